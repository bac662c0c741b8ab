"""U-Nets whose encoder is a 2D ImageNet classifier from timm, for nnU-Net plans (Messaoudi et al., MedIA 2023).

* :class:`EncoderUNet2D` (Omnia-Net, generalised): timm ``features_only`` encoder + U-Net decoder.
* :class:`EncoderUNet3D` (DX-Net): the same network built in 2D and inflated to 3D (encoder AND decoder), with
  planar (kd = 1, depth stride 1) stages wherever the plans do not pool along depth.
* :class:`DepthStackUNet` (DS-Net): a small 3D encoder squeezes depth to 3 slices, which become the RGB channels of
  a 2D Omnia-Net applied to every feature channel, and a 3D decoder restores depth.

Tensor layout follows nnU-Net: ``[B, C, (D,) H, W]``; ``strides`` is nnU-Net's ``pool_op_kernel_sizes`` (first entry
all ones).  All constructor arguments are JSON-serialisable so the networks can be named in a plans file
(``architecture.network_class_name``) and rebuilt by nnU-Net's predictor without the trainer.

Mapping the plans' pooling onto the encoder: the timm encoder has five stride-2 stages (reductions 2..32).  With
``n = len(strides) - 1`` pooling steps, encoder stage ``k < min(n, 5)`` pools by ``strides[k + 1]`` (the stride of
every strided conv/pool inside that stage is rewritten, so ``(1, 2)`` steps of anisotropic plans work); the encoder
is cropped after stage ``n`` when ``n < 5``; when ``n > 5`` plain [conv, norm, act] x 2 stages are appended.  The
full-resolution skip comes from a small stem block (3x3 conv -> ``stem_channels``, norm, act).
"""
from __future__ import annotations

import difflib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_vf.architectures.inflate import inflate_2d_to_3d, inflate_state_dict, is_strided, module_input_levels

__all__ = ["EncoderUNet2D", "EncoderUNet3D", "DepthStackUNet", "InstanceNormAct", "create_timm_encoder",
           "check_timm_encoder_name", "set_encoder_strides", "depth_reduction_plan"]

ENCODER_STAGES = 5
DEFAULT_DECODER_CHANNELS = (16, 32, 64, 128, 256, 320, 320, 320)


def check_timm_encoder_name(encoder_name: str) -> None:
    import timm

    if encoder_name not in timm.list_models():
        close = difflib.get_close_matches(encoder_name, timm.list_models(), n=6, cutoff=0.5)
        raise ValueError(f"unknown timm encoder {encoder_name!r}; close matches: {close or 'none'}. Set "
                         f"nnUNetv2_vf_plan_network --encoder (arch_kwargs['encoder_name'] in the plans) to a name from "
                         f"timm.list_models(), e.g. 'efficientnet_lite0' or 'resnet18'.")


