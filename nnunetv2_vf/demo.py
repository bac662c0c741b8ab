"""The built-in demo: PCT-Net through nnU-Net on 40 bundled real hippocampus MRI cases, with and without Volume
Fusion pretraining, ending with a Dice table, overlay pictures and the commands as a recipe (report.md).

    nnUNetv2_vf_demo                    # default: 9 steps, about 11.5 min on a quiet 2-core CPU
    nnUNetv2_vf_demo --quick            # smoke run: same steps, tiny budgets (about 4 min)
    nnUNetv2_vf_demo --dry-run          # only print the steps and their commands
    nnUNetv2_vf_demo --device cuda      # same on a GPU

Every step is a real nnU-Net / plugin console script, printed in full (with the environment it gets) before it
runs, so the demo doubles as a recipe; report.md ends with the same commands.  The output folder (-o, default
./nnunetv2_vf_demo_output) is never deleted unless --overwrite is given.  Each command's complete output is kept
in OUTPUT/logs/; the console leaves out nnU-Net's per-tensor listing of loaded pretrained weights, shows progress
bars once per 30 s and a warning once (--verbose shows everything).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES
from nnunetv2_vf.nnunet_ext_trainers import TRAINER_DIR
from nnunetv2_vf.workflow import command_environment, nnunet_environment, run_nnunet

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "Dataset004_HippocampusDemo"
DATASET_ID = 4
DATASET_NAME = "Dataset004_HippocampusDemo"
VF_PLANS = "nnUNetPlans_VF"
# Covers most of a hippocampus crop (about 36 x 50 x 35 voxels) and is 3x faster per step on CPU than the planned
# 40 x 64 x 48; the adapted plans fine-tune on it too.
PRETRAIN_PATCH = (32, 48, 32)
FOLD_NOTE = "fold 0 of nnU-Net's 5-fold split: trains on 25 of the 32 training cases, validates on 7"
# Seconds per step kind on a quiet 2-core CPU, measured by benchmarks/demo_step_times.py (which rewrites the file);
# every demo run writes its own measured times to OUTPUT/timings.json in the same shape.
STEP_TIMES = Path(__file__).resolve().parent / "demo_data" / "step_times.json"
SLOW_FACTOR = 1.5  # a step running past 1.5x its estimate (+ 30 s) is reported as slower than estimated
SLOW_MARGIN_S = 30


def step_time_estimates(path: Path = STEP_TIMES) -> dict[str, dict[str, float]]:
    """{"quick": {step kind: seconds}, "default": {...}} from the step-time table."""
    table = json.loads(Path(path).read_text())
    return {mode: {k: float(v) for k, v in table[mode].items()} for mode in ("quick", "default")}


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def slower_than_estimated(title: str, elapsed_s: float, estimate_s: float, finished: bool) -> str | None:
    """The line that tells the user a step runs slower than its estimate, or None while it is within it."""
    if elapsed_s <= SLOW_FACTOR * estimate_s + SLOW_MARGIN_S:
        return None
    load = load_average()
    state = "took" if finished else "has run for"
    return (f"[slower than estimated: {title} {state} {_minutes(elapsed_s)}, {elapsed_s / max(estimate_s, 1):.1f}x "
            f"the {_minutes(estimate_s)} measured on a quiet 2-core CPU; load average {load:.1f} on "
            f"{os.cpu_count()} CPUs{'' if finished else '. It is still running'}]")


class SlowStepWatch:
    """Prints :func:`slower_than_estimated` once while a step runs past its estimate (a daemon thread), so a busy
    machine gets a message instead of silence between progress lines."""

    def __init__(self, title: str, estimate_s: float, poll_s: float = 5.0):
        self.title, self.estimate_s, self.poll_s = title, estimate_s, poll_s
        self.started = time.time()
        self.reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "SlowStepWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            line = slower_than_estimated(self.title, time.time() - self.started, self.estimate_s, finished=False)
            if line:
                print(line, flush=True)
                self.reported = True
                return


NNUNET_LISTING_START = "Below is the list of overlapping blocks in pretrained model and nnUNet architecture"
NNUNET_LISTING_END = "################### Done ###################"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def shell_line(args: list[str], env: dict | None = None) -> str:
    """``args`` as one copy-pasteable shell line, prefixed by ``VAR=value`` for each item of ``env``."""
    prefix = [f"{k}={_shell_value(k, v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(str(a)) for a in args])


def _shell_value(name: str, value: str) -> str:
    if name == "nnUNet_extTrainer" and value == TRAINER_DIR:
        return '"$(nnUNetv2_vf_trainer_dir)"'  # portable: the plugin's trainer folder wherever it is installed
    return shlex.quote(str(value))


def demo_variables(env: dict) -> dict:
    """The variables of ``env`` a user needs to repeat a command: nnU-Net's own (``nnUNet_*``)."""
    first = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    return {k: env[k] for k in [*first, *sorted(k for k in env if k.startswith("nnUNet_") and k not in first)]
            if k in env}


