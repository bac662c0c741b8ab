"""PCT-Net through nnU-Net's own console scripts on real hippocampus MRI (CPU, a few iterations)."""
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_vf.workflow import nnunet_environment, run_nnunet

TRAINER = "PCTNetTrainer_small_2epochs"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(hippo_dataset):
    env = hippo_dataset["env"]
    run_nnunet(["nnUNetv2_train", hippo_dataset["id"], "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu", "--npz"],
               env, echo=False)
    model_dir = Path(env["nnUNet_results"]) / hippo_dataset["name"] / f"{TRAINER}__nnUNetPlans__3d_fullres"
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / hippo_dataset["name"] / "splits_final.json").read_text())
    return dict(hippo_dataset, model_dir=model_dir, val_cases=splits[0]["val"][:2])


def _copy_images(raw: Path, cases, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy2(raw / "imagesTr" / f"{case}_0000.nii.gz", target)
    return target


def test_training_writes_pctnet_plans_and_checkpoint(trained):
    plans = json.loads((trained["model_dir"] / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"] == "nnunetv2_vf.architectures.pctnet.PCTNet"
    assert cfg["patch_size"] == [40, 64, 48]  # nnU-Net planned [40, 56, 40]; PCT-Net r=1 needs (8, 16, 16)
    ckpt = torch.load(trained["model_dir"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    assert any(k.startswith("decoder.seg_layers.") for k in ckpt["network_weights"])
    assert (trained["model_dir"] / "fold_0" / "progress.png").stat().st_size > 0
    summary = json.loads((trained["model_dir"] / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_predict_and_evaluate(trained, tmp_path):
    env, raw = trained["env"], trained["raw"]
    images = _copy_images(raw, trained["val_cases"], tmp_path / "images")
    out = tmp_path / "pred"
    run_nnunet(["nnUNetv2_predict", "-i", images, "-o", out, "-d", trained["id"], "-c", "3d_fullres", "-tr", TRAINER,
                "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1], env, echo=False)
    gt = tmp_path / "gt"
    gt.mkdir()
    for case in trained["val_cases"]:
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}
        shutil.copy2(raw / "labelsTr" / f"{case}.nii.gz", gt)
    run_nnunet(["nnUNetv2_evaluate_simple", gt, out, "-l", 1, 2, "-o", tmp_path / "summary.json"], env, echo=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(trained["val_cases"])
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_challenge_workflow_find_best_ensemble_export(trained, tmp_path):
    env, raw = trained["env"], trained["raw"]
    run_nnunet(["nnUNetv2_find_best_configuration", trained["id"], "-c", "3d_fullres", "-tr", TRAINER, "-f", 0,
                "-np", 1], env, echo=False)
    instructions = Path(env["nnUNet_results"]) / trained["name"] / "inference_instructions.txt"
    assert TRAINER in instructions.read_text()

    images = _copy_images(raw, trained["val_cases"][:1], tmp_path / "images")
    outs = []
    for chk in ("checkpoint_final.pth", "checkpoint_best.pth"):
        out = tmp_path / chk.split(".")[0]
        run_nnunet(["nnUNetv2_predict", "-i", images, "-o", out, "-d", trained["id"], "-c", "3d_fullres", "-tr",
                    TRAINER, "-f", 0, "-chk", chk, "-device", "cpu", "--save_probabilities", "-npp", 1, "-nps", 1],
                   env, echo=False)
        outs.append(out)
    run_nnunet(["nnUNetv2_ensemble", "-i", *outs, "-o", tmp_path / "ens", "-np", 1], env, echo=False)
    assert (tmp_path / "ens" / f"{trained['val_cases'][0]}.nii.gz").exists()

    zip_path = tmp_path / "model.zip"
    run_nnunet(["nnUNetv2_export_model_to_zip", "-d", trained["id"], "-o", zip_path, "-c", "3d_fullres", "-tr",
                TRAINER, "-f", 0], env, echo=False)
    names = zipfile.ZipFile(zip_path).namelist()
    assert any(n.endswith("fold_0/checkpoint_final.pth") for n in names)
    # a fresh results folder (as in an offline container) installs the zip and predicts with it
    fresh = nnunet_environment(tmp_path / "container")
    run_nnunet(["nnUNetv2_install_pretrained_model_from_zip", zip_path], fresh, echo=False)
    run_nnunet(["nnUNetv2_predict", "-i", images, "-o", tmp_path / "container_pred", "-d", trained["id"], "-c",
                "3d_fullres", "-tr", TRAINER, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1], fresh, echo=False)
    assert (tmp_path / "container_pred" / f"{trained['val_cases'][0]}.nii.gz").exists()
