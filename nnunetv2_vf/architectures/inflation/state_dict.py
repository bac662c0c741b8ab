"""A 2D checkpoint mapped onto an inflated network, key by key (pure function)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from nnunetv2_vf.architectures.inflation.geometry import inflate_kernel
from nnunetv2_vf.architectures.inflation.weights import check_mode

__all__ = ["inflate_state_dict"]


def inflate_state_dict(state_dict_2d: Mapping[str, torch.Tensor], model_3d: nn.Module, mode: str = "i3d", *,
                       require_all_keys: bool = False) -> dict[str, torch.Tensor]:
    """Map a 2D state_dict onto ``model_3d``'s keys and shapes (pure function; returns a new dict).

    4D conv kernels become 5D at the 3D model's depth kernel size with the same rule as the module rewriter
    (:func:`~nnunetv2_vf.architectures.inflation.geometry.inflate_kernel`; transposed convs scaled by their depth
    stride); everything else (biases, norms, running stats, linear layers) is copied.  Raises ``ValueError``
    listing every key of the checkpoint that the model lacks and every shape that is not an inflation (a
    checkpoint for another architecture or dataset).  ``require_all_keys`` also reports model keys the checkpoint
    lacks (default False: partial sources such as encoder-only weights are allowed).
    """
    check_mode(mode)
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
            out[key] = inflate_kernel(value, want.shape[2], mode, transposed=transposed,
                                      depth_stride=owner.stride[0] if transposed else 1).to(want.dtype)
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
