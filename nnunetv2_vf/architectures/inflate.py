"""Inflate 2D networks (timm ImageNet encoders, whole 2D U-Nets) into 3D networks (Messaoudi et al., MedIA 2023).

The public entry point; the work is split by concern in :mod:`nnunetv2_vf.architectures.inflation`:

* weight maths (:mod:`~.inflation.weights`): :func:`inflate_conv_weight` (i3d / centre / planar kernel rules,
  transposed convs scaled by their depth stride), :func:`adapt_input_conv_weight` (timm's RGB -> C rule);
* depth geometry (:mod:`~.inflation.geometry`): depth kernel/stride/padding of each layer and the weight rule for
  it, shared by :func:`inflate_2d_to_3d` and :func:`inflate_state_dict`; :func:`stage_depth_strides`,
  :func:`module_input_levels`, :func:`depth_receptive_radius`;
* 3D layers (:mod:`~.inflation.layers`): :class:`BatchNormAct3d`, :class:`LayerNorm3d`, :class:`Conv3dSame`,
  :class:`DepthReplicatePadConv3d`, :class:`LearnedStem`;
* which modules work on 5D tensors (:mod:`~.inflation.rank_check`, read from their ``forward``) and timm's blocks
  that need a rank-agnostic forward (:mod:`~.inflation.timm_rules`);
* the module rewriter (:func:`inflate_2d_to_3d`) and checkpoint inflation (:func:`inflate_state_dict`).

Biases, norm affine parameters and running statistics are copied, never scaled; grouping is kept; module names
and state_dict keys of the 2D network are kept, so a trained 2D checkpoint inflates key by key.
"""
from __future__ import annotations

from nnunetv2_vf.architectures.inflation import timm_rules as _timm_rules
from nnunetv2_vf.architectures.inflation.geometry import (DepthSetting, depth_receptive_radius, is_strided,
                                                          module_input_levels, stage_depth_strides)
from nnunetv2_vf.architectures.inflation.layers import (BatchNormAct3d, Conv3dSame, DepthReplicatePadConv3d,
                                                        LayerNorm3d, LearnedStem)
from nnunetv2_vf.architectures.inflation.rank_check import module_problems, rank_problems
from nnunetv2_vf.architectures.inflation.rewriter import inflate_2d_to_3d
from nnunetv2_vf.architectures.inflation.state_dict import inflate_state_dict
from nnunetv2_vf.architectures.inflation.weights import INFLATION_MODES, adapt_input_conv_weight, inflate_conv_weight

__all__ = ["INFLATION_MODES", "inflate_conv_weight", "inflate_2d_to_3d", "inflate_state_dict", "stage_depth_strides",
           "module_input_levels", "is_strided", "adapt_input_conv_weight", "LearnedStem", "BatchNormAct3d",
           "LayerNorm3d", "Conv3dSame", "DepthReplicatePadConv3d", "depth_receptive_radius", "rank_problems",
           "module_problems", "DepthSetting"]


def __getattr__(name: str):
    # networks pickled before the split name their rank-agnostic timm classes (SEModule3d, ...) in this module
    return getattr(_timm_rules, name)
