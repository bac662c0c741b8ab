"""Volume Fusion pretext task: fusion identity, label statistics, box scaling, seeding, workers, bad input."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunetv2_vf.pretrain.volume_fusion import (
    PAPER_PARAMETERS, FusionParameters, VolumeFusionTransform, downsample_labels, grid_block_labels,
    grid_block_size_range, paint_boxes, paper_box_labels, paper_box_size_range, sample_paper_boxes, volume_fusion)

CROP = (16, 24, 20)


def _batch(seed=0, b=3, c=2, shape=CROP, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(b, c, *shape)).astype(dtype)


def _expected(labels, foreground, background):
    alpha = labels.astype(np.float64) / 4
    return alpha * foreground + (1 - alpha) * background


# ---------------------------------------------------------------------------------------------- identity / labels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paper_fusion_identity_uses_previous_sample_as_foreground(dtype):
    batch = _batch(dtype=dtype)
    fused, labels = volume_fusion(batch, np.random.default_rng(1), "paper")
    assert fused.shape == batch.shape and fused.dtype == batch.dtype
    assert labels.shape == (3, 1, *CROP) and labels.dtype == np.uint8
    assert labels.min() == 0 and labels.max() <= 4 and set(np.unique(labels)) == {0, 1, 2, 3, 4}
    foreground = batch[[2, 0, 1]]  # sample (n - 1) mod B
    np.testing.assert_allclose(fused, _expected(labels, foreground, batch), rtol=0, atol=1e-6)
    # class 4 is pure foreground and class 0 untouched background, voxel for voxel and in every channel
    full = np.broadcast_to(labels == 4, batch.shape)
    untouched = np.broadcast_to(labels == 0, batch.shape)
    np.testing.assert_array_equal(fused[full], foreground[full])
    np.testing.assert_array_equal(fused[untouched], batch[untouched])
    assert not np.allclose(fused[~untouched], batch[~untouched])


def test_grid_fusion_identity_with_augmented_crops_of_the_same_sample():
    batch = _batch(b=2)
    batch[1] += 100.0  # a very different second sample: the grid variant must not mix samples
    fused, labels, fg, bg = volume_fusion(batch, np.random.default_rng(2), "grid", return_sources=True)
    assert fused.shape == batch.shape and fused.dtype == np.float32
    assert labels.shape == (2, 1, *CROP) and labels.dtype == np.uint8 and labels.max() <= 4
    np.testing.assert_allclose(fused, _expected(labels, fg, bg), rtol=0, atol=1e-6)
    # both crops are contrast-remapped to [0, 1] and are different augmentations
    for crop in (fg, bg):
        assert crop.min() >= 0 and crop.max() <= 1 and crop.max() - crop.min() > 0.5
    assert not np.allclose(fg, bg)
    assert fused.min() >= 0 and fused.max() <= 1  # a +100 offset from another sample would show here


def test_volume_fusion_of_a_real_image_batch(hippo_images):
    batch = np.stack([img[None] for img in hippo_images[:2]])
    fused, labels = volume_fusion(batch, np.random.default_rng(0))
    np.testing.assert_allclose(fused, _expected(labels, batch[[1, 0]], batch), atol=1e-5)


# ---------------------------------------------------------------------------------------------- statistics
# Sample std of the per-map class-0 fraction at 64x128x128 is ~0.14 (paper) / ~0.06 (grid), of one foreground
# class ~0.08 / ~0.025; with 160 maps the standard errors are ~0.011 / 0.0045 and ~0.006 / 0.002, so the
# tolerances below are about 4 standard errors around the reference values of the spec. With K classes the
# untouched fraction does not depend on K and the rest splits evenly over the K - 1 foreground classes (a
# foreground class' standard error grows about as the root of its share: tolerance scaled by sqrt(4 / (K - 1)));
# a fused block fraction r leaves 1 - r * (1 - 0.44) / 0.7 of the grid untouched.
PAPER_FRACTIONS = (paper_box_labels, 0.485, 0.045, 0.025)
GRID_FRACTIONS = (grid_block_labels, 0.44, 0.02, 0.01)


# the foreground ratio acts in the grid variant only: the paper variant is checked at its default ratio
@pytest.mark.parametrize("make_labels, background, background_tol, class_tol, num_classes, ratio", [
    *[(*PAPER_FRACTIONS, k, 0.7) for k in (5, 3, 2, 7)],
    *[(*GRID_FRACTIONS, k, r) for k, r in ((5, 0.7), (3, 0.7), (2, 0.7), (7, 0.7), (5, 0.35))],
])
def test_class_fractions_match_reference(make_labels, background, background_tol, class_tol, num_classes, ratio):
    params = FusionParameters(num_classes=num_classes, foreground_ratio=ratio)
    if make_labels is grid_block_labels:
        background = 1 - ratio * (1 - background) / 0.7
    rng = np.random.default_rng(123)
    counts = np.zeros(num_classes)
    for _ in range(160):
        labels = make_labels((64, 128, 128), rng, params)
        assert labels.max() <= num_classes - 1
        counts += np.bincount(labels.ravel(), minlength=num_classes)
    fractions = counts / counts.sum()
    assert len(fractions) == num_classes
    assert abs(fractions[0] - background) < background_tol, fractions
    per_class = (1 - background) / (num_classes - 1)
    assert np.all(np.abs(fractions[1:] - per_class) < class_tol * (4 / (num_classes - 1)) ** 0.5), fractions


def test_paper_box_sizes_scale_with_the_crop():
    assert [r.tolist() for r in paper_box_size_range((64, 128, 128))] == [[8, 8, 8], [40, 80, 80]]
    shape = (16, 32, 48)
    lo, hi = paper_box_size_range(shape)
    assert lo.tolist() == [2, 2, 3] and hi.tolist() == [10, 20, 30]
    assert [r.tolist() for r in paper_box_size_range((1, 3, 5))] == [[1, 1, 1], [1, 2, 3]]
    rng = np.random.default_rng(5)
    sizes, counts = [], []
    for _ in range(200):
        starts, box_sizes, classes = sample_paper_boxes(shape, rng)
        sizes.append(box_sizes)
        counts.append(len(classes))
        assert set(np.unique(classes)) <= {1, 2, 3, 4}
    sizes = np.concatenate(sizes)
    assert np.all(sizes.min(0) == lo) and np.all(sizes.max(0) == hi)
    assert min(counts) == 10 and max(counts) == 40
    # painted boxes never exceed the largest box extent, and are clipped to the crop
    starts, box_sizes, _ = sample_paper_boxes(shape, rng)
    for start, size in zip(starts, box_sizes):
        painted = paint_boxes(shape, start[None], size[None], np.array([3]))
        extent = np.array([np.ptp(i) + 1 for i in np.nonzero(painted)])
        assert np.all(extent <= hi) and np.all(extent == np.minimum(start + size, shape) - np.maximum(start, 0))


def test_grid_blocks_scale_with_the_crop_and_fuse_seventy_percent():
    assert [r.tolist() for r in grid_block_size_range((64, 128, 128))] == [[5, 8, 8], [20, 32, 32]]
    lo, hi = grid_block_size_range((32, 32, 32))
    assert lo.tolist() == [2, 2, 2] and hi.tolist() == [10, 8, 8]
    shape = np.array([32, 40, 36])
    lo, hi = grid_block_size_range(shape)
    for seed in range(20):
        labels = grid_block_labels(shape, np.random.default_rng(seed))
        # replay the first two draws (block size, then grid offset) to locate the grid
        replay = np.random.default_rng(seed)
        block = replay.integers(lo, hi + 1)
        n_blocks = shape // block
        offset = replay.integers(0, shape - n_blocks * block + 1)
        grid = labels[tuple(slice(o, o + n * b) for o, n, b in zip(offset, n_blocks, block))]
        outside = labels.copy()
        outside[tuple(slice(o, o + n * b) for o, n, b in zip(offset, n_blocks, block))] = 0
        assert not outside.any(), "the border remainder must stay class 0"
        blocks = grid.reshape(n_blocks[0], block[0], n_blocks[1], block[1], n_blocks[2], block[2])
        per_block = blocks[:, :1, :, :1, :, :1]
        assert np.all(blocks == per_block), "each block must carry one class"
        assert np.count_nonzero(per_block) == int(np.floor(0.7 * n_blocks.prod()))


# ---------------------------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("variant", ["paper", "grid"])
def test_same_seed_same_output_different_seed_different_output(variant):
    batch = _batch()
    a = volume_fusion(batch, np.random.default_rng(42), variant)
    b = volume_fusion(batch, np.random.default_rng(42), variant)
    c = volume_fusion(batch, np.random.default_rng(43), variant)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])
    t1 = VolumeFusionTransform(variant, seed=7)(data=batch.copy())
    t2 = VolumeFusionTransform(variant, seed=7)(data=batch.copy())
    t3 = VolumeFusionTransform(variant, seed=8)(data=batch.copy())
    np.testing.assert_array_equal(t1["target"], t2["target"])
    assert not np.array_equal(t1["target"], t3["target"])


# ---------------------------------------------------------------------------------------------- transform
def test_transform_keeps_torch_and_downsamples_like_nnunet():
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    batch = torch.from_numpy(_batch(b=2, shape=(16, 32, 32)))
    out = VolumeFusionTransform(seed=0, deep_supervision_scales=scales)(data=batch.clone(), target=None, keys=["a"])
    assert isinstance(out["data"], torch.Tensor) and out["data"].dtype == torch.float32
    assert out["keys"] == ["a"]
    pyramid = out["target"]
    assert [tuple(p.shape) for p in pyramid] == [(2, 1, 16, 32, 32), (2, 1, 8, 16, 16), (2, 1, 4, 8, 8)]
    assert all(p.dtype == torch.int16 for p in pyramid)
    np.testing.assert_allclose(out["data"].numpy(),
                               _expected(pyramid[0].numpy(), batch.numpy()[[1, 0]], batch.numpy()), atol=1e-6)
    per_sample = [DownsampleSegForDSTransform(scales)(segmentation=pyramid[0][i])["segmentation"] for i in range(2)]
    for level, reference in enumerate(zip(*per_sample)):
        torch.testing.assert_close(pyramid[level], torch.stack(reference))
    numpy_levels = downsample_labels(pyramid[0].numpy(), scales)
    assert all(isinstance(level, np.ndarray) for level in numpy_levels)
    out_np = VolumeFusionTransform("grid", data_key="img", label_key="seg", seed=0)(img=batch.numpy())
    assert isinstance(out_np["img"], np.ndarray) and out_np["seg"].dtype == np.uint8


# ---------------------------------------------------------------------------------------------- workers
@pytest.fixture(scope="module")
def hippo_images(shared_dir):
    """Six real hippocampus T1 crops, z-scored and cropped/padded to 32x48x32 (D, H, W)."""
    folder = shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr"
    images = []
    for path in sorted(folder.glob("*.nii.gz"))[:6]:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        image = (image - image.mean()) / max(image.std(), 1e-8)
        out = np.zeros((32, 48, 32), np.float32)
        region = tuple(slice(0, min(a, b)) for a, b in zip(image.shape, out.shape))
        out[region] = image[region]
        images.append(out)
    return images


class _FixedCropLoader(DataLoader):
    """Yields the same real two-crop batch in every worker, so only the fusion RNG can make batches differ."""

    def __init__(self, images):
        super().__init__(images, batch_size=2, num_threads_in_multithreaded=2, infinite=True)

    def generate_train_batch(self):
        data = np.stack([image[None] for image in self._data[:2]])
        return {"data": data, "original": data.copy()}


@pytest.mark.parametrize("seed", [None, 7])
def test_transform_in_multithreaded_augmenter_with_real_images(hippo_images, seed):
    def run():
        transform = VolumeFusionTransform("paper", seed=seed)
        transform(data=_batch(b=2))  # used in the parent before the workers fork: they must not share its stream
        augmenter = MultiThreadedAugmenter(_FixedCropLoader(hippo_images), transform, num_processes=2,
                                           num_cached_per_queue=1, seeds=[11, 12])
        try:
            return [next(augmenter) for _ in range(4)]  # round robin: worker 0, 1, 0, 1
        finally:
            augmenter._finish()

    batches = run()
    for batch in batches:
        original = batch["original"]
        np.testing.assert_allclose(batch["data"], _expected(batch["target"], original[[1, 0]], original), atol=1e-5)
        assert batch["target"].shape == (2, 1, 32, 48, 32) and 0 < np.mean(batch["target"] > 0) < 1
    labels = [b["target"] for b in batches]
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[2], labels[3])
    assert not np.array_equal(labels[0], labels[2])  # a worker's stream advances
    if seed is not None:  # a seeded transform in a seeded augmenter repeats exactly
        again = run()
        for x, y in zip(batches, again):
            np.testing.assert_array_equal(x["target"], y["target"])


def test_transform_in_nnunets_nondet_augmenter_with_torch_batches(hippo_images):
    """nnU-Net 2.8 trains through NonDetMultiThreadedAugmenter with seeds=None and torch batches."""
    class TorchLoader(_FixedCropLoader):
        def generate_train_batch(self):
            batch = super().generate_train_batch()
            return {key: torch.from_numpy(value) for key, value in batch.items()}

    augmenter = NonDetMultiThreadedAugmenter(TorchLoader(hippo_images), VolumeFusionTransform(), num_processes=2,
                                             num_cached=2, seeds=None)
    try:
        batches = [next(augmenter) for _ in range(6)]
        # let the results thread settle before the workers stop: a thread still receiving a torch batch from a
        # stopped worker dies with a (harmless) FileNotFoundError that pytest reports as a warning
        deadline = time.time() + 10
        while not augmenter.results_loop_queue.full() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        augmenter._finish()
    for batch in batches:
        assert isinstance(batch["data"], torch.Tensor) and batch["target"].dtype == torch.int16
        original = batch["original"].numpy()
        np.testing.assert_allclose(batch["data"].numpy(), _expected(batch["target"].numpy(), original[[1, 0]],
                                                                     original), atol=1e-5)
    labels = [b["target"].numpy() for b in batches]
    assert all(not np.array_equal(labels[i], labels[j]) for i in range(6) for j in range(i + 1, 6))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_problem_and_fix():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"another sample of the batch.*batch size >= 2 or variant='grid'"):
        volume_fusion(_batch(b=1), rng, "paper")
    fused, labels = volume_fusion(_batch(b=1), rng, "grid")  # a single sample is fine for "grid"
    assert fused.shape == (1, 2, *CROP)
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        volume_fusion(np.zeros((2, 1, 16, 16), np.float32), rng)
    with pytest.raises(ValueError, match=r"'paper', 'grid'"):
        volume_fusion(_batch(), rng, "boxes")
    with pytest.raises(ValueError, match=r"'paper', 'grid'"):
        VolumeFusionTransform("boxes")
    for bad in (np.nan, np.inf):
        batch = _batch()
        batch[1, 0, 3, 4, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf.*clean/normalise"):
            volume_fusion(batch, rng)
    with pytest.raises(ValueError, match="floating-point.*astype"):
        volume_fusion(np.zeros((2, 1, 4, 4, 4), np.int16), rng)
    with pytest.raises(KeyError, match="data_key"):
        VolumeFusionTransform()(image=_batch())


# ---------------------------------------------------------------------------------------------- frozen reference
REFERENCE = Path(__file__).parent / "data" / "grid_fusion_reference.npz"


def _reference_d_input():
    """The larger reference input (> 2**16 voxels per channel, so the strided percentile probe is used); integer
    arithmetic only, identical on every platform."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.int64) for n in (48, 48, 40)], indexing="ij")
    v = (((z * 7 + y * 3 + x) % 11) * 5 + (z * y) % 13 + x // 4)[None, None].astype(np.float32)
    return np.concatenate([v, v[:, :, ::-1] * 3 - 1], axis=0)


@pytest.mark.parametrize("case", ["a", "b", "c", "d"])
def test_grid_fusion_matches_frozen_reference_bit_for_bit(case):
    """``grid`` output and RNG draw order frozen from the implementation of 2026-11-26 (before the speed-up):
    float32 / float64 batches, two channels, a constant channel, tied percentiles, a large crop. Same seed ->
    the same bits, and the generator is left in the same state (the next draws agree)."""
    ref = np.load(REFERENCE)
    batch = _reference_d_input() if case == "d" else ref[f"{case}_input"]
    rng = np.random.default_rng(int(ref[f"{case}_seed"]))
    fused, labels = volume_fusion(batch, rng, "grid")
    np.testing.assert_array_equal(labels, ref[f"{case}_labels"])
    assert fused.dtype == batch.dtype
    if case == "d":
        assert fused.astype(np.float64).sum() == ref["d_fused_sum"]
        digest = np.frombuffer(hashlib.sha256(np.ascontiguousarray(fused).tobytes()).digest(), dtype=np.uint8)
        np.testing.assert_array_equal(digest, ref["d_fused_sha256"])
    else:
        np.testing.assert_array_equal(fused, ref[f"{case}_fused"])
    np.testing.assert_array_equal(rng.integers(0, 2 ** 62, size=4), ref[f"{case}_next"])


def test_fused_contrast_remap_equals_segment_lookup_at_the_knots():
    """The fast remap (middle segment everywhere + masked fix-ups, float32 thresholds) gives the bits of the
    per-voxel lookup, also for voxels exactly at / one float32 step around knots that float32 cannot represent."""
    from nnunetv2_vf.pretrain.volume_fusion import _remap_into, _remap_lookup
    rng = np.random.default_rng(0)
    for knots in ([-3.0, 0.1, 0.7, 4.0], [-1.0, -0.3, 1e-8, 2.5], [0.0, 1.0 / 3, 2.0 / 3, 1.0]):
        knots = np.asarray(knots, dtype=np.float64)
        special = []
        for k in knots[1:3]:
            k32 = np.float32(k)
            special += [k32, np.nextafter(k32, np.float32(-np.inf)), np.nextafter(k32, np.float32(np.inf))]
        x = rng.uniform(knots[0], knots[3], size=4000).astype(np.float32)
        x[:len(special)] = special
        x = x.reshape(10, 20, 20)
        out = np.empty_like(x)
        _remap_into(x, knots, out)
        np.testing.assert_array_equal(out, _remap_lookup(x, knots))
        flipped = np.empty_like(x)
        _remap_into(x, knots, np.flip(flipped, axis=(0, 2)))  # writing through a flipped view
        np.testing.assert_array_equal(np.flip(flipped, axis=(0, 2)), out)


# ---------------------------------------------------------------------------------------------- the knobs
def test_default_knobs_are_the_papers_and_draw_the_same_maps():
    assert PAPER_PARAMETERS == FusionParameters(5, (10, 40), (1 / 8, 1 / 16, 1 / 16), (5 / 8,) * 3, 0.7,
                                                (5 / 64, 1 / 16, 1 / 16), (20 / 64, 1 / 4, 1 / 4))
    for make in (paper_box_labels, grid_block_labels):  # an explicit default = no parameters
        np.testing.assert_array_equal(make(CROP, np.random.default_rng(3)),
                                      make(CROP, np.random.default_rng(3), FusionParameters()))


@pytest.mark.parametrize("variant", ["paper", "grid"])
def test_fusion_with_three_classes_uses_halves(variant):
    params = FusionParameters(num_classes=3)
    batch = _batch()
    fused, labels, fg, bg = volume_fusion(batch, np.random.default_rng(4), variant, params=params,
                                          return_sources=True)
    assert set(np.unique(labels)) == {0, 1, 2}
    alpha = labels.astype(np.float64) / 2
    np.testing.assert_allclose(fused, alpha * fg + (1 - alpha) * bg, rtol=0, atol=1e-6)
    # the in-place float32 path of the grid variant gives the same bits
    fast, fast_labels = volume_fusion(batch, np.random.default_rng(4), variant, params=params)
    np.testing.assert_array_equal(fast_labels, labels)
    np.testing.assert_array_equal(fast, fused)
    transform = VolumeFusionTransform(variant, seed=1, params=params)
    assert transform(data=batch.copy())["target"].max() == 2 and "num_classes=3" in repr(transform)


def test_box_count_and_size_knobs():
    shape = (16, 32, 48)
    params = FusionParameters(num_boxes=(2, 3), box_fraction_min=(0.25, 0.25, 0.25), box_fraction_max=(0.5,) * 3)
    lo, hi = paper_box_size_range(shape, params)
    assert lo.tolist() == [4, 8, 12] and hi.tolist() == [8, 16, 24]
    rng = np.random.default_rng(0)
    drawn = [sample_paper_boxes(shape, rng, params) for _ in range(300)]
    assert {len(classes) for _, _, classes in drawn} == {2, 3}
    sizes = np.concatenate([s for _, s, _ in drawn])
    assert sizes.min(0).tolist() == lo.tolist() and sizes.max(0).tolist() == hi.tolist()


def test_grid_block_knobs():
    shape = np.array([32, 40, 36])
    params = FusionParameters(block_fraction_min=(0.25,) * 3, block_fraction_max=(0.25,) * 3, foreground_ratio=0.5)
    lo, hi = grid_block_size_range(shape, params)
    assert lo.tolist() == hi.tolist() == [8, 10, 9]
    labels = grid_block_labels(shape, np.random.default_rng(1), params)
    blocks = labels.reshape(4, 8, 4, 10, 4, 9)[:, 0, :, 0, :, 0]  # 4 x 4 x 4 blocks fill the crop exactly
    assert np.count_nonzero(blocks) == 32  # floor(0.5 * 64)


@pytest.mark.parametrize("knobs, expected", [
    (dict(num_classes=1), "--vf-classes (fusion classes K) must be an integer from 2 to 256 (got 1)"),
    (dict(num_classes=300), "--vf-classes (fusion classes K) must be an integer from 2 to 256 (got 300)"),
    (dict(num_boxes=(0, 4)), "--vf-boxes needs MIN MAX with 1 <= MIN <= MAX boxes per sample (got 0 4)"),
    (dict(num_boxes=(9, 4)), "--vf-boxes needs MIN MAX with 1 <= MIN <= MAX"),
    (dict(box_fraction_min=(0, 0.1, 0.1)), "--vf-box-min needs three fractions of the crop D H W, each in (0, 1]"),
    (dict(box_fraction_max=(1.5, 0.5, 0.5)), "--vf-box-max needs three fractions"),
    (dict(box_fraction_min=(0.7, 0.1, 0.1)), "--vf-box-min 0.7 0.1 0.1 exceeds --vf-box-max 0.625 0.625 0.625"),
    (dict(foreground_ratio=0.0), "--vf-foreground-ratio (fraction of grid blocks fused with the foreground) must"),
    (dict(foreground_ratio=1.2), "must be in (0, 1] (got 1.2)"),
    (dict(block_fraction_min=(0.1, 0.1)), "--vf-block-min needs three fractions"),
    (dict(block_fraction_max=(0.05, 0.25, 0.25)), "--vf-block-min 0.078125 0.0625 0.0625 exceeds --vf-block-max"),
])
def test_bad_knobs_name_the_option_and_the_papers_value(knobs, expected):
    with pytest.raises(ValueError) as e:
        FusionParameters(**knobs)
    assert expected in str(e.value) and "the paper's" in str(e.value)


# ---------------------------------------------------------------------------------------------- the authors' recipe
def test_contrast_remap_sends_a_tied_minimum_to_0p1_as_the_authors_do():
    """Where the low percentile equals the crop's minimum (a large flat background), the minimum lies on the middle
    segment and maps to 0.1, not 0; symmetric at the top (0.9). Without ties the knots are unchanged."""
    from nnunetv2_vf.pretrain.volume_fusion import _contrast_knots, _remap_into, _remap_lookup
    x = np.zeros((10, 10, 10), np.float32)
    x[5:] = np.linspace(0.01, 1, 500, dtype=np.float32).reshape(5, 10, 10)  # half the voxels at the minimum
    knots = _contrast_knots(x, np.random.default_rng(1), float(x.min()), float(x.max()))
    assert knots[0] == knots[1] == 0
    out = np.empty_like(x)
    _remap_into(x, knots, out)
    np.testing.assert_array_equal(out, _remap_lookup(x, knots))
    assert np.all(out[:5] == np.float32(0.1)) and out.min() == np.float32(0.1)
    top = 1 - x  # half the voxels at the maximum
    knots = _contrast_knots(top, np.random.default_rng(1), float(top.min()), float(top.max()))
    assert knots[2] == knots[3] == 1 and np.all(_remap_lookup(top, knots)[:5] == np.float32(0.9))
    ramp = np.linspace(-1, 3, 1000, dtype=np.float32).reshape(10, 10, 10)  # no tie: the end points reach 0 and 1
    knots = _contrast_knots(ramp, np.random.default_rng(2), -1.0, 3.0)
    assert knots[0] < knots[1] and _remap_lookup(ramp, knots).min() == 0 and _remap_lookup(ramp, knots).max() == 1


def test_grid_pairs_come_from_a_source_region_larger_than_the_patch():
    """The authors cut both crops from a region 1.5x the patch, so the crop scale can zoom out: the fused patch has
    the requested shape and is the fusion of the two crops."""
    from nnunetv2_vf.pretrain.volume_fusion import GRID_SOURCE_SCALE, fuse, grid_source_shape
    assert GRID_SOURCE_SCALE == 1.5 and grid_source_shape((64, 128, 128)) == (96, 192, 192)
    with pytest.raises(ValueError, match="--grid-source-scale must be >= 1"):
        grid_source_shape((16, 32, 32), 0.5)
    rng = np.random.default_rng(0)
    source = rng.random((2, 1, 24, 48, 48)).astype(np.float32)
    fused, labels, fg, bg = volume_fusion(source, rng, "grid", output_shape=(16, 32, 32), return_sources=True)
    assert fused.shape == fg.shape == bg.shape == (2, 1, 16, 32, 32) and labels.shape == (2, 1, 16, 32, 32)
    np.testing.assert_allclose(fused, fuse(bg, fg, labels), atol=1e-6)
    with pytest.raises(ValueError, match="'paper' Volume Fusion variant fuses the crops as they are"):
        volume_fusion(source, rng, "paper", output_shape=(16, 32, 32))
    transform = VolumeFusionTransform("grid", seed=0, output_shape=(16, 32, 32))
    assert transform(data=source)["data"].shape == (2, 1, 16, 32, 32)


def test_flip_augmentation_flips_each_axis_about_half_the_time():
    """The authors' only augmentation before fusion: a flip per axis with p = 0.5, content unchanged."""
    from nnunetv2_vf.pretrain.dataset import random_flip
    rng = np.random.default_rng(0)
    crop = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    counts = np.zeros(3)
    for _ in range(400):
        out = random_flip(crop, rng)
        assert out.shape == crop.shape and sorted(out.ravel()) == sorted(crop.ravel())
        d, h, w = np.argwhere(out[0] == 0)[0]  # the corner voxel moves along an axis iff that axis was flipped
        counts += [d == 1, h == 2, w == 3]
    assert ((counts > 160) & (counts < 240)).all()
