"""The statistics of the accuracy studies: paired intervals on synthetic data with a known effect, their coverage
and power in simulated studies from a crossed seeds x cases random-effects model (against the two-way percentile
bootstrap as the reference), per-case Dice from nnU-Net's summary.json, and the study report (table, verdict,
curves) from recorded runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_vf.paired_stats import ADVISED_SEEDS, describe_effect, paired_bootstrap, per_case_dice

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


def test_seeds_or_cases_without_a_finite_pair_are_dropped():
    t, c = _paired(0.05, 0.02, seeds=4, cases=12)
    t_nan, c_nan = t.copy(), c.copy()
    t_nan[:, 3] = np.nan
    c_nan[2] = np.nan
    e = paired_bootstrap(t_nan, c_nan)
    kept = paired_bootstrap(np.delete(np.delete(t, 2, 0), 3, 1), np.delete(np.delete(c, 2, 0), 3, 1))
    assert (e.n_seeds, e.n_cases) == (3, 11)
    assert e.to_dict() == pytest.approx(kept.to_dict())


# ---- coverage and power in simulated studies ------------------------------------------------------------------------
# (seed sd, case sd, residual sd) of the paired difference d[seed, case] = effect + a[seed] + b[case] + e[seed, case]
SEEDS_DOMINATE = (0.10, 0.03, 0.02)
CASES_DOMINATE = (0.0, 0.10, 0.02)
MIXED = (0.03, 0.05, 0.03)
EFFECT = 0.05


def _crossed_study(rng, sds, seeds: int, cases: int = 20, effect: float = EFFECT):
    """(treatment, control) [seeds, cases] scores of one simulated study."""
    seed_sd, case_sd, resid_sd = sds
    diff = (effect + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, case_sd, (1, cases))
            + rng.normal(0, resid_sd, (seeds, cases)))
    control = rng.uniform(0.4, 0.9, size=cases) + np.zeros((seeds, 1))
    return control + diff, control


def _percentile_bootstrap(t, c, rng, n_boot: int = 1000):
    """The reference: seeds and cases resampled independently with replacement, 2.5 and 97.5 percentiles."""
    d = t - c
    s = rng.integers(0, d.shape[0], (n_boot, d.shape[0]))
    k = rng.integers(0, d.shape[1], (n_boot, d.shape[1]))
    return np.quantile(d[s[:, :, None], k[:, None, :]].mean((1, 2)), [0.025, 0.975])


def _simulate(sds, seeds: int, studies: int = 400, reference: bool = True, rng_seed: int = 0):
    """(coverage, median width) of the interval and, with ``reference``, of the percentile bootstrap."""
    rng = np.random.default_rng(rng_seed)
    covered, widths, ref_covered, ref_widths = [], [], [], []
    for _ in range(studies):
        t, c = _crossed_study(rng, sds, seeds)
        e = paired_bootstrap(t, c)
        covered.append(e.low < EFFECT < e.high)
        widths.append(e.high - e.low)
        if reference:
            low, high = _percentile_bootstrap(t, c, rng)
            ref_covered.append(low < EFFECT < high)
            ref_widths.append(high - low)
    ours = (np.mean(covered), np.median(widths))
    return (ours, (np.mean(ref_covered), np.median(ref_widths))) if reference else ours


@pytest.mark.parametrize("seeds", [3, 5])
def test_interval_covers_the_effect_where_seeds_dominate(seeds):
    """Three seeds give the bootstrap ten seed multisets and normal-like quantiles: it covers about three studies in
    four. The random-effects interval with its t quantile on about S - 1 df keeps close to 95 %."""
    (coverage, _), (ref_coverage, _) = _simulate(SEEDS_DOMINATE, seeds, rng_seed=seeds)
    assert coverage >= 0.92
    assert ref_coverage < 0.90


@pytest.mark.parametrize("seeds", [3, 5])
def test_interval_covers_the_effect_in_a_mixed_design(seeds):
    coverage, _ = _simulate(MIXED, seeds, reference=False, rng_seed=10 + seeds)
    assert coverage >= 0.92


def test_interval_stays_narrow_where_cases_dominate():
    """No seed variation: df approaches C - 1 and the interval is about as wide as the bootstrap's."""
    (coverage, width), (_, ref_width) = _simulate(CASES_DOMINATE, 3, rng_seed=20)
    assert coverage >= 0.92
    assert width <= 1.15 * ref_width


def test_min_detectable_effect_is_detected_with_about_80_percent_power():
    """Five seeds where seeds dominate. At the design's smallest detectable effect, from the model's true variance
    of the mean and df, about four studies in five claim it; the studies' own estimates scatter around that value
    (the median below it: a variance estimated from 4 df is more often under its mean than over)."""
    from scipy import stats
    seeds, cases = 5, 20
    s2_seed, s2_case, s2_resid = np.square(SEEDS_DOMINATE)
    ms = np.array([s2_resid + cases * s2_seed, s2_resid + seeds * s2_case, s2_resid])  # expected mean squares
    dfs = np.array([seeds - 1, cases - 1, (seeds - 1) * (cases - 1)])
    coef = np.array([1, 1, -1]) / (seeds * cases)
    var = coef @ ms
    df = var ** 2 / np.sum((coef * ms) ** 2 / dfs)
    design = (stats.t.ppf(0.975, df) + stats.t.ppf(0.80, df)) * np.sqrt(var)
    rng = np.random.default_rng(30)
    studies = [paired_bootstrap(*_crossed_study(rng, SEEDS_DOMINATE, seeds, cases, effect=design)) for _ in range(400)]
    assert 0.65 <= np.mean([e.detected for e in studies]) <= 0.95
    assert 0.75 * design <= np.median([e.min_detectable for e in studies]) <= 1.1 * design


def test_sentence_asks_for_more_seeds_where_seeds_dominate():
    rng = np.random.default_rng(40)
    few = paired_bootstrap(*_crossed_study(rng, SEEDS_DOMINATE, 3))
    enough = paired_bootstrap(*_crossed_study(rng, SEEDS_DOMINATE, ADVISED_SEEDS))
    by_cases = paired_bootstrap(*_crossed_study(rng, CASES_DOMINATE, 3))
    assert few.seed_share > 0.5 and enough.seed_share > 0.5 and by_cases.seed_share < 0.5
    assert f">= {ADVISED_SEEDS} seeds are needed" in describe_effect(few)
    assert "seeds are needed" not in describe_effect(enough) + describe_effect(by_cases)
    for e in (few, enough, by_cases):
        assert f"smallest detectable effect (80 % power) {e.min_detectable:.3f}" in describe_effect(e)
        assert e.min_detectable > (e.high - e.low) / 2 > 0


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
    assert "| smallest detectable (80 % power) |" in md
    for c in comparisons:
        assert 0 < c["min_detectable"] < 0.1 and f"| {c['min_detectable']:.3f} | 3 x 10 |" in md
        assert f"smallest detectable effect (80 % power) {c['min_detectable']:.3f}" in md
    recorded = json.loads((tmp_path / "t.json").read_text())["comparisons"]
    assert recorded[0]["detected"] is True
    assert recorded[1]["min_detectable"] == pytest.approx(comparisons[1]["min_detectable"])


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
