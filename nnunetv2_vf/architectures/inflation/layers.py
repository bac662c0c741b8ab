"""3D layers that torch lacks: counterparts of timm's 2D layers, depth-replicate padding, the paper's stem."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNormAct3d", "LayerNorm3d", "Conv3dSame", "DepthReplicatePadConv3d", "LearnedStem"]


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


class LearnedStem(nn.Module):
    """The paper's input adaptation: [3x3 conv -> norm -> ReLU] at full resolution mapping ``in_channels`` to
    ``out_channels`` (3 to feed an RGB encoder unchanged, or 16 with the encoder's first conv re-initialised).

    Not the default: timm's kernel rule (``adapt_input_conv_weight``) keeps the pretrained first conv and adds no
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
