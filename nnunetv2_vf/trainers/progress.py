"""What a user sees while a plugin trainer runs: a progress line at least every minute, no import-time noise.

nnU-Net prints one block per epoch.  An epoch of 250 iterations of a 3D network on a CPU (or a paper-size PCT-Net
on a small GPU) takes many minutes, during which nothing shows that training is alive.  :class:`ProgressLines`
counts iterations and, when more than ``progress_interval_s`` (60 s) have passed since the last line, writes::

    epoch 3: iteration 87/250, loss -0.4123, elapsed 61 s

through ``print_to_log_file`` (console and nnU-Net's training log; only rank 0 prints under DDP).  ``elapsed`` is
the time since the epoch started.  Nothing is printed for epochs shorter than the interval.

Import-time noise: ``import timm`` (the cross-dimensional trainers' encoders) calls ``torch.jit.interface`` in
timm's HRNet module, which recent torch answers with a FutureWarning -- once per process that imports the plugin
trainers, i.e. in every ``nnUNetv2_train`` / ``nnUNetv2_predict``.  This module, imported by the trainer modules
before anything imports timm, does that one import with exactly that warning ignored; other warnings (and the
same warning triggered by anyone else's code later) are untouched.
"""
from __future__ import annotations

import time
import warnings

__all__ = ["ProgressLines"]


def _import_timm_quietly() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        try:
            import timm  # noqa: F401
        except ImportError:  # the PCT-Net trainers work without timm
            pass


_import_timm_quietly()


class ProgressLines:
    """Trainer mixin (place it before ``nnUNetTrainer`` in the bases): a short progress line at least every
    ``progress_interval_s`` seconds during training epochs."""

    progress_interval_s: float = 60.0

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._progress_epoch_start = self._progress_last = time.monotonic()
        self._progress_iteration = 0

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        now = time.monotonic()
        if getattr(self, "_progress_epoch_start", None) is None:  # train_step outside nnU-Net's epoch loop
            self._progress_epoch_start = self._progress_last = now
            self._progress_iteration = 0
        self._progress_iteration += 1
        if now - self._progress_last > self.progress_interval_s:
            loss = result.get("loss") if isinstance(result, dict) else None
            loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
            self.print_to_log_file(f"epoch {self.current_epoch}: iteration {self._progress_iteration}/"
                                   f"{self.num_iterations_per_epoch}{loss_text}, elapsed "
                                   f"{now - self._progress_epoch_start:.0f} s")
            self._progress_last = now
        return result
