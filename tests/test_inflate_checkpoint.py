"""``nnUNetv2_vf_inflate_checkpoint`` without training: small 2D networks built in-process, converted into the 3D
network of hand-written plans; readable errors for checkpoints that do not fit; the output passes nnU-Net's own
``-pretrained_weights`` loader unchanged."""
from __future__ import annotations

import subprocess

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunetv2_vf.inflate_checkpoint import build_3d_network, inflate_checkpoint
from nnunetv2_vf.trainers.cross_dimensional import (EncoderUNet2DTrainer, EncoderUNet3DTrainer,
                                                    EncoderUNet3DTrainer_2epochs, inflate_2d_checkpoint)
from nnunetv2_vf.workflow import console_script
from synthetic_plans import nnunet_configuration

DATASET = "Dataset999_Tiny"
STRIDES_3D = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
KERNELS_3D = [[3, 3, 3]] * 3
STRIDES_2D = [[1, 1], [2, 2], [2, 2]]


def _plans() -> dict:
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"2d": nnunet_configuration([32, 32], STRIDES_2D, [[3, 3]] * 3),
                               "3d_fullres": nnunet_configuration([16, 32, 32], STRIDES_3D, KERNELS_3D)}}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz",
                "numTraining": 4}


def _checkpoint_2d(tmp_path, name="ckpt2d.pth", plans=None, trainer=EncoderUNet2DTrainer, heads=None,
                   **arch_overrides) -> tuple:
    """A checkpoint shaped like EncoderUNet2DTrainer's checkpoint_final.pth (random 2D network)."""
    plans = plans or _plans()
    trained_plans, _ = trainer.encoder_unet_plans(plans, "2d")
    arch = trained_plans["configurations"]["2d"]["architecture"]
    arch["arch_kwargs"].update(arch_overrides)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                 heads or 3, deep_supervision=True)
    with torch.no_grad():  # distinctive values, so that loading can be verified
        for p in net.parameters():
            p.normal_()
    path = tmp_path / name
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer.__name__,
                "init_args": {"plans": trained_plans, "configuration": "2d", "fold": 0,
                              "dataset_json": DATASET_JSON}}, path)
    return path, net


def test_converted_file_loads_with_nnunets_stock_loader(tmp_path):
    src, net2d = _checkpoint_2d(tmp_path)
    out = tmp_path / "inflated.pth"
    summary = inflate_checkpoint(src, _plans(), DATASET_JSON, out)
    assert summary["network_class_name"].endswith("EncoderUNet3D") and summary["inflation"] == "i3d"
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert set(saved) == {"network_weights", "inflated_from_2d"}
    w2d, w3d = net2d.state_dict(), saved["network_weights"]
    # encoder AND decoder: i3d inflation, the depth sum gives back the 2D kernel
    for key in ("decoder.blocks.0.0.0.weight", "stem.0.weight", "decoder.seg_layers.0.weight"):
        assert w3d[key].ndim == 5 and torch.allclose(w3d[key].sum(2), w2d[key], atol=1e-5), key
    enc = next(k for k, v in w2d.items() if k.startswith("encoder.") and v.ndim == 4)
    assert torch.allclose(w3d[enc].sum(2), w2d[enc], atol=1e-5)

    # the 3D network of the training run (built the same way) accepts it through nnU-Net's own loader, unchanged
    fresh = build_3d_network(_plans(), DATASET_JSON, "3d_fullres", "EncoderUNet3DTrainer")
    load_pretrained_weights(fresh, str(out))
    got = fresh.state_dict()
    assert torch.equal(got["decoder.blocks.0.0.0.weight"], w3d["decoder.blocks.0.0.0.weight"])
    # ... except the final classifiers, which nnU-Net's loader skips (documented)
    assert not torch.equal(got["decoder.seg_layers.0.weight"], w3d["decoder.seg_layers.0.weight"])


def test_budget_variant_builds_the_same_weights(tmp_path):
    """Tiny trainer variants change batch/patch size only: the weights file fits them too."""
    src, _ = _checkpoint_2d(tmp_path)
    out = tmp_path / "inflated.pth"
    inflate_checkpoint(src, _plans(), DATASET_JSON, out, trainer="EncoderUNet3DTrainer_2epochs")
    load_pretrained_weights(build_3d_network(_plans(), DATASET_JSON, "3d_fullres", EncoderUNet3DTrainer_2epochs),
                            str(out))