class InstanceNormAct(nn.Module):
    """Instance norm that replaces a (timm) batch norm: keeps ``weight``/``bias`` (same state_dict keys, affine
    pretrained values), drops the running statistics, keeps the fused activation of timm's ``BatchNormAct2d``.

    ``F.instance_norm`` works for any spatial rank, so this module needs no change when the network is inflated.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, act: nn.Module | None = None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "InstanceNormAct":
        act = nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
        new = cls(bn.num_features, bn.eps, act)
        if bn.affine:
            with torch.no_grad():
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps))


def _replace_batch_norms(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, InstanceNormAct.from_batch_norm(child))
        else:
            _replace_batch_norms(child)
    return module


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _norm(norm: str, channels: int, dim: int = 2) -> nn.Module:
    if norm == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")


def _conv_block(in_ch: int, out_ch: int, norm: str, stride: Sequence[int] | None = None,
                kernel: Sequence[int] | None = None, dim: int = 2) -> nn.Sequential:
    kernel = tuple(kernel) if kernel is not None else (3,) * dim
    stride = tuple(stride) if stride is not None else (1,) * dim
    return nn.Sequential(_CONV[dim](in_ch, out_ch, kernel, stride=stride, padding=tuple(k // 2 for k in kernel),
                                    bias=False),
                         _norm(norm, out_ch, dim), nn.ReLU(inplace=True))


def set_encoder_strides(encoder: nn.Module, strided_levels: dict[str, int], strides: Sequence[Sequence[int]]) -> None:
    """Give every strided conv/pool that leaves level L the plan's stride ``strides[L + 1]`` (in place).

    ``strided_levels`` maps the names of the encoder's originally strided modules to their input level;
    ``strides`` is the plan's full list (first entry all ones).  Works for 2D modules and their inflated 3D copies.
    """
    modules = dict(encoder.named_modules())
    for name, level in strided_levels.items():
        m = modules[name]
        if level + 1 >= len(strides):
            continue
        new = tuple(int(s) for s in strides[level + 1])
        if isinstance(m, nn.modules.conv._ConvNd):
            m.stride = new
        else:  # pools: kernel-2 pools (ResNet-D avg_down) must shrink their kernel with the stride
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * len(new)
            if isinstance(m, (nn.AvgPool2d, nn.AvgPool3d)) and all(v == 2 for v in k):
                m.kernel_size = new
            m.stride = new


def create_timm_encoder(encoder_name: str, in_chans: int, num_stages: int, drop_path_rate: float = 0.0):
    """timm ``features_only`` encoder returning the first ``num_stages`` (1..5) feature maps; unused tail removed."""
    import timm

    check_timm_encoder_name(encoder_name)
    kwargs = dict(pretrained=False, features_only=True, in_chans=in_chans, out_indices=tuple(range(num_stages)))
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        encoder = timm.create_model(encoder_name, **kwargs)
    except TypeError:  # families without stochastic depth
        kwargs.pop("drop_path_rate", None)
        encoder = timm.create_model(encoder_name, **kwargs)
    reductions = encoder.feature_info.reduction()
    if list(reductions) != [2, 4, 8, 16, 32][:num_stages]:
        raise ValueError(f"encoder {encoder_name!r} has feature reductions {reductions}; the encoder U-Nets need "
                         f"five stride-2 stages (reductions 2, 4, 8, 16, 32) like EfficientNet, ResNet, RegNet, "
                         f"MobileNet. Choose such an encoder.")
    # EfficientNet-style feature extractors keep all blocks even when fewer outputs are requested
    last = encoder.feature_info.module_name()[-1]
    if hasattr(encoder, "blocks") and last.startswith("blocks."):
        encoder.blocks = encoder.blocks[: int(last.split(".")[1]) + 1]
    return encoder


def _check_strides(strides, dim: int) -> list[tuple[int, ...]]:
    strides = [tuple(int(v) for v in s) for s in strides]
    if len(strides) < 2 or any(len(s) != dim for s in strides) or strides[0] != (1,) * dim:
        raise ValueError(f"strides must be nnU-Net {dim}d pool_op_kernel_sizes ([[1{', 1' * (dim - 1)}], ...], at "
                         f"least one pooling step); got {strides}.")
    if any(v not in (1, 2) for s in strides[1:] for v in s):
        raise ValueError(f"only pooling strides 1 and 2 are supported, got {strides}")
    return strides


class _EncoderUNet(nn.Module):
    """Shared body of the 2D and 3D encoder U-Nets (see :class:`EncoderUNet2D` for the arguments)."""

    dim = 2

    def _build(self, input_channels: int, num_classes: int, strides, kernel_sizes, encoder_name: str,
               input_adaptation: str, norm: str, stem_channels: int, decoder_channels, drop_path_rate: float,
               deep_supervision: bool):
        dim = self.dim
        if input_adaptation not in ("timm", "learned_stem"):
            raise ValueError(f"input_adaptation must be 'timm' or 'learned_stem', got {input_adaptation!r}")
        if len(decoder_channels) < len(strides):
            raise ValueError(f"decoder_channels needs {len(strides)} entries (one per level), got {decoder_channels}")
        n_pool = len(strides) - 1
        n_enc = min(n_pool, ENCODER_STAGES)
        self.strides = strides
        self.kernel_sizes = kernel_sizes
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.encoder_name = encoder_name
        self.input_adaptation = input_adaptation
        self.norm = norm
        self.divisor = tuple(int(math.prod(s[a] for s in strides)) for a in range(dim))

        self.stem = _conv_block(input_channels, stem_channels, norm, kernel=kernel_sizes[0], dim=dim)
        enc_in = input_channels if input_adaptation == "timm" else stem_channels
        encoder = create_timm_encoder(encoder_name, enc_in, n_enc, drop_path_rate)
        levels = module_input_levels(encoder, enc_in)
        modules = dict(encoder.named_modules())
        strided = {n: lvl for n, lvl in levels.items() if is_strided(modules[n])}
        set_encoder_strides(encoder, strided, [s[-2:] for s in strides])
        if norm == "instance":
            _replace_batch_norms(encoder)
        self.encoder = self._to_dim(encoder, levels, strided)
        skip_channels = [stem_channels] + list(encoder.feature_info.channels())
        # deeper plans than the encoder: plain conv stages
        self.extra_stages = nn.ModuleList()
        for k in range(n_enc, n_pool):
            ch = decoder_channels[k + 1]
            self.extra_stages.append(nn.Sequential(
                _conv_block(skip_channels[-1], ch, norm, strides[k + 1], kernel_sizes[k + 1], dim),
                _conv_block(ch, ch, norm, kernel=kernel_sizes[k + 1], dim=dim)))
            skip_channels.append(ch)
        self.skip_channels = skip_channels
        self.decoder = UNetDecoder(skip_channels, decoder_channels[: len(strides)], strides, kernel_sizes,
                                   num_classes, norm, deep_supervision, dim)

    def _to_dim(self, encoder: nn.Module, levels: dict[str, int], strided: dict[str, int]) -> nn.Module:
        return encoder

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.stem(x)
        skips = [stem] + list(self.encoder(x if self.input_adaptation == "timm" else stem))
        for stage in self.extra_stages:
            skips.append(stage(skips[-1]))
        return skips

    def forward(self, x: torch.Tensor):
        if x.ndim != self.dim + 2 or x.shape[1] != self.input_channels:
            axes = "H, W" if self.dim == 2 else "D, H, W"
            raise ValueError(f"{type(self).__name__} expects [B, {self.input_channels}, {axes}], got {tuple(x.shape)}")
        size = x.shape[2:]
        pad = [(-s) % d for s, d in zip(size, self.divisor)]
        if any(pad):  # pad to a multiple of the total stride, crop the outputs back
            x = F.pad(x, [p for axis in reversed(pad) for p in (0, axis)])
        out = self.decoder(self.encode(x))
        if not any(pad):
            return out
        outs = out if isinstance(out, list) else [out]
        cropped, scale = [], [1] * self.dim
        for i, o in enumerate(outs):
            cropped.append(o[(...,) + tuple(slice(0, math.ceil(s / c)) for s, c in zip(size, scale))])
            if i + 1 < len(self.strides):
                scale = [scale[a] * self.strides[i + 1][a] for a in range(self.dim)]
        return cropped if isinstance(out, list) else cropped[0]


class EncoderUNet2D(_EncoderUNet):
    """Omnia-Net generalised: timm encoder + U-Net decoder following nnU-Net's ``strides``.

    Args:
        input_channels, num_classes: as in nnU-Net (``num_classes`` = segmentation heads).
        strides: nnU-Net ``pool_op_kernel_sizes`` (2D), first entry ``[1, 1]``.
        encoder_name: timm model name (``pretrained=False``; weights are loaded by the trainer from a local file).
        input_adaptation: ``"timm"`` (default: encoder's first conv takes the raw channels; pretrained RGB kernels are
            summed/repeated by timm's rule when loaded) or ``"learned_stem"`` (the paper: encoder consumes the output
            of the learned full-resolution stem; its first conv is re-initialised).
        norm: ``"batch"`` (keep pretrained batch-norm statistics) or ``"instance"`` (swap to instance norm, affine
            weights kept, running statistics dropped). Applies to encoder and decoder.
        decoder_channels: channels per resolution level, full resolution first.
        deep_supervision: return a list of logits (one per decoder level, highest resolution first).
    """

    dim = 2

    def __init__(self, input_channels: int, num_classes: int, strides: Sequence[Sequence[int]],
                 encoder_name: str = "efficientnet_lite0", input_adaptation: str = "timm", norm: str = "batch",
                 stem_channels: int = 16, decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 drop_path_rate: float = 0.0, deep_supervision: bool = False):
        super().__init__()
        strides = _check_strides(strides, 2)
        self._build(input_channels, num_classes, strides, [(3, 3)] * len(strides), encoder_name, input_adaptation,
                    norm, stem_channels, decoder_channels, drop_path_rate, deep_supervision)


class EncoderUNet3D(_EncoderUNet):
    """DX-Net: :class:`EncoderUNet2D` with every operator inflated to 3D, following 3D nnU-Net plans.

    The timm encoder is built in 2D with the plans' in-plane strides and inflated (``inflation``: ``"i3d"`` or
    ``"centre"``, see :mod:`nnunetv2_vf.architectures.inflate`); then every strided module gets the full 3D stride
    of its stage, and convs of levels whose plan kernel has depth 1 (anisotropic plans) become planar
    (kd = 1, no depth padding).  Stem, extra stages and decoder are native 3D modules with the plan's kernels.
    State-dict keys equal those of :meth:`planar_counterpart` (the matching EncoderUNet2D), so a trained 2D network
    or 2D ImageNet weights load through :meth:`load_inflated`.
    """

    dim = 3

    def __init__(self, input_channels: int, num_classes: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]] | None = None, encoder_name: str = "efficientnet_lite0",
                 input_adaptation: str = "timm", norm: str = "batch", stem_channels: int = 16,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS, drop_path_rate: float = 0.0,
                 inflation: str = "i3d", deep_supervision: bool = False):
        super().__init__()
        strides = _check_strides(strides, 3)
        kernel_sizes = [tuple(int(v) for v in k) for k in (kernel_sizes or [(3, 3, 3)] * len(strides))]
        if len(kernel_sizes) != len(strides) or any(len(k) != 3 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must give one 3D kernel per stage ({len(strides)}), got {kernel_sizes}")
        if inflation not in ("i3d", "centre"):
            raise ValueError(f"inflation must be 'i3d' or 'centre', got {inflation!r}")
        self.inflation = inflation
        self._counterpart_kwargs = dict(input_channels=input_channels, num_classes=num_classes,
                                        strides=[list(s[1:]) for s in strides], encoder_name=encoder_name,
                                        input_adaptation=input_adaptation, norm=norm, stem_channels=stem_channels,
                                        decoder_channels=list(decoder_channels), drop_path_rate=drop_path_rate)
        self._build(input_channels, num_classes, strides, kernel_sizes, encoder_name, input_adaptation, norm,
                    stem_channels, decoder_channels, drop_path_rate, deep_supervision)

    def _to_dim(self, encoder: nn.Module, levels: dict[str, int], strided: dict[str, int]) -> nn.Module:

        encoder3d = inflate_2d_to_3d(encoder, mode=self.inflation)
        set_encoder_strides(encoder3d, strided, self.strides)
        modules2d = dict(encoder.named_modules())
        for name, m in encoder3d.named_modules():
            if name not in levels:
                continue
            level = levels[name] + (1 if name in strided else 0)
            if self.kernel_sizes[min(level, len(self.kernel_sizes) - 1)][0] != 1:
                continue
            _make_planar(m, modules2d[name])
        return encoder3d

    def planar_counterpart(self) -> EncoderUNet2D:
        """The EncoderUNet2D with the same state-dict keys (in-plane strides): source of 2D weights."""
        return EncoderUNet2D(**self._counterpart_kwargs)

    def load_inflated(self, state_dict_2d: dict, only_prefix: str | None = None) -> list[str]:
        """Load 2D weights (an EncoderUNet2D state dict) inflated with ``self.inflation``; returns loaded keys.

        Transposed convs (decoder upsampling, kernel = stride) are repeated along depth without scaling by
        :func:`inflate_state_dict`'s transposed rule: each output slice receives exactly one input slice, so
        depth-constant inputs stay exact.
        """
        own = self.state_dict()
        source = {k: v for k, v in state_dict_2d.items() if only_prefix is None or k.startswith(only_prefix)}
        missing = [k for k in own if (only_prefix is None or k.startswith(only_prefix)) and k not in source]
        if missing:
            raise ValueError(f"the 2D weights lack {len(missing)} keys of this network (e.g. {missing[:3]}): they come "
                             f"from another architecture/encoder. Use a checkpoint of EncoderUNet2DTrainer with the "
                             f"same encoder ({self.encoder_name}) on the same dataset (2d configuration).")
        inflated = inflate_state_dict(source, self, mode=self.inflation)
        for k, v in source.items():
            target = own.get(k)
            if target is None:
                continue
            if inflated[k].shape != target.shape:
                raise ValueError(f"2D weight {k} {tuple(v.shape)} does not inflate to this network's "
                                 f"{tuple(target.shape)}: the 2D network was built for another plan (classes, "
                                 f"channels, encoder or stages). Train the 2d configuration of the same dataset with "
                                 f"the same encoder, then pass its checkpoint_final.pth.")
        result = self.load_state_dict({k: inflated[k] for k in source if k in own}, strict=False)
        if result.unexpected_keys:  # pragma: no cover - filtered above
            raise RuntimeError(f"unexpected keys {result.unexpected_keys[:3]}")
        return [k for k in source if k in own]


def _make_planar(m3d: nn.Module, m2d: nn.Module) -> None:
    """Turn an inflated conv/pool into its kd = 1 version (exact slice-wise 2D behaviour), in place."""
    if isinstance(m3d, nn.Conv3d) and m3d.kernel_size[0] != 1:
        m3d.kernel_size = (1,) + tuple(m3d.kernel_size[1:])
        m3d.padding = (0,) + tuple(m3d.padding[1:]) if isinstance(m3d.padding, tuple) else m3d.padding
        m3d.weight = nn.Parameter(m2d.weight.detach().clone().unsqueeze(2))
    elif isinstance(m3d, (nn.MaxPool3d, nn.AvgPool3d)):
        k = m3d.kernel_size if isinstance(m3d.kernel_size, tuple) else (m3d.kernel_size,) * 3
        p = m3d.padding if isinstance(m3d.padding, tuple) else (m3d.padding,) * 3
        m3d.kernel_size, m3d.padding = (1,) + tuple(k[1:]), (0,) + tuple(p[1:])


class UNetDecoder(nn.Module):
    """[transposed-conv upsample by the plan's stride, concat skip, 2 x (conv, norm, ReLU)] per level.

    ``seg_layers[i]`` is the 1x1 classifier of decoder level i (deepest first, like dynamic_network_architectures);
    outputs are returned highest resolution first.
    """

    def __init__(self, skip_channels: Sequence[int], channels: Sequence[int], strides, kernel_sizes,
                 num_classes: int, norm: str, deep_supervision: bool, dim: int = 2):
        super().__init__()
        self.deep_supervision = deep_supervision
        n_levels = len(skip_channels)
        self.upsamples, self.blocks, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        below = skip_channels[-1]
        for level in range(n_levels - 2, -1, -1):
            out_ch = channels[level]
            stride = tuple(strides[level + 1])
            kernel = kernel_sizes[level]
            self.upsamples.append(_CONV_T[dim](below, out_ch, stride, stride=stride, bias=False))
            self.blocks.append(nn.Sequential(
                _conv_block(out_ch + skip_channels[level], out_ch, norm, None, kernel, dim),
                _conv_block(out_ch, out_ch, norm, None, kernel, dim)))
            self.seg_layers.append(_CONV[dim](out_ch, num_classes, 1))
            below = out_ch

    def forward(self, skips: list[torch.Tensor]):
        x = skips[-1]
        outputs = []
        for i, (up, block) in enumerate(zip(self.upsamples, self.blocks)):
            x = block(torch.cat([up(x), skips[-(i + 2)]], 1))
            if self.deep_supervision or i == len(self.blocks) - 1:
                outputs.append(self.seg_layers[i](x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


def depth_reduction_plan(depth: int) -> tuple[int, int]:
    """(number of depth-halving convs, depth kernel of the final valid conv) that bring ``depth`` to 3 slices."""
    if depth < 3:
        raise ValueError(f"DepthStackUNet needs a patch depth of at least 3 slices, got {depth}: use a larger "
                         f"patch (plans 'patch_size') or the 2d configuration.")
    n_halvings = 0
    while depth > 5:
        depth = (depth + 1) // 2  # k3, s2, p1 conv
        n_halvings += 1
    return n_halvings, depth - 2


def _conv_block_3d(in_ch: int, out_ch: int, kernel=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)):
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
                         nn.InstanceNorm3d(out_ch, affine=True), nn.LeakyReLU(0.01, inplace=True))


class DepthStackUNet(nn.Module):
    """DS-Net: 3D depth encoder -> per-channel 2D Omnia-Net on 3-slice stacks -> 3D depth decoder.

    The 3D encoder (randomly initialised, ``depth_features`` channels) halves only the depth axis until at most
    5 slices remain, then a valid conv leaves exactly 3.  ``[B, F, 3, H, W]`` is folded to ``[B*F, 3, H, W]``: every
    feature channel becomes one RGB image for the 2D :class:`EncoderUNet2D` (``self.omnia``; its ImageNet encoder is
    the transferred part), whose 3 output channels are read back as 3 slices.  The decoder mirrors the depth encoder
    (transposed convs along depth, skip concatenation).  In-plane pooling follows the plans' strides with the depth
    component removed.  ``patch_size`` fixes the depth reduction, so inputs must have the patch depth.
    No deep supervision (the 2D net works per feature channel, not per class): train with deep supervision off.
    """

    def __init__(self, input_channels: int, num_classes: int, strides: Sequence[Sequence[int]],
                 patch_size: Sequence[int], encoder_name: str = "efficientnet_lite0", depth_features: int = 8,
                 norm: str = "batch", decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 drop_path_rate: float = 0.0, deep_supervision: bool = False):
        super().__init__()
        if deep_supervision:
            raise ValueError("DepthStackUNet has a single output: build it with deep_supervision=False (use "
                             "DepthStackUNetTrainer, which disables nnU-Net's deep supervision).")
        if len(patch_size) != 3 or any(len(s) != 3 for s in strides):
            raise ValueError(f"DepthStackUNet is 3D: needs a 3D patch and 3D strides, got {patch_size}, {strides}")
        self.input_channels = input_channels
        self.patch_depth = int(patch_size[0])
        n_halvings, final_kernel = depth_reduction_plan(self.patch_depth)
        in_plane = [list(s[1:]) for s in strides]
        in_plane = [in_plane[0]] + [s for s in in_plane[1:] if s != [1, 1]]
        if len(in_plane) < 2:
            in_plane.append([2, 2])  # the 2D net needs at least one pooling step
        self.stem = _conv_block_3d(input_channels, depth_features)
        self.down = nn.ModuleList(_conv_block_3d(depth_features, depth_features, stride=(2, 1, 1))
                                  for _ in range(n_halvings))
        self.to_three = _conv_block_3d(depth_features, depth_features, (final_kernel, 1, 1), padding=(0, 0, 0))
        self.omnia = EncoderUNet2D(3, 3, in_plane, encoder_name, "timm", norm, decoder_channels=decoder_channels,
                                   drop_path_rate=drop_path_rate, deep_supervision=False)
        self.decoder = DepthDecoder(depth_features, n_halvings, final_kernel, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.input_channels or x.shape[2] != self.patch_depth:
            raise ValueError(f"DepthStackUNet expects [B, {self.input_channels}, {self.patch_depth}, H, W] (the "
                             f"plans' patch depth), got {tuple(x.shape)}")
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        stack = self.to_three(skips[-1])
        b, f, three, h, w = stack.shape
        planes = self.omnia(stack.reshape(b * f, three, h, w))
        return self.decoder(planes.reshape(b, f, three, h, w), skips)


class DepthDecoder(nn.Module):
    """Restores depth: 3 -> reduced depth (transposed valid conv) -> x2 per halving, skip concat + conv block."""

    def __init__(self, channels: int, n_halvings: int, final_kernel: int, num_classes: int):
        super().__init__()
        self.deep_supervision = False
        self.from_three = nn.ConvTranspose3d(channels, channels, (final_kernel, 1, 1), bias=False)
        self.blocks = nn.ModuleList([_conv_block_3d(2 * channels, channels)])
        self.upsamples = nn.ModuleList()
        for _ in range(n_halvings):
            self.upsamples.append(nn.ConvTranspose3d(channels, channels, (2, 1, 1), stride=(2, 1, 1), bias=False))
            self.blocks.append(_conv_block_3d(2 * channels, channels))
        self.seg_layers = nn.ModuleList([nn.Conv3d(channels, num_classes, 1)])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.blocks[0](torch.cat([self.from_three(x), skips[-1]], 1))
        for i, up in enumerate(self.upsamples):
            skip = skips[-(i + 2)]
            x = self.blocks[i + 1](torch.cat([up(x)[:, :, : skip.shape[2]], skip], 1))
        return self.seg_layers[0](x)