class ConsoleFilter:
    """What the console shows of a command's output: everything, except

    - nnU-Net's per-tensor listing of loaded pretrained weights (``run_training`` passes ``verbose=True``), which
      becomes one line with the count, and
    - progress-bar redraws (tqdm writes one per update; through a pipe each becomes a line): the first, then at most
      one every ``bar_interval_s`` seconds, and the finished one;
    - a Python warning already shown by an earlier command (``seen_warnings`` is shared by the demo's commands):
      e.g. nnU-Net 2.8's trainer discovery imports timm, whose ``torch.jit.interface`` call warns in every
      ``nnUNetv2_train`` and ``nnUNetv2_predict`` process.
    """

    TQDM = re.compile(r"^(?P<name>[^|]*?):?\s*\d+%\|.*\|\s*(?P<n>\d+)/(?P<total>\d+)\b")
    WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")

    def __init__(self, verbose: bool, log_file: Path, bar_interval_s: float = 30.0,
                 seen_warnings: set | None = None):
        self.verbose, self.log_file, self.bar_interval_s = verbose, log_file, bar_interval_s
        self.seen_warnings = set() if seen_warnings is None else seen_warnings
        self._listing: int | None = None
        self._bars: dict[str, tuple[float, str]] = {}  # bar name -> (time shown, "n/total" shown)
        self._hiding_warning = False

    def __call__(self, line: str) -> str | None:
        if self.verbose:
            return line
        if self._hiding_warning:
            self._hiding_warning = False
            if line.startswith((" ", "\t")):  # the source line Python prints under a warning
                return None
        if self.WARNING.match(line):
            if line in self.seen_warnings:
                self._hiding_warning = True
                return None
            self.seen_warnings.add(line)
            return line
        if self._listing is not None:
            if line.strip() == NNUNET_LISTING_END:
                n, self._listing = self._listing, None
                return f"(nnU-Net listed the {n} pretrained tensors it loaded: see {self.log_file}, or --verbose)\n"
            self._listing += 1
            return None
        if line.startswith(NNUNET_LISTING_START):
            self._listing = 0
            return None
        bar = self.TQDM.match(line)
        if bar:
            now, count = time.monotonic(), f"{bar['n']}/{bar['total']}"
            shown_at, shown_count = self._bars.get(bar["name"], (None, None))
            finished = bar["n"] == bar["total"]
            if count == shown_count or not (shown_at is None or finished or now - shown_at >= self.bar_interval_s):
                return None
            self._bars[bar["name"]] = (now, count)
        return line


