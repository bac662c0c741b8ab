"""Volume Fusion pretraining: input indexing, preprocessing, bad input, plans adaptation, checkpoint checks.

Fast, in-process tests on real images (hippocampus MRI from ../shared/data and the bundled demo dataset).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_vf.architectures.pctnet import SMALL_FEATURES, PCTNet, pctnet_strides, table_layout_record
from nnunetv2_vf.pretrain.adapt_plans import adapted_plans, convert_misfm_checkpoint
from nnunetv2_vf.pretrain.adaptation_plan import (FORMAT, AdaptationPlan, AdaptationPlanError, input_projection_keys,
                                                   network_keys)
from nnunetv2_vf.pretrain.dataset import (Preprocessing, VFPretrainDataLoader, VolumeCache, check_volume_headers,
                                          crop_or_pad, find_images)
from nnunetv2_vf.trainers.vf_pretrained_trainer import check_pretrained_compatibility

DEMO = Path(__file__).resolve().parents[1] / "nnunetv2_vf" / "demo_data" / "Dataset004_HippocampusDemo"
SMALL = SMALL_FEATURES


@pytest.fixture(scope="module")
def hippo_images(shared_dir) -> list[Path]:
    return sorted((shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))[:4]


def test_find_images_uses_images_folders_of_raw_dataset_only():
    files = find_images([DEMO])
    names = {f.parent.name for f in files}
    assert names == {"imagesTr", "imagesTs"}
    assert len(files) == len(list((DEMO / "imagesTr").glob("*.nii.gz"))) + len(list((DEMO / "imagesTs").glob("*")))


def test_empty_folder_error_names_folder_and_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError) as e:
        find_images([tmp_path])
    assert str(tmp_path) in str(e.value) and ".nii.gz" in str(e.value)


def test_2d_images_rejected(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)), str(tmp_path / "a.nii.gz"))
    with pytest.raises(ValueError, match="3D volumes"):
        check_volume_headers(find_images([tmp_path]))


def test_corrupt_file_skipped_with_warning_and_all_corrupt_is_error(tmp_path, hippo_images):
    good = [tmp_path / p.name for p in hippo_images[:2]]
    for src, dst in zip(hippo_images, good):
        dst.write_bytes(src.read_bytes())
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"this is not an image" * 10)
    with pytest.warns(UserWarning, match="broken_0000"):
        kept = check_volume_headers(find_images([tmp_path]))
    assert sorted(kept) == sorted(good)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.nii.gz").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="could be read"):
        check_volume_headers(find_images([only_bad]))


def test_truncated_volume_skipped_at_load_time(tmp_path, hippo_images):
    """A header that reads but data that does not: the sampler warns, skips it and uses the good volumes."""
    data = hippo_images[0].read_bytes()
    broken = tmp_path / "truncated.nii.gz"
    broken.write_bytes(data[: len(data) // 2])
    good = tmp_path / hippo_images[1].name
    good.write_bytes(hippo_images[1].read_bytes())
    cache = VolumeCache([broken, good], tmp_path / "cache", Preprocessing("MR"))
    loader = VFPretrainDataLoader(cache, [0, 1], (16, 32, 32), 4, augmentation="none", seed=0)
    with pytest.warns(UserWarning, match="truncated"):
        for _ in range(3):
            batch = loader.generate_train_batch()
    assert batch["data"].shape == (4, 1, 16, 32, 32) and np.isfinite(batch["data"]).all()
    assert cache.failed == {0}


def test_nan_voxels_replaced_after_warning(tmp_path, hippo_images):
    img = sitk.ReadImage(str(hippo_images[0]), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[:3] = np.nan
    arr[5, 5, 5] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    path = tmp_path / "with_nans.mha"  # ITK's NIfTI reader drops NaNs itself
    sitk.WriteImage(out, str(path))
    with pytest.warns(UserWarning, match="with_nans"):
        pre = Preprocessing("MR")(path)
    assert np.isfinite(pre).all()
    assert abs(pre.mean()) < 1e-3 and abs(pre.std() - 1) < 1e-3  # z-scored after the replacement


def test_ct_window_and_resampling(tmp_path, hippo_images):
    """CT: HU clipped to [-1000, 1000] and mapped to [-1, 1] (nnU-Net's CTNormalization); spacing resamples."""
    img = sitk.ReadImage(str(hippo_images[0]), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 4000 - 2000  # -2000 .. 2000 HU
    arr[0, 0, 0], arr[0, 0, 1] = 0.0, 500.0
    ct = sitk.GetImageFromArray(arr.astype(np.float32))
    ct.SetSpacing((1.0, 1.0, 1.0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(path))
    out = Preprocessing("CT")(path)
    assert out.min() == -1 and out.max() == 1
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 1] == pytest.approx(0.5)
    resampled = Preprocessing("CT", spacing=[2.0, 2.0, 2.0])(path)
    assert resampled.shape[1:] == tuple(round(s / 2) for s in arr.shape)


def test_small_volumes_are_padded_by_reflection_and_augmented_batches_have_patch_shape(tmp_path, hippo_images):
    """The authors pad by reflection: no constant slab (0 is water in CT, the mean in MR) enters the pretext task."""
    vol = np.random.rand(1, 5, 6, 7).astype(np.float32) + 1
    crop = crop_or_pad(vol, (9, 6, 10), np.random.default_rng(0))
    assert crop.shape == (1, 9, 6, 10) and crop.min() >= 1  # no zero padding
    np.testing.assert_array_equal(crop, np.pad(vol, [(0, 0), (2, 2), (0, 0), (1, 2)], mode="reflect"))
    larger = crop_or_pad(vol, (16, 32, 32), np.random.default_rng(0))  # pads wider than the volume: reflected again
    assert larger.shape == (1, 16, 32, 32) and set(np.unique(larger)) <= set(np.unique(vol))
    cache = VolumeCache(hippo_images[:2], tmp_path / "cache", Preprocessing("MR"))
    for augmentation in ("nnunet", "flip", "none"):
        loader = VFPretrainDataLoader(cache, [0, 1], (48, 64, 64), 2, augmentation=augmentation, seed=0)
        batch = loader.generate_train_batch()  # larger than the images
        assert batch["data"].shape == (2, 1, 48, 64, 64) and np.isfinite(batch["data"]).all()
    assert len(list((tmp_path / "cache").rglob("*.b2nd"))) >= 1  # preprocessed once, cached


def test_mismatched_pretrained_checkpoint_error_lists_keys_and_fix(tmp_path):
    pretrained = PCTNet(1, 5, features_per_stage=SMALL)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": pretrained.state_dict(), **table_layout_record(pretrained.state_dict())}, path)
    same = PCTNet(1, 3, features_per_stage=SMALL)  # other class count: only classifiers differ -> fine
    assert check_pretrained_compatibility(same, str(path)) > 100
    other = PCTNet(1, 3, features_per_stage=(8, 16, 32, 64, 96))
    with pytest.raises(ValueError) as e:
        check_pretrained_compatibility(other, str(path))
    msg = str(e.value)
    assert "shape mismatch: encoder.pct4" in msg and "nnUNetv2_vf_adapt_plans" in msg


def test_misfm_checkpoint_is_converted(shared_dir, tmp_path):
    fixture = shared_dir / "fixtures" / "pctnet" / "pctnet_public_checkpoint.pt"
    net = PCTNet(1, 3, features_per_stage=SMALL)
    with pytest.raises(ValueError, match="nnUNetv2_vf_convert_misfm"):
        check_pretrained_compatibility(net, str(fixture))
    out = tmp_path / "converted.pth"
    plan = convert_misfm_checkpoint(fixture, out, SMALL, 1)
    weights = torch.load(out, weights_only=True)["network_weights"]
    assert check_pretrained_compatibility(net, str(out)) > 100
    ref = torch.load(fixture, weights_only=True)["model_state_dict"]
    assert torch.equal(weights["stem.proj.weight"], ref["embeddings.1.proj.weight"])
    assert plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] == list(SMALL)
    assert (tmp_path / "adaptation_plan.json").is_file()
    stored = AdaptationPlan.load(tmp_path)
    assert stored.weights_file == "converted.pth" and stored.keys_to_in_proj == ["stem.proj"]
    assert stored.volume_fusion == {"variant": "paper", "num_classes": 5}


def _small_plan(**changes) -> AdaptationPlan:
    arch = {"network_class_name": "nnunetv2_vf.architectures.pctnet.PCTNet",
            "arch_kwargs": {"features_per_stage": list(SMALL), "resolution_mode": 1, "strides": pctnet_strides(1)},
            "_kw_requires_import": []}
    values = dict(trainer_name="test", patch_size=[16, 32, 32], pretrain_num_input_channels=1,
                  preprocessing={"spacing": [1.5, 0.8, 0.8], "normalization": "CT",
                                 "nnunet_normalization_scheme": "CTNormalization",
                                 "intensity_properties": Preprocessing("CT").ct_intensity_properties})
    return AdaptationPlan.for_network(arch, **{**values, **changes})


def test_adapted_plans_reproduce_pretraining_preprocessing(hippo_images):
    plans = {"plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {"0": {"mean": 5.0}},
             "configurations": {
                 "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [56, 40]},
                 "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 56, 40],
                                "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                                "use_mask_for_norm": [False],
                                "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {}}}}}
    plan = _small_plan()
    new = adapted_plans(plans, plan, "3d_fullres", "nnUNetPlans_VF", num_input_channels=1)
    cfg = new["configurations"]["3d_fullres"]
    assert new["plans_name"] == "nnUNetPlans_VF" and cfg["data_identifier"] == "nnUNetPlans_VF_3d_fullres"
    assert cfg["spacing"] == [1.5, 0.8, 0.8] and cfg["normalization_schemes"] == ["CTNormalization"]
    props = new["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]) == (-1000, 1000, 0, 1000)
    assert cfg["patch_size"] == [16, 32, 32]
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == list(SMALL)
    kept = adapted_plans(plans, plan, "3d_fullres", "P2", keep_patch_size=True)
    assert kept["configurations"]["3d_fullres"]["patch_size"] == [40, 64, 48]  # rounded to PCT-Net's strides
    assert adapted_plans(plans, plan, "3d_fullres", "P3", num_input_channels=2)  # 1 -> C: the stem is repeated
    with pytest.raises(ValueError, match="the dataset has 3 input channels but the pretrained network takes 2"):
        adapted_plans(plans, _small_plan(pretrain_num_input_channels=2), "3d_fullres", "P3", num_input_channels=3)
    json.dumps(new)  # serialisable
    assert new["pretrain_info"]["adaptation_plan"]["format"] == FORMAT


def test_fine_tuning_trainers_validate_the_recorded_adaptation_plan():
    """VFPretrainedTrainer / VFPlansNetworkTrainer read the plan that nnUNetv2_vf_adapt_plans recorded in the plans:
    a damaged record or a network edited away from the pretrained one stops the trainer before nnU-Net builds it."""
    from nnunetv2_vf.pretrain.adaptation_plan import plan_recorded_in_plans
    from nnunetv2_vf.trainers.vf_pretrained_trainer import VFPretrainedTrainer
    plans = {"plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {"0": {"mean": 5.0}},
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 56, 40],
                                               "spacing": [1.0, 1.0, 1.0],
                                               "normalization_schemes": ["ZScoreNormalization"],
                                               "use_mask_for_norm": [False],
                                               "architecture": {"network_class_name": "PlainConvUNet",
                                                                "arch_kwargs": {}, "_kw_requires_import": []}}}}
    assert plan_recorded_in_plans(plans, "3d_fullres") is None  # never adapted: a from-scratch run
    adapted = adapted_plans(plans, _small_plan(), "3d_fullres", "nnUNetPlans_VF")
    assert plan_recorded_in_plans(adapted, "3d_fullres") == _small_plan()

    damaged = json.loads(json.dumps(adapted))
    damaged["pretrain_info"]["adaptation_plan"].pop("keys_to_in_proj")
    with pytest.raises(AdaptationPlanError, match="pretrain_info.adaptation_plan of plans 'nnUNetPlans_VF'.*"
                                                  "'keys_to_in_proj' is missing"):
        VFPretrainedTrainer(damaged, "3d_fullres", 0, {}, torch.device("cpu"))

    edited = json.loads(json.dumps(adapted))
    edited["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "PlainConvUNet"
    with pytest.raises(AdaptationPlanError, match="builds PlainConvUNet but its recorded pretraining used "
                                                  "nnunetv2_vf.architectures.pctnet.PCTNet.*nnUNetv2_vf_adapt_plans"):
        plan_recorded_in_plans(edited, "3d_fullres")


# ---------------------------------------------------------------------------------------------- adaptation plan
# what the previous release (format 1) wrote for a PCT-Net run: refused (no table layout record, see
# test_checkpoint_layout.py); the same plan of a network without such tables keeps loading
V1_PLAN = {
    "format": "nnunetv2_vf.adaptation_plan/1", "trainer_name": "nnUNetv2_vf_pretrain",
    "architecture_plans": {"arch_class_name": "nnunetv2_vf.architectures.pctnet.PCTNet",
                           "arch_kwargs": {"features_per_stage": [8, 16, 32, 64, 96], "resolution_mode": 1,
                                           "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]},
                           "arch_kwargs_requiring_import": []},
    "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [16, 32, 32],
    "key_to_encoder": "encoder", "key_to_stem": "stem", "keys_to_in_proj": ["stem.proj"], "patch_size": [16, 32, 32],
    "preprocessing": {"spacing": None, "normalization": "MR", "nnunet_normalization_scheme": "ZScoreNormalization",
                      "intensity_properties": None, "ct_window": None, "resampling": "nnunetv2 ..."},
    "volume_fusion": {"variant": "paper", "num_classes": 5},
    "optimizer": {"name": "Adam", "lr": 0.001}, "iterations": 2, "num_pretraining_images": 3}


def test_adaptation_plan_round_trips_and_reads_version_1(tmp_path):
    plan = _small_plan(volume_fusion={"variant": "grid", "num_classes": 3})
    again = AdaptationPlan.from_json(plan.to_json())
    assert again == plan and json.loads(plan.to_json())["format"] == FORMAT == "nnunetv2_vf.adaptation_plan/4"
    assert plan.keys_to_in_proj == ["stem.proj"] and plan.key_to_stem == "stem"  # declared by PCTNet itself
    (tmp_path / "adaptation_plan.json").write_text(json.dumps(V1_PLAN))
    with pytest.raises(AdaptationPlanError, match="no 'pctnet_table_layout' record"):
        AdaptationPlan.load(tmp_path)
    v1_plain = {**V1_PLAN, "architecture_plans": {**V1_PLAN["architecture_plans"], "arch_class_name":
                                                  "dynamic_network_architectures.architectures.unet.PlainConvUNet"}}
    (tmp_path / "adaptation_plan.json").write_text(json.dumps(v1_plain))
    old = AdaptationPlan.load(tmp_path)  # a pretraining output folder works as well as the file
    assert old.format == FORMAT and old.architecture_plans == v1_plain["architecture_plans"]
    assert old.preprocessing["nnunet_normalization_scheme"] == "ZScoreNormalization" and old.iterations == 2
    assert old.volume_fusion == {"variant": "paper", "num_classes": 5}


@pytest.mark.parametrize("change, expected", [
    (lambda p: p.pop("preprocessing"), "field 'preprocessing' is missing"),
    (lambda p: p.pop("keys_to_in_proj"), "field 'keys_to_in_proj' is missing"),
    (lambda p: p["architecture_plans"].pop("arch_class_name"), "field 'architecture_plans.arch_class_name' is missing"),
    (lambda p: p.update(patch_size=[16, 32]), "field 'patch_size' must be three positive integers"),
    (lambda p: p["preprocessing"].update(nnunet_normalization_scheme="RGB"),
     "'preprocessing.nnunet_normalization_scheme' must be one of"),
    (lambda p: p["preprocessing"].update(spacing=[1, 0, 1]), "'preprocessing.spacing' must be null"),
    (lambda p: p.update(pretrain_num_input_channels=0), "'pretrain_num_input_channels' must be an integer >= 1"),
    (lambda p: p.update(format="nnunetv2_vf.adaptation_plan/9"), "a newer nnunetv2_vf wrote it"),
    (lambda p: p.pop("format"), "not an adaptation plan of nnUNetv2_vf_pretrain"),
])
def test_adaptation_plan_errors_name_the_field_and_the_fix(tmp_path, change, expected):
    plan = json.loads(json.dumps(V1_PLAN))
    change(plan)
    path = tmp_path / "adaptation_plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(AdaptationPlanError) as e:
        AdaptationPlan.load(path)
    assert expected in str(e.value) and str(path) in str(e.value)
    assert "nnUNetv2_vf_pretrain" in str(e.value)  # the fix: where a valid plan comes from
    from nnunetv2_vf.pretrain.cli import adapt_plans_main  # the console script: a message, not a traceback
    with pytest.raises(SystemExit) as e:
        adapt_plans_main(["-d", "4", "-a", str(path)])
    assert isinstance(e.value.code, str) and expected in e.value.code


def test_adaptation_plan_that_is_not_json(tmp_path):
    path = tmp_path / "adaptation_plan.json"
    path.write_text("{truncated")
    with pytest.raises(AdaptationPlanError, match="is not valid JSON"):
        AdaptationPlan.load(path)
    with pytest.raises(FileNotFoundError, match="written by nnUNetv2_vf_pretrain"):
        AdaptationPlan.load(tmp_path / "nothing")


def _tiny_nnunet_networks(in_channels: int):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    plain = PlainConvUNet(in_channels, 3, (8, 16, 32), torch.nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True)
    resenc = ResidualEncoderUNet(in_channels, 3, (8, 16, 32), torch.nn.Conv3d, 3, [1, 2, 2], [1, 1, 1], 3, 2,
                                 conv_bias=True)
    return plain, resenc


def test_networks_declare_their_stem_encoder_and_input_projection():
    """PCT-Net declares its keys as class attributes, dynamic-network-architectures' U-Nets as instance attributes
    (read from a network built on the meta device when only the plans' architecture block is known)."""
    from nnunetv2_vf.pretrain.adaptation_plan import build_network
    pct = PCTNet(2, 3, features_per_stage=SMALL)
    plain, resenc = _tiny_nnunet_networks(2)
    for net in (pct, plain, resenc):
        keys = network_keys(net)
        weights = net.state_dict()
        for proj in keys.keys_to_in_proj:  # the input projection sees the image channels
            assert weights[f"{proj}.weight"].shape[1] == 2
        assert any(k.startswith(keys.key_to_stem + ".") for k in weights)
        assert any(k.startswith(keys.key_to_encoder + ".") for k in weights)
    assert network_keys(plain).key_to_encoder == "encoder.stages"  # the library's own declaration
    assert network_keys(resenc).keys_to_in_proj == ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
    architecture = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                    "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32],
                                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 3,
                                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 1, 1],
                                    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True},
                    "_kw_requires_import": ["conv_op"]}
    assert network_keys(architecture) == network_keys(resenc)
    assert next(build_network(architecture).parameters()).is_meta  # nothing allocated
    with pytest.raises(ValueError, match="key_to_stem, key_to_encoder and keys_to_in_proj"):
        network_keys("torch.nn.Conv3d")


