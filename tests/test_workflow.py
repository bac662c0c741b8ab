"""workflow.command_line: console scripts run from their entry point where they are not installed (the borrowed GPU
machine has the wheels unpacked onto PYTHONPATH, no executables)."""
from __future__ import annotations

import subprocess

import pytest

from nnunetv2_vf import workflow
from nnunetv2_vf.nnunet_ext_trainers import TRAINER_DIR


def test_installed_script_is_used_directly():
    cmd = workflow.command_line("nnUNetv2_vf_trainer_dir")
    assert len(cmd) == 1 and cmd[0].endswith("nnUNetv2_vf_trainer_dir")


def test_entry_point_fallback_runs_the_same_command(monkeypatch):
    def missing(name):
        raise FileNotFoundError(name)
    monkeypatch.setattr(workflow, "console_script", missing)
    cmd = workflow.command_line("nnUNetv2_vf_trainer_dir")
    assert cmd[1] == "-c"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.strip() == TRAINER_DIR
    assert "predict_entry_point" in workflow.command_line("nnUNetv2_predict")[2]
    with pytest.raises(FileNotFoundError):
        workflow.command_line("no_such_console_script")
