"""Fine-tuning PCT-Net from Volume Fusion pretraining (``-pretrained_weights``) inside nnU-Net.

nnU-Net loads ``-pretrained_weights`` in ``run_training.maybe_load_checkpoint`` right after ``initialize()`` with its
own loader (an assertion per key, final classifiers ``.seg_layers.`` skipped); the trainer does not see the file.
Readable checks come before training, at conversion time: ``nnUNetv2_vf_convert_misfm`` (the authors' raw weights),
``nnUNetv2_vf_adapt_plans`` (plans that build the pretrained network) and :func:`check_pretrained_compatibility`
(every key nnU-Net's loader would reject, with the fix), which any script can call on a network and a file.
"""
from __future__ import annotations

import torch

from nnunetv2_vf.checkpoint_io import read_weights_file
from nnunetv2_vf.trainers.pctnet_trainer import PCTNetTrainer
from nnunetv2_vf.trainers.variants import NoMirroring, TrainingBudget

__all__ = ["VFPretrainedTrainer", "VFPretrainedTrainer_small_2epochs", "VFPretrainedTrainer_small_10epochs",
           "VFPretrainedTrainer_small_3epochs",
           "VFPretrainedTrainer_100epochs", "check_pretrained_compatibility"]

CLASSIFIER_MARK = ".seg_layers."


def check_pretrained_compatibility(network: torch.nn.Module, path: str) -> int:
    """Raise a ValueError naming every key nnU-Net's loader would reject; returns the number of tensors that load."""
    ckpt = read_weights_file(path, "-pretrained_weights", "nnUNetv2_vf_pretrain writes OUTPUT_DIR/checkpoint_final.pth",
                             "give an intact nnUNetv2_vf_pretrain or nnU-Net checkpoint_final.pth", allow_numpy=True)
    if isinstance(ckpt, dict) and "model_state_dict" in ckpt and "network_weights" not in ckpt:
        raise ValueError(f"-pretrained_weights {path} is in the MIS-FM authors' format (model_state_dict). Convert "
                         f"it first: nnUNetv2_vf_convert_misfm {path} converted.pth, then "
                         f"nnUNetv2_vf_adapt_plans -d DATASET -a adaptation_plan.json (written next to "
                         f"converted.pth) and train with -pretrained_weights converted.pth")
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ValueError(f"-pretrained_weights {path} holds no 'network_weights' (keys: "
                         f"{list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__}); give an nnU-Net or "
                         f"nnUNetv2_vf_pretrain checkpoint_final.pth")
    pretrained = ckpt["network_weights"]
    own = network.state_dict()
    problems = []
    for key, value in own.items():
        if CLASSIFIER_MARK in key:
            continue
        if key not in pretrained:
            problems.append(f"missing in checkpoint: {key} {tuple(value.shape)}")
        elif pretrained[key].shape != value.shape:
            problems.append(f"shape mismatch: {key} checkpoint {tuple(pretrained[key].shape)} vs network "
                            f"{tuple(value.shape)}")
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        arch = ckpt.get("architecture")
        raise ValueError(
            f"-pretrained_weights {path} does not fit the network of these plans ({len(problems)} problem(s)):\n  "
            f"{shown}\nFix: write plans with the pretraining architecture and preprocessing, "
            f"'nnUNetv2_vf_adapt_plans -d DATASET -a PRETRAIN_DIR/adaptation_plan.json -p nnUNetPlans_VF', run "
            f"nnUNetv2_preprocess -plans_name nnUNetPlans_VF, and train with '-p nnUNetPlans_VF'"
            + (f" (checkpoint architecture: {arch})" if arch else "")
            + ". For another network, subclass the trainer and override initialize().")
    return sum(1 for k in own if CLASSIFIER_MARK not in k)


class VFPretrainedTrainer(PCTNetTrainer):
    """PCT-Net fine-tuning from Volume Fusion weights: the plans' PCT-Net architecture (from
    ``nnUNetv2_vf_adapt_plans``) is kept, the learning rate warms up linearly over the first 10 % of the epochs
    (pretrained features are not destroyed by large early updates from a randomly initialised classifier), then
    decays polynomially (AdamW, lr 1e-3, as PCTNetTrainer)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.warmup_fraction = 0.1


class VFPretrainedTrainer_small_2epochs(NoMirroring, TrainingBudget, VFPretrainedTrainer):
    """Smoke-test size: 2 epochs x 4 iterations, no mirroring, small PCT-Net when the plans carry none."""

    pctnet_features = (8, 16, 32, 64, 128)
    budget = (2, 4, 2)


class VFPretrainedTrainer_small_10epochs(NoMirroring, TrainingBudget, VFPretrainedTrainer):
    """CPU demo and benchmark size: 10 epochs x 15 iterations, no mirroring, small PCT-Net when the plans carry
    none (the same as PCTNetTrainer_small_10epochs, plus the fine-tuning warm-up)."""

    pctnet_features = (8, 16, 32, 64, 128)
    budget = (10, 15, 3)


class VFPretrainedTrainer_small_3epochs(VFPretrainedTrainer_small_10epochs):
    """Shortest benchmark size: 3 epochs x 25 iterations (early convergence is where VF helps most)."""

    budget = (3, 25, 5)


class VFPretrainedTrainer_100epochs(TrainingBudget, VFPretrainedTrainer):
    """GPU benchmark size: 100 epochs x 250 iterations (paper PCT-Net unless the plans carry another)."""

    budget = (100, 250, 50)