def test_input_projection_aliases_found_by_identity_and_widened_together(tmp_path):
    """nnU-Net's U-Nets hold their first convolution under four state-dict names; widening only the declared one
    stops nnU-Net's own loader at the shape check. Every name of the same parameter is found and widened."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2_vf.pretrain.adapt_plans import repeat_stem_over_channels
    for single, double in zip(_tiny_nnunet_networks(1), _tiny_nnunet_networks(2)):
        keys = network_keys(single)
        names = input_projection_keys(single, keys.keys_to_in_proj)
        assert len(names) == 4 and set(keys.keys_to_in_proj) <= set(names)
        assert sum(n.startswith("decoder.encoder.") for n in names) == 2
        weights = {k: v.clone() for k, v in single.state_dict().items()}  # saved files hold separate copies
        only_declared = repeat_stem_over_channels(weights, keys.keys_to_in_proj[:1], 2)
        path = tmp_path / f"{type(single).__name__}.pth"
        torch.save({"network_weights": only_declared}, path)
        with pytest.raises(AssertionError, match="shape"):  # the defect: nnU-Net's loader refuses the rest
            load_pretrained_weights(double, str(path))
        torch.save({"network_weights": repeat_stem_over_channels(weights, names, 2)}, path)
        load_pretrained_weights(double, str(path))
        loaded = double.get_submodule(keys.keys_to_in_proj[0]).weight
        torch.testing.assert_close(loaded.sum(1, keepdim=True), weights[f"{keys.keys_to_in_proj[0]}.weight"])


def test_pctnet_sizes_are_defined_once():
    """The paper's and the small PCT-Net sizes are spelled only in pctnet_sizes.py (the frozen speed baseline
    excepted): the package, the benchmarks and the tests import PAPER_FEATURES / SMALL_FEATURES."""
    import re
    root = Path(__file__).resolve().parents[1]
    literal = re.compile(r"24,\s*48,\s*128,\s*256,\s*512|[\[(]8,\s*16,\s*32,\s*64,\s*128[\])]")
    spelled = [str(f.relative_to(root)) for folder in ("nnunetv2_vf", "benchmarks", "tests")
               for f in (root / folder).rglob("*.py")
               if f.name not in ("pctnet_sizes.py", "_pctnet_baseline.py") and literal.search(f.read_text())]
    assert spelled == []


def test_pretrain_help_states_the_papers_fusion_knobs():
    """--vf-* default to None (the paper's values come from FusionParameters); the help text must quote them."""
    import re
    from nnunetv2_vf.pretrain.cli import _pretrain_parser
    from nnunetv2_vf.pretrain.pretrainer import FUSION_SETTINGS
    from nnunetv2_vf.pretrain.volume_fusion import PAPER_PARAMETERS
    actions = {a.dest: a for a in _pretrain_parser()._actions}
    for setting, knob in FUSION_SETTINGS.items():
        quoted = [float(v) for v in re.search(r"\(paper: ([0-9. ]+)", actions[setting].help).group(1).split()]
        paper = getattr(PAPER_PARAMETERS, knob)
        assert quoted == list(paper if isinstance(paper, tuple) else [paper]), setting
        assert actions[setting].default is None


# ---------------------------------------------------------------------------------------------- C input channels
def test_stem_repeated_over_channels_is_the_mean_of_the_channels():
    from nnunetv2_vf.pretrain.adapt_plans import repeat_stem_over_channels
    weight = torch.randn(4, 1, 3, 3, 3)
    other = torch.randn(4)
    out = repeat_stem_over_channels({"stem.proj.weight": weight, "stem.proj.bias": other}, ["stem.proj"], 3)
    assert out["stem.proj.weight"].shape == (4, 3, 3, 3, 3) and out["stem.proj.bias"] is other
    for c in range(3):
        torch.testing.assert_close(out["stem.proj.weight"][:, c:c + 1], weight / 3)
    same = repeat_stem_over_channels({"stem.proj.weight": weight}, ["stem.proj"], 1)["stem.proj.weight"]
    torch.testing.assert_close(same, weight)
    with pytest.raises(ValueError, match="only single-channel pretrained stems"):
        repeat_stem_over_channels({"stem.proj.weight": torch.randn(4, 2, 3, 3, 3)}, ["stem.proj"], 3)
    with pytest.raises(ValueError, match="hold no encoder.stem.convs.0.conv.weight"):
        repeat_stem_over_channels({"stem.proj.weight": weight}, ["encoder.stem.convs.0.conv"], 3)


def test_two_channel_dataset_gets_plans_and_weights_with_a_two_channel_stem(tmp_path, monkeypatch, capsys,
                                                                            two_channel_preprocessed):
    """nnUNetv2_vf_adapt_plans on a 2-channel dataset: the written weights load into the plans' network, which
    computes on any 2-channel input what the pretrained network computes on the channels' mean."""
    from nnunetv2_vf.pretrain.cli import adapt_plans_main
    pretrain = tmp_path / "vf_run"
    pretrain.mkdir()
    torch.manual_seed(0)
    original = PCTNet(1, 5, features_per_stage=SMALL).eval()
    torch.save({"network_weights": original.state_dict(), "trainer_name": "nnUNetv2_vf_pretrain",
                **table_layout_record(original.state_dict())},
               pretrain / "checkpoint_final.pth")
    _small_plan().save(pretrain / "adaptation_plan.json")
    folder = two_channel_preprocessed / "Dataset777_TwoChannels"
    monkeypatch.setenv("nnUNet_preprocessed", str(two_channel_preprocessed))
    adapt_plans_main(["-d", "Dataset777_TwoChannels", "-a", str(pretrain / "adaptation_plan.json")])
    converted = pretrain / "checkpoint_final_2ch.pth"
    assert f"train with -pretrained_weights {converted}" in capsys.readouterr().out
    plans = json.loads((folder / "nnUNetPlans_VF.json").read_text())
    assert plans["pretrain_info"]["input_channel_adaptation"]["weights"] == str(converted.resolve())
    info = plans["pretrain_info"]
    assert info["pretrained_weights"] == str(converted.resolve())  # the file to give -pretrained_weights
    # nnU-Net master's fields: the checkpoint as pretrained (single-channel) and its channel count
    assert info["checkpoint_path"] == str((pretrain / "checkpoint_final.pth").resolve())
    assert info["pt_num_in_channels"] == 1 and info["keys_to_in_proj"] == ["stem.proj"]
    embedded = torch.load(converted, weights_only=True)["nnssl_adaptation_plan"]
    assert embedded["pretrain_num_input_channels"] == 2  # the _2ch file describes itself
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"] * 2
    adapted = PCTNet(2, 5, features_per_stage=SMALL).eval()
    adapted.load_state_dict(torch.load(converted, weights_only=True)["network_weights"])  # same shapes everywhere
    x = torch.randn(1, 2, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x)[0], original(x.mean(1, keepdim=True))[0], atol=1e-4, rtol=1e-4)
        same = x[:, :1].repeat(1, 2, 1, 1, 1)  # identical channels: exactly the image itself
        torch.testing.assert_close(adapted(same)[0], original(x[:, :1])[0], atol=1e-4, rtol=1e-4)
    # the weights are required: without them the dataset cannot use the pretraining
    (pretrain / "checkpoint_final.pth").rename(pretrain / "elsewhere.pth")
    with pytest.raises(SystemExit) as e:
        adapt_plans_main(["-d", "Dataset777_TwoChannels", "-a", str(pretrain / "adaptation_plan.json"),
                          "--overwrite"])
    assert "2-channel stem" in e.value.code and "with -w" in e.value.code
    adapt_plans_main(["-d", "Dataset777_TwoChannels", "-a", str(pretrain / "adaptation_plan.json"), "-w",
                      str(pretrain / "elsewhere.pth"), "--overwrite"])
    assert (pretrain / "elsewhere_2ch.pth").is_file()


