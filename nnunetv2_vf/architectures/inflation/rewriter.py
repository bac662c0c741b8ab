"""The module rewriter: a deep copy of a 2D network with every 2D layer replaced by its 3D counterpart and every
other module checked for rank-agnosticism (:mod:`.rank_check`), keeping the module tree (state_dict keys)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from nnunetv2_vf.architectures.inflation import geometry as geo
from nnunetv2_vf.architectures.inflation.layers import (BatchNormAct3d, Conv3dSame, DepthReplicatePadConv3d,
                                                        LayerNorm3d)
from nnunetv2_vf.architectures.inflation.rank_check import module_problems
from nnunetv2_vf.architectures.inflation.timm_rules import (RANK_AGNOSTIC_SUBCLASSES, rank_agnostic_class,
                                                            timm_forward_overrides, timm_layer_types)
from nnunetv2_vf.architectures.inflation.weights import check_mode

__all__ = ["inflate_2d_to_3d"]

_OWN_3D = (BatchNormAct3d, LayerNorm3d, Conv3dSame, DepthReplicatePadConv3d)


class _Inflater:
    def __init__(self, mode: str, depth_kernel: geo.DepthSetting, depth_stride: geo.DepthSetting,
                 depth_padding: str, passthrough: tuple[type, ...]):
        self.mode = mode
        self.depth_kernel = depth_kernel
        self.depth_stride = depth_stride
        self.depth_padding = depth_padding
        self.passthrough = passthrough
        self.overrides = timm_forward_overrides()
        timm_types = timm_layer_types()
        self.BatchNormAct2d, self.LayerNorm2d = timm_types["BatchNormAct2d"], timm_types["LayerNorm2d"]
        self.Conv2dSame = timm_types["Conv2dSame"]

    # per-type conversions ----------------------------------------------------------------------------------------
    def conv(self, name: str, m: nn.Conv2d) -> nn.Module:
        kh, kw = m.kernel_size
        string_padding = isinstance(m.padding, str)
        kd, sd, pd = geo.conv_depth(self.mode, self.depth_kernel, self.depth_stride, name, m, kh, m.stride[0],
                                    None if string_padding else m.padding[0])
        padding = m.padding if string_padding else (pd,) + tuple(m.padding)
        kwargs = dict(stride=(sd,) + tuple(m.stride), dilation=(1,) + tuple(m.dilation), groups=m.groups,
                      bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        if isinstance(m, self.Conv2dSame):
            new = Conv3dSame(m.in_channels, m.out_channels, (kd, kh, kw), padding=0,
                             depth_replicate=self.depth_padding == "replicate", **kwargs)
        elif self.depth_padding == "replicate" and pd and not string_padding:
            new = DepthReplicatePadConv3d(m.in_channels, m.out_channels, (kd, kh, kw), padding=(0,) + padding[1:],
                                          depth_pad=pd, padding_mode=m.padding_mode, **kwargs)
        else:
            new = nn.Conv3d(m.in_channels, m.out_channels, (kd, kh, kw), padding=padding,
                            padding_mode=m.padding_mode, **kwargs)
        with torch.no_grad():
            new.weight.copy_(geo.inflate_kernel(m.weight, kd, self.mode))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        return new

    def conv_transpose(self, name: str, m: nn.ConvTranspose2d) -> nn.Module:
        kh, kw = m.kernel_size
        kd, sd, pd, opd = geo.transposed_conv_depth(self.mode, self.depth_kernel, self.depth_stride, name, m, kh,
                                                    m.stride[0], m.padding[0], m.output_padding[0])
        new = nn.ConvTranspose3d(m.in_channels, m.out_channels, (kd, kh, kw), stride=(sd,) + tuple(m.stride),
                                 padding=(pd,) + tuple(m.padding), output_padding=(opd,) + tuple(m.output_padding),
                                 groups=m.groups, bias=m.bias is not None, dilation=(1,) + tuple(m.dilation),
                                 device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(geo.inflate_kernel(m.weight, kd, self.mode, transposed=True, depth_stride=sd))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        return new

    def pool(self, name: str, m: nn.Module) -> nn.Module:
        kh, kw = geo.pair(m.kernel_size)
        sh, sw = geo.pair(m.stride if m.stride is not None else m.kernel_size)
        ph, pw = geo.pair(m.padding)
        kd, sd, pd = geo.pool_depth(self.mode, self.depth_kernel, self.depth_stride, name, m, kh, sh, ph)
        if isinstance(m, nn.MaxPool2d):
            dh, dw = geo.pair(m.dilation)
            return nn.MaxPool3d((kd, kh, kw), (sd, sh, sw), (pd, ph, pw), dilation=(1, dh, dw),
                                return_indices=m.return_indices, ceil_mode=m.ceil_mode)
        if m.divisor_override is not None:
            raise NotImplementedError(f"{name} ({type(m).__name__}): divisor_override has no 3D equivalent")
        return nn.AvgPool3d((kd, kh, kw), (sd, sh, sw), (pd, ph, pw), ceil_mode=m.ceil_mode,
                            count_include_pad=m.count_include_pad)

    @staticmethod
    def adaptive_pool(m: nn.Module) -> nn.Module:
        size = m.output_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        size = (size[0],) + size
        if isinstance(m, nn.AdaptiveMaxPool2d):
            return nn.AdaptiveMaxPool3d(size, return_indices=m.return_indices)
        return nn.AdaptiveAvgPool3d(size)

    def upsample(self, name: str, m: nn.Upsample) -> nn.Module:
        if m.size is not None or m.scale_factor is None:
            raise NotImplementedError(f"{name} (Upsample with a fixed output size): give a scale_factor instead")
        sh, sw = geo.pair(m.scale_factor)
        # upsampling undoes a stride: the depth factor follows the same setting as the strided layers (an int
        # setting included, so depth_stride=1 does not upsample depth)
        sd = geo.layer_depth_stride(self.mode, self.depth_stride, name, m, int(sh)) if sh == int(sh) else (
            1 if self.mode == "planar" else sh)
        mode = {"nearest": "nearest", "bilinear": "trilinear", "nearest-exact": "nearest-exact"}.get(m.mode)
        if mode is None:
            raise NotImplementedError(f"{name} (Upsample mode {m.mode!r}) has no 3D counterpart")
        return nn.Upsample(scale_factor=(float(sd), float(sh), float(sw)), mode=mode, align_corners=m.align_corners)

    def batch_norm(self, m: nn.modules.batchnorm._BatchNorm) -> nn.Module:
        if isinstance(m, self.BatchNormAct2d):
            new = BatchNormAct3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.drop, m.act)
        else:
            new = nn.BatchNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        own = {k: v for k, v in m.state_dict().items() if not k.startswith(("drop.", "act."))}
        new.load_state_dict({**new.state_dict(), **own})
        return new.to(device=next(iter(own.values())).device) if own else new

    def replace(self, name: str, m: nn.Module) -> nn.Module | None:
        """3D module for ``m``, or None if ``m`` is kept (its children are then visited)."""
        t = type(m)
        if t in (nn.Conv2d, self.Conv2dSame):
            return self.conv(name, m)
        if t is nn.ConvTranspose2d:
            return self.conv_transpose(name, m)
        if t in (nn.BatchNorm2d, self.BatchNormAct2d):
            return self.batch_norm(m)
        if t is nn.InstanceNorm2d:
            new = nn.InstanceNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new.load_state_dict(m.state_dict())
            return new
        if t is self.LayerNorm2d:
            new = LayerNorm3d(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                              bias=m.bias is not None)
            new.load_state_dict(m.state_dict())
            return new
        if t in (nn.MaxPool2d, nn.AvgPool2d):
            return self.pool(name, m)
        if t in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
            return self.adaptive_pool(m)
        if t is nn.Upsample:
            return self.upsample(name, m)
        if t is nn.Dropout2d:
            return nn.Dropout3d(m.p, m.inplace)
        if t in self.overrides:
            m.__class__ = rank_agnostic_class(t, self.overrides[t])
            return None
        if t in self.passthrough or t in _OWN_3D or t in RANK_AGNOSTIC_SUBCLASSES.values():
            return None
        problems = module_problems(m)
        if problems:
            listed = "\n  ".join(problems[:6]) + (f"\n  ... and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise NotImplementedError(
                f"cannot inflate module {name or '<root>'!r} of class {t.__module__}.{t.__qualname__}: on a 5D "
                f"tensor it would act on the wrong axes:\n  {listed}\nReplace the module, or if it is rank-agnostic "
                f"after all, pass it in inflate_2d_to_3d(..., passthrough=({t.__name__},)).")
        return None  # rank-agnostic: its children are checked

    def run(self, module: nn.Module, prefix: str = "") -> nn.Module:
        new = self.replace(prefix, module)
        if new is not None:
            new.train(module.training)
            return new
        for child_name, child in list(module.named_children()):
            path = f"{prefix}.{child_name}" if prefix else child_name
            replaced = self.run(child, path)
            if replaced is not child:
                setattr(module, child_name, replaced)
        return module


def inflate_2d_to_3d(module: nn.Module, mode: str = "i3d", depth_kernel: geo.DepthSetting = None,
                     depth_stride: geo.DepthSetting = None, depth_padding: str = "zeros",
                     passthrough: Sequence[type] = ()) -> nn.Module:
    """Deep-copied 3D version of a 2D network (timm ``features_only`` encoder, timm classifier, plain nn.Module).

    Args:
        module: the 2D network (left unchanged).
        mode: weight rule, ``"i3d"`` (default), ``"centre"`` or ``"planar"`` (see ``inflate_conv_weight``).
        depth_kernel: depth of each conv/pool kernel.  ``None``: ``kh`` for odd in-plane kernels (3x3 -> 3x3x3,
            7x7 -> 7x7x7), the depth stride for even "patchify" kernels in i3d (1 in centre), 1 in planar mode.
            An int applies to every kernel with ``kh > 1``; a ``{module name: int}`` dict or a callable
            ``f(name, module_2d) -> int | None`` (None = default) chooses per layer.
        depth_stride: depth stride of each conv/pool/upsample.  ``None``: the in-plane stride (isotropic), 1 in planar
            mode.  An int applies to every layer whose in-plane stride is > 1; a dict or callable as above chooses
            per layer, e.g. ``{"conv_stem": 1}`` or ``stage_depth_strides`` (per feature stage: "this stride-2
            stage does not pool along depth").
        depth_padding: ``"zeros"`` (default) or ``"replicate"`` (border slices repeated: i3d then reproduces the 2D
            network on every slice of a depth-constant input, borders included).
        passthrough: extra module classes to keep without checking their forward (declared rank-agnostic).

    Depth padding is the in-plane padding when ``kd == kh`` ("same"-like), ``(kd - 1) // 2`` otherwise (0 for
    unpadded layers); see :mod:`.geometry`.  Module names and state_dict keys are those of the 2D network; only
    weight shapes change.  Every module that is kept is checked by :mod:`.rank_check`; one whose forward would act
    on the wrong axes of a 5D tensor raises ``NotImplementedError`` naming its path, class and the operation.
    """
    check_mode(mode)
    if depth_padding not in ("zeros", "replicate"):
        raise ValueError(f"depth_padding must be 'zeros' or 'replicate', got {depth_padding!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"inflate_2d_to_3d expects an nn.Module, got {type(module).__name__}")
    inflater = _Inflater(mode, depth_kernel, depth_stride, depth_padding, tuple(passthrough))
    return inflater.run(copy.deepcopy(module))
