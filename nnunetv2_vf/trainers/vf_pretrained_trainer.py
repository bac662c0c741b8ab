"""Fine-tuning PCT-Net from Volume Fusion pretraining (``-pretrained_weights``) inside nnU-Net.

nnU-Net loads ``-pretrained_weights`` in ``run_training.maybe_load_checkpoint`` right after ``initialize()`` with its
own loader (an assertion per key, final classifiers ``.seg_layers.`` skipped). Readable checks come first: at
conversion time ``nnUNetv2_vf_convert_misfm`` (the authors' raw weights) and ``nnUNetv2_vf_adapt_plans`` (plans that
build the pretrained network); at training time every plugin trainer's ``initialize()`` runs
:func:`~nnunetv2_vf.trainers.safeguards.check_pretrained_compatibility` on the file nnU-Net is about to load
(:class:`~nnunetv2_vf.trainers.safeguards.PretrainedWeightsCheck`; re-exported here for existing imports).

Fine-tuning options (encoder only, decoder first, lower encoder lr) are trainer variants of every trainer here
(``VFPretrainedTrainer_encoderOnly``, ``..._freezeEncoder<N>ep``, ``..._encoderLr0p1``):
:mod:`nnunetv2_vf.trainers.finetuning_variants`. nnU-Net's own networks pretrained with ``--network plans`` are
fine-tuned by :class:`~nnunetv2_vf.trainers.plans_network_trainer.VFPlansNetworkTrainer`.
"""
from __future__ import annotations

import torch

from nnunetv2_vf.architectures.pctnet import SMALL_FEATURES
from nnunetv2_vf.pretrain.adaptation_plan import plan_recorded_in_plans
from nnunetv2_vf.trainers.pctnet_trainer import PCTNetTrainer
from nnunetv2_vf.trainers.safeguards import CLASSIFIER_MARK, check_pretrained_compatibility  # noqa: F401 (moved)
from nnunetv2_vf.trainers.variants import NoMirroring, TrainingBudget

__all__ = ["VFPretrainedTrainer", "VFPretrainedTrainer_small_2epochs", "VFPretrainedTrainer_small_10epochs",
           "VFPretrainedTrainer_small_3epochs", "VFPretrainedTrainer_small_1x15", "VFPretrainedTrainer_small_2x15",
           "VFPretrainedTrainer_small_4x15", "VFPretrainedTrainer_small_40x15", "VFPretrainedTrainer_small_80x15",
           "VFPretrainedTrainer_100epochs", "check_pretrained_compatibility"]


class VFPretrainedTrainer(PCTNetTrainer):
    """PCT-Net fine-tuning from Volume Fusion weights: the plans' PCT-Net architecture (from
    ``nnUNetv2_vf_adapt_plans``) is kept, the learning rate warms up linearly over the first 10 % of the epochs
    (pretrained features are not destroyed by large early updates from a randomly initialised classifier), then
    decays polynomially (AdamW, lr 1e-3, as PCTNetTrainer).  The budget variants below do both per iteration
    (:class:`~nnunetv2_vf.trainers.variants.PerIterationSchedule`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plan_recorded_in_plans(plans, configuration)  # a damaged or contradicted record fails here, readably
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.warmup_fraction = 0.1


class VFPretrainedTrainer_small_2epochs(NoMirroring, TrainingBudget, VFPretrainedTrainer):
    """Smoke-test size: 2 epochs x 4 iterations, no mirroring, small PCT-Net when the plans carry none."""

    pctnet_features = SMALL_FEATURES
    budget = (2, 4, 2)


class VFPretrainedTrainer_small_10epochs(NoMirroring, TrainingBudget, VFPretrainedTrainer):
    """CPU demo and benchmark size: 10 epochs x 15 iterations, no mirroring, small PCT-Net when the plans carry
    none (the same as PCTNetTrainer_small_10epochs, plus the fine-tuning warm-up)."""

    pctnet_features = SMALL_FEATURES
    budget = (10, 15, 3)


class VFPretrainedTrainer_small_3epochs(VFPretrainedTrainer_small_10epochs):
    """Shortest benchmark size: 3 epochs x 25 iterations (early convergence is where VF helps most)."""

    budget = (3, 25, 5)


class VFPretrainedTrainer_small_1x15(VFPretrainedTrainer_small_10epochs):
    """Head-start study budget (benchmarks/head_start.py): 1 epoch x 15 iterations, annealed within it."""

    budget = (1, 15, 3)


class VFPretrainedTrainer_small_2x15(VFPretrainedTrainer_small_10epochs):
    """Head-start study budget: 2 epochs x 15 iterations (``_small_2epochs`` is the 2 x 4 smoke size)."""

    budget = (2, 15, 3)


class VFPretrainedTrainer_small_4x15(VFPretrainedTrainer_small_10epochs):
    """Head-start study budget: 4 epochs x 15 iterations."""

    budget = (4, 15, 3)


class VFPretrainedTrainer_small_40x15(VFPretrainedTrainer_small_10epochs):
    """Head-start study, converged setting: 40 epochs x 15 iterations, 5 validation batches per epoch (the per-epoch
    pseudo Dice that shows whether the run has flattened out)."""

    budget = (40, 15, 5)


class VFPretrainedTrainer_small_80x15(VFPretrainedTrainer_small_10epochs):
    """Head-start study, converged setting: 80 epochs x 15 iterations, 5 validation batches per epoch (the budget at
    which scratch's per-epoch pseudo Dice is tested for a plateau)."""

    budget = (80, 15, 5)


class VFPretrainedTrainer_100epochs(TrainingBudget, VFPretrainedTrainer):
    """GPU benchmark size: 100 epochs x 250 iterations (paper PCT-Net unless the plans carry another)."""

    budget = (100, 250, 50)
