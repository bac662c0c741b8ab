"""Depth geometry of inflated layers: ONE rule for the module rewriter and the state-dict path.

A 2D layer with in-plane kernel ``kh``, stride ``sh`` and padding ``ph`` becomes a 3D layer with depth kernel
``kd``, depth stride ``sd`` and depth padding ``pd`` (:func:`conv_depth`, :func:`transposed_conv_depth`,
:func:`pool_depth`); its 2D weight becomes a 3D weight with the rule :func:`weight_rule` picks for that ``kd``
(:func:`inflate_kernel`).  :func:`~nnunetv2_vf.architectures.inflation.rewriter.inflate_2d_to_3d` decides the
geometry from the settings; :func:`~nnunetv2_vf.architectures.inflation.state_dict.inflate_state_dict` reads it
back from an inflated model and applies the same :func:`inflate_kernel`, so a checkpoint inflated key by key
equals the network inflated module by module.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn

from nnunetv2_vf.architectures.inflation.weights import inflate_conv_weight

__all__ = ["DepthSetting", "resolve_setting", "pair", "weight_rule", "inflate_kernel", "conv_depth",
           "transposed_conv_depth", "pool_depth", "layer_depth_stride", "module_input_levels", "is_strided",
           "stage_depth_strides", "depth_receptive_radius"]

# per-layer depth settings: one int for all layers, {module name: int}, or f(name, module_2d) -> int | None
DepthSetting = Union[None, int, Mapping[str, int], Callable[[str, nn.Module], Union[int, None]]]


def pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _per_layer(setting: DepthSetting) -> bool:
    return isinstance(setting, Mapping) or (callable(setting) and not isinstance(setting, int))


def resolve_setting(setting: DepthSetting, name: str, module: nn.Module, default: int, what: str) -> int:
    value = None
    if isinstance(setting, Mapping):
        value = setting.get(name)
    elif callable(setting):
        value = setting(name, module)
    elif setting is not None:
        value = setting
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} for {name!r} must be a positive int, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------- weights of a layer
def weight_rule(mode: str, kd: int, *, transposed: bool = False, depth_stride: int = 1) -> str:
    """Weight rule for a depth kernel ``kd`` under inflation ``mode``: depth-1 kernels are planar; a kernel that a
    setting made deeper than 1 in planar mode is i3d; centre needs a centre index, so an even kernel is i3d unless
    it is a strided transposed conv (which repeats in both rules)."""
    if kd == 1:
        return "planar"
    if mode == "planar":
        return "i3d"
    if mode == "centre" and kd % 2 == 0 and not (transposed and depth_stride > 1):
        return "i3d"
    return mode


def inflate_kernel(weight_2d: torch.Tensor, kd: int, mode: str, *, transposed: bool = False,
                   depth_stride: int = 1) -> torch.Tensor:
    """The 3D kernel of a layer with depth kernel ``kd`` (and depth stride, for transposed convs)."""
    rule = weight_rule(mode, kd, transposed=transposed, depth_stride=depth_stride)
    return inflate_conv_weight(weight_2d, kd, rule, transposed=transposed, depth_stride=depth_stride)


# ------------------------------------------------------------------------------------------- shape of a layer
def layer_depth_stride(mode: str, setting: DepthSetting, name: str, m: nn.Module, stride_h: int) -> int:
    if stride_h == 1 and not _per_layer(setting):
        return 1  # an int setting applies to the in-plane strided layers only
    return resolve_setting(setting, name, m, 1 if mode == "planar" else stride_h, "depth_stride")


def _depth_padding(kd: int, kh: int, pad_h: int) -> int:
    return pad_h if kd == kh else ((kd - 1) // 2 if pad_h else 0)


def conv_depth(mode: str, depth_kernel: DepthSetting, depth_stride: DepthSetting, name: str, m: nn.Module,
               kh: int, sh: int, ph: int | None) -> tuple[int, int, int]:
    """(kd, sd, pd) of a conv: ``kd`` = ``kh`` for odd kernels; even "patchify" kernels cover the depth stride in
    i3d (centre needs odd: 1); 1 in planar mode.  ``pd`` mirrors the in-plane padding when ``kd == kh`` and is
    ``(kd - 1) // 2`` otherwise (0 for an unpadded layer; ``ph=None``: string padding, none added)."""
    sd = layer_depth_stride(mode, depth_stride, name, m, sh)
    if mode == "planar":
        default = 1
    elif kh % 2 == 1:
        default = kh
    else:
        default = sd if mode == "i3d" else 1
    if kh == 1 and not _per_layer(depth_kernel):
        kd = 1  # an int setting applies to the spatial (k > 1) kernels only
    else:
        kd = resolve_setting(depth_kernel, name, m, default, "depth_kernel")
    if mode == "planar" and kd != 1:
        raise ValueError(f"mode 'planar' keeps every kernel at depth 1; depth_kernel gave {kd} for {name!r}")
    return kd, sd, (0 if ph is None else _depth_padding(kd, kh, ph))


