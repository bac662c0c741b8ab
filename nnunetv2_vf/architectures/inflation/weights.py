"""Pure weight maths of 2D -> 3D inflation (no modules, no state).

Rules for a 2D kernel ``w`` ``[O, I, kh, kw]`` -> ``[O, I, kd, kh, kw]``:

* ``"i3d"`` (default, Carreira & Zisserman 2017): ``w`` repeated ``kd`` times along depth, divided by ``kd``.  A 3D
  conv with these weights reproduces the 2D conv on every slice of a depth-constant input, away from the depth
  borders (everywhere with ``depth_padding="replicate"``).
* ``"centre"``: zeros with ``w`` at the centre depth index (odd ``kd``): exact slice-wise behaviour everywhere.
* ``"planar"``: ``kd = 1``: every layer stays in-plane (no depth context, no depth pooling).

Transposed convs (weights ``[I, O/groups, kh, kw]``) get the depth axis at the same place.  With depth stride ``s``
each output slice of a depth-constant input receives ``kd / s`` kernel taps (``kd`` a multiple of ``s``), so the
i3d rule scales by ``s / kd`` instead of ``1 / kd``: for upsampling with ``kernel == stride`` the weights are
repeated without scaling.  ``"centre"`` has no meaning for a strided transposed conv (zero taps would leave output
slices empty) and uses the same repeat rule there.
"""
from __future__ import annotations

import torch

__all__ = ["INFLATION_MODES", "check_mode", "inflate_conv_weight", "adapt_input_conv_weight"]

INFLATION_MODES = ("i3d", "centre", "planar")


def check_mode(mode: str) -> None:
    if mode not in INFLATION_MODES:
        raise ValueError(f"unknown inflation mode {mode!r}; use one of {INFLATION_MODES} ('i3d' is the default).")


def inflate_conv_weight(weight_2d: torch.Tensor, depth: int, mode: str = "i3d", *, transposed: bool = False,
                        depth_stride: int = 1) -> torch.Tensor:
    """Return a new ``[O, I, depth, kh, kw]`` kernel made from a 2D ``[O, I, kh, kw]`` kernel (pure function).

    ``transposed``/``depth_stride`` describe a ConvTranspose weight ``[I, O/groups, kh, kw]`` and its depth stride
    (see the module docstring for the transposed-conv scaling).
    """
    check_mode(mode)
    if not isinstance(weight_2d, torch.Tensor) or weight_2d.ndim != 4:
        shape = tuple(weight_2d.shape) if isinstance(weight_2d, torch.Tensor) else type(weight_2d).__name__
        raise ValueError(f"inflate_conv_weight expects a 2D conv kernel [O, I, kh, kw], got {shape}; 5D kernels are "
                         f"already 3D (nothing to inflate).")
    depth, depth_stride = int(depth), int(depth_stride)
    if depth < 1 or depth_stride < 1:
        raise ValueError(f"depth ({depth}) and depth_stride ({depth_stride}) must be >= 1")
    w = weight_2d.detach().unsqueeze(2)
    if mode == "planar":
        if depth != 1:
            raise ValueError(f"mode 'planar' makes a depth-1 kernel; got depth={depth}. Use mode 'i3d' or 'centre' "
                             f"for a depth kernel > 1.")
        return w.clone()
    if transposed and depth_stride > 1:
        # every output slice gets depth / depth_stride taps of a depth-constant input
        return w.repeat(1, 1, depth, 1, 1) * (depth_stride / depth)
    if mode == "i3d":
        return w.repeat(1, 1, depth, 1, 1) / depth
    if depth % 2 == 0:
        raise ValueError(f"mode 'centre' needs an odd depth kernel (a centre index), got depth={depth}. Use an odd "
                         f"depth kernel, or mode 'i3d'.")
    out = w.new_zeros(w.shape[:2] + (depth,) + w.shape[3:])
    out[:, :, depth // 2] = weight_2d.detach()
    return out


def adapt_input_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt an RGB first-conv kernel (2D ``[O, 3, kh, kw]`` or inflated 3D ``[O, 3, kd, kh, kw]``) to
    ``in_channels`` inputs with timm's rule (``timm.models._manipulate.adapt_input_conv``, reused): 1 channel ->
    sum of the RGB kernels (a grey image replicated to RGB gives the same response); C != 3 -> RGB kernels repeated
    cyclically and scaled by 3 / C.  This is the default input adaptation;
    :class:`~nnunetv2_vf.architectures.inflation.layers.LearnedStem` is the paper's alternative.
    """
    from timm.models._manipulate import adapt_input_conv

    if weight.ndim not in (4, 5):
        raise ValueError(f"expected a conv kernel [O, I, (kd,) kh, kw], got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if weight.shape[1] != 3 and in_channels != weight.shape[1]:
        raise ValueError(f"timm's rule adapts RGB (3-channel) kernels; this kernel has {weight.shape[1]} input "
                         f"channels. Pass the pretrained first conv, or use LearnedStem in front of the encoder.")
    w = weight.detach().clone()
    if weight.ndim == 4:
        return adapt_input_conv(in_channels, w)
    o, i, d, h, wd = w.shape  # adapt_input_conv only mixes axis 1: fold depth into height and back
    return adapt_input_conv(in_channels, w.reshape(o, i, d * h, wd)).reshape(o, in_channels, d, h, wd)
