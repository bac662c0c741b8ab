"""End to end: ``nnUNetv2_vf_pretrain`` (single process, resume, torchrun DDP) on real hippocampus MRI, then
``nnUNetv2_vf_adapt_plans`` -> ``nnUNetv2_preprocess`` -> ``nnUNetv2_train -tr VFPretrainedTrainer_small_2epochs
-pretrained_weights`` -> ``nnUNetv2_predict``, all through the real console scripts; the same for a two-channel
dataset (the image and a transformed copy), whose pretrained stem is repeated over the channels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_vf.architectures.pctnet import SMALL_FEATURES, PCTNet
from nnunetv2_vf.workflow import console_script, run_nnunet

from conftest import predict_3d_fold0

SMALL = [str(f) for f in SMALL_FEATURES]
COMMON = ["--batch-size", "2", "--patch-size", "16", "32", "32", "--features", *SMALL, "--modality", "MR",
          "--device", "cpu", "--num-workers", "0", "--val-every", "2", "--val-samples", "2", "--seed", "7"]
PLANS = "nnUNetPlans_VF"


@pytest.fixture(scope="module")
def pretrain_inputs(hippo_dataset, tmp_path_factory, shared_dir):
    """The test dataset's raw folder plus a plain folder with one more real image and one corrupt file."""
    extra = tmp_path_factory.mktemp("unlabelled")
    src = sorted((shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))[-1]
    shutil.copy2(src, extra / src.name)
    (extra / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return [str(hippo_dataset["raw"]), str(extra)]


@pytest.fixture(scope="module")
def pretrained(pretrain_inputs, hippo_dataset, tmp_path_factory):
    """3 iterations, then ``--continue`` to 5: the resumed run."""
    out = tmp_path_factory.mktemp("vf_pretrain") / "run"
    cache = out.parent / "cache"
    env = hippo_dataset["env"]
    first = run_nnunet(["nnUNetv2_vf_pretrain", *pretrain_inputs, "-o", out, "--iterations", "3", *COMMON,
                        "--cache-dir", cache], env, echo=False)
    second = run_nnunet(["nnUNetv2_vf_pretrain", *pretrain_inputs, "-o", out, "--iterations", "5", "--continue",
                         *COMMON, "--cache-dir", cache], env, echo=False)
    return {"dir": out, "cache": cache, "first_log": first, "second_log": second}


@pytest.mark.slow
def test_pretrain_outputs_and_exact_resume(pretrained, pretrain_inputs, hippo_dataset):
    out = pretrained["dir"]
    assert "corrupt_0000.nii.gz" in pretrained["first_log"]  # the corrupt file was named and skipped
    assert "resumed from" in pretrained["second_log"] and "at iteration 3" in pretrained["second_log"]
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "adaptation_plan.json", "progress.png",
                 "validation_set.npz", "config.json"):
        assert (out / name).is_file(), name
    final = torch.load(out / "checkpoint_final.pth", weights_only=True)  # plain tensors and builtins only
    assert final["iteration"] == 5
    net = PCTNet(1, 5, features_per_stage=[int(f) for f in SMALL])
    net.load_state_dict(final["network_weights"])  # exactly the PCTNet layout
    from test_nnssl_interop import read_like_nnunet_master
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):  # nnU-Net master's nnssl route reads both
        assert read_like_nnunet_master(out / name)["pretrain_patch_size"] == [16, 32, 32]
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)  # RNG states as plain lists too
    assert latest["logs"]["iteration"] == [2, 3, 4, 5]
    assert latest["logs"]["train_iteration"] == [1, 2, 3, 4, 5]  # the loss curve has more points than validation
    log = (out / "training_log.txt").read_text()
    assert "warning: skipping unreadable image" in log and "corrupt_0000.nii.gz" in log  # not only on stderr
    assert all(np.isfinite(latest["logs"]["train_loss"])) and all(0 <= d <= 1 for d in latest["logs"]["val_dice"])
    plan = json.loads((out / "adaptation_plan.json").read_text())
    assert plan["patch_size"] == [16, 32, 32] and plan["volume_fusion"]["variant"] == "paper"
    assert plan["preprocessing"]["nnunet_normalization_scheme"] == "ZScoreNormalization"
    assert plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] == list(SMALL_FEATURES)
    assert plan["num_pretraining_images"] == 17  # 16 dataset images + 1 extra; the corrupt one is not counted
    assert "on 17 volumes" in pretrained["first_log"]

    # an uninterrupted 5-iteration run gives the same weights as 3 + resumed 2
    straight = out.parent / "straight"
    run_nnunet(["nnUNetv2_vf_pretrain", *pretrain_inputs, "-o", straight, "--iterations", "5", *COMMON,
                "--cache-dir", pretrained["cache"]], hippo_dataset["env"], echo=False)
    ref = torch.load(straight / "checkpoint_final.pth", weights_only=True)["network_weights"]
    for k, v in final["network_weights"].items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.slow
