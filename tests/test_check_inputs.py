"""``nnUNetv2_vf_check_inputs``: inputs that cannot be right for a model (wrong channel count, 2D images for a 3D
model, empty or unreadable files, wrong names) are named case by case from the headers alone, before
``nnUNetv2_predict`` would spend minutes on them; good inputs pass."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from nnunetv2_vf.workflow import console_script

ENDING = ".nii.gz"


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "VFPretrainedTrainer__nnUNetPlans_VF__3d_fullres"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                     "labels": {"background": 0, "a": 1}, "file_ending": ENDING}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"patch_size": [16, 32, 32]}}}))
    return folder


def _images(shared_dir, folder, channels=2, n=2):
    folder.mkdir()
    source = sorted((shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr").glob(f"*{ENDING}"))[:n]
    for image in source:
        case = image.name[: -len("_0000" + ENDING)]
        for c in range(channels):
            shutil.copy2(image, folder / f"{case}_{c:04d}{ENDING}")
    return folder


def _run(*args):
    return subprocess.run([console_script("nnUNetv2_vf_check_inputs"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_good_inputs_pass(shared_dir, tmp_path, model):
    ok = _run("-i", _images(shared_dir, tmp_path / "in"), "-m", model)
    assert ok.returncode == 0, ok.stderr
    assert "2 case(s)" in ok.stdout and "2 channel(s) (T2, ADC), 3D" in ok.stdout


def test_each_wrong_input_is_named_with_the_fix(shared_dir, tmp_path, model):
    import SimpleITK as sitk
    folder = _images(shared_dir, tmp_path / "in", channels=1, n=2)  # one channel for a 2-channel model
    cases = sorted({p.name[: -len("_0000" + ENDING)] for p in folder.iterdir()})
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.float32)), str(folder / f"flat_0000{ENDING}"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.float32)), str(folder / f"flat_0001{ENDING}"))
    (folder / f"empty_0000{ENDING}").write_bytes(b"")
    (folder / f"empty_0001{ENDING}").write_bytes(b"not an image")
    (folder / f"badname{ENDING}").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = _run("-i", folder, "-m", model)
    assert proc.returncode == 1
    err = proc.stderr
    assert f"case {cases[0]}: 1 channel file(s), the model takes 2 (0000 T2, 0001 ADC); missing " \
           f"{cases[0]}_0001{ENDING}" in err, err
    assert "flat_0000.nii.gz: a 2D image of size 30x20; this 3D model (3d_fullres) needs 3D volumes" in err
    assert "empty_0000.nii.gz: empty file" in err and "empty_0001.nii.gz: unreadable" in err
    assert "badname.nii.gz: not named CASE_XXXX.nii.gz" in err
    assert err.strip().splitlines()[-1].startswith("Fix: give every case one file per channel")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # reads headers only, changes nothing


def test_missing_model_or_folder(tmp_path, model):
    proc = _run("-i", tmp_path / "nowhere", "-m", model)
    assert proc.returncode == 1 and "input folder" in proc.stderr and "does not exist" in proc.stderr
    proc = _run("-i", tmp_path, "-m", tmp_path)
    assert proc.returncode == 1 and "has no dataset.json or plans.json" in proc.stderr
