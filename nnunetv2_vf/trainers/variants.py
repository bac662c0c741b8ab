"""Mixins for nnU-Net-style trainer variants (``_Xepochs``, ``NoMirroring``) shared by all plugin trainers.

Place them before the trainer class: ``class PCTNetTrainer_small_2epochs(NoMirroring, TrainingBudget, ...)``.
"""
from __future__ import annotations

import torch

__all__ = ["TrainingBudget", "NoMirroring"]


class TrainingBudget:
    """``budget = (epochs, iterations per epoch, validation iterations)`` replaces nnUNetTrainer's 1000 x 250 (50).

    The explicit ``__init__`` signature matters: nnUNetTrainer records its init kwargs (for checkpoints and DDP
    workers) by inspecting ``self.__init__``, so ``*args/**kwargs`` would break it.
    """

    budget: tuple[int, int, int]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.budget


class NoMirroring:
    """nnU-Net's ``nnUNetTrainerNoMirroring`` as a mixin: no mirroring augmentation and no test-time mirroring.

    For the CPU-sized variants: test-time mirroring multiplies the final validation and every later
    ``nnUNetv2_predict`` by 8 in 3D (4 in 2D), which dominates a run of a few minutes on CPU.
    """

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
