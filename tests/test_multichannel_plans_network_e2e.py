"""End to end: ``nnUNetv2_vf_pretrain --network plans`` of nnU-Net's PlainConvUNet and ResidualEncoderUNet on
single-channel hippocampus MRI, then a real 2-channel dataset through ``nnUNetv2_vf_adapt_plans`` (which writes the
``_2ch.pth`` weights), ``nnUNetv2_preprocess``, ``nnUNetv2_train -pretrained_weights <..._2ch.pth>`` and
``nnUNetv2_predict``. nnU-Net's U-Nets hold their first convolution under four state-dict names; nnU-Net's own loader
checks every one of them, so all four must be widened."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from nnunetv2_vf.workflow import run_nnunet

from conftest import predict_3d_fold0
from test_pretrain_e2e import COMMON, SMALL  # the PCT-Net version's pretraining settings

TRAINER = "VFPlansNetworkTrainer_cpu_2epochs"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def small_plans(plans: dict, network: str) -> dict:
    """``plans`` whose 3d_fullres network is the planned one at 8 features in the first stage (and, for
    ``ResidualEncoderUNet``, residual blocks): a plans file the stock commands accept, minutes cheaper on CPU."""
    plans = copy.deepcopy(plans)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    kwargs = arch["arch_kwargs"]
    kwargs["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(kwargs["n_stages"])]
    if network == "ResidualEncoderUNet":
        arch["network_class_name"] = RESENC
        kwargs["n_blocks_per_stage"] = [1] * kwargs["n_stages"]
        kwargs.pop("n_conv_per_stage")
    plans["plans_name"] = f"tiny{network}"
    return plans


@pytest.mark.slow
@pytest.mark.parametrize("network", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_plans_network_pretraining_finetunes_a_two_channel_dataset(network, hippo_dataset, two_channel_hippo,
                                                                   tmp_path):
    env, did = two_channel_hippo["env"], str(two_channel_hippo["id"])
    folder = Path(env["nnUNet_preprocessed"])
    plans_file = tmp_path / f"tiny{network}.json"
    plans_file.write_text(json.dumps(small_plans(json.loads(
        (folder / hippo_dataset["name"] / "nnUNetPlans.json").read_text()), network)))
    out = tmp_path / "pretrain"
    i = COMMON.index("--features")
    common = COMMON[:i] + COMMON[i + 1 + len(SMALL):]  # --network plans takes the plans' features
    run_nnunet(["nnUNetv2_vf_pretrain", hippo_dataset["raw"], "-o", out, "--iterations", "2", "--network", "plans",
                "--plans", plans_file, *common], env, echo=False)
    plans = f"nnUNetPlans_VF_{network}"
    log = run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", did, "-a", out / "adaptation_plan.json", "-p", plans], env,
                     echo=False)
    weights = out / "checkpoint_final_2ch.pth"
    assert f"-pretrained_weights {weights}" in log
    single = torch.load(out / "checkpoint_final.pth", weights_only=True)["network_weights"]
    double = torch.load(weights, weights_only=True)["network_weights"]
    widened = [k for k in double if double[k].shape != single[k].shape]
    assert len(widened) == 4 and sum(k.startswith("decoder.encoder.") for k in widened) == 2  # every name of it
    for k in widened:
        assert double[k].shape[1] == 2
        torch.testing.assert_close(double[k].sum(1, keepdim=True), single[k])

    run_nnunet(["nnUNetv2_preprocess", "-d", did, "-plans_name", plans, "-c", "3d_fullres", "-np", "1"], env,
               echo=False)
    log = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", TRAINER, "-p", plans, "-pretrained_weights",
                      weights, "-device", "cpu"], env, echo=False)
    assert "Loading pretrained weights" in log  # nnU-Net's own loader, which checks every tensor's shape
    model_dir = Path(env["nnUNet_results"]) / two_channel_hippo["name"] / f"{TRAINER}__{plans}__3d_fullres"
    assert json.loads((model_dir / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
        "network_class_name"].endswith(network)
    case = two_channel_hippo["cases"][0]
    outp = predict_3d_fold0(sorted((two_channel_hippo["raw"] / "imagesTr").glob(f"{case}_*.nii.gz")), tmp_path, env,
                            did, TRAINER, plans)
    assert (outp / f"{case}.nii.gz").is_file()
