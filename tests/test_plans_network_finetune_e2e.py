"""End to end: Volume Fusion pretraining of nnU-Net's own residual-encoder network (``nnUNetv2_vf_pretrain --network
plans --plans nnUNetResEncUNetMPlans.json``), ``nnUNetv2_vf_adapt_plans`` -> ``nnUNetv2_preprocess`` ->
``nnUNetv2_train -tr VFPlansNetworkTrainer_cpu_2epochs_freezeEncoder1ep -pretrained_weights`` ->
``nnUNetv2_predict``, all through the real console scripts on real hippocampus MRI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunetv2_vf.workflow import run_nnunet

from conftest import predict_3d_fold0
from test_pretrain_e2e import COMMON, SMALL  # the PCT-Net version's pretraining settings

RESENC_PLANS = "nnUNetResEncUNetMPlans"
VF_PLANS = "nnUNetResEncUNetMPlans_VF"
TRAINER = "VFPlansNetworkTrainer_cpu_2epochs_freezeEncoder1ep"


@pytest.fixture(scope="module")
def resenc_pretrained(hippo_dataset, tmp_path_factory):
    """ResEnc-M planning of the test dataset, 3 VF pretraining iterations of its network, adapted + preprocessed
    fine-tuning plans."""
    env, did = hippo_dataset["env"], str(hippo_dataset["id"])
    run_nnunet(["nnUNetv2_plan_experiment", "-d", did, "-pl", "nnUNetPlannerResEncM"], env, echo=False)
    folder = Path(env["nnUNet_preprocessed"]) / hippo_dataset["name"]
    out = tmp_path_factory.mktemp("vf_resenc") / "run"
    i = COMMON.index("--features")
    common = COMMON[:i] + COMMON[i + 1 + len(SMALL):]  # --network plans takes the plans' features
    run_nnunet(["nnUNetv2_vf_pretrain", hippo_dataset["raw"], "-o", out, "--iterations", "3", "--network", "plans",
                "--plans", folder / f"{RESENC_PLANS}.json", *common], env, echo=False)
    run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", did, "-a", out / "adaptation_plan.json", "-sp", RESENC_PLANS,
                "-p", VF_PLANS], env, echo=False)
    run_nnunet(["nnUNetv2_preprocess", "-d", did, "-plans_name", VF_PLANS, "-c", "3d_fullres", "-np", "1"], env,
               echo=False)
    return {"weights": out / "checkpoint_final.pth", "plans": json.loads((folder / f"{VF_PLANS}.json").read_text())}


@pytest.mark.slow
def test_resenc_pretrain_adapt_finetune_predict(resenc_pretrained, hippo_dataset, tmp_path):
    """One 2-epoch fine-tune of the decoder-first variant checks the trainer (plans' network, warm-up) and the
    option (frozen for epoch 0, unfrozen on schedule, recorded in the model folder) together: each extra run of a
    24M-parameter network costs minutes on CPU."""
    env, did = hippo_dataset["env"], str(hippo_dataset["id"])
    cfg = resenc_pretrained["plans"]["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert cfg["patch_size"] == [16, 32, 32]
    weights = resenc_pretrained["weights"]
    log = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", TRAINER, "-p", VF_PLANS,
                      "-pretrained_weights", weights, "-device", "cpu"], env, echo=False)
    model_dir = Path(env["nnUNet_results"]) / hippo_dataset["name"] / f"{TRAINER}__{VF_PLANS}__3d_fullres"
    assert "Loading pretrained weights" in log  # nnU-Net's own loader
    # per-iteration schedule over 2 x 4 iterations: one warm-up iteration at half the 1e-3 peak (epoch 0's logged
    # lr), peak at iteration 1, poly decay; epoch 1 starts at iteration 4: 1e-3 * (1 - 3/7)^0.9 = 0.0006
    assert "Current learning rate: 0.0005" in log and "Current learning rate: 0.0006" in log
    assert "FreezeEncoder: encoder frozen" in log and "encoder unfrozen at epoch 1" in log
    assert log.index("encoder frozen") < log.index("Current learning rate: 0.0006") < log.index("unfrozen at epoch 1")
    debug = json.loads((model_dir / "fold_0" / "debug.json").read_text())
    assert debug["freeze_encoder_epochs"] == "1" and debug["batch_size"] == "2"  # recorded in the model folder
    assert json.loads((model_dir / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
        "network_class_name"].endswith("ResidualEncoderUNet")  # the plans' network, kept for prediction

    pre = torch.load(weights, weights_only=True)["network_weights"]
    tuned = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    convs = [k for k, v in pre.items() if v.ndim == 5 and k.startswith("encoder.")]
    moved = sum((tuned[k].float() - pre[k].float()).norm() for k in convs)
    scale = sum(pre[k].float().norm() for k in convs)
    assert convs and 0 < moved < 0.1 * scale  # started from the pretrained encoder, and trained it in epoch 1
    dec = [k for k, v in pre.items() if k.startswith("decoder.stages.") and v.is_floating_point()]
    assert any(not torch.equal(tuned[k], pre[k]) for k in dec)

    outp = predict_3d_fold0(sorted((hippo_dataset["raw"] / "imagesTr").glob("*.nii.gz"))[:1], tmp_path, env, did,
                            TRAINER, VF_PLANS)
    assert len(list(outp.glob("*.nii.gz"))) == 1
