"""nnssl interoperability: the ``nnssl_adaptation_plan`` every checkpoint embeds is what nnU-Net master's nnssl route
reads, and ``nnUNetv2_vf_convert_nnssl`` converts checkpoints built the way nnssl's trainers save them (a whole
ResEnc U-Net; an encoder with a projection head, as its contrastive methods write) into weights nnU-Net 2.8's own
``-pretrained_weights`` loader accepts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunetv2_vf.architectures.pctnet import SMALL_FEATURES, PCTNet
from nnunetv2_vf.pretrain.adaptation_plan import AdaptationPlan, network_keys
from nnunetv2_vf.pretrain.nnssl_format import (NNSSL_PLAN_KEY, NNSSL_PRESETS, convert_nnssl_checkpoint,
                                               nnssl_checkpoint_fields)
from nnunetv2_vf.workflow import run_nnunet

from conftest import predict_3d_fold0

TINY_RESENC = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
               "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
               "n_blocks_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
               "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
               "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
               "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
RESENC_KEYS = {"key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
               "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]}


def read_like_nnunet_master(path: Path) -> dict:
    """The fields nnU-Net master's nnssl route reads from a checkpoint (``nnUNetv2_preprocess_like_nnssl`` and
    ``PretrainedTrainer.load_pretrained_weights``), each with the type it uses; then its loading step: the network
    built from ``architecture_plans`` takes the encoder and the stem by the plan's keys."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    ckpt = torch.load(path, weights_only=True, map_location="cpu")  # master loads weights-only
    plan = ckpt[NNSSL_PLAN_KEY]
    config_name, config = next(iter(plan["pretrain_plan"]["configurations"].items()))
    assert isinstance(config_name, str)
    assert config["spacing"] is None or (len(config["spacing"]) == 3 and all(s > 0 for s in config["spacing"]))
    assert len(config["patch_size"]) == 3 and all(isinstance(p, int) for p in config["patch_size"])
    assert config["spacing_style"] in ("onemmiso", "median", "noresample")
    arch = plan["architecture_plans"]
    assert isinstance(arch["arch_class_name"], str) and isinstance(arch["arch_kwargs"], dict)
    assert isinstance(arch["arch_kwargs_requiring_import"], list)
    for key in ("key_to_encoder", "key_to_stem"):
        assert isinstance(plan[key], str)
    assert isinstance(plan["keys_to_in_proj"], list) and plan["keys_to_in_proj"]
    assert "key_to_lpe" in plan  # read with [], so present even when None
    assert isinstance(plan["pretrain_num_input_channels"], int)
    assert len(plan["recommended_downstream_patchsize"]) == 3
    for citation in ckpt.get("citations", []):
        assert {"type", "name"} <= set(citation) and (citation.get("apa_citations") or citation.get("bibtex_citations"))

    weights = ckpt["network_weights"]
    net = get_network_from_plans(arch["arch_class_name"], arch["arch_kwargs"], arch["arch_kwargs_requiring_import"],
                                 plan["pretrain_num_input_channels"], 2, allow_init=False, deep_supervision=False)
    for ours, theirs in ((net.key_to_encoder, plan["key_to_encoder"]), (net.key_to_stem, plan["key_to_stem"])):
        part = {k[len(theirs) + 1:]: v for k, v in weights.items() if k.startswith(theirs + ".")}
        net.get_submodule(ours).load_state_dict(part)  # strict: every tensor of the part, in shape
    for proj in plan["keys_to_in_proj"]:
        assert weights[f"{proj}.weight"].shape[1] == plan["pretrain_num_input_channels"]
    return plan


def _pctnet_plan() -> AdaptationPlan:
    arch = {"network_class_name": f"{PCTNet.__module__}.{PCTNet.__name__}",
            "arch_kwargs": {"features_per_stage": list(SMALL_FEATURES)}, "_kw_requires_import": []}
    return AdaptationPlan.for_network(arch, trainer_name="nnUNetv2_vf_pretrain", patch_size=[16, 32, 32],
                                      preprocessing={"spacing": [1.0, 1.0, 1.0], "normalization": "MR",
                                                     "nnunet_normalization_scheme": "ZScoreNormalization"})


def test_embedded_plan_is_what_nnunet_master_reads(tmp_path):
    plan = _pctnet_plan()
    net = PCTNet(1, 5, features_per_stage=SMALL_FEATURES)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": net.state_dict(), **nnssl_checkpoint_fields(plan)}, path)
    read = read_like_nnunet_master(path)
    assert read["key_to_encoder"] == "encoder" and read["key_to_stem"] == "stem" and read["key_to_lpe"] is None
    config = next(iter(read["pretrain_plan"]["configurations"].values()))
    assert config["spacing_style"] == "onemmiso" and config["normalization_schemes"] == ["ZScoreNormalization"]
    assert config["patch_size"] == [16, 32, 32] == read["pretrain_patch_size"]
    broken = torch.load(path, weights_only=True)
    broken[NNSSL_PLAN_KEY]["key_to_stem"] = "encoder"  # a wrong key is caught by the loading step
    torch.save(broken, path)
    with pytest.raises(RuntimeError):
        read_like_nnunet_master(path)


