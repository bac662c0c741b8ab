"""The statistics of the accuracy studies: paired bootstrap intervals on synthetic data with a known effect, per-case
Dice from nnU-Net's summary.json, and the study report (table, verdict, curves) from recorded runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_vf.paired_stats import describe_effect, paired_bootstrap, per_case_dice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _paired(effect: float, noise: float, seeds: int = 3, cases: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    case_difficulty = rng.uniform(0.4, 0.9, size=cases)  # shared by both arms: what pairing removes
    control = case_difficulty + rng.normal(0, noise, size=(seeds, cases))
    treatment = case_difficulty + effect + rng.normal(0, noise, size=(seeds, cases))
    return treatment, control


def test_known_gain_is_detected_and_covered():
    t, c = _paired(effect=0.05, noise=0.03)
    e = paired_bootstrap(t, c)
    assert e.detected and e.low > 0
    assert e.low < 0.05 < e.high
    assert e.mean == pytest.approx(np.mean(t - c))
    assert describe_effect(e).startswith("gain: Dice difference +0.0")


def test_known_loss_is_detected():
    t, c = _paired(effect=-0.04, noise=0.02)
    e = paired_bootstrap(t, c)
    assert e.detected and e.high < 0 and describe_effect(e).startswith("loss")


def test_no_effect_gives_an_interval_around_zero():
    t, c = _paired(effect=0.0, noise=0.05, seed=3)
    e = paired_bootstrap(t, c)
    assert e.low < 0 < e.high and not e.detected
    assert describe_effect(e).startswith("no difference detected at this size")


def test_interval_narrows_with_more_cases_and_seeds():
    small = paired_bootstrap(*_paired(0.02, 0.05, seeds=2, cases=8))
    large = paired_bootstrap(*_paired(0.02, 0.05, seeds=5, cases=80))
    assert (large.high - large.low) < 0.6 * (small.high - small.low)


def test_pairing_matters():
    """Case difficulty varies far more than the effect: an unpaired comparison could not see it, the paired one does."""
    t, c = _paired(effect=0.02, noise=0.005)
    assert np.std(t) > 5 * 0.02
    assert paired_bootstrap(t, c).detected


def test_nan_pairs_are_left_out_and_shapes_checked():
    t, c = _paired(0.05, 0.01)
    t[0, 0] = np.nan
    e = paired_bootstrap(t, c)
    assert np.isfinite([e.mean, e.low, e.high]).all()
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(t[:, :5], c)
    with pytest.raises(ValueError, match="no finite"):
        paired_bootstrap(np.full((2, 2), np.nan), np.zeros((2, 2)))


def _summary(path: Path, dice: dict) -> Path:
    per_case = [{"reference_file": f"/x/gt/{case}.nii.gz", "prediction_file": f"/x/pred/{case}.nii.gz",
                 "metrics": {str(k): {"Dice": v} for k, v in enumerate(values, start=1)}}
                for case, values in dice.items()]
    path.write_text(json.dumps({"metric_per_case": per_case}))
    return path


def test_per_case_dice_averages_foreground_classes(tmp_path):
    s = _summary(tmp_path / "summary.json", {"case_a": [0.8, 0.6], "case_b": [float("nan"), 0.5],
                                             "case_c": [float("nan"), float("nan")]})
    d = per_case_dice(s)
    assert d["case_a"] == pytest.approx(0.7) and d["case_b"] == pytest.approx(0.5) and np.isnan(d["case_c"])


def test_study_report_from_recorded_runs(tmp_path):
    from _study import Arm, Study, plot_learning_curves, write_report
    study = Study(name="t", dataset_id=1, dataset_name="D", configuration="3d_fullres", plans="P", trainer="T",
                  budgets=[2, 4], seeds=[0, 1, 2], arms=[Arm("scratch"), Arm("pretrained")], env={})
    study.results = {"runs": []}
    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(10)]
    for budget, gain in ((2, 0.10), (4, 0.0)):
        for seed in study.seeds:
            base = rng.uniform(0.5, 0.7, size=len(cases))
            for arm, shift in (("scratch", 0.0), ("pretrained", gain)):
                study.results["runs"].append({
                    "budget": budget, "seed": seed, "arm": arm,
                    "dice_per_case": {c: float(v + shift + rng.normal(0, 0.01)) for c, v in zip(cases, base)},
                    "curve": {"val_pseudo_dice": list(np.linspace(0.1, 0.6 + shift, 5)), "train_loss": [0] * 5}})
    comparisons = [study.compare(b, "pretrained", "scratch") for b in study.budgets]
    assert comparisons[0]["detected"] and comparisons[0]["low"] > 0.05
    assert not comparisons[1]["detected"]
    assert np.array(comparisons[0]["paired_differences"]).shape == (3, 10)
    plot_learning_curves(study, 15, tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    md = write_report("t", "# header", comparisons, {"x": 1}, tmp_path, ["curves.png"]).read_text()
    assert "**gain**" in md and "no difference detected" in md and "3 x 10" in md
    assert json.loads((tmp_path / "t.json").read_text())["comparisons"][0]["detected"] is True


def test_study_refuses_unpaired_cases():
    from _study import Arm, Study
    study = Study(name="t", dataset_id=1, dataset_name="D", configuration="2d", plans="P", trainer="T", budgets=[2],
                  seeds=[0], arms=[Arm("a"), Arm("b")], env={})
    study.results = {"runs": [{"budget": 2, "seed": 0, "arm": "a", "dice_per_case": {"x": 0.5}},
                              {"budget": 2, "seed": 0, "arm": "b", "dice_per_case": {"y": 0.5}}]}
    with pytest.raises(ValueError, match="different cases"):
        study.compare(2, "b", "a")


def test_too_few_seeds_never_claim():
    t, c = _paired(effect=0.05, noise=0.01, seeds=1)
    e = paired_bootstrap(t, c)
    assert e.excludes_zero and not e.detected  # the cases alone say "gain"; one seed is not enough to claim it
    assert describe_effect(e).startswith("no claim: 1 seed(s) < 3")
