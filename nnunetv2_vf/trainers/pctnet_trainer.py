"""nnU-Net training with PCT-Net.

The trainer rewrites the chosen configuration of the plans *before* ``nnUNetTrainer.__init__`` (the only place
whose changes reach the model folder's ``plans.json``, which prediction uses to rebuild the network):
the patch is rounded up to what PCT-Net accepts and ``architecture`` points at
:class:`nnunetv2_vf.architectures.pctnet.PCTNet` with JSON kwargs.  Because ``arch_kwargs['strides']`` is
PCT-Net's own down-sampling, nnU-Net's deep-supervision scales follow the network's four outputs unchanged.
"""
from __future__ import annotations

import copy

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_vf.architectures.pctnet import PAPER_FEATURES, SMALL_FEATURES, fit_patch_size, pctnet_strides
from nnunetv2_vf.plans import effective_configuration
from nnunetv2_vf.trainers.lr_schedule import WarmupPolyLRScheduler
from nnunetv2_vf.trainers.progress import ProgressLines
from nnunetv2_vf.trainers.safeguards import AtomicCheckpoints, PretrainedWeightsCheck
from nnunetv2_vf.trainers.variants import NoMirroring, TrainingBudget

__all__ = ["PCTNetTrainer", "PCTNetTrainer_2epochs", "PCTNetTrainer_small", "PCTNetTrainer_small_2epochs",
           "PCTNetTrainer_small_10epochs",
           "PCTNET_CLASS_NAME", "with_pctnet_architecture"]

PCTNET_CLASS_NAME = "nnunetv2_vf.architectures.pctnet.PCTNet"


def with_pctnet_architecture(plans: dict, configuration: str, features=PAPER_FEATURES, resolution_mode: int = 1,
                             **pctnet_kwargs) -> dict:
    """Copy of ``plans`` whose ``configuration`` builds PCT-Net on a patch PCT-Net accepts.

    A configuration that already names PCTNet (e.g. written by ``nnUNetv2_vf_adapt_plans`` from a pretraining run)
    keeps its architecture kwargs; only the patch is checked.
    """
    plans = copy.deepcopy(plans)
    effective = effective_configuration(plans, configuration)
    cfg = plans["configurations"][configuration]
    if len(effective["patch_size"]) != 3:
        raise ValueError(f"PCT-Net is a 3D network; configuration {configuration!r} is "
                         f"{len(effective['patch_size'])}D. Train 3d_fullres (or 3d_lowres) with the PCT-Net "
                         f"trainers, or use the 2D encoder U-Net trainers for 2d.")
    arch = effective.get("architecture", {})
    if arch.get("network_class_name") == PCTNET_CLASS_NAME:
        kwargs = dict(arch["arch_kwargs"])
        resolution_mode = kwargs.get("resolution_mode", 1)
    else:
        kwargs = {"features_per_stage": list(features), "resolution_mode": resolution_mode, **pctnet_kwargs}
    kwargs["strides"] = pctnet_strides(resolution_mode)
    cfg["patch_size"] = fit_patch_size(effective["patch_size"], resolution_mode)
    cfg["architecture"] = {"network_class_name": PCTNET_CLASS_NAME, "arch_kwargs": kwargs,
                           "_kw_requires_import": []}
    return plans


def _decay_groups(network: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, PReLU slopes and relative-position tables (standard for Swin blocks)."""
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("relative_position_bias_table") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PCTNetTrainer(PretrainedWeightsCheck, AtomicCheckpoints, ProgressLines, nnUNetTrainer):
    """PCT-Net (paper configuration) inside nnU-Net, AdamW with linear warm-up then poly decay.

    Why not nnU-Net's SGD (lr 1e-2, momentum 0.99): attention logits of the Swin branch diverge at that step size
    early on; Adam-type optimisers with warm-up are the standard for window transformers and are what the MIS-FM
    authors used (Adam, lr 1e-3, wd 1e-5).
    """

    pctnet_features: tuple = PAPER_FEATURES
    resolution_mode: int = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plans = with_pctnet_architecture(plans, configuration, self.pctnet_features, self.resolution_mode)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 1e-5
        # of the epochs (at least one; 0: no warm-up), of all iterations under a TrainingBudget (per-iteration steps)
        self.warmup_fraction = 0.02

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(_decay_groups(self.network, self.weight_decay), lr=self.initial_lr)
        warmup = max(1, round(self.warmup_fraction * self.num_epochs)) if self.warmup_fraction > 0 else 0
        return optimizer, WarmupPolyLRScheduler(optimizer, self.num_epochs, warmup)


class PCTNetTrainer_small(PCTNetTrainer):
    """A CPU-sized PCT-Net (features 8-128, the authors' fixture size) for demos."""

    pctnet_features = SMALL_FEATURES


class PCTNetTrainer_small_2epochs(NoMirroring, TrainingBudget, PCTNetTrainer_small):
    """Smoke-test size: 2 epochs x 4 iterations, no mirroring."""

    budget = (2, 4, 2)


class PCTNetTrainer_small_10epochs(NoMirroring, TrainingBudget, PCTNetTrainer_small):
    """Demo size: 10 epochs x 15 iterations, no mirroring (about three minutes on 2 CPU cores for hippocampus with
    a 32x48x32 patch)."""

    budget = (10, 15, 3)


class PCTNetTrainer_2epochs(TrainingBudget, PCTNetTrainer):
    """GPU check size (benchmarks/gpu_check.py): the paper PCT-Net, 2 epochs x 50 iterations, nnU-Net's
    mirroring and test-time mirroring kept."""

    budget = (2, 50, 10)
