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