@dataclass
class Step:
    key: str  # step kind: its key in the step-time table
    title: str
    commands: list[list] = field(default_factory=list)
    action: Callable[[], None] | None = None  # Python work: before the commands if it has ``shell``, else after
    shell: list[str] = field(default_factory=list)  # shell equivalent of ``action``, for the printout and recipe


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output).resolve()
        self.env = self._environment(create=not args.dry_run)
        self.raw = Path(self.env["nnUNet_raw"]) / DATASET_NAME
        self.dataset_json = json.loads((DEMO_DATA / "dataset.json").read_text())
        self.quick = bool(args.quick)
        self.recipe: list[str] = []
        self.timings: list[tuple[str, float]] = []
        self.seen_warnings: set[str] = set()
        self.estimates = step_time_estimates()["quick" if self.quick else "default"]
        self.step_seconds: list[tuple[str, float]] = []  # (step kind, measured seconds), for timings.json
        self.runs = self._runs()
        self.steps = self._steps()

    # ------------------------------------------------------------------------------------------------ the plan
    def _environment(self, create: bool) -> dict:
        if create:
            return nnunet_environment(self.out)
        with tempfile.TemporaryDirectory() as tmp:  # --dry-run: the same variables, nothing created
            env = nnunet_environment(tmp)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[name] = str(self.out / name)
        return env

    def _runs(self) -> dict:
        """name -> (trainer, extra nnUNetv2_train arguments, plans). Seeded (``_seed0``): the two arms see the same
        batches and augmentation, and a rerun repeats them."""
        suffix = ("2epochs" if self.quick else "10epochs") + "_seed0"
        if self.args.no_pretraining:
            return {"scratch": (f"PCTNetTrainer_small_{suffix}", [], "nnUNetPlans")}
        # both arms on the adapted plans: same preprocessing and network, only the initialisation differs
        return {"scratch": (f"PCTNetTrainer_small_{suffix}", [], VF_PLANS),
                "vf_pretrained": (f"VFPretrainedTrainer_small_{suffix}",
                                  ["-pretrained_weights", self.pretrain_dir / "checkpoint_final.pth"], VF_PLANS)}

    @property
    def pretrain_dir(self) -> Path:
        return self.out / "vf_pretraining"

    def prediction_dir(self, name: str) -> Path:
        return self.out / f"predictions_{name}"

    def _steps(self) -> list[Step]:
        device, test_images = self.args.device, self.raw / "imagesTs"
        steps = [Step("copy", "copy the bundled dataset (40 real hippocampus MRI cases: 32 train, 8 test) into "
                              "nnUNet_raw", action=self._copy_dataset,
                      shell=[shell_line(["cp", "-r", DEMO_DATA, self.raw])]),
                 Step("plan", "nnU-Net planning and preprocessing",
                      [["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1]])]
        if not self.args.no_pretraining:
            iterations = 20 if self.quick else 150
            steps += [
                Step("pretrain", f"Volume Fusion pretraining on the 32 training images, labels unused ({iterations} "
                                 f"iterations)",
                     [["nnUNetv2_vf_pretrain", self.raw / "imagesTr", "-o", self.pretrain_dir, "--modality", "MR",
                       "--iterations", iterations, "--batch-size", 2, "--patch-size", *PRETRAIN_PATCH,
                       "--features", *SMALL_FEATURES, "--device", device, "--num-workers", 0,
                       "--val-every", max(10, iterations // 6)]]),
                Step("adapt", "plans with the pretraining's network and preprocessing (nnUNetPlans_VF), "
                              "preprocessed",
                     [["nnUNetv2_vf_adapt_plans", "-d", DATASET_ID, "-a", self.pretrain_dir / "adaptation_plan.json",
                       "-p", VF_PLANS],
                      ["nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", VF_PLANS, "-c", "3d_fullres",
                       "-np", 1]])]
        for name, (trainer, extra, plans) in self.runs.items():
            what = "fine-tune the VF-pretrained PCT-Net" if name == "vf_pretrained" else "train PCT-Net from scratch"
            steps += [
                Step("train", f"{what} ({FOLD_NOTE})",
                     [["nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", trainer, "-p", plans, "-device", device,
                       *extra]]),
                Step("predict", f"predict the 8 held-out test cases ({name})",
                     [["nnUNetv2_predict", "-i", test_images, "-o", self.prediction_dir(name), "-d", DATASET_ID,
                       "-c", "3d_fullres", "-tr", trainer, "-p", plans, "-f", 0, "-device", device,
                       "-npp", 1, "-nps", 1]])]
        labels = [str(v) for k, v in self.dataset_json["labels"].items() if v != 0]
        steps.append(Step("evaluate", "Dice on the test cases, overlay pictures, report.md",
                          [["nnUNetv2_evaluate_simple", self.raw / "labelsTs", self.prediction_dir(name), "-l", *labels,
                            "-o", self.prediction_dir(name) / "summary.json", "-np", 1] for name in self.runs],
                          action=self._pictures_and_report))
        return steps

    def estimate_s(self, step: Step) -> float:
        return self.estimates[step.key]

    # ------------------------------------------------------------------------------------------------ printing
    def print_environment(self) -> None:
        variables = demo_variables(self.env)
        line = "export " + " ".join(f"{k}={_shell_value(k, v)}" for k, v in variables.items())
        print("Environment of every command below (paste it first to repeat them by hand):\n$ " + line, flush=True)
        self.recipe += ["# environment (nnU-Net's folders and small-machine settings; the trainer folder of the "
                        "plugin)", line]

    def announce(self, args: list[str], env: dict) -> None:
        """Print a command exactly as it runs: extra variables it gets on top of the exported ones, then argv."""
        base = demo_variables(self.env)
        extra = {k: v for k, v in demo_variables(env).items() if base.get(k) != v}
        line = shell_line(args, extra)
        print(f"$ {line}", flush=True)
        self.recipe.append(line)

    # ------------------------------------------------------------------------------------------------ running
    def run(self) -> None:
        total = sum(self.estimate_s(s) for s in self.steps)
        print(f"nnunetv2-vf demo{' (--quick)' if self.quick else ''}: {len(self.steps)} steps, about "
              f"{_minutes(total)} on a quiet 2-core CPU (measured, {STEP_TIMES.name}; a GPU is faster).\n"
              f"Output folder: {self.out}", flush=True)
        load = load_average()
        if load > (os.cpu_count() or 1):
            print(f"The machine is busy (load average {load:.1f} on {os.cpu_count()} CPUs): expect the steps to "
                  f"take longer than estimated.", flush=True)
        self.print_environment()
        started = time.time()
        for i, step in enumerate(self.steps, 1):
            print(f"\n=== step {i}/{len(self.steps)}: {step.title} (about {_minutes(self.estimate_s(step))}) ===",
                  flush=True)
            self.recipe += ["", f"# step {i}: {step.title}"]
            for line in step.shell:
                print(f"$ {line}", flush=True)
                self.recipe.append(line)
            if self.args.dry_run:
                for command in step.commands:
                    self.announce([str(a) for a in command], command_environment(command, self.env))
                continue
            t = time.time()
            log_file = self.out / "logs" / f"step{i:02d}_{step.key}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with SlowStepWatch(f"step {i}", self.estimate_s(step)):
                if step.action is not None and step.shell:  # Python work that replaces a shell command
                    step.action()
                for command in step.commands:
                    console = ConsoleFilter(self.args.verbose, log_file, seen_warnings=self.seen_warnings)
                    run_nnunet(command, self.env, log_file=log_file, echo=console,
                               on_start=self.announce)
                if step.action is not None and not step.shell:  # Python work on the commands' results
                    step.action()
            seconds = time.time() - t
            self.timings.append((f"{i}. {step.title}", seconds))
            self.step_seconds.append((step.key, seconds))
            self._write_timings(started)
            slow = slower_than_estimated(f"step {i}", seconds, self.estimate_s(step), finished=True)
            print(f"[step {i}/{len(self.steps)} done in {_minutes(seconds)}; "
                  f"{_minutes(time.time() - started)} so far]" + (f"\n{slow}" if slow else ""), flush=True)
        if self.args.dry_run:
            print("\n(--dry-run: nothing was run)")
            return
        report = self.report(time.time() - started)
        (self.out / "report.md").write_text(report)
        print("\n" + report)
        print(f"report written to {self.out / 'report.md'}")

    def _write_timings(self, started: float) -> None:
        """OUTPUT/timings.json: this run's measured seconds per step kind, in the step-time table's shape (what
        benchmarks/demo_step_times.py reads)."""
        per_kind: dict[str, float] = {}
        for kind, seconds in self.step_seconds:
            per_kind.setdefault(kind, []).append(seconds)
        record = {"mode": "quick" if self.quick else "default", "device": self.args.device,
                  "cpus": os.cpu_count(), "load_average_at_end": load_average(),
                  "elapsed_s": round(time.time() - started, 1),
                  "seconds": {k: round(float(np.mean(v)), 1) for k, v in per_kind.items()},
                  "steps": [[k, round(s, 1)] for k, s in self.step_seconds]}
        (self.out / "timings.json").write_text(json.dumps(record, indent=1))

    def _copy_dataset(self) -> None:
        shutil.copytree(DEMO_DATA, self.raw)

    # ------------------------------------------------------------------------------------------------ results
    def _pictures_and_report(self) -> None:
        from nnunetv2_vf.visualize import label_names_from_dataset_json

        names = label_names_from_dataset_json(self.dataset_json)
        self.results = {}
        for name in self.runs:
            summary = json.loads((self.prediction_dir(name) / "summary.json").read_text())
            self.results[name] = {names.get(int(k), k): v["Dice"] for k, v in summary["mean"].items()}
        pictures_dir = self.out / "pictures"
        self.n_pictures = len(render_overlays(self.raw / "imagesTs", self.raw / "labelsTs",
                                              {n: self.prediction_dir(n) for n in self.runs}, pictures_dir, names))
        model_dirs = {name: Path(self.env["nnUNet_results"]) / DATASET_NAME / f"{tr}__{plans}__3d_fullres" / "fold_0"
                      for name, (tr, _, plans) in self.runs.items()}
        self.validation = {}
        for name, folder in model_dirs.items():
            summary = folder / "validation" / "summary.json"
            if summary.exists():
                self.validation[name] = json.loads(summary.read_text())["foreground_mean"]["Dice"]
        progress = dict(model_dirs, vf_pretraining=self.pretrain_dir)  # the pretraining stage's own progress plot
        for name, folder in progress.items():
            if (folder / "progress.png").exists():
                shutil.copy2(folder / "progress.png", pictures_dir / f"progress_{name}.png")

    def report(self, elapsed: float) -> str:
        results, validation, n_pictures = self.results, self.validation, self.n_pictures
        label_cols = list(next(iter(results.values())))
        lines = ["# nnunetv2-vf demo result", "",
                 f"{'Quick run (--quick: tiny budgets, checks the pipeline, not the accuracy). ' if self.quick else ''}"
                 f"Device {self.args.device}, {_minutes(elapsed)} in all. Test set: the 8 held-out hippocampus MRI "
                 f"cases (never seen in pretraining or training). Validation: nnU-Net's own, on the 7 cases of "
                 f"fold 0 (the other 25 training cases train).", "",
                 "| run | trainer | " + " | ".join(f"test Dice {n}" for n in label_cols) +
                 " | test mean | validation Dice (7 cases) |",
                 "|---|---|" + "---|" * (len(label_cols) + 2)]
        for name, dice in results.items():
            val = f"{validation[name]:.3f}" if name in validation else "-"
            lines.append(f"| {name} | `{self.runs[name][0]}` | " + " | ".join(f"{d:.3f}" for d in dice.values()) +
                         f" | {np.mean(list(dice.values())):.3f} | {val} |")
        if len(results) > 1:
            lines += ["", "What this can and cannot show: one seeded run per arm. The difference between the two rows "
                          "is mostly the luck of one random start: in the project's seeded study the pretrained - "
                          "scratch difference of a single seed ranged from -0.26 to +0.15 Dice with everything else "
                          "fixed. No gain of Volume Fusion pretraining has been detected (frozen-feature probe: "
                          "pretrained - random +0.063 Dice, 95 % CI [-0.006, +0.131]; fine-tuned for 150 iterations "
                          "on 2 labelled cases, 5 seeds: pretrained - scratch -0.029 [-0.111, +0.053]; fine-tuned "
                          "to convergence, 1200 iterations, 3 seeds: +0.004 [-0.004, +0.012]); see "
                          "docs/evidence.md of nnunetv2-vf for the studies and their intervals."]
        lines += ["", f"Pictures: {self.out / 'pictures'} ({n_pictures} overlays with a label legend, progress_*.png "
                      f"training curves). Complete output of every command: {self.out / 'logs'}.", "",
                  "| step | seconds |", "|---|---|"]
        lines += [f"| {title} | {seconds:.0f} |" for title, seconds in self.timings]
        lines += ["", "## Recipe: the same commands on your own dataset", "",
                  "These are the commands the demo ran, in order. For your data: put it in nnU-Net's format under "
                  "`$nnUNet_raw/DatasetXXX_Name`, replace the dataset id 4 by XXX and the folder names accordingly, "
                  "use `--modality CT` for CT images, and drop the demo's CPU sizes (`--iterations`, `--patch-size`, "
                  "`--features`, the `_small_10epochs_seed0`/`_small_2epochs_seed0` trainers: use `PCTNetTrainer` and "
                  "`VFPretrainedTrainer`) on a GPU (`-device cuda`, `--device cuda`). The copy and picture steps "
                  "are the demo's own.", "", "```bash", *self.recipe, "```", ""]
        return "\n".join(lines)


def render_overlays(images: Path, gt: Path, preds: dict[str, Path], target: Path,
                    label_names: dict[int, str] | None = None) -> list[Path]:
    import SimpleITK as sitk

    from nnunetv2_vf.visualize import save_overlay

    label_names = label_names or {1: "anterior", 2: "posterior"}
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for gt_file in sorted(gt.glob("*.nii.gz")):
        case = gt_file.name[: -len(".nii.gz")]
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))).astype(np.float32)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_file)))
        for name, folder in preds.items():
            prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / gt_file.name)))
            dice = {lab: 2 * np.sum((prediction == lab) & (reference == lab)) /
                    max(1, np.sum(prediction == lab) + np.sum(reference == lab)) for lab in label_names}
            path = target / f"{case}_{name}.png"
            save_overlay(image, reference, prediction, path,
                         f"{case} — {name}: Dice " + ", ".join(f"{label_names[k]} {d:.2f}" for k, d in dice.items()),
                         label_names=label_names)
            written.append(path)
    return written


