"""Short-budget trainer variants in nnU-Net's ``_Xepochs`` style, declared by one class attribute."""
from __future__ import annotations

import torch

__all__ = ["TrainingBudget"]


class TrainingBudget:
    """Mixin placed before a trainer class: ``budget = (epochs, iterations per epoch, validation iterations)``
    replaces nnUNetTrainer's 1000 x 250 (50).

    The explicit ``__init__`` signature matters: nnUNetTrainer records its init kwargs (for checkpoints and DDP
    workers) by inspecting ``self.__init__``, so ``*args/**kwargs`` would break it.
    """

    budget: tuple[int, int, int]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.budget