@pytest.mark.parametrize("case,match", [
    ("dataset", r"trained on Dataset998_Other.*train the 2d configuration of Dataset999_Tiny"),
    ("classes", r"predicts 5 outputs, Dataset999_Tiny needs 3.*train the 2d configuration"),
    ("encoder", r"encoder_name='mobilenetv3_small_050'.*'efficientnet_lite0'.*nnUNetv2_vf_plan_network -d "
                r"Dataset999_Tiny -c 3d_fullres --network EncoderUNet3D --encoder mobilenetv3_small_050 -p NEW_PLANS "
                r"and give -p NEW_PLANS to the conversion AND the 3D training"),
    ("norm", r"norm='instance'.*norm='batch'.*--network EncoderUNet3D --norm instance -p NEW_PLANS"),
    ("not_encoder_unet", r"holds a dynamic_network_architectures.*PlainConvUNet.*not an EncoderUNet2D"),
    ("not_2d", r"no 2D encoder U-Net weights"),
    ("no_weights", r"holds no 'network_weights'"),
])
def test_conversion_errors_name_problem_and_fix(tmp_path, case, match):
    out = tmp_path / "inflated.pth"
    if case == "dataset":
        plans = _plans()
        plans["dataset_name"] = "Dataset998_Other"
        src, _ = _checkpoint_2d(tmp_path, plans=plans)
    elif case == "classes":
        src, _ = _checkpoint_2d(tmp_path, heads=5)
    elif case == "encoder":
        src, _ = _checkpoint_2d(tmp_path, encoder_name="mobilenetv3_small_050")
    elif case == "norm":
        src, _ = _checkpoint_2d(tmp_path, norm="instance")
    elif case == "not_encoder_unet":
        src = tmp_path / "plain.pth"
        torch.save({"network_weights": {"decoder.x.weight": torch.zeros(1, 1, 3, 3)}, "trainer_name": "nnUNetTrainer",
                    "init_args": {"plans": _plans(), "configuration": "2d"}}, src)
    elif case == "not_2d":
        net3d = build_3d_network(_plans(), DATASET_JSON)
        src = tmp_path / "3d.pth"
        torch.save({"network_weights": net3d.state_dict()}, src)
    else:
        src = tmp_path / "raw.pth"
        torch.save({"model_state_dict": {}}, src)
    with pytest.raises(ValueError, match=match):
        inflate_checkpoint(src, _plans(), DATASET_JSON, out)
    assert not out.exists()


def test_pure_function_refuses_before_changing_weights(tmp_path):
    src, _ = _checkpoint_2d(tmp_path, heads=5)
    net3d = build_3d_network(_plans(), DATASET_JSON)
    before = {k: v.clone() for k, v in net3d.state_dict().items()}
    with pytest.raises(ValueError, match="predicts 5 outputs"):
        inflate_2d_checkpoint(net3d, torch.load(src, weights_only=False), str(src), DATASET)
    assert all(torch.equal(before[k], v) for k, v in net3d.state_dict().items())


def test_trainer_argument_must_be_a_3d_encoder_unet_trainer(tmp_path):
    src, _ = _checkpoint_2d(tmp_path)
    with pytest.raises(ValueError, match="not an EncoderUNet3DTrainer"):
        inflate_checkpoint(src, _plans(), DATASET_JSON, tmp_path / "o.pth", trainer="EncoderUNet2DTrainer")


def test_console_script_reports_errors_without_traceback(tmp_path):
    src, _ = _checkpoint_2d(tmp_path)
    env = {"PATH": "", "nnUNet_preprocessed": str(tmp_path / "pre"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([console_script("nnUNetv2_vf_inflate_checkpoint"), str(src), "-d", DATASET, "-o",
                           str(tmp_path / "o.pth")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "nnUNetv2_plan_and_preprocess" in proc.stderr, proc.stderr


def test_raw_2d_checkpoint_is_refused_by_nnunets_own_loader(tmp_path):
    """Documented: nothing intercepts -pretrained_weights; an unconverted 2D checkpoint gets nnU-Net's assertion."""
    src, _ = _checkpoint_2d(tmp_path)
    with pytest.raises(AssertionError, match="shape of the parameters"):
        load_pretrained_weights(build_3d_network(_plans(), DATASET_JSON), str(src))


def test_3d_plans_of_the_plans_writer_take_another_encoder_and_rule(tmp_path):
    """The fix the errors name works: 3D plans written for the 2D run's encoder (and the centre rule) accept its
    checkpoint, and the converted file holds that encoder inflated with that rule."""
    from nnunetv2_vf.plan_network import network_plans

    src, net2d = _checkpoint_2d(tmp_path, encoder_name="resnet18", norm="instance")
    plans3d = network_plans(_plans(), "3d_fullres", "EncoderUNet3D", "nnUNetPlans_resnet18",
                            encoder="resnet18", norm="instance", inflation="centre")
    out = tmp_path / "inflated.pth"
    summary = inflate_checkpoint(src, plans3d, DATASET_JSON, out)
    assert (summary["encoder_name"], summary["norm"], summary["inflation"]) == (
        "resnet18", "instance", "centre")
    w2d, w3d = net2d.state_dict(), torch.load(out, weights_only=True)["network_weights"]
    enc = next(k for k, v in w2d.items() if k.startswith("encoder.") and v.ndim == 4 and v.shape[-1] == 3)
    centre = w3d[enc][:, :, w3d[enc].shape[2] // 2]  # centre rule: the 2D kernel in the middle slice only
    off_centre = torch.cat([w3d[enc][:, :, :w3d[enc].shape[2] // 2], w3d[enc][:, :, w3d[enc].shape[2] // 2 + 1:]], 2)
    assert torch.allclose(centre, w2d[enc]) and not off_centre.any()
    load_pretrained_weights(build_3d_network(plans3d, DATASET_JSON), str(out))
