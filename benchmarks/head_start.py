"""Does fine-tuning keep the pretrained head start?  Real validation Dice after 15, 30, 60 and 150 iterations.

Seeded, paired runs through the real ``nnUNetv2_train``, built on ``_study.py`` like ``pretraining_gain.py``:

1. ``nnUNetv2_vf_pretrain`` on the unlabelled images of the setting's pretraining datasets minus their held-out
   cases, as pretraining_gain.py does; ``--pretrained DIR`` reuses a finished pretraining (the report states how
   many validation images that pretraining read, from its ``config.json``).
2. One nnU-Net dataset: ``labelled`` training cases (2) + a fixed validation set, one fold; plans adapted to the
   pretraining (``nnUNetv2_vf_adapt_plans``), so every arm has the same network, patch and normalisation.  The
   validation cases are the first ``val_cases`` of pretraining_gain.py's 20 held-out ones and the training cases its
   2-case budget, so a pretraining made for that study (which left the 20 out) can be reused.
3. For every iteration budget, seed and arm: ``nnUNetv2_train ... -tr <budget trainer><recipe>_seed<S>``, with or
   without ``-pretrained_weights``.  Each budget is its own run that warms up and anneals the lr to about 0 within
   that budget (per-iteration schedule of the ``TrainingBudget`` trainers): the Dice at 15 iterations is that of a
   finished 15-iteration fine-tuning, not an intermediate iterate of a longer schedule still at its peak lr.  The
   score is nnU-Net's own final validation of each run (``validation/summary.json``: every validation case, whole
   image, sliding window), not the pseudo Dice of a few validation patches.
   Why separate runs rather than checkpoints of one 150-iteration run: intermediate checkpoints of one schedule
   measure the lr schedule as much as the initialisation (at 15 iterations the lr is at its peak), which is the
   confound this study removes.  The runs cost 15 + 30 + 60 + 150 = 255 instead of 150 iterations per seed and
   arm, plus three more start-ups and final validations.
4. Per budget: per-case paired differences (seeds x validation cases) with 95 % intervals (crossed seeds x cases,
   ``nnunetv2_vf.paired_stats``) for pretrained vs scratch, each head-start recipe vs scratch and vs the default pretrained recipe; a plot of validation Dice
   against iterations; for the longest budget, whether scratch's per-epoch pseudo Dice (mean over seeds) is flat
   over the last 20 % of its iterations (least-squares change over that window within +-FLAT_TOLERANCE).

Arms (``--arms``): ``scratch`` (default recipe, no weights), ``pretrained`` (default recipe of VFPretrainedTrainer:
AdamW peak 1e-3, 10 % warm-up), the head-start recipes ``pretrained_encoderLr0p1`` (encoder at 0.1 x lr) and
``pretrained_peakLr1em4`` (peak 1e-4, no warm-up), and ``frozen_random`` / ``frozen_pretrained`` (``_frozenEncoder``:
only the decoder trains, on a random or a pretrained encoder).

Settings and single-core time.  Cost model, from ``time`` of single runs on this 2-core machine scaled to the
quiet-core figure of about 150 s for a 150-iteration run with 20 validation cases (pretraining_gain.py): about
0.62 s per training iteration (small PCT-Net, patch 16x32x32, batch 2), about 13 s per run for start-up, checkpoints
and the validation workers, and about 2.2 s per validation case (sliding window, export, metrics).

- ``cpu``: hippocampus, 2 labelled cases, 10 validation cases, budgets 15/30/60/150 iterations, arms scratch,
  pretrained, pretrained_encoderLr0p1, pretrained_peakLr1em4, seeds 0-4.  Per seed and arm 4 runs:
  255 x 0.62 s + 4 x (13 s + 10 x 2.2 s) = 298 s; x 4 arms x 5 seeds = 99 min, plus about 1 min of preparation:
  about 100 single-core minutes.  Not included: the pretraining (pass ``--pretrained``; pretraining here would add
  ``pretrain_iterations`` x about 0.5 s).  Five seeds rather than 20 validation cases: at these budgets the
  seed-to-seed spread dominates the interval (``nnunetv2_vf.paired_stats``).
- ``converged``: scratch and pretrained at 600 (40 x 15, ``VFPretrainedTrainer_small_40x15``) and 1200 iterations
  (80 x 15, ``VFPretrainedTrainer_small_80x15``), seeds 0-2, and ``pretrained_encoderLr0p1`` at 600 (pass ``--arms``
  and ``--iterations`` to choose): about 10.5 single-core minutes per 600-iteration run and 21 per 1200-iteration run,
  so scratch + pretrained at 1200 are 6 x 21 = about 128 single-core minutes.  The report says whether scratch's curve at the longest budget has
  flattened out.
- ``smoke``: a few minutes, checks the pipeline, no conclusion: 4-iteration pretraining, budgets 15 and 30
  iterations, 3 validation cases, one seed, three arms (about 5 min of one quiet core, from runs measured on a core
  shared with other jobs, where it takes 2-3 times as long).

Results: ``benchmarks/results/head_start_<setting>.{json,md}`` and ``..._dice.png``; an effect is claimed only where
its interval excludes zero.

    python benchmarks/head_start.py --pretrained /path/to/pretrain_output   # CPU study, ~100 min on one core
    python benchmarks/head_start.py --setting converged --pretrained /path/to/pretrain_output
    python benchmarks/head_start.py --setting smoke                        # a few minutes, no conclusion
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import (Arm, Study, add_study_arguments, markdown_table, resolve_setting,  # noqa: E402
                    study_environment, validation_split)
from pretraining_gain import ensure_pretraining, prepare_adapted_dataset, pretext_curve  # noqa: E402


# arm: (suffix of the budget trainer, loads -pretrained_weights)
ARMS = {"scratch": ("", False), "pretrained": ("", True), "pretrained_encoderLr0p1": ("_encoderLr0p1", True),
        "pretrained_peakLr1em4": ("_peakLr1em4", True), "frozen_random": ("_frozenEncoder", False),
        "frozen_pretrained": ("_frozenEncoder", True)}
HEAD_START_ARMS = ["pretrained_encoderLr0p1", "pretrained_peakLr1em4"]
PRETRAIN = dict(pretrain_datasets={"Dataset004_Hippocampus": 20, "Dataset010_LeftAtrium": 16},
                pretrain_iterations=2400, pretrain_patch=[16, 32, 32], pretrain_batch=4, lr_step=1000,
                val_every=100)
# budget in iterations: trainer (15 iterations per epoch; the 10-epoch one is the demo's 10 x 15)
BUDGETS = {15: "VFPretrainedTrainer_small_1x15", 30: "VFPretrainedTrainer_small_2x15",
           60: "VFPretrainedTrainer_small_4x15", 150: "VFPretrainedTrainer_small_10epochs"}
SETTINGS = {
    "cpu": dict(dataset="Dataset004_Hippocampus", labelled=2, held_out=20, val_cases=10, seeds=[0, 1, 2, 3, 4],
                budgets=BUDGETS, arms=["scratch", "pretrained", *HEAD_START_ARMS], device="cpu", **PRETRAIN),
    "converged": dict(dataset="Dataset004_Hippocampus", labelled=2, held_out=20, val_cases=10, seeds=[0, 1, 2],
                      budgets={600: "VFPretrainedTrainer_small_40x15", 1200: "VFPretrainedTrainer_small_80x15"},
                      arms=["scratch", "pretrained", "pretrained_encoderLr0p1"], device="cpu", **PRETRAIN),
    "smoke": dict(dataset="Dataset004_Hippocampus", labelled=2, held_out=3, val_cases=3, seeds=[0],
                  budgets={15: "VFPretrainedTrainer_small_1x15", 30: "VFPretrainedTrainer_small_2x15"},
                  arms=["scratch", "pretrained", "pretrained_peakLr1em4"], device="cpu",
                  pretrain_datasets={"Dataset004_Hippocampus": 3}, pretrain_images=12, pretrain_iterations=4,
                  pretrain_patch=[16, 32, 32], pretrain_batch=2, lr_step=1000, val_every=2),
}
DATASET_ID = 952
PLANS = "nnUNetPlans_VF"
FLAT_TOLERANCE = 0.02  # Dice: "flat" = the fitted change over the last 20 % of iterations is within this


def leaked_validation_images(pretrain_dir: Path, val_ids: list[str]) -> list[str]:
    """Validation cases whose image the pretraining read (its config.json lists its input files)."""
    config = pretrain_dir / "config.json"
    if not config.is_file():
        return []
    files = [f[0] if isinstance(f, list) else str(f) for f in json.loads(config.read_text()).get("input_files", [])]
    return sorted(v for v in val_ids if any(Path(f).name.startswith(v + "_") for f in files))


def flatness(curves: list[list[float]], fraction: float = 0.2) -> dict | None:
    """Least-squares change of the mean curve over its last ``fraction`` of epochs (at least two), and the verdict;
    None for curves of fewer than two epochs."""
    n = min(map(len, curves))
    if n < 2:
        return None
    mean = np.mean([c[:n] for c in curves], axis=0)
    window = min(n, max(2, int(np.ceil(fraction * n))))
    y = mean[-window:]
    change = float(np.polyfit(np.arange(window), y, 1)[0] * (window - 1))
    return {"epochs": n, "window_epochs": window, "fitted_change": round(change, 4),
            "window_mean": round(float(y.mean()), 4), "flat": abs(change) <= FLAT_TOLERANCE}


def plot_dice_vs_iterations(runs: list[dict], arms: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, arm in enumerate(arms):
        by_budget = {}
        for r in runs:
            if r["arm"] == arm:
                by_budget.setdefault(r["budget"], []).append(r["dice"])
        if not by_budget:
            continue
        x = sorted(by_budget)
        y = [np.mean(by_budget[b]) for b in x]
        ax.plot(x, y, "o-", color=f"C{i}", label=f"{arm} (n={max(map(len, by_budget.values()))})")
        ax.fill_between(x, [min(by_budget[b]) for b in x], [max(by_budget[b]) for b in x], color=f"C{i}",
                        alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in runs})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning iterations (each a separate run annealed within its budget)")
    ax.set_ylabel("validation Dice (nnU-Net's final validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{title}\nline: mean over seeds, band: min-max over seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu", help="study size (default: %(default)s)")
    p.add_argument("--pretrained", help="a finished nnUNetv2_vf_pretrain output folder to reuse (skips step 1)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="arms to run (default: setting's)")
    p.add_argument("--iterations", type=int, nargs="+", help="iteration budgets, a subset of the setting's")
    add_study_arguments(p, "/tmp/vf_head_start")
    args = p.parse_args()
    s = resolve_setting(SETTINGS, args, ("seeds", "arms", "device"))
    if args.iterations:
        unknown = set(args.iterations) - set(s["budgets"])
        if unknown:
            raise SystemExit(f"--iterations {sorted(unknown)}: the {args.setting} setting has budgets "
                             f"{sorted(s['budgets'])}")
        s["budgets"] = {b: t for b, t in s["budgets"].items() if b in args.iterations}

    shared = Path(args.shared)
    work, env = study_environment(args)
    source = shared / "data" / s["dataset"]
    held_out, rest = validation_split(source, s["held_out"])  # pretraining_gain.py's split: the pretraining's held-out
    val_ids, train_ids = held_out[: s["val_cases"]], rest[: s["labelled"]]
    timings = {}

    # 1. pretraining
    t0 = time.time()
    pretrain_dir = ensure_pretraining(args, s, shared, work, env)
    timings["pretraining_s"] = round(time.time() - t0)
    leaked = leaked_validation_images(pretrain_dir, val_ids)
    if leaked:
        print(f"warning: the pretraining read the images of {len(leaked)} validation case(s): {leaked}", flush=True)

    # 2. labelled dataset (one fold), adapted plans
    t0 = time.time()
    name = prepare_adapted_dataset(source, env, work, DATASET_ID, "VFHeadStart", train_ids + val_ids,
                                   [{"train": train_ids, "val": val_ids}], pretrain_dir, PLANS)
    timings["prepare_s"] = round(time.time() - t0)

    # 3. one run per budget, seed and arm; all records in one results file (resumable with --keep)
    weights = pretrain_dir / "checkpoint_final.pth"
    results_path = work / "runs.json"
    results = json.loads(results_path.read_text()) if args.keep and results_path.is_file() else {"runs": []}
    study_name = f"head_start_{args.setting}"

    def study_for(trainer: str) -> Study:
        return Study(name=study_name, dataset_id=DATASET_ID, dataset_name=name, configuration="3d_fullres",
                     plans=PLANS, trainer=trainer, budgets=list(s["budgets"]), seeds=s["seeds"], arms=[],
                     env=env, device=s["device"], log_dir=work, results=results, results_file=results_path,
                     budget_unit="iterations")

    t0 = time.time()
    todo = [(b, seed, arm) for b in s["budgets"] for seed in s["seeds"] for arm in s["arms"]]
    for count, (budget, seed, arm) in enumerate(todo, 1):
        suffix, pretrained = ARMS[arm]
        study = study_for(s["budgets"][budget] + suffix)
        if args.report_only or study.done(budget, seed, arm):
            continue
        extra = (lambda _seed: ["-pretrained_weights", weights]) if pretrained else (lambda _seed: [])
        study.run_one(0, budget, seed, Arm(arm, extra), f"[{count}/{len(todo)}] {budget} iterations:")
    runs = [r for r in results["runs"] if r["budget"] in s["budgets"] and r["arm"] in s["arms"]]
    timings["finetuning_s"] = round(sum(r["seconds"] for r in runs)) if args.report_only else round(
        time.time() - t0)

    # 4. paired statistics, flatness, plot, report
    analysis = study_for(s["budgets"][max(s["budgets"])])
    pairs = [(arm, "scratch") for arm in s["arms"] if arm != "scratch"]
    pairs += [(arm, "pretrained") for arm in s["arms"] if arm in HEAD_START_ARMS and "pretrained" in s["arms"]]
    comparisons = [c for b in s["budgets"] for t, c_ in pairs if (c := analysis.compare(b, t, c_))]
    longest = max(s["budgets"])
    scratch_curves = [r["curve"]["val_pseudo_dice"] for r in runs if r["budget"] == longest and r["arm"] == "scratch"]
    flat = flatness(scratch_curves) if scratch_curves else None
    results_dir = Path(args.results_dir)
    figure = f"{study_name}_dice.png"
    plot_dice_vs_iterations(runs, s["arms"], results_dir / figure, f"head start, {s['dataset']}, "
                            f"{s['labelled']} labelled cases")
    means = {(b, a): float(np.mean([r["dice"] for r in runs if (r["budget"], r["arm"]) == (b, a)]))
             for b in s["budgets"] for a in s["arms"] if any((r["budget"], r["arm"]) == (b, a) for r in runs)}
    seconds = {b: round(float(np.mean([r["seconds"] for r in runs if r["budget"] == b])), 1)
               for b in s["budgets"] if any(r["budget"] == b for r in runs)}
    pretext = pretext_curve(pretrain_dir)
    flat_text = ("no scratch run of the longest budget with two or more epochs" if flat is None else
                 f"scratch's per-epoch pseudo Dice (mean over {len(scratch_curves)} seed(s)) over the last "
                 f"{flat['window_epochs']} of {flat['epochs']} epochs: fitted change {flat['fitted_change']:+.3f} "
                 f"(mean {flat['window_mean']:.3f}): " + ("flat" if flat["flat"] else "NOT flat") +
                 f" (tolerance +-{FLAT_TOLERANCE})")
    md = [f"# Head start of VF pretraining ({args.setting} setting)", "",
          f"Dataset {s['dataset']}: {s['labelled']} labelled training cases ({', '.join(train_ids)}); "
          f"{len(val_ids)} validation cases ({', '.join(val_ids)}), scored by nnU-Net's final validation of every "
          f"run. Trainers (`_seed{{{','.join(map(str, s['seeds']))}}}`): "
          + ", ".join(f"{b} iterations {t}" for b, t in s["budgets"].items())
          + "; every budget is a separate run annealed to about 0 within it. Plans " + PLANS + ". Pretraining "
          f"{pretrain_dir} (validation images it read: {len(leaked)}"
          + (f", {leaked}" if leaked else "") + "), fixed-set fusion Dice "
          + (" -> ".join(f"{d:.3f}@{i:g}" for i, d in zip(pretext.get("iteration", []), pretext.get("val_dice", [])))
             or "n/a") + f". Times (single-threaded runs, each pinned to one core): {timings}; mean seconds per run by budget {seconds}.",
          "", "Mean validation Dice per arm:", "",
          "| iterations | " + " | ".join(s["arms"]) + " |", "|---" * (len(s["arms"]) + 1) + "|"]
    md += [f"| {b} | " + " | ".join(f"{means[(b, a)]:.3f}" if (b, a) in means else "-" for a in s["arms"]) + " |"
           for b in s["budgets"]]
    md += ["", "Paired differences (seeds x validation cases):", "",
           markdown_table(comparisons).replace("| labelled cases |", "| iterations |", 1), ""]
    md += [f"- {c['budget']} iterations, {c['treatment']} vs {c['control']}: {c['statement']}" for c in comparisons]
    md += ["", f"Convergence ({longest} iterations): {flat_text}.", "", f"![{figure}]({figure})"]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{study_name}.json").write_text(json.dumps(
        {"comparisons": comparisons, "mean_dice": {f"{b} {a}": v for (b, a), v in means.items()},
         "flatness": flat, "setting": s, "val_ids": val_ids, "train_ids": train_ids, "timings": timings,
         "leaked_validation_images": leaked, "pretext_curve": pretext, "runs": runs}, indent=1))
    report = results_dir / f"{study_name}.md"
    report.write_text("\n".join(md) + "\n")
    for c in comparisons:
        print(f"{c['budget']:4d} iterations: {c['treatment']} {c['treatment_mean']:.3f} vs {c['control']} "
              f"{c['control_mean']:.3f}: {c['statement']}")
    print(f"convergence: {flat_text}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
