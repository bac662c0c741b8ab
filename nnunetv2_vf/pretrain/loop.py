"""One training step and one validation pass of Volume Fusion pretraining, with nnU-Net's loss.

nnU-Net's pieces are used as they are (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``,
``DeepSupervisionWrapper``). Its ``nnUNetTrainer._build_loss`` and ``_get_deep_supervision_scales`` are methods
bound to a trainer's plans and label manager, not functions; ``_build_loss`` also leaves the background out of the
Dice (``do_bg=False``), while every fusion class (alpha = 0 included) is a target here. So the two rules they hold,
the scales from the strides and the halving deep-supervision weights, are restated below, unchanged.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = ["deep_supervision_scales", "build_loss", "Optimisation", "train_step", "evaluate", "autocast"]


def deep_supervision_scales(strides) -> list[list[float]]:
    """nnU-Net's ``_get_deep_supervision_scales`` for an architecture's strides."""
    return [list(map(float, s)) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]


def build_loss(num_scales: int, is_ddp: bool):
    """(deep-supervised loss for training, the full-resolution loss for validation)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    base = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": True, "ddp": is_ddp}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(num_scales)])
    weights[-1] = 1e-6 if is_ddp else 0  # as nnU-Net: DDP rejects parameters without gradient
    return DeepSupervisionWrapper(base, weights / weights.sum()), base


def autocast(device: torch.device):
    return torch.autocast("cuda", enabled=True) if device.type == "cuda" else nullcontext()


@dataclass
class Optimisation:
    """The paper's optimiser (Adam, lr halved every ``lr_step`` iterations), gradient norm clipping, and AMP's
    gradient scaler on CUDA."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    grad_clip: float

    @classmethod
    def build(cls, network: nn.Module, lr: float, weight_decay: float, lr_step: int, grad_clip: float,
              device: torch.device) -> "Optimisation":
        optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
        return cls(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=0.5),
                   torch.amp.GradScaler("cuda") if device.type == "cuda" else None, grad_clip)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor, parameters) -> None:
        parameters = list(parameters)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(parameters, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(parameters, self.grad_clip)
            self.optimizer.step()
        self.scheduler.step()

    def state(self) -> dict:
        return {"optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.scheduler.state_dict(),
                "grad_scaler_state": None if self.scaler is None else self.scaler.state_dict()}

    def load_state(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        if self.scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.scaler.load_state_dict(ckpt["grad_scaler_state"])


def train_step(model: nn.Module, loss_fn, optimisation: Optimisation, batch: dict, device: torch.device,
               what_to_fix: str) -> float:
    """One update on an augmented, fused batch; returns its loss. ``what_to_fix``: said on a non-finite loss."""
    x = torch.as_tensor(batch["data"]).to(device, non_blocking=True)
    y = [torch.as_tensor(t.astype(np.int64) if isinstance(t, np.ndarray) else t).to(device)
         for t in batch["target"]]
    optimisation.optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        loss = loss_fn(model(x), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {what_to_fix}")
    optimisation.step(loss, model.parameters())
    return loss.item()  # .item() synchronises, so step times are real on CUDA too


def _dice_stats(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-class (tp, fp, fn) of the hard prediction, shape [classes, 3]."""
    pred = logits.argmax(1)
    tgt = target[:, 0].long()
    out = np.zeros((logits.shape[1], 3))
    for c in range(logits.shape[1]):
        p, t = pred == c, tgt == c
        out[c] = [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
    return out


@torch.no_grad()
def evaluate(network: nn.Module, base_loss, data: np.ndarray, target: np.ndarray, batch_size: int,
             device: torch.device, num_classes: int) -> tuple[float, float]:
    """(mean loss, mean Dice over the fusion classes) on the fixed validation crops, in this process only."""
    network.eval()
    stats, losses = np.zeros((num_classes, 3)), []
    ddp = base_loss.dc.ddp
    for s in range(0, len(data), batch_size):
        x = torch.from_numpy(data[s:s + batch_size]).to(device)
        y = torch.from_numpy(target[s:s + batch_size].astype(np.int64)).to(device)
        with autocast(device):
            out = network(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            base_loss.dc.ddp = False  # its batch Dice would all-gather across ranks; only rank 0 validates
            losses.append(base_loss(out, y).item())
            base_loss.dc.ddp = ddp
        stats += _dice_stats(out.float(), y)
    network.train()
    tp, fp, fn = stats.T
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return float(np.mean(losses)), float(np.nanmean(dice))