def transposed_conv_depth(mode: str, depth_kernel: DepthSetting, depth_stride: DepthSetting, name: str,
                          m: nn.Module, kh: int, sh: int, ph: int, output_padding_h: int) -> tuple[int, int, int, int]:
    """(kd, sd, pd, output padding) of a transposed conv: ``kd`` = ``kh`` when depth is upsampled like H, else the
    depth stride (kernel == stride upsampling), 1 in planar mode."""
    sd = layer_depth_stride(mode, depth_stride, name, m, sh)
    kd = resolve_setting(depth_kernel, name, m, 1 if mode == "planar" else (kh if sd == sh else sd), "depth_kernel")
    same = kd == kh and sd == sh
    return kd, sd, (ph if same else 0), (output_padding_h if sd == sh else 0)


def pool_depth(mode: str, depth_kernel: DepthSetting, depth_stride: DepthSetting, name: str, m: nn.Module,
               kh: int, sh: int, ph: int) -> tuple[int, int, int]:
    """(kd, sd, pd) of a max/avg pool: odd kernels keep ``kh``; even ones cover the depth stride.  In centre mode
    an average pool that does not stride depth gets ``kd = 1``, the pooling counterpart of a centre kernel: with a
    deeper kernel its zero padding (``count_include_pad``) would dilute the border slices of a depth-constant
    input (a max pool is exact either way)."""
    sd = layer_depth_stride(mode, depth_stride, name, m, sh)
    kd = 1 if mode == "planar" else (kh if kh % 2 == 1 or sd == sh else sd)
    if mode == "centre" and sd == 1 and isinstance(m, nn.AvgPool2d):
        kd = 1
    if kh > 1 and mode != "planar":
        kd = resolve_setting(depth_kernel, name, m, kd, "depth_kernel")
    return kd, sd, _depth_padding(kd, kh, ph)


# ------------------------------------------------------------------------------------------- resolution levels
def module_input_levels(model_2d: nn.Module, in_chans: int | None = None, probe_size: int = 64) -> dict[str, int]:
    """Resolution level (0 = network input, k = after k stride-2 steps) at which every Conv2d/MaxPool2d/AvgPool2d
    runs, keyed by module name (names survive inflation).

    Found from each module's input width in a probe forward pass, so it holds for any timm family whose stages
    each halve the resolution once, whatever the stage layout.
    """
    if in_chans is None:
        first = next((m for m in model_2d.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError("model has no Conv2d; pass in_chans")
        in_chans = first.in_channels
    levels: dict[str, int] = {}
    hooks = []
    for name, m in model_2d.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            def hook(mod, args, name=name):
                levels.setdefault(name, int(round(math.log2(probe_size / args[0].shape[-1]))))
            hooks.append(m.register_forward_pre_hook(hook))
    was_training = model_2d.training
    model_2d.eval()
    try:
        with torch.no_grad():
            model_2d(torch.zeros(1, in_chans, probe_size, probe_size))
    finally:
        model_2d.train(was_training)
        for h in hooks:
            h.remove()
    return levels


def is_strided(m: nn.Module) -> bool:
    return max(pair(m.stride or 1)) > 1


def stage_depth_strides(model_2d: nn.Module, pool_depth: Sequence[bool], in_chans: int | None = None,
                        probe_size: int = 64) -> dict[str, int]:
    """``depth_stride`` dict from per-stage flags: ``pool_depth[k]`` says whether the k-th stride-2 step of the
    network (counted from the input: k = 0 halves the input) also halves depth.

    Steps beyond ``len(pool_depth)`` keep the default (isotropic) stride.
    """
    modules = dict(model_2d.named_modules())
    found = {name: step for name, step in module_input_levels(model_2d, in_chans, probe_size).items()
             if is_strided(modules[name])}
    return {name: (2 if pool_depth[step] else 1) for name, step in found.items() if step < len(pool_depth)}


def depth_receptive_radius(model_3d: nn.Module) -> int:
    """Upper bound on how many slices from a depth border the output can feel the border (depth stride 1
    everywhere): sum of ``dilation * (kd - 1) // 2`` over all convs and pools (parallel branches both counted)."""
    radius = 0
    for m in model_3d.modules():
        if isinstance(m, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
            d = getattr(m, "dilation", 1)
            d = d[0] if isinstance(d, tuple) else d
            radius += d * (k - 1) // 2
    return radius