def test_a_run_recorded_before_the_recipe_settings_resumes_with_what_it_ran():
    """config.json of a run without 'augmentation' / 'grid_source_scale' ran nnU-Net's transforms (its 'augment'
    flag) and grid crops from the patch: --continue keeps that meaning instead of switching to today's defaults."""
    from dataclasses import asdict
    from nnunetv2_vf.pretrain.config import PretrainConfig, legacy_recipe, resumed_config
    old = {k: v for k, v in asdict(PretrainConfig(inputs=["/x"], output_dir="/o")).items()
           if k not in ("augmentation", "grid_source_scale")}
    assert legacy_recipe({**old, "augment": True}) == {"augmentation": "nnunet", "grid_source_scale": 1.0}
    assert legacy_recipe({**old, "augment": False})["augmentation"] == "none"
    cfg, _ = resumed_config(PretrainConfig(inputs=[], output_dir="/o", iterations=9), {"iterations"},
                            {**old, "augment": True}, None, Path("/o"))
    assert cfg.augmentation == "nnunet" and cfg.grid_source_scale == 1.0 and cfg.iterations == 9
    new, _ = resumed_config(PretrainConfig(inputs=[], output_dir="/o"), set(),
                            asdict(PretrainConfig(inputs=["/x"], output_dir="/o")), None, Path("/o"))
    assert new.augmentation == "flip" and new.grid_source_scale == 1.5


def test_late_rise_tells_a_plateau_from_a_rising_curve_despite_noise():
    from nnunetv2_vf.pretrain.progress import PLATEAU_RISE, late_rise
    rng = np.random.default_rng(0)
    it = np.arange(250, 12001, 250)
    noise = rng.normal(0, 0.005, it.size)  # validation-point noise of a run whose lr has decayed
    rising = 0.2 + 0.3 * it / it[-1] + noise  # +0.075 over the last quarter
    flat = 0.5 - 0.3 * np.exp(-it / 1000) + noise  # saturated long before the last quarter
    assert late_rise(it, rising) == pytest.approx(0.075, abs=0.03)
    assert late_rise(it, rising) > PLATEAU_RISE > late_rise(it, flat)
    assert late_rise(it[:3], flat[:3]) is None and late_rise([], []) is None
