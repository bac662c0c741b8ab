"""Inflate 2D networks (timm ImageNet encoders, whole 2D U-Nets) into 3D networks (Messaoudi et al., MedIA 2023).

Weight rules for a 2D kernel ``w`` of shape ``[O, I, kh, kw]`` -> ``[O, I, kd, kh, kw]`` (:func:`inflate_conv_weight`):

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

Biases, norm affine parameters and running statistics are copied, never scaled; grouping is kept.

:func:`inflate_2d_to_3d` deep-copies a 2D network and replaces every operator by its 3D counterpart, keeping the
module tree (state_dict keys) identical, so a trained 2D checkpoint can be inflated key by key with
:func:`inflate_state_dict`.  Modules whose ``forward`` is 2D-specific (``x.mean((2, 3))`` in squeeze-excitation,
channels-last permutes in ConvNeXt blocks and ``LayerNorm2d``, the 4D assert of timm's ``BatchNormAct2d``) are
replaced or given a rank-agnostic ``forward`` (same parameters, same keys).  Any torch/timm module that is not known
to be safe raises ``NotImplementedError`` naming its path, instead of silently pooling over the wrong axes.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["INFLATION_MODES", "inflate_conv_weight", "inflate_2d_to_3d", "inflate_state_dict", "stage_depth_strides",
           "module_input_levels", "is_strided",
           "adapt_input_conv_weight", "LearnedStem", "BatchNormAct3d", "LayerNorm3d", "Conv3dSame",
           "DepthReplicatePadConv3d", "depth_receptive_radius"]

INFLATION_MODES = ("i3d", "centre", "planar")

# per-layer depth settings: one int for all layers, {module name: int}, or f(name, module_2d) -> int | None
DepthSetting = Union[None, int, Mapping[str, int], Callable[[str, nn.Module], Union[int, None]]]


def _check_mode(mode: str) -> None:
    if mode not in INFLATION_MODES:
        raise ValueError(f"unknown inflation mode {mode!r}; use one of {INFLATION_MODES} ('i3d' is the default).")


# --------------------------------------------------------------------------------------------- weight rules
def inflate_conv_weight(weight_2d: torch.Tensor, depth: int, mode: str = "i3d", *, transposed: bool = False,
                        depth_stride: int = 1) -> torch.Tensor:
    """Return a new ``[O, I, depth, kh, kw]`` kernel made from a 2D ``[O, I, kh, kw]`` kernel (pure function).

    ``transposed``/``depth_stride`` describe a ConvTranspose weight ``[I, O/groups, kh, kw]`` and its depth stride
    (see the module docstring for the transposed-conv scaling).
    """
    _check_mode(mode)
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
    cyclically and scaled by 3 / C.  This is the default input adaptation; :class:`LearnedStem` is the paper's
    alternative.
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


class LearnedStem(nn.Module):
    """The paper's input adaptation: [3x3 conv -> norm -> ReLU] at full resolution mapping ``in_channels`` to
    ``out_channels`` (3 to feed an RGB encoder unchanged, or 16 with the encoder's first conv re-initialised).

    Not the default: timm's kernel rule (:func:`adapt_input_conv_weight`) keeps the pretrained first conv and adds no
    parameters; the stem is offered for the Omnia-Net recipe.
    """

    def __init__(self, in_channels: int, out_channels: int = 3, dim: int = 2, norm: str = "batch"):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        if norm == "batch":
            norm_layer = (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(out_channels)
        elif norm == "instance":
            norm_layer = (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(out_channels, affine=True)
        else:
            raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")
        self.conv = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = norm_layer
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


# --------------------------------------------------------------------------------------------- 3D operators
class BatchNormAct3d(nn.BatchNorm3d):
    """3D counterpart of timm's ``BatchNormAct2d`` (batch norm, then ``drop`` and ``act`` children; same keys)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, drop: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class LayerNorm3d(nn.LayerNorm):
    """Channels-first layer norm for ``[B, C, D, H, W]`` (3D counterpart of timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv3dSame(nn.Conv3d):
    """TensorFlow 'SAME' padding (computed from the input size, extra pixel at the end): 3D ``Conv2dSame``.

    ``depth_replicate``: pad depth by repeating border slices instead of zeros (see DepthReplicatePadConv3d).
    """

    def __init__(self, *args, depth_replicate: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.depth_replicate = bool(depth_replicate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [_same_padding(s, k, st, d) for s, k, st, d in
                zip(x.shape[2:], self.kernel_size, self.stride, self.dilation)]
        if self.depth_replicate and pads[0]:
            x = F.pad(x, (0, 0, 0, 0, pads[0] // 2, pads[0] - pads[0] // 2), mode="replicate")
            pads[0] = 0
        x = F.pad(x, [p for total in reversed(pads) for p in (total // 2, total - total // 2)])
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DepthReplicatePadConv3d(nn.Conv3d):
    """Conv3d that pads depth by replicating the border slices (in-plane padding unchanged, zeros).

    With i3d weights this makes a depth-constant input give the 2D result on every slice, borders included.
    """

    def __init__(self, *args, depth_pad: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.depth_pad = int(depth_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth_pad:
            x = F.pad(x, (0, 0, 0, 0, self.depth_pad, self.depth_pad), mode="replicate")
        return super().forward(x)


def _spatial_axes(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


# Rank-agnostic forwards for timm modules whose forward hard-codes 2D axes.  The instance keeps its parameters and
# children (identical state_dict keys); only its class is switched to a subclass with the forward below.
def _se_efficientnet_forward(self, x):
    x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean(_spatial_axes(x), keepdim=True))))
    return x * self.gate(x_se)


def _se_module_forward(self, x):
    x_se = x.mean(_spatial_axes(x), keepdim=True)
    if self.add_maxpool:
        x_se = 0.5 * x_se + 0.5 * x.amax(_spatial_axes(x), keepdim=True)
    x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
    return x * self.gate(x_se)


def _effective_se_forward(self, x):
    x_se = x.mean(_spatial_axes(x), keepdim=True)
    if self.add_maxpool:
        x_se = 0.5 * x_se + 0.5 * x.amax(_spatial_axes(x), keepdim=True)
    return x * self.gate(self.fc(x_se))


def _convnext_block_forward(self, x):
    shortcut = x
    x = self.conv_dw(x)
    if self.use_conv_mlp:
        x = self.mlp(self.norm(x))
    else:  # channels-last LayerNorm + Linear MLP
        x = self.mlp(self.norm(x.movedim(1, -1))).movedim(-1, 1)
    if self.gamma is not None:
        x = x.mul(self.gamma.reshape((1, -1) + (1,) * (x.ndim - 2)))
    return self.drop_path(x) + self.shortcut(shortcut)


def _timm_forward_overrides() -> dict[type, Callable]:
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models.convnext import ConvNeXtBlock

    return {SqueezeExcite: _se_efficientnet_forward, SEModule: _se_module_forward,
            EffectiveSEModule: _effective_se_forward, ConvNeXtBlock: _convnext_block_forward}


_RANK_AGNOSTIC_SUBCLASSES: dict[type, type] = {}


def _rank_agnostic_class(cls: type, forward: Callable) -> type:
    """A subclass of ``cls`` (same name + '3d') with ``forward`` replaced; cached so instances pickle by name."""
    if cls not in _RANK_AGNOSTIC_SUBCLASSES:
        sub = type(cls.__name__ + "3d", (cls,), {"forward": forward, "__module__": __name__,
                                                  "__doc__": f"{cls.__name__} with a forward for any spatial rank."})
        sub.__qualname__ = sub.__name__
        globals()[sub.__name__] = sub  # importable by name (pickling, deepcopy)
        _RANK_AGNOSTIC_SUBCLASSES[cls] = sub
    return _RANK_AGNOSTIC_SUBCLASSES[cls]


def __getattr__(name: str):
    # the rank-agnostic subclasses are made on first use; this lets pickle find them in a fresh process
    for cls, forward in _timm_forward_overrides().items():
        if cls.__name__ + "3d" == name:
            return _rank_agnostic_class(cls, forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _safe_timm_classes() -> tuple[type, ...]:
    """timm classes whose forward only chains children / elementwise ops (checked in timm 1.0 sources)."""
    from timm.layers import conv_bn_act, drop, mlp
    from timm.models import _efficientnet_blocks as eb, _features, byobnet, convnext, efficientnet, regnet, resnet

    classes = [_features.FeatureListNet, _features.FeatureDictNet, efficientnet.EfficientNetFeatures,
               efficientnet.EfficientNet, eb.DepthwiseSeparableConv, eb.InvertedResidual, eb.ConvBnAct,
               eb.EdgeResidual, resnet.ResNet, resnet.BasicBlock, resnet.Bottleneck, regnet.RegNet, regnet.RegStage,
               regnet.Bottleneck, convnext.ConvNeXtStage, byobnet.BottleneckBlock, byobnet.BasicBlock,
               conv_bn_act.ConvNormAct, drop.DropPath, mlp.Mlp]
    return tuple(classes)


def _is_elementwise_activation(cls: type) -> bool:
    module = cls.__module__
    if cls is nn.Softmax2d:
        return False
    return module in ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me")


_SAFE_TORCH = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.GroupNorm,
               nn.LayerNorm, nn.Linear, nn.Flatten, nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d,
               nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.Dropout3d)


# --------------------------------------------------------------------------------------------- network inflation
def _resolve(setting: DepthSetting, name: str, module: nn.Module, default: int, what: str) -> int:
    value = None
    if callable(setting) and not isinstance(setting, Mapping):
        value = setting(name, module)
    elif isinstance(setting, Mapping):
        value = setting.get(name)
    elif setting is not None:
        value = setting
    if value is None:
        return default
    if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} for {name!r} must be a positive int, got {value!r}")
    return int(value)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Inflater:
    def __init__(self, mode: str, depth_kernel: DepthSetting, depth_stride: DepthSetting, depth_padding: str,
                 passthrough: tuple[type, ...]):
        self.mode = mode
        self.depth_kernel = depth_kernel
        self.depth_stride = depth_stride
        self.depth_padding = depth_padding
        self.passthrough = passthrough
        self.overrides = _timm_forward_overrides()
        self.safe_timm = _safe_timm_classes()
        from timm.layers import BatchNormAct2d, LayerNorm2d
        from timm.layers.adaptive_avgmax_pool import SelectAdaptivePool2d
        from timm.layers.conv2d_same import Conv2dSame
        self.BatchNormAct2d, self.LayerNorm2d, self.Conv2dSame = BatchNormAct2d, LayerNorm2d, Conv2dSame
        self.SelectAdaptivePool2d = SelectAdaptivePool2d

    # depth geometry of one layer ------------------------------------------------------------------------------
    def _stride_d(self, name: str, module: nn.Module, stride_h: int) -> int:
        if self.mode == "planar":
            default = 1
        else:
            default = stride_h
        if stride_h == 1 and not callable(self.depth_stride) and not isinstance(self.depth_stride, Mapping):
            return 1  # an int setting applies to the in-plane strided layers only
        return _resolve(self.depth_stride, name, module, default, "depth_stride")

    def _kernel_d(self, name: str, module: nn.Module, kernel_h: int, stride_d: int) -> int:
        if self.mode == "planar":
            default = 1
        elif kernel_h % 2 == 1:
            default = kernel_h
        else:  # patchify kernels (kernel == stride): cover the depth stride; centre needs odd -> 1
            default = stride_d if self.mode == "i3d" else 1
        if kernel_h == 1 and not callable(self.depth_kernel) and not isinstance(self.depth_kernel, Mapping):
            return 1  # an int setting applies to the spatial (k > 1) kernels only
        kd = _resolve(self.depth_kernel, name, module, default, "depth_kernel")
        if self.mode == "planar" and kd != 1:
            raise ValueError(f"mode 'planar' keeps every kernel at depth 1; depth_kernel gave {kd} for {name!r}")
        return kd

    @staticmethod
    def _pad_d(kd: int, kh: int, pad_h: int) -> int:
        if kd == kh:
            return pad_h
        return (kd - 1) // 2 if pad_h else 0

    # per-type conversions ----------------------------------------------------------------------------------------
    def conv(self, name: str, m: nn.Conv2d) -> nn.Module:
        kh, kw = m.kernel_size
        sh, sw = m.stride
        sd = self._stride_d(name, m, sh)
        kd = self._kernel_d(name, m, kh, sd)
        same = isinstance(m, self.Conv2dSame)
        if isinstance(m.padding, str):
            padding = m.padding
            pd = 0
        else:
            ph, pw = m.padding
            pd = self._pad_d(kd, kh, ph)
            padding = (pd, ph, pw)
        kwargs = dict(stride=(sd, sh, sw), dilation=(1,) + tuple(m.dilation), groups=m.groups,
                      bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        if same:
            new = Conv3dSame(m.in_channels, m.out_channels, (kd, kh, kw), padding=0,
                             depth_replicate=self.depth_padding == "replicate", **kwargs)
        elif self.depth_padding == "replicate" and pd and not isinstance(padding, str):
            new = DepthReplicatePadConv3d(m.in_channels, m.out_channels, (kd, kh, kw), padding=(0,) + padding[1:],
                                          depth_pad=pd, padding_mode=m.padding_mode, **kwargs)
        else:
            new = nn.Conv3d(m.in_channels, m.out_channels, (kd, kh, kw), padding=padding,
                            padding_mode=m.padding_mode, **kwargs)
        with torch.no_grad():
            new.weight.copy_(inflate_conv_weight(m.weight, kd, self._weight_mode(kd)))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        return new

    def _weight_mode(self, kd: int) -> str:
        return "planar" if kd == 1 else ("i3d" if self.mode == "planar" else self.mode)

    def conv_transpose(self, name: str, m: nn.ConvTranspose2d) -> nn.Module:
        kh, kw = m.kernel_size
        sh, sw = m.stride
        sd = self._stride_d(name, m, sh)
        kd = _resolve(self.depth_kernel, name, m, 1 if self.mode == "planar" else (kh if sd == sh else sd),
                      "depth_kernel")
        ph, pw = m.padding
        pd = ph if kd == kh and sd == sh else 0
        opd = m.output_padding[0] if sd == sh else 0
        new = nn.ConvTranspose3d(m.in_channels, m.out_channels, (kd, kh, kw), stride=(sd, sh, sw),
                                 padding=(pd, ph, pw), output_padding=(opd,) + tuple(m.output_padding),
                                 groups=m.groups, bias=m.bias is not None, dilation=(1,) + tuple(m.dilation),
                                 device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            mode = self._weight_mode(kd)
            if mode == "centre" and sd == 1 and kd % 2 == 0:
                mode = "i3d"
            new.weight.copy_(inflate_conv_weight(m.weight, kd, mode, transposed=True, depth_stride=sd))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        return new

    def pool(self, name: str, m: nn.Module) -> nn.Module:
        kh, kw = _pair(m.kernel_size)
        sh, sw = _pair(m.stride if m.stride is not None else m.kernel_size)
        ph, pw = _pair(m.padding)
        sd = self._stride_d(name, m, sh)
        if self.mode == "planar":
            kd = 1
        else:
            kd = kh if kh % 2 == 1 or sd == sh else sd
        kd = _resolve(self.depth_kernel, name, m, kd, "depth_kernel") if kh > 1 and self.mode != "planar" else kd
        pd = self._pad_d(kd, kh, ph)
        if isinstance(m, nn.MaxPool2d):
            dh, dw = _pair(m.dilation)
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
        sh, sw = _pair(m.scale_factor)
        sd = sh if self.mode != "planar" else 1
        if self.depth_stride is not None and (callable(self.depth_stride) or isinstance(self.depth_stride, Mapping)):
            sd = _resolve(self.depth_stride, name, m, sd, "depth_stride")
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
            m.__class__ = _rank_agnostic_class(t, self.overrides[t])
            return None
        if t is self.SelectAdaptivePool2d:
            if not isinstance(m.pool, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity)):
                raise NotImplementedError(f"{name or '<root>'} ({t.__name__} with {type(m.pool).__name__}): only "
                                          f"'avg'/'max' pooling without flatten_fast has a 3D counterpart here")
            return None
        if (t in _SAFE_TORCH or t in self.safe_timm or _is_elementwise_activation(t) or t in self.passthrough
                or t in _RANK_AGNOSTIC_SUBCLASSES.values() or t in (BatchNormAct3d, LayerNorm3d, Conv3dSame,
                                                                     DepthReplicatePadConv3d)):
            return None
        from_library = t.__module__.split(".")[0] in ("torch", "timm")
        if from_library or "2d" in t.__name__.lower():
            raise NotImplementedError(
                f"cannot inflate module {name or '<root>'!r} of class {t.__module__}.{t.__qualname__}: its forward is "
                f"not known to work on 5D tensors (2D-specific ops would silently act on the wrong axes). Supported: "
                f"conv/pool/norm/upsample layers, ResNet/ResNeXt, EfficientNet(-Lite), ConvNeXt, RegNet blocks. If "
                f"the class is rank-agnostic, pass it in inflate_2d_to_3d(..., passthrough=(YourClass,)).")
        return None  # a user-defined container: its children are checked

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


def inflate_2d_to_3d(module: nn.Module, mode: str = "i3d", depth_kernel: DepthSetting = None,
                     depth_stride: DepthSetting = None, depth_padding: str = "zeros",
                     passthrough: Sequence[type] = ()) -> nn.Module:
    """Deep-copied 3D version of a 2D network (timm ``features_only`` encoder, timm classifier, plain nn.Module).

    Args:
        module: the 2D network (left unchanged).
        mode: weight rule, ``"i3d"`` (default), ``"centre"`` or ``"planar"`` (see :func:`inflate_conv_weight`).
        depth_kernel: depth of each conv/pool kernel.  ``None``: ``kh`` for odd in-plane kernels (3x3 -> 3x3x3,
            7x7 -> 7x7x7), the depth stride for even "patchify" kernels in i3d (1 in centre), 1 in planar mode.
            An int applies to every kernel with ``kh > 1``; a ``{module name: int}`` dict or a callable
            ``f(name, module_2d) -> int | None`` (None = default) chooses per layer.
        depth_stride: depth stride of each conv/pool/upsample.  ``None``: the in-plane stride (isotropic), 1 in planar
            mode.  An int applies to every layer whose in-plane stride is > 1; a dict or callable as above chooses
            per layer, e.g. ``{"conv_stem": 1}`` or :func:`stage_depth_strides` (per feature stage: "this stride-2
            stage does not pool along depth").
        depth_padding: ``"zeros"`` (default) or ``"replicate"`` (border slices repeated: i3d then reproduces the 2D
            network on every slice of a depth-constant input, borders included).
        passthrough: extra module classes whose forward works on 5D input as is (e.g. a custom norm wrapper).

    Depth padding is the in-plane padding when ``kd == kh`` ("same"-like), ``(kd - 1) // 2`` otherwise (0 for
    unpadded layers).  Module names and state_dict keys are those of the 2D network; only weight shapes change.
    Raises ``NotImplementedError`` naming the module path and class for a layer with an unknown 2D-specific forward.
    """
    _check_mode(mode)
    if depth_padding not in ("zeros", "replicate"):
        raise ValueError(f"depth_padding must be 'zeros' or 'replicate', got {depth_padding!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"inflate_2d_to_3d expects an nn.Module, got {type(module).__name__}")
    inflater = _Inflater(mode, depth_kernel, depth_stride, depth_padding, tuple(passthrough))
    return inflater.run(copy.deepcopy(module))


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
    return max(_pair(m.stride or 1)) > 1


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


# --------------------------------------------------------------------------------------------- checkpoints
def inflate_state_dict(state_dict_2d: Mapping[str, torch.Tensor], model_3d: nn.Module, mode: str = "i3d", *,
                       require_all_keys: bool = False) -> dict[str, torch.Tensor]:
    """Map a 2D state_dict onto ``model_3d``'s keys and shapes (pure function; returns a new dict).

    4D conv kernels become 5D with :func:`inflate_conv_weight` at the 3D model's depth kernel size (transposed convs
    scaled by their depth stride); everything else (biases, norms, running stats, linear layers) is copied.  Raises
    ``ValueError`` listing every key of the checkpoint that the model lacks and every shape that is not an inflation
    (a checkpoint for another architecture or dataset).  ``require_all_keys`` also reports model keys the checkpoint
    lacks (default False: partial sources such as encoder-only weights are allowed).
    """
    _check_mode(mode)
    if not isinstance(state_dict_2d, Mapping):
        raise TypeError(f"state_dict_2d must be a mapping of tensors, got {type(state_dict_2d).__name__}")
    target = model_3d.state_dict()
    modules = dict(model_3d.named_modules())
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in state_dict_2d.items():
        if key not in target:
            problems.append(f"{key}: not in the 3D model")
            continue
        want = target[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: not a tensor ({type(value).__name__})")
        elif tuple(value.shape) == tuple(want.shape):
            out[key] = value.detach().clone().to(want.dtype)
        elif value.ndim == 4 and want.ndim == 5 and value.shape[:2] == want.shape[:2] \
                and value.shape[2:] == want.shape[3:]:
            owner = modules.get(key.rsplit(".", 1)[0])
            transposed = isinstance(owner, nn.ConvTranspose3d)
            depth_stride = owner.stride[0] if transposed else 1
            kd = want.shape[2]
            rule = "planar" if kd == 1 else ("i3d" if mode == "planar" else mode)
            if rule == "centre" and kd % 2 == 0 and not (transposed and depth_stride > 1):
                rule = "i3d"  # even (patchify) depth kernels have no centre index
            out[key] = inflate_conv_weight(value, kd, rule, transposed=transposed,
                                           depth_stride=depth_stride).to(want.dtype)
        else:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} does not inflate to model {tuple(want.shape)}")
    if require_all_keys:
        problems += [f"{k}: missing from the checkpoint" for k in target if k not in state_dict_2d]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"the 2D checkpoint does not match this 3D network ({len(problems)} mismatches):\n  {shown}\n"
                         f"It was saved for another architecture, encoder or dataset (number of classes/channels). "
                         f"Use a checkpoint of the same network trained in 2D on the same dataset.")
    return out
