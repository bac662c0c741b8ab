"""PCT-Net: parallel convolution and transformer network (MIS-FM, Wang et al., arXiv:2306.16925).

Written from ``shared/spec/pctnet.md``.  Tensor layout is [B, C, D, H, W] throughout (depth first, as nnU-Net
stores volumes); the transformer branch works on tokens [B, D*H*W, C].

Differences from the authors' module, all deliberate:
- only the stem and head of the chosen resolution mode exist (the reference stores three of each, two unused);
- window partition, padding and shift masks are computed from the actual input, so one set of weights runs on any
  patch whose sides are divisible by :func:`required_divisibility`;
- relative-position tables always have the full ``(2 * window_size - 1) ** 3`` rows; a block whose token grid is
  not larger than the window shrinks its window as the reference does, and reads the reference's smaller table
  from the centre of the full one (:func:`centre_table_rows`), so one set of weights runs on any valid patch and
  the authors' checkpoints with shrunken tables load exactly; files of these weights record that layout
  (:data:`TABLE_LAYOUT`), and weights without the record are refused (:func:`check_table_layout`);
- the unused per-block LayerNorm of the reference is not created;
- the final 1x1x1 classifiers live in ``decoder.seg_layers`` (nnU-Net's ``-pretrained_weights`` skips them) and
  their norm/activation in ``decoder.heads`` (those transfer).
"""
from __future__ import annotations

import contextlib
import math
import os
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunetv2_vf.architectures.pctnet_sizes import PAPER_FEATURES, SMALL_FEATURES
from nnunetv2_vf.checkpoint_io import read_weights_file, trained_checkpoint_kind

__all__ = ["PCTNet", "pctnet_strides", "required_divisibility", "fit_patch_size", "load_misfm_weights",
           "convert_misfm_state_dict", "misfm_relative_position_index", "centre_table_rows",
           "place_table_at_centre", "PAPER_FEATURES", "SMALL_FEATURES", "TABLE_LAYOUT_KEY", "TABLE_LAYOUT",
           "TABLE_LAYOUT_FIX", "TableLayoutError", "has_relative_position_tables", "table_layout_record",
           "table_layout_problem", "check_table_layout"]


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------------
def _planar(resolution_mode: int, level: int) -> bool:
    """Levels below the resolution mode convolve in-plane only (1x3x3)."""
    return level < resolution_mode


def pctnet_strides(resolution_mode: int) -> list[list[int]]:
    """Down-sampling per level in nnU-Net's ``pool_op_kernel_sizes`` form (level 0 first, [1,1,1])."""
    if resolution_mode not in (0, 1, 2):
        raise ValueError(f"resolution_mode must be 0, 1 or 2, got {resolution_mode}")
    return [[1, 1, 1]] + [[1, 2, 2] if _planar(resolution_mode, lvl) else [2, 2, 2] for lvl in range(4)]


def required_divisibility(resolution_mode: int) -> tuple[int, int, int]:
    """Patch sides (D, H, W) must be multiples of these: the total down-sampling per axis."""
    strides = pctnet_strides(resolution_mode)
    return tuple(math.prod(s[axis] for s in strides) for axis in range(3))