def test_pretrain_ddp_torchrun_cpu(pretrain_inputs, hippo_dataset, tmp_path):
    out = tmp_path / "ddp"
    log = run_nnunet(["torchrun", "--nproc_per_node", "2", console_script("nnUNetv2_vf_pretrain"),
                      *pretrain_inputs, "-o", out, "--iterations", "2", *COMMON],
                     dict(hippo_dataset["env"], OMP_NUM_THREADS="1"), echo=False)
    assert "x 2 process(es)" in log
    final = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert final["iteration"] == 2
    assert json.loads((out / "adaptation_plan.json").read_text())["optimizer"]["world_size"] == 2


@pytest.mark.slow
def test_adapt_plans_finetune_and_predict(pretrained, hippo_dataset, tmp_path):
    env, did = hippo_dataset["env"], str(hippo_dataset["id"])
    run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", did, "-a", pretrained["dir"] / "adaptation_plan.json",
                "-p", PLANS], env, echo=False)
    plans_file = Path(env["nnUNet_preprocessed"]) / hippo_dataset["name"] / f"{PLANS}.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"] == "nnunetv2_vf.architectures.pctnet.PCTNet"
    assert cfg["patch_size"] == [16, 32, 32] and cfg["normalization_schemes"] == ["ZScoreNormalization"]
    run_nnunet(["nnUNetv2_preprocess", "-d", did, "-plans_name", PLANS, "-c", "3d_fullres", "-np", "1"], env,
               echo=False)
    weights = pretrained["dir"] / "checkpoint_final.pth"
    log = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "VFPretrainedTrainer_small_2epochs",
                      "-p", PLANS, "-pretrained_weights", weights, "-device", "cpu"], env, echo=False)
    assert "Loading pretrained weights" in log  # nnU-Net's own loader (the plugin does not intercept it)

    model_dir = (Path(env["nnUNet_results"]) / hippo_dataset["name"] /
                 f"VFPretrainedTrainer_small_2epochs__{PLANS}__3d_fullres")
    tuned = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    pre = torch.load(weights, weights_only=True)["network_weights"]
    torch.manual_seed(0)
    random_init = PCTNet(1, 3, features_per_stage=[int(f) for f in SMALL]).state_dict()
    convs = [k for k, v in pre.items() if v.ndim == 5 and ".seg_layers." not in k]
    moved = sum((tuned[k].float() - pre[k].float()).norm() for k in convs)
    random_distance = sum((random_init[k] - pre[k].float()).norm() for k in convs)
    assert moved < 0.1 * random_distance  # fine-tuning started from the pretrained weights

    outp = predict_3d_fold0(sorted((hippo_dataset["raw"] / "imagesTr").glob("*.nii.gz"))[:2], tmp_path, env, did,
                            "VFPretrainedTrainer_small_2epochs", PLANS)
    assert len(list(outp.glob("*.nii.gz"))) == 2