def nnssl_checkpoint(network_weights: dict, architecture_plans: dict, patch=(16, 32, 32), spacing=(1.0, 1.0, 1.0),
                     trainer="VolumeFusionTrainer", keys=RESENC_KEYS) -> dict:
    """A checkpoint laid out as nnssl's ``AbstractBaseTrainer.save_checkpoint`` writes it, with the adaptation plan
    in the form of nnssl's ``AdaptationPlan.serialize()``."""
    configuration = {"data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
                     "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
                     "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                     "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                                   "force_separate_z": None},
                     "resampling_fn_mask": "resample_data_or_seg_to_shape",
                     "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
                     "spacing": list(spacing), "patch_size": list(patch)}
    plan = {"architecture_plans": architecture_plans,
            "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                              "original_median_spacing_after_transp": [1, 1, 1], "image_reader_writer": "NibabelReaderWriter",
                              "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                              "configurations": {"onemmiso": configuration}, "experiment_planner_used": "ExperimentPlanner"},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": list(patch), **keys,
            "key_to_lpe": None}
    return {"network_weights": network_weights, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "logging": {"train_losses": [0.5]}, "_best_ema": None, "current_epoch": 1,
            "init_args": {"plan": {}, "configuration_name": "onemmiso", "fold": "all", "pretrain_json": {},
                          "device": "cpu"}, "trainer_name": trainer, NNSSL_PLAN_KEY: plan}


def _tiny_resenc(in_channels=1):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", TINY_RESENC,
                                  ["conv_op", "norm_op", "nonlin"], in_channels, 4, allow_init=True,
                                  deep_supervision=False)


