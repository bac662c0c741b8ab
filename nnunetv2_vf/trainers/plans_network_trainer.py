"""Fine-tuning nnU-Net's own networks (PlainConvUNet, the ResEnc presets) from Volume Fusion pretraining.

``nnUNetv2_vf_pretrain --network plans --plans nnUNetResEncUNetMPlans.json`` pretrains the network of a plans file;
``nnUNetv2_vf_adapt_plans -sp nnUNetResEncUNetMPlans`` writes fine-tuning plans with that network;
``nnUNetv2_train ... -tr VFPlansNetworkTrainer -p <adapted plans> -pretrained_weights checkpoint_final.pth``
fine-tunes it (nnU-Net's own loader reads the weights).
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_vf.pretrain.adaptation_plan import plan_recorded_in_plans
from nnunetv2_vf.plans import effective_configuration
from nnunetv2_vf.trainers.lr_schedule import WarmupPolyLRScheduler
from nnunetv2_vf.trainers.progress import ProgressLines
from nnunetv2_vf.trainers.safeguards import AtomicCheckpoints, PretrainedWeightsCheck
from nnunetv2_vf.trainers.variants import NoMirroring, TrainingBudget

__all__ = ["VFPlansNetworkTrainer", "VFPlansNetworkTrainer_cpu_2epochs", "VFPlansNetworkTrainer_cpu_10epochs",
           "VFPlansNetworkTrainer_100epochs", "CpuBatch", "check_plans_network"]


class VFPlansNetworkTrainer(PretrainedWeightsCheck, AtomicCheckpoints, ProgressLines, nnUNetTrainer):
    """nnU-Net's trainer for pretrained weights: the plans' network, nnU-Net's SGD (Nesterov, momentum 0.99,
    weight decay 3e-5) at a peak lr of 1e-3 instead of 1e-2, reached by a linear warm-up over the first 5 % of the
    epochs (50 of nnU-Net's 1000), then nnU-Net's poly decay.

    Why: nnU-Net's documentation (documentation/pretraining_and_finetuning.md, "Using pretrained weights") leaves
    fine-tuning to plain nnUNetTrainer and suggests writing trainers "with learning rate rampup"; the DKFZ's own
    fine-tuning of pretrained ResEnc networks (MIC-DKFZ/panther, nnUNetTrainer1e3_150e_polylrlin) keeps nnU-Net's
    SGD at lr 1e-3 with a 50-epoch linear warm-up and poly decay.  The full 1e-2 from the first step lets the
    gradients of the randomly initialised classifier overwrite the pretrained features before they are used.
    """

    warmup_fraction: float = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_plans_network(plans, configuration, type(self).__name__)
        plan_recorded_in_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        warmup = max(1, round(self.warmup_fraction * self.num_epochs)) if self.warmup_fraction > 0 else 0
        return optimizer, WarmupPolyLRScheduler(optimizer, self.num_epochs, warmup)


def check_plans_network(plans: dict, configuration: str, trainer: str) -> None:
    """Refuse plans whose network belongs to a plugin trainer (they would train, but with the wrong recipe)."""
    name = effective_configuration(plans, configuration).get("architecture", {}).get("network_class_name", "")
    if name.startswith("nnunetv2_vf."):
        which = "VFPretrainedTrainer" if name.endswith(".PCTNet") else "the trainer of that network"
        raise ValueError(f"{plans.get('plans_name', 'these plans')} ({configuration}) build "
                         f"{name.rsplit('.', 1)[-1]}, but {trainer} fine-tunes nnU-Net's own networks "
                         f"(PlainConvUNet, ResidualEncoderUNet) pretrained with 'nnUNetv2_vf_pretrain --network "
                         f"plans'; train these plans with {which}")


class CpuBatch:
    """At most ``cpu_batch_size`` patches per batch, whatever the plans say (nnU-Net's ResEnc presets plan e.g. 12 for
    hippocampus, which makes a CPU smoke test of a 24M-parameter network take minutes per epoch)."""

    cpu_batch_size: int = 2

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if not self.is_ddp:
            self.batch_size = min(self.batch_size, self.cpu_batch_size)


class VFPlansNetworkTrainer_cpu_2epochs(CpuBatch, NoMirroring, TrainingBudget, VFPlansNetworkTrainer):
    """Smoke-test size: 2 epochs x 4 iterations (1 warm-up iteration), batch at most 2, no mirroring."""

    budget = (2, 4, 2)


class VFPlansNetworkTrainer_cpu_10epochs(CpuBatch, NoMirroring, TrainingBudget, VFPlansNetworkTrainer):
    """CPU demo size: 10 epochs x 15 iterations, batch at most 2, no mirroring."""

    budget = (10, 15, 3)


class VFPlansNetworkTrainer_100epochs(TrainingBudget, VFPlansNetworkTrainer):
    """GPU benchmark size: 100 epochs x 250 iterations, nnU-Net's mirroring kept."""

    budget = (100, 250, 50)
