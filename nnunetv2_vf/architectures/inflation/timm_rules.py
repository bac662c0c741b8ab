"""timm-specific rules: timm's 2D layer classes the rewriter replaces, and rank-agnostic forwards for timm blocks
whose forward hard-codes 2D axes (``x.mean((2, 3))`` in squeeze-excitation, channels-last permutes and
``gamma.reshape(1, -1, 1, 1)`` in ConvNeXt blocks).

The instance keeps its parameters and children (identical state_dict keys); only its class is switched to a
subclass with the forward below.  The subclasses are made on first use and are importable by name from this module
(and from ``nnunetv2_vf.architectures.inflate``), so inflated networks pickle.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["timm_layer_types", "timm_forward_overrides", "rank_agnostic_class", "RANK_AGNOSTIC_SUBCLASSES"]


def _spatial_axes(x) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


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


def timm_forward_overrides() -> dict[type, Callable]:
    """timm class -> a forward for any spatial rank (same parameters)."""
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models.convnext import ConvNeXtBlock

    return {SqueezeExcite: _se_efficientnet_forward, SEModule: _se_module_forward,
            EffectiveSEModule: _effective_se_forward, ConvNeXtBlock: _convnext_block_forward}


def timm_layer_types() -> dict[str, type]:
    """timm's 2D layers that the rewriter replaces by 3D layers (same keys)."""
    from timm.layers import BatchNormAct2d, LayerNorm2d
    from timm.layers.conv2d_same import Conv2dSame

    return {"BatchNormAct2d": BatchNormAct2d, "LayerNorm2d": LayerNorm2d, "Conv2dSame": Conv2dSame}


RANK_AGNOSTIC_SUBCLASSES: dict[type, type] = {}


def rank_agnostic_class(cls: type, forward: Callable) -> type:
    """A subclass of ``cls`` (same name + '3d') with ``forward`` replaced; cached so instances pickle by name."""
    if cls not in RANK_AGNOSTIC_SUBCLASSES:
        sub = type(cls.__name__ + "3d", (cls,), {"forward": forward, "__module__": __name__,
                                                  "__doc__": f"{cls.__name__} with a forward for any spatial rank."})
        sub.__qualname__ = sub.__name__
        globals()[sub.__name__] = sub  # importable by name (pickling, deepcopy)
        RANK_AGNOSTIC_SUBCLASSES[cls] = sub
    return RANK_AGNOSTIC_SUBCLASSES[cls]


def __getattr__(name: str):
    # the rank-agnostic subclasses are made on first use; this lets pickle find them in a fresh process
    for cls, forward in timm_forward_overrides().items():
        if cls.__name__ + "3d" == name:
            return rank_agnostic_class(cls, forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
