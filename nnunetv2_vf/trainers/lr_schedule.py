"""The learning-rate schedule of the plugin trainers: optional linear warm-up, then nnU-Net's poly decay.

Stepped once per epoch (nnU-Net's way) by the full-length trainers, once per training iteration by the short-budget
ones (:class:`PerIterationWarmupPolyLRScheduler`, through :class:`nnunetv2_vf.trainers.variants.PerIterationSchedule`).
"""
from __future__ import annotations

from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["WarmupPolyLRScheduler", "PerIterationWarmupPolyLRScheduler"]


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup_steps``, then nnU-Net's poly decay; ``step(epoch)`` like PolyLRScheduler.

    Every param group follows the schedule from its own peak lr (its lr when the scheduler is created), so groups
    keep their ratio, e.g. a 10x lower lr for a pretrained encoder; nnU-Net's PolyLRScheduler sets one lr for all.
    """

    def __init__(self, optimizer, max_steps: int, warmup_steps: int = 0, exponent: float = 0.9):
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.exponent = exponent
        self.ctr = 0
        for group in optimizer.param_groups:  # kept in the optimizer state, so a resumed run has the same peaks
            group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, -1)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        remaining = max(1, self.max_steps - self.warmup_steps)
        # clamped so that stepping past the end (fewer epochs on resume) never gives a zero or complex lr
        return (1 - min(step - self.warmup_steps, remaining - 1) / remaining) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        factor = self.factor(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class PerIterationWarmupPolyLRScheduler(WarmupPolyLRScheduler):
    """The same schedule counted in training iterations: ``max_steps`` = epochs x iterations per epoch.

    The lr is a function of (epoch, iteration in the epoch) only, and every call sets it absolutely, so nothing is
    counted and nothing can be stepped twice: nnU-Net's own ``step(current_epoch)`` at each epoch start sets the lr
    of that epoch's first iteration (the one nnU-Net logs and plots), ``step_iteration(epoch, i)`` before every
    training iteration sets that iteration's lr.  A ``--c`` continuation restores ``current_epoch`` and the
    optimiser's per-group peaks (``initial_lr``), which is all the schedule depends on.
    """

    def __init__(self, optimizer, iterations_per_epoch: int, max_steps: int, warmup_steps: int = 0,
                 exponent: float = 0.9):
        self.iterations_per_epoch = iterations_per_epoch
        super().__init__(optimizer, max_steps, warmup_steps, exponent)

    def step(self, epoch=None):
        if epoch is None or epoch == -1:  # _LRScheduler.__init__'s initial call: iteration 0
            super().step(None)
        else:
            self.step_iteration(epoch, 0)

    def step_iteration(self, epoch: int, iteration: int) -> None:
        super().step(epoch * self.iterations_per_epoch + iteration)
