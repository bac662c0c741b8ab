"""Mixins for nnU-Net-style trainer variants (``_Xepochs``, ``NoMirroring``, ``_seedN``) shared by all plugin
trainers; a ``TrainingBudget`` also anneals its learning rate per iteration (``PerIterationSchedule``).

Place them before the trainer class: ``class PCTNetTrainer_small_2epochs(NoMirroring, TrainingBudget, ...)``.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from nnunetv2_vf.trainers.lr_schedule import PerIterationWarmupPolyLRScheduler, WarmupPolyLRScheduler

__all__ = ["TrainingBudget", "PerIterationSchedule", "NoMirroring", "Seeded", "seed_everything"]


class PerIterationSchedule:
    """The trainer's warm-up + poly schedule stepped every training iteration instead of every epoch.

    nnU-Net sets the lr once per epoch (``lr_scheduler.step(current_epoch)`` in ``on_train_epoch_start``): over a
    few epochs that is a staircase that never anneals, e.g. a 10-epoch budget trains its whole last epoch at 14 % of
    the peak and warms up with one constant epoch at half the peak.  Here the same warm-up + poly decay runs over all
    ``num_epochs x num_iterations_per_epoch`` iterations: the last iteration trains at (1 / decay iterations)^0.9 of
    the peak (1.2 % for 10 x 15 iterations with a 10 % warm-up) and the warm-up rises every iteration.

    - ``configure_optimizers``: the trainer's own optimiser and :class:`WarmupPolyLRScheduler` (its per-group peaks,
      e.g. a lower encoder lr, and its exponent are kept), re-counted in iterations; the warm-up is the trainer's
      ``warmup_fraction`` of all iterations (at least one when the fraction is not 0).
    - ``on_train_epoch_start`` resets the iteration count; nnU-Net's own ``step(current_epoch)`` there sets (and
      logs) the lr of the epoch's first iteration.
    - ``train_step`` sets the lr of (``current_epoch``, iteration) before nnU-Net's step.

    The lr depends on nothing but the epoch and the iteration in it (each call sets it absolutely), so nnU-Net's
    epoch-start call and the first iteration's call set the same value (no double stepping), and a ``--c``
    continuation, which restores ``current_epoch`` and the optimiser's peaks, continues the same sequence.
    """

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        if not isinstance(scheduler, WarmupPolyLRScheduler):
            raise TypeError(f"{type(self).__name__}: PerIterationSchedule re-counts a WarmupPolyLRScheduler in "
                            f"iterations, but configure_optimizers returned {type(scheduler).__name__}")
        total = self.num_epochs * self.num_iterations_per_epoch
        fraction = getattr(self, "warmup_fraction", scheduler.warmup_steps / max(1, scheduler.max_steps))
        warmup = max(1, round(fraction * total)) if fraction > 0 else 0
        return optimizer, PerIterationWarmupPolyLRScheduler(optimizer, self.num_iterations_per_epoch, total, warmup,
                                                            scheduler.exponent)

    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        iteration = getattr(self, "_iteration_in_epoch", 0)
        self.lr_scheduler.step_iteration(self.current_epoch, iteration)
        self._iteration_in_epoch = iteration + 1
        return super().train_step(batch)


class TrainingBudget(PerIterationSchedule):
    """``budget = (epochs, iterations per epoch, validation iterations)`` replaces nnUNetTrainer's 1000 x 250 (50).

    A budget trains with the per-iteration schedule (:class:`PerIterationSchedule`): over a few epochs nnU-Net's
    per-epoch steps never anneal.  Trainers at nnU-Net's own 1000 epochs keep nnU-Net's per-epoch steps.

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


def seed_everything(seed: int) -> None:
    """Seed every generator an nnU-Net run draws from: Python's ``random``, NumPy's global state (nnU-Net's data
    loader and batchgenerators), and torch (network initialisation, dropout, batchgeneratorsv2 transforms)."""
    seed = int(seed) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Seeded:
    """Reproducible nnU-Net runs (nnU-Net has no seed option): ``seed`` fixes network initialisation and, separately,
    the training data stream (which cases, which crops, which augmentation, which dropout masks).

    Two seeding points, so that the from-scratch and the ``-pretrained_weights`` arm of a study see the SAME batches:
    ``initialize()`` seeds the network initialisation, ``get_dataloaders()`` re-seeds before any batch is drawn.
    Loading pretrained weights happens between the two and draws no random numbers, so the arms differ only in their
    initial weights. On CPU with ``nnUNet_n_proc_DA=0`` a run is bit-reproducible; augmentation worker processes
    (nnU-Net's NonDetMultiThreadedAugmenter) and cuDNN autotuning are not seeded, so GPU runs with workers are
    seeded but not bit-identical. ``--c`` continuation does not restore the generators (nnU-Net does not store them).

    Every epoch logs a digest of all training batches so far, so two runs can prove they saw the same data.
    """

    seed: int = 0

    def initialize(self):
        if not self.was_initialized:
            seed_everything(2 * self.seed)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
        super().initialize()

    def get_dataloaders(self):
        data_seed = 2 * self.seed + 1 + 1000 * self.local_rank  # ranks draw different batches
        seed_everything(data_seed)
        self._batch_digest = hashlib.sha256()
        self.print_to_log_file(f"Seeded: seed {self.seed} (network init {2 * self.seed}, data stream {data_seed})")
        return super().get_dataloaders()

    def train_step(self, batch: dict) -> dict:
        digest = getattr(self, "_batch_digest", None)
        if digest is not None:
            for tensor in (batch["data"], *_as_list(batch["target"])):
                digest.update(_fingerprint(tensor))
        return super().train_step(batch)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if getattr(self, "_batch_digest", None) is not None:
            self.print_to_log_file(f"Seeded: training batch digest {self._batch_digest.hexdigest()[:16]}")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _fingerprint(tensor) -> bytes:
    """Shape plus a strided sample of at most ~4k values: cheap enough for every step, and any change of case, crop
    or augmentation changes it."""
    flat = torch.as_tensor(tensor).detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].to("cpu", torch.float32).numpy()
    return repr(tuple(tensor.shape)).encode() + sample.tobytes()
