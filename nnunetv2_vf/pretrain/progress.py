"""training_log.txt and progress.png of a pretraining run.

nnU-Net's ``nnUNetLogger.plot_progress_png`` is not used: it plots one point per epoch of a fixed set of keys
(all lists the same length), so it cannot carry the per-iteration training curve logged between validations, draws
its learning-rate panel even when the rate never changed, and saves with a plain ``savefig`` (a reader can see a
half-written file; here every file goes through ``atomic_write``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from nnunetv2_vf.checkpoint_io import atomic_write

__all__ = ["empty_logs", "train_log_every", "log_line", "plot_progress", "PLATEAU_RISE", "late_rise"]

# The pretext has plateaued when its fixed-set fusion Dice rises less than this over the last quarter of the run.
PLATEAU_RISE = 0.01


def empty_logs() -> dict:
    """Per validation: iteration, train_loss, val_loss, val_dice, lr, sec_per_it (data_wait_percent added when
    measured); every ``train_log_every`` iterations: train_iteration, train_loss_recent, train_lr."""
    return {"iteration": [], "train_loss": [], "val_loss": [], "val_dice": [], "lr": [], "sec_per_it": [],
            "train_iteration": [], "train_loss_recent": [], "train_lr": []}


def late_rise(iterations, dice, fraction: float = 0.25):
    """Rise of the fixed-set fusion Dice over the last ``fraction`` of the iterations run so far: the slope of the
    least-squares line through the validation points in that window, times the window's length.

    A line, not the difference of two points: single validation points move by a few hundredths with the weights,
    which would decide a first-vs-last comparison on its own. None with fewer than 4 points in the window.
    """
    import numpy as np
    it, d = np.asarray(iterations, dtype=float), np.asarray(dice, dtype=float)
    if it.size == 0:
        return None
    start = it[-1] * (1 - fraction)
    window = (it >= start) & np.isfinite(d)
    if window.sum() < 4:
        return None
    slope = np.polyfit(it[window], d[window], 1)[0]
    return float(slope * (it[-1] - start))


def train_log_every(val_every: int) -> int:
    """Training loss is logged this often: ~5 points per validation interval, at least every 20 iterations."""
    return max(1, min(20, val_every // 5))


def log_line(output_dir: Path, msg: str, stderr: bool = False) -> None:
    """Printed without breaking the progress bar, and appended to training_log.txt."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {msg}"
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr if stderr else sys.stdout)
    with open(output_dir / "training_log.txt", "a") as f:
        f.write(line + "\n")


def plot_progress(path: Path, logs: dict, title: str, log_every: int, num_classes: int) -> None:
    """Training loss every few iterations (the curve), validation loss/Dice at each validation, seconds per
    iteration, and the learning rate only when it changed (a flat line says nothing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    it, lg = logs["iteration"], logs
    lr_points = (lg["train_iteration"], lg["train_lr"]) if lg["train_iteration"] else (it, lg["lr"])
    show_lr = len(set(lr_points[1])) > 1
    fig, axes = plt.subplots(3 if show_lr else 2, 1, figsize=(10, 12 if show_lr else 8), squeeze=False)
    axes = axes[:, 0]
    fig.suptitle(title)
    ax = axes[0]
    if lg["train_iteration"]:
        ax.plot(lg["train_iteration"], lg["train_loss_recent"], "b-", alpha=0.4, lw=1,
                label=f"train loss (mean of {log_every} it.)")
    ax.plot(it, lg["train_loss"], "b.-", label="train loss (mean since last validation)")
    ax.plot(it, lg["val_loss"], "r.-", label="val loss")
    ax.set_xlabel("iteration"), ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(it, lg["val_dice"], "g.--", label=f"val mean Dice ({num_classes} fusion classes)")
    ax2.set_ylabel("mean Dice")
    ax.legend(loc="upper left"), ax2.legend(loc="upper right")
    axes[1].plot(it, lg["sec_per_it"], "b.-", label="seconds / iteration")
    axes[1].set_xlabel("iteration"), axes[1].legend(loc="upper left")
    if show_lr:
        axes[2].plot(*lr_points, "b-", label="learning rate")
        axes[2].set_xlabel("iteration"), axes[2].set_yscale("log"), axes[2].legend(loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), "progress plot")
    plt.close(fig)