def _check_output_folder(out: Path, overwrite: bool) -> str | None:
    """None if the demo may write into ``out`` (after deleting it if asked), else the message saying why not."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not overwrite:
        return (f"nnUNetv2_vf_demo: the output folder {out} already exists (an earlier demo?) and is kept. Choose "
                f"another folder with -o DIR, or pass --overwrite to delete it and start again.")
    if not out.is_dir() or not ((out / "nnUNet_raw").is_dir() or (out / "report.md").is_file()):
        return (f"nnUNetv2_vf_demo: {out} does not look like a demo output folder (no nnUNet_raw/ or report.md "
                f"inside), so --overwrite will not delete it. Choose another folder with -o DIR.")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnUNetv2_vf_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="nnunetv2_vf_demo_output",
                        help="work folder: nnU-Net's raw/preprocessed/results folders, pretraining, predictions, "
                             "pictures/, logs/, report.md (default: ./%(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing output folder of an earlier demo first (without it, the demo "
                             "stops rather than touch an existing folder)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where pretraining and nnU-Net training run (default: %(default)s; the time estimates "
                             "are for a 2-core CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, not the accuracy")
    parser.add_argument("--no-pretraining", action="store_true", help="only train PCT-Net from scratch")
    parser.add_argument("--verbose", action="store_true",
                        help="show every line of every command (including nnU-Net's per-tensor listing of loaded "
                             "pretrained weights); the logs/ folder always has everything")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their commands, run nothing")
    args = parser.parse_args(argv)

    out = Path(args.output).resolve()
    if not args.dry_run:
        problem = _check_output_folder(out, args.overwrite)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        if out.exists():
            shutil.rmtree(out)
    Demo(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
