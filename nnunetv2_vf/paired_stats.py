"""Paired comparisons of two training arms (pretrained vs scratch, ImageNet vs random) for the benchmarks.

A study runs both arms with the same seeds on the same validation cases, so each (seed, case) gives one paired
difference. The 95 % interval is a two-way bootstrap: seeds and cases are resampled independently, with
replacement, because both are samples (of training randomness and of patients) and results are correlated along
each. An effect is claimed only where the interval excludes zero and at least ``MIN_SEEDS`` seeds were run: with
fewer, the interval only covers case-to-case variation, not the training randomness a different seed brings.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["PairedEffect", "paired_bootstrap", "per_case_dice", "describe_effect", "MIN_SEEDS"]

MIN_SEEDS = 3


@dataclass
class PairedEffect:
    mean: float          # mean of (treatment - control) over seeds x cases
    low: float           # 95 % bootstrap interval
    high: float
    n_seeds: int
    n_cases: int
    treatment_mean: float
    control_mean: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def detected(self) -> bool:
        return self.excludes_zero and self.n_seeds >= MIN_SEEDS

    def to_dict(self) -> dict:
        return dict(asdict(self), detected=self.detected, excludes_zero=self.excludes_zero)


def paired_bootstrap(treatment: np.ndarray, control: np.ndarray, n_boot: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> PairedEffect:
    """``treatment``, ``control``: [seeds, cases] scores of the same cases under the same seeds.

    NaN entries (e.g. Dice of a case where a class is absent from both prediction and reference) are left out of
    every mean, with their pair.
    """
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape or t.ndim != 2:
        raise ValueError(f"paired scores must share one [seeds, cases] shape, got {t.shape} and {c.shape}")
    diff = t - c
    if not np.isfinite(diff).any():
        raise ValueError("no finite paired difference")
    rng = np.random.default_rng(seed)
    n_seeds, n_cases = diff.shape
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    cases = rng.integers(0, n_cases, size=(n_boot, n_cases))
    # [boot, seeds, cases] resampled grid; mean over the finite entries
    grid = diff[seeds[:, :, None], cases[:, None, :]]
    means = np.nanmean(grid.reshape(n_boot, -1), axis=1)
    means = means[np.isfinite(means)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    finite = np.isfinite(diff)
    return PairedEffect(float(np.nanmean(diff)), float(low), float(high), n_seeds, n_cases,
                        float(np.mean(t[finite])), float(np.mean(c[finite])))


def describe_effect(effect: PairedEffect, what: str = "Dice") -> str:
    """One README-ready sentence: a gain or loss only where the interval excludes zero."""
    interval = f"{effect.mean:+.3f} [95 % CI {effect.low:+.3f}, {effect.high:+.3f}]"
    if effect.n_seeds < MIN_SEEDS:
        return (f"no claim: {effect.n_seeds} seed(s) < {MIN_SEEDS}, the interval covers cases only: {what} "
                f"difference {interval}")
    if not effect.detected:
        return f"no difference detected at this size: {what} difference {interval}"
    return f"{'gain' if effect.mean > 0 else 'loss'}: {what} difference {interval}"


def per_case_dice(summary_json: str | Path) -> dict[str, float]:
    """Case id -> Dice averaged over the foreground classes, from nnU-Net's ``validation/summary.json``."""
    summary = json.loads(Path(summary_json).read_text())
    out = {}
    for entry in summary["metric_per_case"]:
        name = Path(entry["reference_file"]).name
        case = name.split(".")[0]
        values = [m["Dice"] for m in entry["metrics"].values()]
        out[case] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out
