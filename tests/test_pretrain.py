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

from nnunetv2_vf.architectures.pctnet import PCTNet, pctnet_strides
from nnunetv2_vf.pretrain.adapt_plans import adapted_plans, convert_misfm_checkpoint
from nnunetv2_vf.pretrain.dataset import (Preprocessing, VFPretrainDataLoader, VolumeCache, check_volume_headers,
                                          crop_or_pad, find_images)
from nnunetv2_vf.trainers.vf_pretrained_trainer import check_pretrained_compatibility

DEMO = Path(__file__).resolve().parents[1] / "nnunetv2_vf" / "demo_data" / "Dataset004_HippocampusDemo"
SMALL = (8, 16, 32, 64, 128)


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
    loader = VFPretrainDataLoader(cache, [0, 1], (16, 32, 32), 4, augment=False, seed=0)
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


def test_small_volumes_are_padded_and_augmented_batches_have_patch_shape(tmp_path, hippo_images):
    vol = np.random.rand(1, 5, 6, 7).astype(np.float32)
    crop = crop_or_pad(vol, (16, 32, 32), np.random.default_rng(0))
    assert crop.shape == (1, 16, 32, 32) and np.isclose(crop.sum(), vol.sum())
    cache = VolumeCache(hippo_images[:2], tmp_path / "cache", Preprocessing("MR"))
    loader = VFPretrainDataLoader(cache, [0, 1], (48, 64, 64), 2, augment=True, seed=0)  # larger than the images
    batch = loader.generate_train_batch()
    assert batch["data"].shape == (2, 1, 48, 64, 64) and np.isfinite(batch["data"]).all()
    assert len(list((tmp_path / "cache").rglob("*.npy"))) >= 1  # preprocessed once, cached


def test_mismatched_pretrained_checkpoint_error_lists_keys_and_fix(tmp_path):
    pretrained = PCTNet(1, 5, features_per_stage=SMALL)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": pretrained.state_dict()}, path)
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


def test_adapted_plans_reproduce_pretraining_preprocessing(hippo_images):
    plans = {"plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {"0": {"mean": 5.0}},
             "configurations": {
                 "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [56, 40]},
                 "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 56, 40],
                                "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                                "use_mask_for_norm": [False],
                                "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {}}}}}
    plan = {"architecture_plans": {"arch_class_name": "nnunetv2_vf.architectures.pctnet.PCTNet",
                                   "arch_kwargs": {"features_per_stage": list(SMALL), "resolution_mode": 1,
                                                   "strides": pctnet_strides(1)},
                                   "arch_kwargs_requiring_import": []},
            "patch_size": [16, 32, 32], "pretrain_num_input_channels": 1,
            "preprocessing": {"spacing": [1.5, 0.8, 0.8], "normalization": "CT",
                              "nnunet_normalization_scheme": "CTNormalization",
                              "intensity_properties": Preprocessing("CT").ct_intensity_properties}}
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
    with pytest.raises(ValueError, match="input channels"):
        adapted_plans(plans, plan, "3d_fullres", "P3", num_input_channels=2)
    json.dumps(new)  # serialisable