@pytest.mark.slow
def test_finetune_rejects_unconverted_misfm_weights(hippo_dataset, shared_dir):
    """The authors' raw MIS-FM file is refused by nnU-Net's own ``-pretrained_weights`` loader (no
    'network_weights'; the trainer does not intercept the loader nor read the command line).  The readable
    diagnosis that names the converter comes from the pre-flight check ``check_pretrained_compatibility``."""
    from nnunetv2_vf.trainers.vf_pretrained_trainer import check_pretrained_compatibility

    env, did = hippo_dataset["env"], str(hippo_dataset["id"])
    fixture = shared_dir / "fixtures" / "pctnet" / "pctnet_public_checkpoint.pt"
    with pytest.raises(RuntimeError) as e:
        run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "VFPretrainedTrainer_small_2epochs",
                    "-pretrained_weights", fixture, "-device", "cpu"], env, echo=False)
    assert "network_weights" in str(e.value)
    with pytest.raises(ValueError, match="MIS-FM authors' format.*nnUNetv2_vf_convert_misfm"):
        check_pretrained_compatibility(torch.nn.Conv3d(1, 1, 1), str(fixture))


@pytest.mark.slow
def test_pretrain_plans_network(pretrain_inputs, hippo_dataset, tmp_path):
    """``--network plans``: nnU-Net's own planned PlainConvUNet from the dataset's plans file is pretrained."""
    plans_file = Path(hippo_dataset["env"]["nnUNet_preprocessed"]) / hippo_dataset["name"] / "nnUNetPlans.json"
    out = tmp_path / "plans_net"
    i = COMMON.index("--features")
    common = COMMON[:i] + COMMON[i + 1 + len(SMALL):]
    run_nnunet(["nnUNetv2_vf_pretrain", *pretrain_inputs, "-o", out, "--iterations", "2", "--network", "plans",
                "--plans", plans_file, *common], hippo_dataset["env"], echo=False)
    plan = json.loads((out / "adaptation_plan.json").read_text())
    arch = plan["architecture_plans"]
    assert arch["arch_class_name"].endswith("PlainConvUNet")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    net = get_network_from_plans(arch["arch_class_name"], arch["arch_kwargs"], arch["arch_kwargs_requiring_import"],
                                 1, 3, deep_supervision=True)
    weights = torch.load(out / "checkpoint_final.pth", weights_only=True)["network_weights"]
    own = net.state_dict()
    assert all(weights[k].shape == v.shape for k, v in own.items() if ".seg_layers." not in k)


@pytest.mark.slow
def test_two_channel_dataset_finetunes_from_single_channel_pretraining(pretrained, two_channel_hippo, tmp_path):
    """Real hippocampus MRI as channel 0 and its square root (another contrast of the same anatomy) as
    channel 1; adapt_plans writes 2-channel plans and weights; stock preprocess / train / predict run on them."""
    import SimpleITK as sitk
    env, did, name, raw, cases = (two_channel_hippo[k] for k in ("env", "id", "name", "raw", "cases"))
    did = str(did)
    log = run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", did, "-a", pretrained["dir"] / "adaptation_plan.json",
                      "-p", PLANS], env, echo=False)
    weights = pretrained["dir"] / "checkpoint_final_2ch.pth"
    assert f"-pretrained_weights {weights}" in log
    converted = torch.load(weights, weights_only=True)["network_weights"]
    single = torch.load(pretrained["dir"] / "checkpoint_final.pth", weights_only=True)["network_weights"]
    assert converted["stem.proj.weight"].shape[1] == 2
    torch.testing.assert_close(converted["stem.proj.weight"].sum(1, keepdim=True), single["stem.proj.weight"])
    run_nnunet(["nnUNetv2_preprocess", "-d", did, "-plans_name", PLANS, "-c", "3d_fullres", "-np", "1"], env,
               echo=False)
    log = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "VFPretrainedTrainer_small_2epochs",
                      "-p", PLANS, "-pretrained_weights", weights, "-device", "cpu"], env, echo=False)
    assert "Loading pretrained weights" in log
    model_dir = Path(env["nnUNet_results"]) / name / f"VFPretrainedTrainer_small_2epochs__{PLANS}__3d_fullres"
    tuned = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert tuned["stem.proj.weight"].shape[1] == 2
    outp = predict_3d_fold0(sorted((raw / "imagesTr").glob(f"{cases[0]}_*.nii.gz")), tmp_path, env, did,
                            "VFPretrainedTrainer_small_2epochs", PLANS)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(outp / f"{cases[0]}.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{cases[0]}.nii.gz")))
    assert predicted.shape == label.shape and set(np.unique(predicted)) <= {0, 1, 2}
