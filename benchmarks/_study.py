"""Shared by the accuracy studies (``pretraining_gain.py``, ``imagenet_init_accuracy.py``): seeded, paired runs of
two or more initialisations through the real ``nnUNetv2_train``, per-case paired differences with a crossed
seeds x cases random-effects interval, learning curves, and the JSON / markdown / PNG written under ``benchmarks/results/``.

A study is a list of runs, each (budget, seed, arm). Runs of the same (budget, seed) use the same
``<trainer>_seed<seed>`` class, so they draw the same batches and differ only in their initial weights
(``nnunetv2_vf.trainers.variants.Seeded``). Every finished run is appended to the results JSON at once, so an
interrupted study resumes where it stopped (``--keep``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from nnunetv2_vf.paired_stats import MIN_SEEDS, describe_effect, paired_bootstrap, per_case_dice
from nnunetv2_vf.workflow import run_nnunet

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


def add_study_arguments(p, workdir: str) -> None:
    """The options every study shares: where the data is, where it works, resuming, reporting."""
    p.add_argument("--seeds", type=int, nargs="+", help="seeds 0-4 (default: setting's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: setting's")
    p.add_argument("--shared", default=str(REPO.parent / "shared"),
                   help="folder holding data/<dataset> (default: ../shared beside the checkout)")
    p.add_argument("--workdir", default=workdir, help="nnU-Net folders (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="reuse the workdir and the runs already finished")
    p.add_argument("--report-only", action="store_true",
                   help="with --keep: no training, report the runs finished so far (an interrupted study)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the report goes (default: %(default)s)")


def resolve_setting(settings: dict, args, keys: Sequence[str]) -> dict:
    """The chosen ``--setting`` with the options given on the command line taking precedence."""
    s = dict(settings[args.setting])
    s.update({key: getattr(args, key) for key in keys if getattr(args, key) is not None})
    return s


def study_environment(args) -> tuple[Path, dict]:
    """(work folder, nnU-Net environment) for a study; a fresh work folder unless ``--keep``."""
    from nnunetv2_vf.workflow import nnunet_environment
    work = Path(args.workdir)
    if args.report_only and not args.keep:
        raise SystemExit("--report-only reports an existing study: add --keep")
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return work, nnunet_environment(work, extra={"OMP_NUM_THREADS": threads})


def validation_split(source: Path, n_val: int) -> tuple[list[str], list[str]]:
    """(validation ids, the other ids in a fixed shuffled order): the same for every study of a dataset, so a
    pretraining run that left the validation cases out can be shared."""
    ending = json.loads((source / "dataset.json").read_text())["file_ending"]
    ids = sorted(f.name[: -len(ending)] for f in (source / "labelsTr").iterdir() if f.name.endswith(ending))
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    return order[:n_val], order[n_val:]


@dataclass
class Arm:
    name: str
    extra_args: Callable[[int], list] = lambda seed: []   # nnUNetv2_train arguments for this arm and seed
    env: dict = field(default_factory=dict)               # extra environment variables
    plans: Optional[str] = None                           # -p of this arm (its network); default: the study's


@dataclass
class Study:
    """Runs ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER_seedS`` for every fold (one per label budget),
    seed and arm; the first arm is the control."""
    name: str
    dataset_id: int
    dataset_name: str
    configuration: str
    plans: str
    trainer: str
    budgets: Sequence[int]
    seeds: Sequence[int]
    arms: Sequence[Arm]
    env: dict
    device: str = "cpu"
    log_dir: Optional[Path] = None
    results: dict = field(default_factory=dict)
    results_file: Optional[Path] = None
    budget_unit: str = "labelled"  # what a budget counts, for messages: labelled cases, or "iterations"

    def run_dir(self, seed: int, plans: Optional[str] = None) -> Path:
        return (Path(self.env["nnUNet_results"]) / self.dataset_name /
                f"{self.trainer}_seed{seed}__{plans or self.plans}__{self.configuration}")

    def load(self, path: Path, keep: bool) -> None:
        self.results_file = path
        self.results = json.loads(path.read_text()) if keep and path.is_file() else {"runs": []}

    def done(self, budget: int, seed: int, arm: str) -> Optional[dict]:
        return next((r for r in self.results["runs"]
                     if (r["budget"], r["seed"], r["arm"]) == (budget, seed, arm)), None)

    def run_all(self) -> None:
        total = len(self.budgets) * len(self.seeds) * len(self.arms)
        count = 0
        for fold, budget in enumerate(self.budgets):
            for seed in self.seeds:
                for arm in self.arms:
                    count += 1
                    if self.done(budget, seed, arm.name):
                        continue
                    self.run_one(fold, budget, seed, arm, f"[{count}/{total}]")

    def run_one(self, fold: int, budget: int, seed: int, arm: Arm, counter: str = "") -> dict:
        cmd = ["nnUNetv2_train", self.dataset_id, self.configuration, fold, "-tr", f"{self.trainer}_seed{seed}",
               "-p", arm.plans or self.plans, "-device", self.device, *arm.extra_args(seed)]
        log = (self.log_dir or Path(self.env["nnUNet_results"])) / f"{self.name}_b{budget}_s{seed}_{arm.name}.log"
        t0 = time.time()
        run_nnunet(cmd, dict(self.env, **arm.env), log_file=log, echo=False)
        fold_dir = self.run_dir(seed, arm.plans) / f"fold_{fold}"
        kept = self.run_dir(seed, arm.plans) / f"fold_{fold}_{arm.name}"
        if kept.exists():
            shutil.rmtree(kept)
        os.replace(fold_dir, kept)  # the other arm of this seed trains into fold_{fold} next
        record = {"budget": budget, "seed": seed, "arm": arm.name, "seconds": round(time.time() - t0, 1),
                  "dice_per_case": per_case_dice(kept / "validation" / "summary.json"),
                  "curve": learning_curve(kept / "checkpoint_final.pth"), "model_dir": str(kept)}
        record["dice"] = float(np.nanmean(list(record["dice_per_case"].values())))
        self.results["runs"].append(record)
        if self.results_file is not None:
            self.results_file.write_text(json.dumps(self.results, indent=1))
        print(f"{counter} {self.name}: {budget} {self.budget_unit}, seed {seed}, {arm.name:>12s}: "
              f"Dice {record['dice']:.4f} ({record['seconds']:.0f} s)", flush=True)
        return record

    # ---- analysis --------------------------------------------------------------------------------------------------
    def scores(self, budget: int, arm: str) -> tuple[np.ndarray, list[int], list[str]]:
        runs = {r["seed"]: r for r in self.results["runs"] if r["budget"] == budget and r["arm"] == arm}
        seeds = sorted(runs)
        cases = sorted(runs[seeds[0]]["dice_per_case"]) if seeds else []
        grid = np.array([[runs[s]["dice_per_case"].get(c, np.nan) for c in cases] for s in seeds])
        return grid, seeds, cases

    def compare(self, budget: int, treatment: str, control: str) -> Optional[dict]:
        t, t_seeds, t_cases = self.scores(budget, treatment)
        c, c_seeds, c_cases = self.scores(budget, control)
        seeds = sorted(set(t_seeds) & set(c_seeds))
        if not seeds:
            return None
        if t_cases != c_cases:
            raise ValueError(f"{treatment} and {control} were validated on different cases")
        t = t[[t_seeds.index(s) for s in seeds]]
        c = c[[c_seeds.index(s) for s in seeds]]
        effect = paired_bootstrap(t, c)
        return {"budget": budget, "treatment": treatment, "control": control, "seeds": seeds,
                "cases": t_cases, "paired_differences": (t - c).round(5).tolist(), **effect.to_dict(),
                "statement": describe_effect(effect)}


def learning_curve(checkpoint: Path) -> dict:
    """Per epoch: nnU-Net's pseudo Dice on the validation batches (``mean_fg_dice``) and the training loss, from
    the logger state nnU-Net stores in its checkpoint."""
    import torch
    logging = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    return {"val_pseudo_dice": [float(x) for x in logging["mean_fg_dice"]],
            "train_loss": [float(x) for x in logging["train_losses"]]}


def plot_learning_curves(study: Study, iterations_per_epoch: int, path: Path, title: str) -> None:
    """One panel per label budget: pseudo validation Dice against fine-tuning iterations, mean over seeds and the
    min-max band, one colour per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in study.budgets if any(r["budget"] == b for r in study.results["runs"])]
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(max(6.0, 4.2 * len(budgets)), 4.0), squeeze=False,
                             sharey=True)
    for ax, budget in zip(axes[0], budgets):
        for i, arm in enumerate(study.arms):
            curves = [r["curve"]["val_pseudo_dice"] for r in study.results["runs"]
                      if r["budget"] == budget and r["arm"] == arm.name]
            if not curves:
                continue
            n = min(map(len, curves))
            y = np.array([c[:n] for c in curves])
            x = np.arange(1, n + 1) * iterations_per_epoch
            colour = f"C{i}"
            ax.plot(x, y.mean(0), color=colour, label=f"{arm.name} (n={len(curves)})")
            ax.fill_between(x, y.min(0), y.max(0), color=colour, alpha=0.2, linewidth=0)
        ax.set_title(f"{budget} labelled case(s)")
        ax.set_xlabel("fine-tuning iterations")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("nnU-Net pseudo Dice (validation)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}\nline: mean over seeds, band: min-max over seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(comparisons: Sequence[dict]) -> str:
    rows = ["| labelled cases | treatment | control | mean Dice treatment | mean Dice control | paired difference "
            "[95 % CI] | smallest detectable (80 % power) | seeds x cases | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        verdict = (("**gain**" if c["mean"] > 0 else "**loss**") if c["detected"] else
                   f"no claim ({c['n_seeds']} seed)" if c["n_seeds"] < MIN_SEEDS else "no difference detected")
        rows.append(f"| {c['budget']} | {c['treatment']} | {c['control']} | {c['treatment_mean']:.3f} | "
                    f"{c['control_mean']:.3f} | {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | "
                    f"{c['min_detectable']:.3f} | {c['n_seeds']} x {c['n_cases']} | {verdict} |")
    return "\n".join(rows)


def write_report(name: str, header: str, comparisons: Sequence[dict], extra: dict, results_dir: Path,
                 figures: Sequence[str] = ()) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps({"comparisons": list(comparisons), **extra}, indent=1))
    md = [header, "", markdown_table(comparisons), ""]
    md += [f"- {c['budget']} labelled, {c['treatment']} vs {c['control']}: {c['statement']}" for c in comparisons]
    md += [""] + [f"![{f}]({f})" for f in figures]
    path = results_dir / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path
