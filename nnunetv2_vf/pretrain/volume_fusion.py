"""Volume Fusion (VF) pretext task of MIS-FM (Wang et al., arXiv:2306.16925; TIP 2025 "VolF").

A network input is fused from a background ``B`` and a foreground ``F`` of the same shape,

    X = alpha * F + (1 - alpha) * B,        alpha = Y / 4,  Y in {0, 1, 2, 3, 4} per voxel,

and the network learns to segment the integer fusion map ``Y`` (5 classes) -- no annotation needed.

Two variants (see ``docs/volume_fusion.md``):

* ``"paper"`` (default): ``Y`` is painted with 10..40 random boxes of class 1..4; ``F`` of sample ``n`` is sample
  ``(n - 1) mod B`` of the batch, ``B`` is sample ``n`` itself. Needs a batch of at least 2.
* ``"grid"``: ``F`` and ``B`` are two independently augmented crops of the same sample (scale, crop, resize, flip,
  contrast remap to [0, 1], gamma, joint inversion); ``Y`` is a block grid in which 70 % of the blocks get class 1..4.

These are the paper's values; the number of classes K, boxes per sample, box and block size ranges and the fused
block fraction are parameters (:class:`FusionParameters`, ``nnUNetv2_vf_pretrain --vf-*``) for MIS-FM's ablations.

Layout everywhere: ``[B, C, D, H, W]`` for images, ``[B, 1, D, H, W]`` for fusion maps (nnU-Net's target layout).
All randomness comes from an explicit ``numpy.random.Generator``; the functions are pure otherwise.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from batchgenerators.transforms.abstract_transforms import AbstractTransform

__all__ = [
    "NUM_FUSION_CLASSES", "VARIANTS", "FusionParameters", "PAPER_PARAMETERS",
    "paper_box_size_range", "sample_paper_boxes", "paint_boxes", "paper_box_labels",
    "grid_block_size_range", "grid_block_labels",
    "grid_augmented_crop", "grid_source_shape", "GRID_SOURCE_SCALE", "fuse", "volume_fusion", "downsample_labels", "VolumeFusionTransform",
]

NUM_FUSION_CLASSES = 5  # alpha in {0, 1/4, 2/4, 3/4, 1}
VARIANTS = ("paper", "grid")

# Box-size fractions of the crop (D, H, W) for the "paper" variant; the reference constants for a 64x128x128 crop
# are D 8..40 and H/W 8..80 voxels, i.e. these fractions.
PAPER_BOX_FRACTION_MIN = (1 / 8, 1 / 16, 1 / 16)
PAPER_BOX_FRACTION_MAX = (5 / 8, 5 / 8, 5 / 8)
PAPER_NUM_BOXES = (10, 40)  # inclusive

# Block-size fractions for the "grid" variant; reference [5, 8, 8] .. [20, 32, 32] voxels for 64x128x128.
GRID_BLOCK_FRACTION_MIN = (5 / 64, 8 / 128, 8 / 128)
GRID_BLOCK_FRACTION_MAX = (20 / 64, 32 / 128, 32 / 128)
GRID_FUSED_BLOCK_FRACTION = 0.7

# Crop augmentation of the "grid" variant.
GRID_SCALE_RANGE = (0.7, 1.5)
GRID_LOW_PERCENTILE_RANGE = (0.1, 2.0)
GRID_HIGH_PERCENTILE_RANGE = (98.0, 99.9)
GRID_GAMMA_RANGE = (0.7, 1.5)
GRID_P_FLIP = 0.5
GRID_P_INVERT = 0.25
# The authors cut the two crops of a pair from a source region this many times the patch per axis (96x192x192 for
# 64x128x128), so that the crop scale U(0.7, 1.5) zooms out as well as in.
GRID_SOURCE_SCALE = 1.5
# Percentiles are estimated on at most this many voxels (a regular sub-grid) to keep the remap cheap.
_PERCENTILE_MAX_VOXELS = 1 << 16


def _fractions(values) -> bool:
    return len(values) == 3 and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values)


def _show(values) -> str:
    return " ".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


@dataclass(frozen=True)
class FusionParameters:
    """The knobs of the pretext task (MIS-FM's ablations); the defaults are the paper's / reference code's.

    ``num_classes`` K: fusion coefficients ``alpha in {0, 1/(K-1), ..., 1}`` and K segmentation classes.
    ``num_boxes``: inclusive range of boxes per sample ("paper" variant). ``box_fraction_min/max``: box size range
    per axis (D, H, W) as fractions of the crop ("paper"). ``foreground_ratio``: fraction of the grid blocks that get
    a foreground class 1..K-1 ("grid"). ``block_fraction_min/max``: grid block size range per axis as fractions of
    the crop ("grid"). Each error names the ``nnUNetv2_vf_pretrain`` option of the knob.
    """
    num_classes: int = NUM_FUSION_CLASSES
    num_boxes: Tuple[int, int] = PAPER_NUM_BOXES
    box_fraction_min: Tuple[float, float, float] = PAPER_BOX_FRACTION_MIN
    box_fraction_max: Tuple[float, float, float] = PAPER_BOX_FRACTION_MAX
    foreground_ratio: float = GRID_FUSED_BLOCK_FRACTION
    block_fraction_min: Tuple[float, float, float] = GRID_BLOCK_FRACTION_MIN
    block_fraction_max: Tuple[float, float, float] = GRID_BLOCK_FRACTION_MAX

    # the nnUNetv2_vf_pretrain option of each knob, and the variant it acts in (None: both)
    OPTIONS = {"num_classes": ("--vf-classes", None), "num_boxes": ("--vf-boxes", "paper"),
               "box_fraction_min": ("--vf-box-min", "paper"), "box_fraction_max": ("--vf-box-max", "paper"),
               "foreground_ratio": ("--vf-foreground-ratio", "grid"),
               "block_fraction_min": ("--vf-block-min", "grid"), "block_fraction_max": ("--vf-block-max", "grid")}

    def __post_init__(self):
        for name in ("num_boxes", "box_fraction_min", "box_fraction_max", "block_fraction_min", "block_fraction_max"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        k = self.num_classes
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 2 <= k <= 256:
            raise ValueError(f"--vf-classes (fusion classes K) must be an integer from 2 to 256 (got {k}): alpha "
                             f"takes K values 0, 1/(K-1), ..., 1; e.g. --vf-classes {NUM_FUSION_CLASSES} (the paper's)")
        lo_hi = self.num_boxes
        if (len(lo_hi) != 2 or not all(isinstance(v, (int, np.integer)) for v in lo_hi) or lo_hi[0] < 1
                or lo_hi[1] < lo_hi[0]):
            raise ValueError(f"--vf-boxes needs MIN MAX with 1 <= MIN <= MAX boxes per sample (got {_show(lo_hi)}): "
                             f"e.g. --vf-boxes {_show(PAPER_NUM_BOXES)} (the paper's)")
        for low, high, paper_low, paper_high in (("box_fraction_min", "box_fraction_max", PAPER_BOX_FRACTION_MIN,
                                                  PAPER_BOX_FRACTION_MAX),
                                                 ("block_fraction_min", "block_fraction_max", GRID_BLOCK_FRACTION_MIN,
                                                  GRID_BLOCK_FRACTION_MAX)):
            example = f"e.g. {self.OPTIONS[low][0]} {_show(paper_low)} {self.OPTIONS[high][0]} {_show(paper_high)}"
            for name in (low, high):
                if not _fractions(getattr(self, name)):
                    raise ValueError(f"{self.OPTIONS[name][0]} needs three fractions of the crop D H W, each in "
                                     f"(0, 1] (got {_show(getattr(self, name))}): {example} (the paper's)")
            if any(a > b for a, b in zip(getattr(self, low), getattr(self, high))):
                raise ValueError(f"{self.OPTIONS[low][0]} {_show(getattr(self, low))} exceeds "
                                 f"{self.OPTIONS[high][0]} {_show(getattr(self, high))} on some axis: give minimum "
                                 f"sizes no larger than the maximum ones, {example} (the paper's)")
        r = self.foreground_ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 1:
            raise ValueError(f"--vf-foreground-ratio (fraction of grid blocks fused with the foreground) must be in "
                             f"(0, 1] (got {r}): e.g. --vf-foreground-ratio {GRID_FUSED_BLOCK_FRACTION} (the paper's)")

    def to_dict(self) -> dict:
        """JSON form (lists), as recorded in config.json and the adaptation plan."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PAPER_PARAMETERS = FusionParameters()


# ----------------------------------------------------------------------------------------------------------------
# label maps
# ----------------------------------------------------------------------------------------------------------------
def _scaled_range(shape: Sequence[int], frac_min: Sequence[float], frac_max: Sequence[float]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    shape = np.asarray(shape, dtype=np.float64)
    lo = np.maximum(1, np.round(shape * np.asarray(frac_min))).astype(np.int64)
    hi = np.maximum(lo, np.round(shape * np.asarray(frac_max))).astype(np.int64)
    return lo, hi


def _check_spatial_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a spatial shape (D, H, W) with positive sizes, got {shape}")
    return shape


def paper_box_size_range(shape: Sequence[int], params: FusionParameters = PAPER_PARAMETERS
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive (min, max) box size per axis for a crop of ``shape`` = (D, H, W) (paper: D 1/8..5/8, H/W
    1/16..5/8 of the crop)."""
    return _scaled_range(_check_spatial_shape(shape), params.box_fraction_min, params.box_fraction_max)


def sample_paper_boxes(shape: Sequence[int], rng: np.random.Generator, params: FusionParameters = PAPER_PARAMETERS
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the boxes of one "paper" fusion map: returns ``(starts [M, 3], sizes [M, 3], classes [M])``.

    ``M ~ UniformInt[num_boxes]`` (paper 10..40), sizes uniform in :func:`paper_box_size_range`, centres uniform
    over the crop, classes ``UniformInt[1, K-1]``. Starts may be negative / boxes may stick out: :func:`paint_boxes`
    clips.
    """
    shape = _check_spatial_shape(shape)
    lo, hi = paper_box_size_range(shape, params)
    num_boxes = int(rng.integers(params.num_boxes[0], params.num_boxes[1] + 1))
    sizes = rng.integers(lo, hi + 1, size=(num_boxes, 3))
    centres = rng.integers(0, np.asarray(shape), size=(num_boxes, 3))
    starts = centres - sizes // 2
    classes = rng.integers(1, params.num_classes, size=num_boxes)
    return starts, sizes, classes


def paint_boxes(shape: Sequence[int], starts: np.ndarray, sizes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Paint boxes into a zero uint8 map of ``shape``, in order (later boxes overwrite), clipped to the crop."""
    shape = _check_spatial_shape(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    lower = np.clip(starts, 0, shape)
    upper = np.clip(starts + sizes, 0, shape)
    for (d0, h0, w0), (d1, h1, w1), c in zip(lower, upper, classes):
        labels[d0:d1, h0:h1, w0:w1] = c
    return labels


def paper_box_labels(shape: Sequence[int], rng: np.random.Generator, params: FusionParameters = PAPER_PARAMETERS
                     ) -> np.ndarray:
    """One "paper" fusion map (uint8, values 0..K-1) for a crop of spatial ``shape`` = (D, H, W)."""
    return paint_boxes(shape, *sample_paper_boxes(shape, rng, params))


def grid_block_size_range(shape: Sequence[int], params: FusionParameters = PAPER_PARAMETERS
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive (min, max) block size per axis of the "grid" variant for a crop of ``shape`` = (D, H, W)."""
    return _scaled_range(_check_spatial_shape(shape), params.block_fraction_min, params.block_fraction_max)


def grid_block_labels(shape: Sequence[int], rng: np.random.Generator, params: FusionParameters = PAPER_PARAMETERS
                      ) -> np.ndarray:
    """One "grid" fusion map (uint8, values 0..K-1) for a crop of spatial ``shape`` = (D, H, W).

    One block size per map (per axis uniform in :func:`grid_block_size_range`); the grid holds
    ``floor(size / block)`` whole blocks per axis, placed at a random offset within the remainder (which stays
    class 0); exactly ``floor(foreground_ratio * number_of_blocks)`` (paper 0.7) randomly chosen blocks get a class
    ``UniformInt[1, K-1]``.
    """
    shape = _check_spatial_shape(shape)
    lo, hi = grid_block_size_range(shape, params)
    block = rng.integers(lo, hi + 1)
    num_blocks = np.asarray(shape) // block
    offset = rng.integers(0, np.asarray(shape) - num_blocks * block + 1)
    labels = np.zeros(shape, dtype=np.uint8)
    total = int(np.prod(num_blocks))
    if total == 0:
        return labels
    block_classes = np.zeros(total, dtype=np.uint8)
    fused = rng.choice(total, size=int(np.floor(params.foreground_ratio * total)), replace=False)
    block_classes[fused] = rng.integers(1, params.num_classes, size=fused.size)
    block_classes = block_classes.reshape(tuple(num_blocks))
    for axis in range(3):
        block_classes = np.repeat(block_classes, block[axis], axis=axis)
    region = tuple(slice(o, o + s) for o, s in zip(offset, block_classes.shape))
    labels[region] = block_classes
    return labels


# ----------------------------------------------------------------------------------------------------------------
# crop augmentation of the "grid" variant
# ----------------------------------------------------------------------------------------------------------------
def _contrast_knots(probe: np.ndarray, rng: np.random.Generator, x_min: float, x_max: float
                    ) -> Optional[np.ndarray]:
    """Knots [min, q_lo, q_hi, max] (float64, strictly increasing) of the contrast remap, which maps them to
    [0, 0.1, 0.9, 1]: percentiles ``U(0.1, 2)`` and ``U(98, 99.9)`` of ``probe``; None for a constant crop.

    A percentile can equal the crop's extreme (a large zero-padded or saturated region). The authors' remap then
    sends those voxels to 0.1 (0.9 at the top): the outer segment has zero width and the voxels lie on the middle
    one (:func:`_segments`), so ``knots[0] <= knots[1] < knots[2] <= knots[3]``.
    """
    p_lo = rng.uniform(*GRID_LOW_PERCENTILE_RANGE)
    p_hi = rng.uniform(*GRID_HIGH_PERCENTILE_RANGE)
    q_lo, q_hi = np.percentile(probe, [p_lo, p_hi])
    if x_max <= x_min:  # constant crop: nothing to remap
        return None
    eps = (x_max - x_min) * 1e-6
    knots = np.array([x_min, q_lo, q_hi, x_max], dtype=np.float64)
    knots[2] = max(knots[2], knots[1] + eps)  # a tie in the middle (>= 98 % equal voxels) needs a finite slope
    knots[3] = max(knots[3], knots[2])
    return knots


_REMAP_TARGETS = np.array([0.0, 0.1, 0.9, 1.0])


def _segments(knots: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float64 (slopes, intercepts) of the three remap segments; a zero-width outer segment (a percentile tied with
    the extreme) is the constant 0.1 / 0.9, the value of the middle segment at that knot."""
    widths = np.diff(knots)
    slopes = np.divide(np.diff(_REMAP_TARGETS), widths, out=np.zeros(3), where=widths > 0)
    intercepts = _REMAP_TARGETS[:3] - slopes * knots[:3]
    intercepts[0] = intercepts[0] if widths[0] > 0 else _REMAP_TARGETS[1]
    intercepts[2] = intercepts[2] if widths[2] > 0 else _REMAP_TARGETS[2]
    return slopes, intercepts


def _float32_below_or_equal(value: float) -> np.float32:
    """The largest float32 <= ``value``: for float32 ``x``, ``x > value`` (compared in float64) iff ``x > this``."""
    v = np.float32(value)
    if float(v) > value:
        v = np.nextafter(v, np.float32(-np.inf))
    return v


def _probe(x: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil((x.size / _PERCENTILE_MAX_VOXELS) ** (1 / 3))))
    return x[::step, ::step, ::step]


def _remap_into(x: np.ndarray, knots: np.ndarray, out: np.ndarray) -> None:
    """``out = clip(slope[seg] * x + intercept[seg], 0, 1)`` in float32, seg = segment of ``x`` between the knots.

    Bit-identical to a per-voxel segment lookup (each voxel sees the same float32 multiply and add), but computed
    as the middle segment everywhere plus a fix-up of the few voxels below ``q_lo`` / above ``q_hi`` through their
    flat indices (``take`` / ``put``: boolean indexing costs a full pass per gather and per scatter). ``out`` has
    the shape of ``x`` (contiguous is fastest) and must not alias it.
    """
    slopes64, intercepts64 = _segments(knots)
    slopes, intercepts = slopes64.astype(np.float32), intercepts64.astype(np.float32)
    k_lo = _float32_below_or_equal(knots[1])
    k_hi = _float32_below_or_equal(knots[2])
    np.multiply(x, slopes[1], out=out)
    out += intercepts[1]
    flat = x.reshape(-1)
    for where, knot, seg in ((np.less_equal, k_lo, 0), (np.greater, k_hi, 2)):  # disjoint: knots[2] > knots[1]
        index = np.flatnonzero(where(flat, knot))
        if index.size:
            part = flat.take(index)
            part *= slopes[seg]
            part += intercepts[seg]
            np.put(out, index, part)
    np.clip(out, 0.0, 1.0, out=out)


def _remap_lookup(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Reference form of :func:`_remap_into`: the per-voxel segment lookup (kept for the equivalence test and for
    readability)."""
    slopes, intercepts = _segments(knots)
    segment = (x > knots[1]).astype(np.int8)
    segment += x > knots[2]
    out = slopes.astype(np.float32)[segment]
    out *= x
    out += intercepts.astype(np.float32)[segment]
    return np.clip(out, 0.0, 1.0, out=out)


def _gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    """In-place ``x ** gamma`` for x in [0, 1], as exp(gamma * log x): about 2x faster than np.power in float32."""
    with np.errstate(divide="ignore"):
        np.log(x, out=x)
    x *= np.float32(gamma)
    return np.exp(x, out=x)


def grid_augmented_crop(volume: np.ndarray, output_shape: Sequence[int], rng: np.random.Generator,
                        invert: bool = False, out: Optional[np.ndarray] = None) -> np.ndarray:
    """One augmented crop of a [C, D, H, W] ``volume`` with spatial ``output_shape``, intensities in [0, 1].

    Per axis scale ``s ~ U(0.7, 1.5)``; a crop of ``min(round(out * s), volume)`` voxels at a random position is
    resized (trilinear) to ``output_shape``; each axis flipped with p = 0.5; each channel remapped piecewise
    linearly between two random percentiles to [0, 1], then gamma ``g ~ U(0.7, 1.5)``; ``invert`` maps x -> 1 - x
    (the caller decides, so that both crops of a pair are inverted together). ``out``: optional float32
    [C, *output_shape] array to write into (returned).
    """
    volume = np.asarray(volume)
    if volume.ndim != 4:
        raise ValueError(f"expected one sample [C, D, H, W], got shape {volume.shape}")
    out_shape = np.asarray(_check_spatial_shape(output_shape))
    spatial = np.asarray(volume.shape[1:])
    scale = rng.uniform(*GRID_SCALE_RANGE, size=3)
    crop = np.clip(np.round(out_shape * scale).astype(np.int64), 1, spatial)
    start = rng.integers(0, spatial - crop + 1)
    region = (slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, crop))
    cropped = torch.from_numpy(np.ascontiguousarray(volume[region], dtype=np.float32))
    if tuple(crop) != tuple(out_shape):
        cropped = torch.nn.functional.interpolate(cropped[None], size=tuple(int(o) for o in out_shape),
                                                  mode="trilinear", align_corners=False)[0]
    x = cropped.numpy()
    flip_axes = tuple(1 + a for a in range(3) if rng.uniform() < GRID_P_FLIP)
    result = np.empty(x.shape, dtype=np.float32) if out is None else out
    # the remap and gamma are voxel-wise: they run on the unflipped crop in a contiguous scratch array, and the flip
    # (and the inversion) happen in the one strided pass that writes the result; only the percentile probe, whose
    # sub-grid depends on the orientation, is taken from the flipped crop, as before.
    target = np.flip(result, axis=flip_axes) if flip_axes else result
    flipped = np.flip(x, axis=flip_axes) if flip_axes else x
    scratch = np.empty(x.shape[1:], dtype=np.float32)
    for c in range(x.shape[0]):
        low, high = torch.aminmax(cropped[c])  # one pass for both (exact, like numpy's min and max)
        knots = _contrast_knots(_probe(flipped[c]), rng, float(low), float(high))
        if knots is None:
            scratch.fill(0.0)
        else:
            _remap_into(x[c], knots, scratch)
        _gamma(scratch, rng.uniform(*GRID_GAMMA_RANGE))
        if invert:
            np.subtract(1.0, scratch, out=target[c])
        else:
            np.copyto(target[c], scratch)
    return result


def grid_source_shape(patch_size: Sequence[int], scale: float = GRID_SOURCE_SCALE) -> Tuple[int, int, int]:
    """The source region of a "grid" pair for a patch: ``round(scale * patch)`` per axis (``scale`` >= 1)."""
    if not scale >= 1:
        raise ValueError(f"--grid-source-scale must be >= 1 (got {scale}): the source region holds the patch; "
                         f"e.g. --grid-source-scale {GRID_SOURCE_SCALE} (the authors')")
    return tuple(int(round(p * scale)) for p in _check_spatial_shape(patch_size))


def _grid_pair(sample: np.ndarray, rng: np.random.Generator, foreground: Optional[np.ndarray] = None,
               background: Optional[np.ndarray] = None, output_shape: Optional[Sequence[int]] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
    """(foreground, background): two independently augmented crops of ``sample`` (the source region), resized to
    ``output_shape`` (default: the sample's), inverted together (p=0.25)."""
    invert = bool(rng.uniform() < GRID_P_INVERT)
    shape = sample.shape[1:] if output_shape is None else output_shape
    foreground = grid_augmented_crop(sample, shape, rng, invert, out=foreground)
    background = grid_augmented_crop(sample, shape, rng, invert, out=background)
    return foreground, background


# ----------------------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------------------
def fuse(background: np.ndarray, foreground: np.ndarray, labels: np.ndarray, dtype=None,
         num_classes: int = NUM_FUSION_CLASSES) -> np.ndarray:
    """``alpha * foreground + (1 - alpha) * background`` with ``alpha = labels / (K - 1)`` (K = ``num_classes``,
    paper 5) broadcast over channels.

    ``background``/``foreground`` [B, C, D, H, W], ``labels`` [B, 1, D, H, W]; computed in float32 (float64 for
    float64 input) and cast to ``dtype`` (default: the background's dtype).
    """
    dtype = background.dtype if dtype is None else np.dtype(dtype)
    compute = np.float64 if dtype == np.float64 else np.float32
    alpha = labels.astype(compute) / (num_classes - 1)
    fused = alpha * foreground.astype(compute, copy=False) + (1 - alpha) * background.astype(compute, copy=False)
    return fused.astype(dtype, copy=False)


def _fuse_float32_in_place(background: np.ndarray, foreground: np.ndarray, labels: np.ndarray,
                           num_classes: int = NUM_FUSION_CLASSES) -> np.ndarray:
    """:func:`fuse` for float32 sources that may be overwritten: the same float32 operations, computed in place;
    returns ``foreground`` holding the result."""
    alpha = labels.astype(np.float32)
    alpha /= np.float32(num_classes - 1)
    beta = np.subtract(np.float32(1), alpha)
    foreground *= alpha
    background *= beta
    foreground += background
    return foreground


def _validate_batch(batch: np.ndarray, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Volume Fusion variant {variant!r}; choose one of {list(VARIANTS)}")
    if batch.ndim != 5:
        raise ValueError(
            f"Volume Fusion expects a batch of 3D crops with layout [B, C, D, H, W], got an array of shape "
            f"{tuple(batch.shape)} ({batch.ndim}D); for 2D slices add a singleton depth axis ([B, C, 1, H, W]).")
    if not np.issubdtype(batch.dtype, np.floating):
        raise ValueError(f"Volume Fusion needs a floating-point batch, got dtype {batch.dtype}; convert it first, "
                         f"e.g. batch.astype(np.float32)")
    if variant == "paper" and batch.shape[0] < 2:
        raise ValueError(
            f"the 'paper' Volume Fusion variant takes the foreground from another sample of the batch, but the "
            f"batch holds {batch.shape[0]} sample; use a batch size >= 2 or variant='grid' (which fuses two "
            f"crops of the same sample)")
    if not np.isfinite(batch).all():
        raise ValueError(
            "the batch contains NaN or Inf values; clean/normalise the input first (the pretraining "
            "preprocessing replaces non-finite voxels, e.g. np.nan_to_num after intensity normalisation)")


def volume_fusion(batch: np.ndarray, rng: np.random.Generator, variant: str = "paper", *,
                  params: FusionParameters = PAPER_PARAMETERS, return_sources: bool = False,
                  output_shape: Optional[Sequence[int]] = None):
    """Fuse a batch ``[B, C, D, H, W]`` into Volume Fusion inputs and their K-class targets (``params``; paper
    K = 5).

    Returns ``(fused, labels)``: ``fused`` has the shape and dtype of ``batch``; ``labels`` is uint8
    ``[B, 1, D, H, W]`` in 0..K-1, with ``fused == a * F + (1 - a) * Bg``, ``a = labels / (K - 1)``, where, for
    ``variant="paper"``, ``Bg = batch`` and ``F = np.roll(batch, 1, axis=0)`` (sample ``(n - 1) mod B``), and for
    ``variant="grid"`` ``F``/``Bg`` are the two augmented crops of each sample. With ``return_sources=True`` the
    result is ``(fused, labels, F, Bg)``.

    ``output_shape`` (``"grid"`` only): the spatial shape of the fused patch when ``batch`` holds larger source
    regions (the authors cut both crops from a region :data:`GRID_SOURCE_SCALE` times the patch, so the 0.7-1.5
    scale can zoom out as well as in); default: the batch's own shape.
    """
    batch = np.asarray(batch)
    _validate_batch(batch, variant)
    spatial = batch.shape[2:] if output_shape is None else _check_spatial_shape(output_shape)
    if variant == "paper" and tuple(spatial) != tuple(batch.shape[2:]):
        raise ValueError(f"the 'paper' Volume Fusion variant fuses the crops as they are: output_shape {spatial} "
                         f"must equal the batch's spatial shape {tuple(batch.shape[2:])} (or be omitted)")
    if variant == "paper":
        labels = np.stack([paper_box_labels(spatial, rng, params) for _ in range(batch.shape[0])])[:, None]
        background = batch
        foreground = np.roll(batch, 1, axis=0)
    else:
        # the crops are written straight into the stacked arrays (no per-sample arrays and np.stack copies)
        shape = (*batch.shape[:2], *spatial)
        foreground = np.empty(shape, dtype=np.float32)
        background = np.empty(shape, dtype=np.float32)
        for n, sample in enumerate(batch):
            _grid_pair(sample, rng, foreground[n], background[n], spatial)
        labels = np.stack([grid_block_labels(spatial, rng, params) for _ in range(batch.shape[0])])[:, None]
        if batch.dtype == np.float32 and not return_sources:
            return _fuse_float32_in_place(background, foreground, labels, params.num_classes), labels
    fused = fuse(background, foreground, labels, dtype=batch.dtype, num_classes=params.num_classes)
    if return_sources:
        return fused, labels, foreground, background
    return fused, labels


def downsample_labels(labels: np.ndarray, scales: Sequence[Union[float, Sequence[float]]]) -> List[np.ndarray]:
    """Nearest-neighbour pyramids of a [B, 1, D, H, W] label batch for deep supervision (nnU-Net's scales).

    Reuses batchgeneratorsv2's ``DownsampleSegForDSTransform`` (what nnU-Net 2.8 applies per sample) on the whole
    batch by treating the batch axis as its channel axis.
    """
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    as_torch = isinstance(labels, torch.Tensor)
    tensor = labels if as_torch else torch.from_numpy(np.ascontiguousarray(labels))
    if tensor.ndim != 5 or tensor.shape[1] != 1:
        raise ValueError(f"expected labels [B, 1, D, H, W], got shape {tuple(tensor.shape)}")
    pyramid = DownsampleSegForDSTransform(scales)._apply_to_segmentation(tensor[:, 0])
    pyramid = [level[:, None] for level in pyramid]
    return pyramid if as_torch else [level.numpy() for level in pyramid]


# ----------------------------------------------------------------------------------------------------------------
# batchgenerators transform
# ----------------------------------------------------------------------------------------------------------------
class VolumeFusionTransform(AbstractTransform):
    """batchgenerators batch transform: ``data_dict[data_key]`` -> fused batch, ``data_dict[label_key]`` -> labels.

    Accepts numpy arrays or torch tensors (nnU-Net 2.8's data loader yields torch) and returns the same kind:
    numpy labels are uint8, torch labels int16 (nnU-Net's segmentation dtype). With ``deep_supervision_scales``
    (e.g. ``nnUNetTrainer._get_deep_supervision_scales()``) the labels become a list of nearest-downsampled maps,
    highest resolution first, as nnU-Net's deep-supervision loss expects.

    Random streams: the generator is created lazily in the process that uses the transform, so every
    ``MultiThreadedAugmenter``/``NonDetMultiThreadedAugmenter`` worker draws its own stream. ``seed=None``: each
    process seeds from OS entropy (independent, not reproducible). Integer ``seed``: the creating process uses
    ``SeedSequence(seed)``; any other process (an augmenter worker) uses ``SeedSequence(seed, spawn_key=(k,))`` with
    ``k`` drawn from the global numpy RNG that batchgenerators seeds per worker (``seeds=`` of the augmenter). So
    with a seeded augmenter, workers differ from each other and every run repeats; with ``seeds=None`` workers
    are seeded from OS entropy by batchgenerators and differ run to run, like the data loader's own sampling.

    ``output_shape`` ("grid"): the patch, when the loader yields larger source regions (see :func:`volume_fusion`).
    """

    def __init__(self, variant: str = "paper", data_key: str = "data", label_key: str = "target",
                 seed: Optional[int] = None,
                 deep_supervision_scales: Optional[Sequence[Union[float, Sequence[float]]]] = None,
                 params: FusionParameters = PAPER_PARAMETERS, output_shape: Optional[Sequence[int]] = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown Volume Fusion variant {variant!r}; choose one of {list(VARIANTS)}")
        self.variant = variant
        self.data_key = data_key
        self.label_key = label_key
        self.seed = seed
        self.params = params
        self.output_shape = None if output_shape is None else tuple(int(s) for s in output_shape)
        self.deep_supervision_scales = None if deep_supervision_scales is None else list(deep_supervision_scales)
        self._owner_pid = os.getpid()
        self._rng: Optional[np.random.Generator] = None
        self._rng_pid: Optional[int] = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_rng"] = None  # a process that unpickles the transform starts its own stream
        state["_rng_pid"] = None
        return state

    @property
    def rng(self) -> np.random.Generator:
        pid = os.getpid()
        if self._rng is None or self._rng_pid != pid:
            if self.seed is None:
                seed_sequence = np.random.SeedSequence()
            elif pid == self._owner_pid:
                seed_sequence = np.random.SeedSequence(self.seed)
            else:
                worker_key = int(np.random.randint(0, 2 ** 31 - 1))
                seed_sequence = np.random.SeedSequence(self.seed, spawn_key=(worker_key,))
            self._rng = np.random.default_rng(seed_sequence)
            self._rng_pid = pid
        return self._rng

    def __call__(self, **data_dict):
        data = data_dict.get(self.data_key)
        if data is None:
            raise KeyError(f"VolumeFusionTransform: no {self.data_key!r} in the batch (keys: {list(data_dict)}); "
                           f"set data_key to the image key of your data loader")
        as_torch = isinstance(data, torch.Tensor)
        batch = data.detach().cpu().numpy() if as_torch else np.asarray(data)
        fused, labels = volume_fusion(batch, self.rng, self.variant, params=self.params,
                                      output_shape=self.output_shape)
        if as_torch:
            fused = torch.from_numpy(fused)
            labels = torch.from_numpy(labels).to(torch.int16)
        if self.deep_supervision_scales is not None:
            labels = downsample_labels(labels, self.deep_supervision_scales)
        data_dict[self.data_key] = fused
        data_dict[self.label_key] = labels
        return data_dict

    def __repr__(self):
        return (f"{type(self).__name__}(variant={self.variant!r}, data_key={self.data_key!r}, "
                f"label_key={self.label_key!r}, seed={self.seed!r}, "
                f"deep_supervision_scales={self.deep_supervision_scales!r}, params={self.params!r}, "
                f"output_shape={self.output_shape!r})")
