"""The README's test command is what CI runs; the README's commands exist."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"## The two commands\s+```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    demo, test = _readme_commands()
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()
                if l.strip() and not l.lstrip().startswith("#")]
    assert test in ci_lines
    for command in (demo, test):
        script = command.split()[1]
        assert (REPO / script).is_file(), script


def _section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start: text.index("\n## ", start + 1)]


def test_readme_says_ci_runs_the_test_command_and_documents_the_demo_options(capsys):
    import pytest

    from nnunetv2_vf import demo

    section = _section("The two commands")
    assert "bash scripts/test.sh" in section and "what CI runs" in section
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    demo_help = capsys.readouterr().out
    for option in ("-o", "--overwrite", "--quick", "--device", "--no-pretraining", "--dry-run", "--verbose"):
        assert f"`{option}" in section, option
        assert option in demo_help, option


def test_readme_demo_durations_match_the_demos_estimates():
    """The README quotes the estimates the demo prints (rounded); both say how they were measured."""
    import argparse
    import re

    from nnunetv2_vf import demo

    def total(quick: bool) -> float:
        args = argparse.Namespace(output="/nonexistent/demo", dry_run=True, quick=quick, no_pretraining=False,
                                  device="cpu", verbose=False)
        d = demo.Demo(args)
        return sum(d.estimate_s(s) for s in d.steps) / 60

    section = _section("The two commands")
    full = float(re.search(r"quiet 2-core CPU \(about ([\d.]+) min", section).group(1))
    quick = float(re.search(r"`--quick` about ([\d.]+) min", section).group(1))
    assert abs(full - total(False)) < 0.05 and abs(quick - total(True)) < 0.5
    assert f"about {full:g} min on a quiet 2-core CPU" in demo.__doc__
