"""Shared fixtures.  The end-to-end fixtures run nnU-Net's real console scripts on real data in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from nnunetv2_vf.workflow import make_subset_dataset, nnunet_environment, run_nnunet

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NNUNETV2_VF_SHARED", REPO.parent / "shared")).resolve()

# One small hippocampus dataset, planned and preprocessed once per test session (2d and 3d_fullres).
HIPPO_ID = 904
HIPPO_NAME = "HippoSmall"
HIPPO_CASES = 16


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        raise RuntimeError(f"shared data folder not found at {SHARED}; set NNUNETV2_VF_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> dict:
    """nnU-Net environment (raw/preprocessed/results in a temporary folder, plugin trainers visible)."""
    root = tmp_path_factory.mktemp("nnunet")
    return nnunet_environment(root, extra={"OMP_NUM_THREADS": "2"})


@pytest.fixture(scope="session")
def hippo_dataset(nnunet_env, shared_dir) -> dict:
    """A 16-case real hippocampus dataset, planned and preprocessed by ``nnUNetv2_plan_and_preprocess``.

    Returns dict(id=..., name=..., raw=Path, env=...).
    """
    raw = make_subset_dataset(shared_dir / "data" / "Dataset004_Hippocampus", nnunet_env["nnUNet_raw"],
                              HIPPO_ID, HIPPO_NAME, HIPPO_CASES)
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", HIPPO_ID, "-c", "2d", "3d_fullres", "-np", "1",
                "--verify_dataset_integrity"], nnunet_env, echo=False)
    return {"id": HIPPO_ID, "name": f"Dataset{HIPPO_ID:03d}_{HIPPO_NAME}", "raw": raw, "env": nnunet_env}


def predict_3d_fold0(images, folder: Path, env: dict, dataset, trainer: str, plans: str) -> Path:
    """Copy ``images`` into ``folder/in`` and run ``nnUNetv2_predict`` (3d_fullres, fold 0, CPU, no TTA, one worker
    each) into ``folder/out``; returns that output folder."""
    import shutil
    inp, out = folder / "in", folder / "out"
    inp.mkdir(parents=True)
    for image in images:
        shutil.copy2(image, inp / Path(image).name)
    run_nnunet(["nnUNetv2_predict", "-i", inp, "-o", out, "-d", str(dataset), "-c", "3d_fullres", "-f", "0",
                "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env,
               echo=False)
    return out


TWO_CHANNEL_ID = 944


@pytest.fixture(scope="session")
def two_channel_hippo(hippo_dataset) -> dict:
    """A real 2-channel dataset: 8 hippocampus MRI cases as channel 0 and their square root (another contrast of the
    same anatomy) as channel 1, planned (``nnUNetPlans``) but not preprocessed. Returns dict(id, name, raw, env,
    cases)."""
    import json
    import shutil
    import SimpleITK as sitk
    env = hippo_dataset["env"]
    name = f"Dataset{TWO_CHANNEL_ID:03d}_HippoTwoChannels"
    raw = Path(env["nnUNet_raw"]) / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    source = hippo_dataset["raw"]
    cases = sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))[:8]
    for case in cases:
        image = sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"), sitk.sitkFloat32)
        sitk.WriteImage(image, str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.Sqrt(sitk.Abs(image)), str(raw / "imagesTr" / f"{case}_0001.nii.gz"))
        shutil.copy2(source / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr")
    dataset_json = json.loads((source / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "channel_names": {"0": "MRI", "1": "sqrtMRI"},
                                                  "numTraining": len(cases), "name": "HippoTwoChannels"}))
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", TWO_CHANNEL_ID, "-c", "3d_fullres", "-np", "1", "--no_pp"],
               env, echo=False)
    return {"id": TWO_CHANNEL_ID, "name": name, "raw": raw, "env": env, "cases": cases}


@pytest.fixture
def two_channel_preprocessed(tmp_path) -> Path:
    """``nnUNet_preprocessed`` holding a planned 2-channel dataset (``Dataset777_TwoChannels``: dataset.json and a
    hand-written nnUNetPlans.json with a PlainConvUNet), for plans adaptation without nnU-Net's planner."""
    import json
    root = tmp_path / "preprocessed"
    folder = root / "Dataset777_TwoChannels"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}}))
    (folder / "nnUNetPlans.json").write_text(json.dumps({
        "plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 56, 40], "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"] * 2, "use_mask_for_norm": [False] * 2,
            "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {}}}}}))
    return root
