"""Every option of the plugin's console scripts has help text and no untruthful default: the real ``-h`` output of
each installed script is checked (argparse's ArgumentDefaultsHelpFormatter would print '(default: None)' next to
help text that states the real default, and '(default: True)' next to an off-switch)."""
from __future__ import annotations

import re
import subprocess

import pytest

from nnunetv2_vf.workflow import console_script

SCRIPTS = ("nnUNetv2_vf_pretrain", "nnUNetv2_vf_adapt_plans", "nnUNetv2_vf_convert_misfm",
           "nnUNetv2_vf_convert_nnssl", "nnUNetv2_vf_inflate_checkpoint", "nnUNetv2_vf_plan_network",
           "nnUNetv2_vf_demo", "nnUNetv2_vf_check_inputs")


def test_every_console_script_with_options_is_checked():
    import tomllib
    from pathlib import Path
    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) - {"nnUNetv2_vf_trainer_dir"} == set(SCRIPTS)  # trainer_dir takes no options


def _entries(help_text: str) -> dict[str, str]:
    """{invocation: help} of the argument sections of an argparse help page."""
    entries: dict[str, str] = {}
    current = None
    for section in re.split(r"\n(?=\S[^\n]*:\n)", help_text):
        title, _, body = section.partition("\n")
        if not title.rstrip().endswith(":") or not ("argument" in title or title.startswith("options")):
            continue
        for line in body.splitlines():
            m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
            if m and not line.startswith("   "):  # a new entry: invocation [two spaces help]
                current = m.group(1).strip()
                entries[current] = m.group(2) or ""
            elif current and line.strip():
                entries[current] += " " + line.strip()
    return {k: re.sub(r"\s+", " ", v).strip() for k, v in entries.items()}


@pytest.fixture(scope="module", params=SCRIPTS)
def help_page(request) -> tuple[str, dict[str, str]]:
    proc = subprocess.run([console_script(request.param), "-h"], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "100", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    return request.param, _entries(proc.stdout)


def test_every_option_has_help(help_page):
    script, entries = help_page
    assert len(entries) >= 3, entries
    missing = [k for k, v in entries.items() if not v]
    assert not missing, f"{script}: options without help text: {missing}"


def test_no_untruthful_defaults(help_page):
    script, entries = help_page
    wrong = [k for k, v in entries.items() if "default: None" in v]
    assert not wrong, f"{script}: '(default: None)' shown for {wrong}"
    contradicting = [k for k, v in entries.items() if re.search(r"\(default: (True|False)\)", v)]
    assert not contradicting, f"{script}: on/off flags with a misleading default: {contradicting}"


def test_pretrain_help_states_modality_and_augmentation_truthfully():
    page = _entries(subprocess.run([console_script("nnUNetv2_vf_pretrain"), "-h"], capture_output=True, text=True,
                                   timeout=120, env={"COLUMNS": "100", "PATH": ""}).stdout)
    modality = next(v for k, v in page.items() if k.startswith("--modality"))
    assert "Required for plain image folders" in modality and "dataset.json" in modality
    augmentation = next(v for k, v in page.items() if k.startswith("--augmentation"))
    assert "the authors' recipe, the default" in augmentation and "'nnunet'" in augmentation
    assert "--augmentation none" in page["--no-augmentation"]
    assert "--overwrite" in page and "--continue" in page


def test_convert_misfm_says_its_output_is_a_file():
    page = _entries(subprocess.run([console_script("nnUNetv2_vf_convert_misfm"), "-h"], capture_output=True,
                                   text=True, timeout=120, env={"COLUMNS": "100", "PATH": ""}).stdout)
    assert "FILE" in page["output"]