def test_full_resenc_checkpoint_converts_and_loads_with_nnunets_loader(tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    torch.manual_seed(1)
    source_net = _tiny_resenc()
    ckpt = nnssl_checkpoint(source_net.state_dict(), {"arch_class_name": "ResidualEncoderUNet",
                                                      "arch_kwargs": TINY_RESENC,
                                                      "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]})
    torch.save(ckpt, tmp_path / "nnssl.pth")
    log = run_nnunet(["nnUNetv2_vf_convert_nnssl", tmp_path / "nnssl.pth", tmp_path / "out"], {}, echo=False)
    assert "0 initialised fresh" not in log and "encoder only" not in log
    plan = AdaptationPlan.load(tmp_path / "out")
    assert plan.architecture_plans["arch_class_name"].endswith(".ResidualEncoderUNet")
    assert plan.patch_size == [16, 32, 32] and plan.preprocessing["spacing"] == [1.0, 1.0, 1.0]
    assert plan.preprocessing["nnunet_normalization_scheme"] == "ZScoreNormalization"
    assert plan.key_to_encoder == "encoder.stages" and plan.trainer_name == "VolumeFusionTrainer"
    assert plan.pretrained_tensors["fresh"] == [] and plan.source["format"] == "nnssl"
    target = _tiny_resenc()  # what nnUNetv2_train builds from the adapted plans
    load_pretrained_weights(target, str(tmp_path / "out" / "checkpoint_final.pth"))
    for k, v in source_net.state_dict().items():
        if ".seg_layers." not in k:
            assert torch.equal(target.state_dict()[k], v), k
    read_like_nnunet_master(tmp_path / "out" / "checkpoint_final.pth")  # and it exports back
    with pytest.raises(RuntimeError, match="already exist|--overwrite"):
        run_nnunet(["nnUNetv2_vf_convert_nnssl", tmp_path / "nnssl.pth", tmp_path / "out"], {}, echo=False)


def test_encoder_only_resencl_checkpoint_gets_a_seeded_fresh_decoder(tmp_path):
    """nnssl's contrastive trainers save the ResEnc-L encoder plus a projection head ("ResEncL" preset, no
    arch_kwargs)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    preset = NNSSL_PRESETS["ResEncL"]

    def resencl():
        return get_network_from_plans(preset["network_class_name"], preset["arch_kwargs"],
                                      preset["_kw_requires_import"], 1, 2, allow_init=True, deep_supervision=True)

    torch.manual_seed(3)
    encoder = resencl().encoder
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({"projection_head.0.weight": torch.randn(64, 320), "projection_head.0.bias": torch.zeros(64)})
    torch.save(nnssl_checkpoint(weights, {"arch_class_name": "ResEncL", "arch_kwargs": None,
                                          "arch_kwargs_requiring_import": None}, patch=(160, 160, 160),
                                trainer="SimCLRTrainer"), tmp_path / "simclr.pth")
    reports = [convert_nnssl_checkpoint(tmp_path / "simclr.pth", tmp_path / f"out{i}", seed=5) for i in (0, 1)]
    assert reports[0]["encoder_only"] and reports[0]["unused"] == ["projection_head.0.bias", "projection_head.0.weight"]
    plan = AdaptationPlan.load(tmp_path / "out0")
    assert plan.pretrained_tensors["fresh_init_seed"] == 5
    assert any(p.startswith("decoder.stages") for p in plan.pretrained_tensors["fresh"])
    assert "encoder.stages.0" in plan.pretrained_tensors["pretrained"]
    a, b = (torch.load(tmp_path / f"out{i}" / "checkpoint_final.pth", weights_only=True)["network_weights"]
            for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fresh decoder is reproducible
    for k, v in encoder.state_dict().items():  # the encoder, and the decoder's references to it, are pretrained
        assert torch.equal(a[f"encoder.{k}"], v) and torch.equal(a[f"decoder.encoder.{k}"], v)
    load_pretrained_weights(resencl(), str(tmp_path / "out0" / "checkpoint_final.pth"))


def test_unsupported_and_foreign_checkpoints_are_refused_with_a_reason(tmp_path):
    torch.save(nnssl_checkpoint({"eva.pos_embed": torch.zeros(1)}, {"arch_class_name": "PrimusM", "arch_kwargs": None,
                                                                    "arch_kwargs_requiring_import": None}),
               tmp_path / "primus.pth")
    with pytest.raises(ValueError, match="Primus is a transformer.*nnUNetv2_train_pretrained"):
        convert_nnssl_checkpoint(tmp_path / "primus.pth", tmp_path / "o1")
    torch.save({"network_weights": {}}, tmp_path / "ours.pth")
    with pytest.raises(ValueError, match="not an nnssl checkpoint.*nnssl_adaptation_plan"):
        convert_nnssl_checkpoint(tmp_path / "ours.pth", tmp_path / "o2")
    wrong = nnssl_checkpoint(PCTNet(1, 2, features_per_stage=SMALL_FEATURES).state_dict(),
                             {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": TINY_RESENC,
                              "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not belong to the network of its adaptation plan"):
        convert_nnssl_checkpoint(tmp_path / "wrong.pth", tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_nnssl_checkpoint_finetunes_through_stock_nnunet(hippo_dataset, tmp_path):
    """convert -> nnUNetv2_vf_adapt_plans -> nnUNetv2_preprocess -> nnUNetv2_train -tr VFPlansNetworkTrainer_cpu_2epochs
    -pretrained_weights -> nnUNetv2_predict, on real hippocampus MRI."""
    env, did = hippo_dataset["env"], str(hippo_dataset["id"])
    torch.manual_seed(2)
    source_net = _tiny_resenc()
    torch.save(nnssl_checkpoint(source_net.state_dict(), {"arch_class_name": "ResidualEncoderUNet",
                                                          "arch_kwargs": TINY_RESENC,
                                                          "arch_kwargs_requiring_import": ["conv_op", "norm_op",
                                                                                           "nonlin"]}),
               tmp_path / "nnssl.pth")
    run_nnunet(["nnUNetv2_vf_convert_nnssl", tmp_path / "nnssl.pth", tmp_path / "conv"], env, echo=False)
    plans = "nnUNetPlans_nnssl"
    run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", did, "-a", tmp_path / "conv" / "adaptation_plan.json", "-p", plans],
               env, echo=False)
    adapted = json.loads((Path(env["nnUNet_preprocessed"]) / hippo_dataset["name"] / f"{plans}.json").read_text())
    info = adapted["pretrain_info"]
    assert info["checkpoint_path"] == str((tmp_path / "conv" / "checkpoint_final.pth").resolve())
    assert info["key_to_encoder"] == "encoder.stages" and info["pt_num_in_channels"] == 1
    run_nnunet(["nnUNetv2_preprocess", "-d", did, "-plans_name", plans, "-c", "3d_fullres", "-np", "1"], env,
               echo=False)
    trainer = "VFPlansNetworkTrainer_cpu_2epochs"
    log = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", trainer, "-p", plans, "-pretrained_weights",
                      tmp_path / "conv" / "checkpoint_final.pth", "-device", "cpu"], env, echo=False)
    assert "Loading pretrained weights" in log
    outp = predict_3d_fold0(sorted((hippo_dataset["raw"] / "imagesTr").glob("*.nii.gz"))[:1], tmp_path, env, did,
                            trainer, plans)
    assert len(list(outp.glob("*.nii.gz"))) == 1
    assert network_keys(_tiny_resenc()).key_to_stem == "encoder.stem"