def fit_patch_size(patch_size: Sequence[int], resolution_mode: int) -> list[int]:
    """Round each patch side up to the next multiple the network accepts."""
    div = required_divisibility(resolution_mode)
    return [int(-(-int(p) // d) * d) for p, d in zip(patch_size, div)]


def _kernel(planar: bool) -> tuple[int, int, int]:
    return (1, 3, 3) if planar else (3, 3, 3)


def _same_padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


# ----------------------------------------------------------------------------------------------------------------
# dropout with cheap masks
# ----------------------------------------------------------------------------------------------------------------
def _times_mask(x: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * keep`` for a CPU tensor outside autograd and a boolean ``keep`` of its shape, in one pass: numpy's
    product casts the booleans in small buffers, whereas torch's product by a bool tensor first copies it to a
    full-size float tensor (and ``masked_fill_`` is slower still). ``out`` may be ``x``."""
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16
        return torch.mul(x, keep, out=torch.empty_like(x) if out is None else out)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    np.multiply(x.numpy(), keep.numpy(), out=out.numpy())
    return out


def _masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * scale * keep`` (``keep`` boolean, on the CPU): two passes and no float mask."""
    out = x.mul(scale)
    if out.requires_grad:  # double backward: stay in autograd
        return out.mul_(keep)
    return _times_mask(out, keep, out=out)


class _MaskedScale(torch.autograd.Function):
    """``x * keep / (1 - p)``, saving only the boolean mask (1 byte per element instead of a float noise tensor);
    forward and backward multiply by the scale and then by the boolean mask (no float mask is built)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.scale), None, None


_MASK_CHUNK = 2 ** 21  # elements per chunk of _keep_mask (even: two per 64-bit word, so chunks continue the stream)


def _keep_mask(shape: Sequence[int], p: float) -> torch.Tensor:
    """Boolean CPU mask, False (dropped) with probability ``p`` (to 2**-33): 32 random bits per element compared
    with ``round(p * 2**32)``.

    The bits come from numpy's SFC64 (``random_raw``: two elements per 64-bit draw), several times faster on CPU
    than ``bernoulli_`` or ``torch.rand``, seeded from torch's default CPU generator: ``torch.manual_seed`` still
    makes runs repeatable, and activation checkpointing (which restores torch's RNG state before recomputing)
    draws the same mask again.
    """
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
    n = int(np.prod(shape))
    threshold = np.uint32(round(p * 2 ** 32))
    generator = np.random.SFC64(seed)
    keep = np.empty(n, dtype=bool)
    # the bits are drawn in chunks of 2**20 64-bit words (the same stream as one draw): an 8 MiB buffer instead of
    # 4 bytes per element, which on CPU costs more in fresh pages than the comparison itself
    for start in range(0, n, _MASK_CHUNK):
        stop = min(start + _MASK_CHUNK, n)
        bits = generator.random_raw((stop - start + 1) // 2).view(np.uint32)[:stop - start]
        np.greater_equal(bits, threshold, out=keep[start:stop])
    return torch.from_numpy(keep).view(tuple(shape))



def _cpu_masks(x: torch.Tensor) -> bool:
    """Whether dropout draws its mask with :func:`_keep_mask` (eager CPU) rather than ``F.dropout``."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Same distribution as ``F.dropout`` (each element zeroed with probability ``p``, survivors scaled by
    ``1 / (1 - p)``). On CPU the mask is drawn by :func:`_keep_mask`; elsewhere (CUDA's fused kernel) and under
    ``torch.compile`` it is ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or not _cpu_masks(x):
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, _keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same attributes, no state) drawing its CPU masks with :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def _negative_part_dot(x: torch.Tensor, g: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """``dot(min(x, 0), g)`` for flat tensors, in cache-sized chunks: no full-size temporary (whose fresh pages
    cost more than the arithmetic on CPU)."""
    total = x.new_zeros(())
    for xs, gs in zip(x.split(chunk), g.split(chunk)):
        total += torch.dot(torch.clamp_max(xs, 0), gs)
    return total


class _SharedSlopePReLU(torch.autograd.Function):
    """PReLU with one slope, same forward (``F.prelu``); the backward uses the vectorised leaky-ReLU backward
    kernel for the input gradient and ``clamp_max`` + ``dot`` for the slope, instead of ATen's PReLU backward,
    which writes a full-size slope gradient and then reduces it (on one CPU thread about 5x less time)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # grad where x > 0, grad * slope elsewhere (exactly what prelu's kernel does)
            grad_x = torch.ops.aten.leaky_relu_backward(grad, x, float(weight.reshape(-1)[0]), False)
        if ctx.needs_input_grad[1]:  # sum over x <= 0 of x * grad
            grad_w = _negative_part_dot(x.reshape(-1), grad.reshape(-1).to(x.dtype))
            grad_w = grad_w.to(weight.dtype).view(weight.shape)
        return grad_x, grad_w


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameter) with the cheaper CPU backward of :class:`_SharedSlopePReLU`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() == 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return _SharedSlopePReLU.apply(x, self.weight)
        return F.prelu(x, self.weight)


# ----------------------------------------------------------------------------------------------------------------
# activation checkpointing (opt-in)
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _running_stats_frozen(modules: Sequence[nn.Module]):
    """BatchNorm running statistics left untouched (momentum 0 -> running * 1 + batch * 0, the exact old value; the
    step counter restored): the recomputation of a checkpointed segment must not count the batch twice."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class _Checkpointable:
    """Mixin of the blocks that activation checkpointing recomputes: ``_run`` goes through
    ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved so that dropout draws the same masks when
    recomputed) when ``checkpoint_blocks`` is set (by :class:`PCTNet`) and gradients are being recorded."""

    checkpoint_blocks = False

    def _run(self, modules: Sequence[nn.Module], fn, *args):
        if not (self.checkpoint_blocks and self.training and torch.is_grad_enabled()):
            return fn(*args)
        calls = []

        def segment(*inputs):
            calls.append(None)
            if len(calls) == 1:
                return fn(*inputs)
            with _running_stats_frozen(modules):  # recomputation in backward
                return fn(*inputs)

        return checkpoint(segment, *args, use_reentrant=False, preserve_rng_state=True)


# ----------------------------------------------------------------------------------------------------------------
# convolutional building blocks (pre-activation: BatchNorm3d + PReLU with one shared slope)
# ----------------------------------------------------------------------------------------------------------------
class NormActConv(nn.Sequential):
    """BN -> PReLU -> Conv3d ("BPC" in the spec). Indices 0, 1, 2 match the reference layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__(nn.BatchNorm3d(in_channels), PReLU(),
                         nn.Conv3d(in_channels, out_channels, tuple(kernel), padding=_same_padding(kernel)))


class ConvBlock(nn.Sequential, _Checkpointable):
    """BN, PReLU, Conv, BN, PReLU, Dropout, Conv; no residual (indices as in the reference)."""

    def __init__(self, channels: int, kernel: Sequence[int], dropout: float):
        kernel = tuple(kernel)
        super().__init__(nn.BatchNorm3d(channels), PReLU(),
                         nn.Conv3d(channels, channels, kernel, padding=_same_padding(kernel)),
                         nn.BatchNorm3d(channels), PReLU(), Dropout(dropout),
                         nn.Conv3d(channels, channels, kernel, padding=_same_padding(kernel)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run((self,), super().forward, x)


class DownBlock(nn.Module, _Checkpointable):
    """Max-pool by ``stride`` then NormActConv."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], kernel: Sequence[int]):
        super().__init__()
        self.pool = nn.MaxPool3d(tuple(stride))
        self.conv = NormActConv(in_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run((self,), lambda t: self.conv(self.pool(t)), x)


class UpCatBlock(nn.Module, _Checkpointable):
    """Up-sample the deeper map to the skip's channels, concatenate [skip, up], fuse back to the skip's channels."""

    def __init__(self, skip_channels: int, deep_channels: int, stride: Sequence[int], kernel: Sequence[int]):
        super().__init__()
        stride = tuple(stride)
        self.up = nn.Sequential(nn.BatchNorm3d(deep_channels), PReLU(),
                                nn.ConvTranspose3d(deep_channels, skip_channels, stride, stride=stride))
        self.conv = NormActConv(2 * skip_channels, skip_channels, kernel)

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        return self._run((self,), lambda a, b: self.conv(torch.cat([a, self.up(b)], dim=1)), skip, deep)


# ----------------------------------------------------------------------------------------------------------------
# 3D Swin transformer
# ----------------------------------------------------------------------------------------------------------------
def misfm_relative_position_index(window: int, table_window: int | None = None) -> torch.Tensor:
    """Row of the bias table for every pair of tokens in a ``window**3`` window: [window**3, window**3].

    Reproduces the reference's quirk (row = a*(3w-1) + b*(2w-1) + c rather than a*(2w-1)**2 + ...) so that its
    published tables mean the same thing here.  ``table_window`` (default ``window``) is the window the table was
    built for; a smaller effective window reads the reference's smaller table placed at the centre of that table
    (:func:`centre_table_rows`).
    """
    return _relative_position_index(int(window), int(table_window or window)).clone()


def centre_table_rows(window: int, table_window: int) -> torch.Tensor:
    """Row of a ``(2 * table_window - 1) ** 3`` bias table that holds each row of a ``(2 * window - 1) ** 3`` table
    placed at its centre (pure function; [(2 * window - 1) ** 3] int64, identity when the windows are equal).
    """
    window, table_window = int(window), int(table_window)
    if not 1 <= window <= table_window:
        raise ValueError(f"a window of {window} cannot be read from the table of window {table_window} "
                         f"(need 1 <= window <= table_window)")
    # Both tables are read as cubes in C order: row r of a table of side s = 2w - 1 is the voxel
    # (r // s**2, r // s % s, r % s).  The small cube (side 2w' - 1) sits inside the full one (side 2w - 1) with the
    # margin w - w' on every axis, so the two cubes share their centre voxel.  Placement is by row, not by relative
    # offset: the reference's quirky index is not a cube layout (rows collide, e.g. for w' = 4 offsets that share a
    # full-window row have different small-window rows), so no placement by offset can reproduce a shrunken table;
    # the rows of a window-w' level are therefore not the rows the full window uses for the same offsets, just as
    # the reference's table for another window is another tensor.
    small, full, margin = 2 * window - 1, 2 * table_window - 1, table_window - window
    cube = torch.arange(small) + margin
    return ((cube[:, None, None] * full + cube[None, :, None]) * full + cube[None, None, :]).reshape(-1)


def place_table_at_centre(table: torch.Tensor, table_window: int) -> torch.Tensor:
    """A ``[(2 * table_window - 1) ** 3, heads]`` table holding a smaller reference table ``[(2w' - 1) ** 3, heads]``
    at its centre (:func:`centre_table_rows`); the other rows are zero: the reference has no values for them, and a
    zero bias prefers no offset should a larger patch use the full window (pure function)."""
    side = round(table.shape[0] ** (1 / 3))
    if table.ndim != 2 or side ** 3 != table.shape[0] or side % 2 == 0 or side > 2 * table_window - 1:
        raise ValueError(f"a relative-position bias table has (2w - 1)**3 rows x heads for a window w <= "
                         f"{table_window}; got shape {tuple(table.shape)}")
    out = table.new_zeros(((2 * table_window - 1) ** 3, table.shape[1]))
    out[centre_table_rows((side + 1) // 2, table_window)] = table
    return out


# Which rows of a relative-position bias table a shrunk window reads is part of what saved weights mean: files of
# PCT-Net weights (pretraining checkpoints, converted MIS-FM weights) and adaptation plans of PCT-Net record it under
# TABLE_LAYOUT_KEY.  TABLE_LAYOUT: a shrunk window w' reads the (2w'-1)**3 rows at the table's centre
# (centre_table_rows), as the MIS-FM authors' network does.  Weights without the record have the offset layout: a
# shrunk window reads the rows the full window gives the same relative offsets (the quirky index with the table
# window's strides and offset shift).  Both agree at the full window only.
TABLE_LAYOUT_KEY = "pctnet_table_layout"
TABLE_LAYOUT = "centre-v2"
# how weights in the offset layout are replaced (the fix of every refusal; each place adds its own steps)
TABLE_LAYOUT_FIX = ("pretrain again with this nnunetv2_vf (nnUNetv2_vf_pretrain), or convert the MIS-FM authors' "
                    "pctnet_ct10k_volf.pt again with nnUNetv2_vf_convert_misfm")
_TABLE_SUFFIX = "relative_position_bias_table"


class TableLayoutError(ValueError):
    """Saved PCT-Net weights whose relative-position tables are not in :data:`TABLE_LAYOUT` (no record, or another
    one); the message names the file, the problem and the fix."""


def has_relative_position_tables(weights) -> bool:
    """Whether a state dict holds relative-position bias tables (PCT-Net; nnU-Net's own networks have none)."""
    return isinstance(weights, Mapping) and any(isinstance(k, str) and k.endswith(_TABLE_SUFFIX) for k in weights)


def table_layout_record(weights) -> dict:
    """``{TABLE_LAYOUT_KEY: TABLE_LAYOUT}`` for a state dict with relative-position tables, ``{}`` otherwise: the
    entry every file of such weights carries next to them (pure function)."""
    return {TABLE_LAYOUT_KEY: TABLE_LAYOUT} if has_relative_position_tables(weights) else {}


def table_layout_problem(layout: Optional[str], subject: str) -> Optional[str]:
    """None when ``layout`` (the record of a file whose PCT-Net weights hold relative-position tables; None: no
    record) is :data:`TABLE_LAYOUT`; otherwise what is wrong, as a sentence starting with ``subject`` (pure
    function)."""
    if layout == TABLE_LAYOUT:
        return None
    if layout is None:
        # a conversion would need one old row per new row; the centre rows of a shrunk window are shared by token
        # pairs that read different rows in the offset layout, so no table reproduces the old outputs
        return (f"{subject} has no {TABLE_LAYOUT_KEY!r} record, so its PCT-Net relative-position bias tables are in "
                f"the offset layout: a window that shrinks to a small token grid reads the rows the full window gives "
                f"the same relative offsets, whereas this nnunetv2_vf reads them at the centre of the table "
                f"({TABLE_LAYOUT!r}, as the MIS-FM authors' network). The weights would load without error but "
                f"compute something else wherever a window shrinks, and they cannot be converted (token pairs that "
                f"share a centre row read different rows in the offset layout)")
    return (f"{subject} records the relative-position table layout {layout!r}, which this nnunetv2_vf does not read "
            f"(it reads {TABLE_LAYOUT!r}): a newer nnunetv2_vf wrote it; upgrade the plugin")


def check_table_layout(checkpoint: Mapping, subject: str, fix: str) -> None:
    """Raise :class:`TableLayoutError` (the problem, then a line ``Fix: <fix>``) when
    ``checkpoint['network_weights']`` holds relative-position tables and ``checkpoint`` does not record
    :data:`TABLE_LAYOUT`; other weights pass."""
    if has_relative_position_tables(checkpoint.get("network_weights")):
        problem = table_layout_problem(checkpoint.get(TABLE_LAYOUT_KEY), subject)
        if problem:
            raise TableLayoutError(f"{problem}\nFix: {fix}")


@lru_cache(maxsize=16)
def _relative_position_index(window: int, table_window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)  # [3, w^3]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w^3, w^3, 3]
    quirk = rel[..., 0] * (3 * window - 1) + rel[..., 1] * (2 * window - 1) + rel[..., 2]
    return centre_table_rows(window, table_window)[quirk]


@lru_cache(maxsize=32)
def _shift_region_ids(padded: tuple[int, int, int], window: int, shift: int) -> torch.Tensor:
    """Region id per token of each window after the cyclic shift: [num_windows, window**3]."""
    ids = torch.zeros(padded, dtype=torch.long)
    count = 0
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for d in bounds:
        for h in bounds:
            for w in bounds:
                ids[d, h, w] = count
                count += 1
    return _partition(ids[None, ..., None], window).squeeze(-1)


def _partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, D, H, W, C] (sides multiples of w) -> [B * nW, w**3, C]."""
    b, d, h, wd, c = x.shape
    x = x.view(b, d // w, w, h // w, w, wd // w, w, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, w ** 3, c)


def effective_window(grid: Sequence[int], window: int, shifted: bool) -> tuple[int, int]:
    """(window, shift) a block uses on a token grid: a grid side <= window shrinks the window and drops the shift."""
    smallest = min(grid)
    if smallest <= window:
        return smallest, 0
    return window, (window // 2 if shifted else 0)


class _WindowLayout:
    """Where every window slot reads its token, for one (grid, window, shift, device); built once and cached.

    ``gather`` [nW * w**3] indexes the tokens [B, N (+1 zero row when padded), C] in window order (end padding,
    cyclic shift by -shift and window partition in one ``index_select``); ``scatter`` [N] is the slot of every
    token, i.e. window merge, reverse shift and crop in one ``index_select``. Pure data movement: the values are
    exactly those of pad + roll + partition (and back), with two copies instead of six.
    """

    def __init__(self, grid: tuple[int, int, int], window: int, shift: int, device: torch.device):
        d, h, w = grid
        n_tokens = d * h * w
        pads = [(-s) % window for s in grid]
        self.padded = tuple(s + p for s, p in zip(grid, pads))
        self.pad = any(pads)
        source = torch.arange(n_tokens, dtype=torch.long).view(d, h, w)
        source = F.pad(source, (0, pads[2], 0, pads[1], 0, pads[0]), value=n_tokens)  # padding -> zero row
        if shift:
            source = torch.roll(source, shifts=(-shift,) * 3, dims=(0, 1, 2))
        gather = _partition(source[None, ..., None], window).reshape(-1)
        slot = torch.empty(n_tokens + 1, dtype=torch.long)
        slot[gather] = torch.arange(gather.numel(), dtype=torch.long)
        self.gather = gather.to(device)
        self.scatter = slot[:n_tokens].to(device)
        self.num_windows = gather.numel() // window ** 3


# The cached index/mask tensors are built outside inference mode (``inference_mode(False)``): a first call under
# ``torch.inference_mode()`` (prediction) must not leave inference tensors that training could not save for backward.
@lru_cache(maxsize=64)
def _window_layout(grid: tuple[int, int, int], window: int, shift: int, device: torch.device) -> _WindowLayout:
    with torch.inference_mode(False):
        return _WindowLayout(grid, window, shift, device)


@lru_cache(maxsize=64)
def _shift_mask(padded: tuple[int, int, int], window: int, shift: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """-100 between tokens of a window that were not neighbours before the cyclic shift (as the reference does),
    0 elsewhere: [nW, 1, n, n]."""
    with torch.inference_mode(False):
        ids = _shift_region_ids(padded, window, shift).clone()
        return ((ids[:, :, None] != ids[:, None, :]).to(dtype) * -100.0).unsqueeze(1).to(device)


@lru_cache(maxsize=64)
def _relative_position_index_on(window: int, table_window: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return _relative_position_index(window, table_window).reshape(-1).clone().to(device)


class _BiasedWindowAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T / sqrt(hd) + mask), p) @ v`` with a hand-written backward, for training on CPU.

    Layout: ``q, k, v`` [B * nW, heads, n, hd] (windows of one sample consecutive); ``mask`` [m, heads, n, n], the
    bias (plus shift mask) of the m windows of one sample (m = 1: the same for all windows), broadcast over samples.

    Saved for backward: the scaled queries, ``k``, ``v``, the softmax output and the boolean keep mask. Autograd of
    the explicit expression also keeps the dropped probabilities (a second [B * nW, heads, n, n] tensor) and builds
    the sum ``scores + mask`` out of place; here the masked probabilities are rebuilt from the softmax output in
    backward, the mask is added in place, and the dropout scale ``1 / (1 - p)`` is applied to the [.., n, hd]
    side of the products instead of the [.., n, n] side (the same value up to rounding; same keep mask for the same
    torch seed).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float):
        scale = q.shape[-1] ** -0.5
        q_scaled = q * scale
        scores = torch.matmul(q_scaled, k.transpose(-2, -1))
        m = mask.shape[0]
        scores.view(-1, m, *scores.shape[1:]).add_(mask)
        attn = torch.softmax(scores, dim=-1)
        del scores
        if p > 0.0:
            keep = _keep_mask(attn.shape, p)
            out = torch.matmul(_times_mask(attn, keep), v).mul_(1.0 / (1.0 - p))
        else:
            keep = None
            out = torch.matmul(attn, v)
        ctx.save_for_backward(q_scaled, k, v, attn, keep)
        ctx.scale, ctx.p, ctx.mask_shape = scale, p, mask.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # numpy inside: a double backward gets torch's clear error
    def backward(ctx, grad_out):
        q_scaled, k, v, attn, keep = ctx.saved_tensors
        grad_out = grad_out.contiguous() if keep is None else grad_out.mul(1.0 / (1.0 - ctx.p))
        grad_v = None
        if ctx.needs_input_grad[2]:
            probs = attn if keep is None else _times_mask(attn, keep)
            grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
            del probs
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1))
        if keep is not None:
            _times_mask(grad_probs, keep, out=grad_probs)
        grad_scores = torch._softmax_backward_data(grad_probs, attn, -1, attn.dtype)
        del grad_probs
        m = ctx.mask_shape[0]
        grad_mask = (grad_scores.view(-1, m, *grad_scores.shape[1:]).sum(0)
                     if ctx.needs_input_grad[3] else None)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q_scaled) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, grad_mask, None


def _explicit_biased_attention(q, k, v, mask, p: float) -> torch.Tensor:
    """What :class:`_BiasedWindowAttention` computes, through autograd (CUDA, ``torch.compile``)."""
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    m = mask.shape[0]
    scores = (scores.view(-1, m, *scores.shape[1:]) + mask).view(scores.shape)
    return torch.matmul(dropout(scores.softmax(dim=-1), p, True), v)


def biased_window_attention(q, k, v, mask, p: float) -> torch.Tensor:
    """Window attention with an additive mask [m, heads, n, n] (m windows per sample) and attention dropout ``p``
    (training); q, k, v [B * nW, heads, n, hd]."""
    if _cpu_masks(q) and not torch.is_autocast_enabled("cpu"):  # its backward assumes one dtype throughout
        return _BiasedWindowAttention.apply(q, k, v, mask, p)
    return _explicit_biased_attention(q, k, v, mask, p)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside cubic windows with a learned relative-position bias."""

    def __init__(self, channels: int, num_heads: int, window_size: int, dropout: float):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attn_drop = dropout
        self.proj = nn.Linear(channels, channels)
        self.proj_drop = Dropout(dropout)
        self._mask_cache: tuple | None = None

    def _bias(self, window: int, device: torch.device) -> torch.Tensor:
        """Relative-position bias [heads, n, n] (gathered from the table on every call: the table is trained)."""
        n = window ** 3
        index = _relative_position_index_on(window, self.window_size, device)
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)

    def _frozen_mask(self, window: int, region: torch.Tensor | None, batch: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        """The 4D mask of the fused attention kernel when nothing needs its gradient: [1, heads, n, n] without
        shift, [batch * nW, heads, n, n] with shift. Cached until the table changes (its version counter)."""
        table = self.relative_position_bias_table
        key = (window, None if region is None else (region.data_ptr(), region.shape), batch, dtype, device,
               table.data_ptr(), table._version)
        if self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1]
        with torch.no_grad():
            bias = self._bias(window, device).unsqueeze(0)
            mask = bias if region is None else (bias + region).repeat(batch, 1, 1, 1)
            mask = mask.to(dtype).contiguous()
        self._mask_cache = (key, mask)
        return mask

    def forward(self, x: torch.Tensor, window: int, region: torch.Tensor | None) -> torch.Tensor:
        """x: [B * nW, window**3, C] (windows of one sample consecutive); region: [nW, 1, n, n] shift mask or None."""
        bw, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B * nW, heads, n, hd]
        p = self.attn_drop if self.training else 0.0
        needs_bias_grad = torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad
        if not needs_bias_grad and p == 0.0:
            # 4D layout with a gradient-free mask: SDPA's fused kernel (a 5D or grad-requiring mask means math path)
            nw = 1 if region is None else region.shape[0]
            mask = self._frozen_mask(window, region, bw // nw, q.dtype, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # the bias table is trained (or attention dropout is on): explicit attention, broadcasting the bias and
            # the shift mask over the batch instead of materialising a [B * nW, heads, n, n] mask
            mask = self._bias(window, x.device).unsqueeze(0).to(q.dtype)
            if region is not None:
                mask = mask + region.to(q.dtype)
            out = biased_window_attention(q, k, v, mask, p)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class DropPath(nn.Module):
    """Stochastic depth per sample (residual branch dropped with probability p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)  # scale the [B, 1, 1] mask, not the tokens: one pass over x


class Mlp(nn.Sequential):
    def __init__(self, channels: int, ratio: float, dropout: float):
        hidden = int(channels * ratio)
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout)
        self.fc2 = nn.Linear(hidden, channels)
        self.drop2 = Dropout(dropout)


class SwinBlock3D(nn.Module, _Checkpointable):
    """Pre-norm 3D Swin block on tokens [B, D*H*W, C]; ``grid`` = (D, H, W) is given at call time."""

    def __init__(self, channels: int, num_heads: int, window_size: int, shifted: bool, dropout: float,
                 drop_path: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(channels)
        self.attn = WindowAttention3D(channels, num_heads, window_size, dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = Mlp(channels, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return self._run((self,), self._forward, x, tuple(grid))

    def _forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b, n_tokens, c = x.shape
        window, shift = effective_window(grid, self.window_size, self.shifted)
        layout = _window_layout(tuple(grid), window, shift, x.device)
        y = self.norm1(x)  # padding (zeros) comes after the norm, as before
        if layout.pad:
            y = torch.cat([y, y.new_zeros(b, 1, c)], dim=1)
        y = y.index_select(1, layout.gather).view(b * layout.num_windows, window ** 3, c)
        region = _shift_mask(layout.padded, window, shift, x.device, y.dtype) if shift else None
        y = self.attn(y, window, region)
        y = y.view(b, -1, c).index_select(1, layout.scatter)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage3D(nn.Module):
    def __init__(self, channels: int, depth: int, num_heads: int, window_size: int, dropout: float,
                 drop_path: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock3D(channels, num_heads, window_size, shifted=(i % 2 == 1), dropout=dropout,
                        drop_path=drop_path) for i in range(depth))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, grid)
        return tokens


class PCTBlock(nn.Module):
    """A ConvBlock and a Swin stage on the same input, summed (no outer residual)."""

    def __init__(self, channels: int, depth: int, num_heads: int, window_size: int, dropout: float,
                 drop_path: float):
        super().__init__()
        self.conv = ConvBlock(channels, (3, 3, 3), dropout)
        self.token_drop = Dropout(dropout)
        self.swin = SwinStage3D(channels, depth, num_heads, window_size, dropout, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.swin(self.token_drop(x.flatten(2).transpose(1, 2)), (d, h, w))
        return self.conv(x) + tokens.transpose(1, 2).reshape(b, c, d, h, w)


class SegHeadNormAct(nn.Sequential):
    """The BN + PReLU in front of each classifier (transferable; the 1x1x1 conv itself is a seg layer)."""

    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm3d(channels), PReLU())


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------
class PCTNetStem(nn.Module):
    """Multi-scale convolutional embedding: full resolution, 1/2 and 1/4 (x0, x1, x2)."""

    def __init__(self, input_channels: int, features: Sequence[int], resolution_mode: int,
                 dropout: Sequence[float]):
        super().__init__()
        strides = pctnet_strides(resolution_mode)
        k0, k1 = _kernel(_planar(resolution_mode, 0)), _kernel(_planar(resolution_mode, 1))
        self.proj = nn.Conv3d(input_channels, features[0], k0, padding=_same_padding(k0))
        self.conv0 = ConvBlock(features[0], k0, dropout[0])
        self.down1 = DownBlock(features[0], features[1], strides[1], k1)
        self.conv1 = ConvBlock(features[1], k1, dropout[1])
        self.down2 = DownBlock(features[1], features[2], strides[2], (3, 3, 3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.conv0(self.proj(x))
        x1 = self.conv1(self.down1(x0))
        return [x0, x1, self.down2(x1)]


class PCTNetEncoder(nn.Module):
    """Levels 2-4 of the pyramid: PCT blocks with down-sampling in between."""

    def __init__(self, features, depths, num_heads, window_size, dropout, drop_path):
        super().__init__()
        self.pct2 = PCTBlock(features[2], depths[0], num_heads[0], window_size, dropout[2], drop_path)
        self.down3 = DownBlock(features[2], features[3], (2, 2, 2), (3, 3, 3))
        self.pct3 = PCTBlock(features[3], depths[1], num_heads[1], window_size, dropout[3], drop_path)
        self.down4 = DownBlock(features[3], features[4], (2, 2, 2), (3, 3, 3))
        self.pct4 = PCTBlock(features[4], depths[2], num_heads[2], window_size, dropout[4], drop_path)

    def forward(self, x2: torch.Tensor) -> list[torch.Tensor]:
        e2 = self.pct2(x2)
        e3 = self.pct3(self.down3(e2))
        return [e2, e3, self.pct4(self.down4(e3))]


class PCTNetDecoder(nn.Module, _Checkpointable):
    """PCT decoder blocks at 1/8 and 1/4, convolutional head blocks at 1/2 and full resolution, 4 classifiers."""

    def __init__(self, num_classes, features, resolution_mode, depths, num_heads, window_size, dropout, drop_path,
                 deep_supervision: bool):
        super().__init__()
        strides = pctnet_strides(resolution_mode)
        k0, k1 = _kernel(_planar(resolution_mode, 0)), _kernel(_planar(resolution_mode, 1))
        self.deep_supervision = deep_supervision
        self.up3 = UpCatBlock(features[3], features[4], (2, 2, 2), (3, 3, 3))
        self.pct3 = PCTBlock(features[3], depths[1], num_heads[1], window_size, dropout[3], drop_path)
        self.up2 = UpCatBlock(features[2], features[3], (2, 2, 2), (3, 3, 3))
        self.pct2 = PCTBlock(features[2], depths[0], num_heads[0], window_size, dropout[2], drop_path)
        self.up1 = UpCatBlock(features[1], features[2], strides[2], k1)
        self.conv1 = ConvBlock(features[1], k1, dropout[1])
        self.up0 = UpCatBlock(features[0], features[1], strides[1], k0)
        self.conv0 = ConvBlock(features[0], k0, dropout[0])
        self.heads = nn.ModuleList(SegHeadNormAct(f) for f in features[:4])
        self.seg_layers = nn.ModuleList(nn.Conv3d(f, num_classes, 1) for f in features[:4])

    def _classify(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return self.seg_layers[level](self.heads[level](x))

    def forward(self, skips: list[torch.Tensor]):
        x0, x1, e2, e3, e4 = skips
        d3 = self.pct3(self.up3(e3, e4))
        d2 = self.pct2(self.up2(e2, d3))
        h1 = self.conv1(self.up1(x1, d2))
        h0 = self.conv0(self.up0(x0, h1))
        out = self._run((self.heads[0],), self._classify, 0, h0)
        if not self.deep_supervision:
            return out
        return [out] + [self._run((self.heads[level],), self._classify, level, feature)
                        for level, feature in ((1, h1), (2, d2), (3, d3))]


class PCTNet(nn.Module):
    """PCT-Net for nnU-Net: input [B, C, D, H, W]; output logits at full resolution, or with deep supervision
    a list of four (scales 1, 1/2, 1/4, 1/8 of the level-0 grid, highest resolution first).

    ``strides`` is accepted so that nnU-Net plans (whose ``arch_kwargs`` must carry ``strides`` for the deep
    supervision scales) can instantiate this class directly; it must equal ``pctnet_strides(resolution_mode)``.

    ``checkpoint_blocks`` (default off; also settable as an attribute) recomputes every block (conv blocks,
    down/up blocks, Swin blocks, classifier heads) in the backward pass instead of keeping its activations (``torch.utils.checkpoint``, non-reentrant):
    less training memory for more time, identical outputs and gradients (dropout masks are redrawn from the
    restored RNG state; BatchNorm running statistics are updated once). It changes no weights, so it can be
    switched in nnU-Net plans' ``arch_kwargs``.
    """
    # state-dict prefixes for fine-tuning (see nnunetv2_vf.pretrain.adaptation_plan.network_keys)
    key_to_stem = "stem"
    key_to_encoder = "encoder"
    keys_to_in_proj = ("stem.proj",)
    # what its bias tables mean, recorded in adaptation plans (nnunetv2_vf.pretrain.adaptation_plan)
    table_layout = TABLE_LAYOUT

    def __init__(self, input_channels: int, num_classes: int,
                 features_per_stage: Sequence[int] = PAPER_FEATURES, resolution_mode: int = 1,
                 dropout: Sequence[float] = (0.0, 0.0, 0.2, 0.2, 0.2), depths: Sequence[int] = (2, 2, 2),
                 num_heads: Sequence[int] = (4, 8, 16), window_size: int = 6, deep_supervision: bool = True,
                 drop_path_rate: float = 0.2, strides: Sequence[Sequence[int]] | None = None,
                 checkpoint_blocks: bool = False):
        super().__init__()
        if len(features_per_stage) != 5 or len(dropout) != 5:
            raise ValueError("PCTNet has 5 levels: features_per_stage and dropout need 5 entries each")
        if len(depths) != 3 or len(num_heads) != 3:
            raise ValueError("PCTNet has PCT blocks on levels 2-4: depths and num_heads need 3 entries each")
        expected = pctnet_strides(resolution_mode)
        if strides is not None and [list(map(int, s)) for s in strides] != expected:
            raise ValueError(f"strides {strides} do not match resolution_mode {resolution_mode} "
                             f"(expected {expected}); regenerate the plans' architecture with PCTNetTrainer")
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.resolution_mode = resolution_mode
        self.divisibility = required_divisibility(resolution_mode)
        self.stem = PCTNetStem(input_channels, features_per_stage, resolution_mode, dropout)
        self.encoder = PCTNetEncoder(features_per_stage, depths, num_heads, window_size, dropout, drop_path_rate)
        self.decoder = PCTNetDecoder(num_classes, features_per_stage, resolution_mode, depths, num_heads,
                                     window_size, dropout, drop_path_rate, deep_supervision)
        self.checkpoint_blocks = checkpoint_blocks

    @property
    def checkpoint_blocks(self) -> bool:
        return self.stem.conv0.checkpoint_blocks

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, _Checkpointable):
                module.checkpoint_blocks = bool(enabled)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"PCTNet is a 3D network and expects input [B, C, D, H, W]; got shape "
                             f"{tuple(x.shape)}. For 2D data use nnU-Net's 2d configuration with another "
                             f"trainer, or add a depth axis.")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"PCTNet was built for {self.input_channels} input channel(s) but got {x.shape[1]}; "
                             f"the dataset's channel_names must match the network (rebuild it or check the "
                             f"input files/modalities).")
        bad = [(s, d) for s, d in zip(x.shape[2:], self.divisibility) if s % d]
        if bad:
            raise ValueError(f"PCTNet (resolution_mode {self.resolution_mode}) needs patch sides divisible by "
                             f"{self.divisibility} (D, H, W); got {tuple(x.shape[2:])}. Use "
                             f"fit_patch_size(patch, {self.resolution_mode}) -> "
                             f"{fit_patch_size(x.shape[2:], self.resolution_mode)}.")

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        x0, x1, x2 = self.stem(x)
        e2, e3, e4 = self.encoder(x2)
        return self.decoder([x0, x1, e2, e3, e4])


# ----------------------------------------------------------------------------------------------------------------
# the authors' published weights
# ----------------------------------------------------------------------------------------------------------------
def _reference_key_map(resolution_mode: int, depths: Sequence[int]) -> dict[str, str]:
    """Reference prefix -> our prefix (the rest of each key, e.g. ``.0.weight``, is rewritten by rules below)."""
    r = resolution_mode
    mapping = {
        f"embeddings.{r}.proj.": "stem.proj.",
        f"embeddings.{r}.conv0.conv_conv.": "stem.conv0.",
        f"embeddings.{r}.down1.conv.": "stem.down1.conv.",
        f"embeddings.{r}.conv1.conv_conv.": "stem.conv1.",
        f"embeddings.{r}.down2.conv.": "stem.down2.conv.",
        "pyramid_ct.down3.conv.": "encoder.down3.conv.",
        "pyramid_ct.down4.conv.": "encoder.down4.conv.",
        "pyramid_ct.up4.": "decoder.up3.",
        "pyramid_ct.up3.": "decoder.up2.",
        f"pred_heads.{r}.up2.": "decoder.up1.",
        f"pred_heads.{r}.up1.": "decoder.up0.",
        f"pred_heads.{r}.conv1.conv_conv.": "decoder.conv1.",
        f"pred_heads.{r}.conv0.conv_conv.": "decoder.conv0.",
    }
    for ref, ours in (("e2", "encoder.pct2"), ("e3", "encoder.pct3"), ("e4", "encoder.pct4"),
                      ("d3", "decoder.pct3"), ("d2", "decoder.pct2")):
        mapping[f"pyramid_ct.convtrans_{ref}.conv.conv_conv."] = f"{ours}.conv."
        mapping[f"pyramid_ct.convtrans_{ref}.trans.blocks."] = f"{ours}.swin.blocks."
    for level, ref in ((0, f"pred_heads.{r}.out_conv0"), (1, f"pred_heads.{r}.out_conv1"),
                       (2, "pyramid_ct.out_conv2"), (3, "pyramid_ct.out_conv3")):
        mapping[f"{ref}.conv.0."] = f"decoder.heads.{level}.0."
        mapping[f"{ref}.conv.1."] = f"decoder.heads.{level}.1."
        mapping[f"{ref}.conv.2."] = f"decoder.seg_layers.{level}."
    return mapping


def convert_misfm_state_dict(reference: dict, resolution_mode: int = 1,
                             depths: Sequence[int] = (2, 2, 2)) -> dict[str, torch.Tensor]:
    """Rename the authors' PCT-Net state_dict to this module's keys (pure function).

    Keys of the other resolution modes' stems/heads and the never-used per-block LayerNorms are dropped; each
    ``relative_position_index`` buffer is checked against the quirk this module reproduces, then dropped.
    """
    mapping = _reference_key_map(resolution_mode, depths)
    # longest prefix first so e.g. "...conv.0." does not shadow "...conv.conv_conv."
    prefixes = sorted(mapping, key=len, reverse=True)
    converted: dict[str, torch.Tensor] = {}
    for key, value in reference.items():
        if key.endswith("relative_position_index"):
            window = round(value.shape[0] ** (1 / 3))
            if not torch.equal(value.cpu(), misfm_relative_position_index(window)):
                raise ValueError(f"{key}: the checkpoint's relative-position index differs from the MIS-FM layout "
                                 f"this converter reproduces; it was not produced by the reference PCT-Net")
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            continue  # other resolution modes, unused norm_layer
        converted[mapping[prefix] + key[len(prefix):]] = value
    return converted


def _load_checkpoint_file(checkpoint: str | os.PathLike) -> dict:
    """The authors' checkpoint file; a file that is an nnU-Net or nnUNetv2_vf_pretrain checkpoint is named as such
    (it needs no conversion)."""
    state = read_weights_file(checkpoint, "PCT-Net weights file",
                              "download the authors' pctnet_ct10k_volf.pt (openmedlab/MIS-FM) or give the path of a "
                              "local copy", "fetch it again", allow_numpy=True)
    kind = trained_checkpoint_kind(state)
    if kind:
        raise ValueError(f"{os.path.abspath(checkpoint)} is {kind}, not the MIS-FM authors' file: it needs no "
                         f"conversion. Fine-tune from it directly: nnUNetv2_train ... -pretrained_weights "
                         f"{os.path.abspath(checkpoint)} with the plans it was made for (for an nnUNetv2_vf_pretrain "
                         f"run: nnUNetv2_vf_adapt_plans -a on the adaptation_plan.json beside it).")
    return state


def load_misfm_weights(model: nn.Module, checkpoint, strict_classifier: bool = False) -> dict:
    """Load the authors' PCT-Net checkpoint (path, or dict with ``model_state_dict``) into ``model`` (a PCTNet).

    Every non-classifier tensor must match by name and shape, otherwise a ValueError lists the mismatches; a smaller
    relative-position table (a level whose window the reference shrank to its token grid) is placed at the centre of
    the full table (:func:`place_table_at_centre`, listed in the report's ``shrunken_tables``).  The
    1x1x1 classifiers (``decoder.seg_layers``) are loaded only when their shapes match (same class count), or
    required to with ``strict_classifier``.  Returns a report dict (loaded / skipped classifier keys).
    """
    if not isinstance(model, PCTNet):
        raise TypeError(f"load_misfm_weights expects a PCTNet, got {type(model).__name__}")
    state = _load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not any(k.startswith("pyramid_ct.") for k in state):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"this checkpoint is not a MIS-FM PCT-Net state_dict (no 'pyramid_ct.*' keys; first keys: "
                         f"{keys}). For a checkpoint written by nnU-Net or nnUNetv2_vf_pretrain use "
                         f"'-pretrained_weights' / load_state_dict(ckpt['network_weights']) instead.")
    depths = [len(model.encoder.pct2.swin.blocks), len(model.encoder.pct3.swin.blocks),
              len(model.encoder.pct4.swin.blocks)]
    converted = convert_misfm_state_dict(state, model.resolution_mode, depths)
    own = model.state_dict()
    shrunken = _place_shrunken_tables(converted, own)
    problems = []
    for key, value in own.items():
        if key not in converted:
            problems.append(f"missing in checkpoint: {key} {tuple(value.shape)}")
        elif converted[key].shape != value.shape and (".seg_layers." not in key or strict_classifier):
            problems.append(f"shape mismatch: {key} checkpoint {tuple(converted[key].shape)} vs model "
                            f"{tuple(value.shape)}")
    problems += [f"unexpected in checkpoint: {k}" for k in converted if k not in own]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise ValueError(f"the checkpoint does not fit this PCTNet ({len(problems)} problem(s)); build the network "
                         f"with the checkpoint's features_per_stage / resolution_mode / depths / heads:\n  {shown}")
    skipped = [k for k in converted if ".seg_layers." in k and converted[k].shape != own[k].shape]
    loadable = {k: v for k, v in converted.items() if k not in skipped}
    model.load_state_dict(loadable, strict=False)
    return {"loaded": sorted(loadable), "skipped_classifier": skipped, "shrunken_tables": shrunken}


def _place_shrunken_tables(converted: dict, own: dict) -> dict[str, int]:
    """Put every smaller bias table of ``converted`` (a level whose window the reference shrank to its grid) at the
    centre of the model's full table, in place; returns {key: shrunken window}.  Tables that are not a smaller cube
    are left for the shape check to report."""
    shrunken = {}
    for key, value in list(converted.items()):
        if not key.endswith("relative_position_bias_table") or key not in own or value.shape == own[key].shape:
            continue
        full_rows, heads = own[key].shape
        table_window = (round(full_rows ** (1 / 3)) + 1) // 2
        side = round(value.shape[0] ** (1 / 3)) if value.ndim == 2 else 0
        if value.ndim == 2 and value.shape[1] == heads and side ** 3 == value.shape[0] and side % 2 \
                and side < 2 * table_window - 1:
            converted[key] = place_table_at_centre(value, table_window)
            shrunken[key] = (side + 1) // 2
    return shrunken
