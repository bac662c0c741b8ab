"""The learning-rate schedule of the plugin trainers: optional linear warm-up, then nnU-Net's poly decay."""
from __future__ import annotations

from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["WarmupPolyLRScheduler"]


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
