"""Does Volume Fusion pretraining help when labels are scarce?  Seeded, paired: VF-pretrained vs from-scratch.

1. ``nnUNetv2_vf_pretrain`` on every unlabelled development image of ``--pretrain-datasets`` except the validation
   cases of those datasets (labels are never read). ``--pretrained DIR`` reuses a finished pretraining run.
2. One nnU-Net dataset with max(budgets) training cases + a fixed validation set; ``splits_final.json`` has one fold
   per label budget (fold i = the first ``budgets[i]`` training cases, validation always the same cases).
3. ``nnUNetv2_vf_adapt_plans`` + ``nnUNetv2_preprocess``: both arms use exactly the same plans (network, patch,
   normalisation).
4. For each budget and seed: ``nnUNetv2_train ... -tr TRAINER_seedS -p nnUNetPlans_VF`` without (scratch) and with
   ``-pretrained_weights`` (pretrained). The same seed means the same initialisation of the classifier, the same
   batches and the same augmentation, so the arms differ only in their initial weights.
5. Per budget: per-case paired differences (pretrained - scratch, Dice averaged over foreground classes, same cases,
   same seeds), their mean and a 95 % interval over seeds x cases (crossed random effects, Student t;
   ``nnunetv2_vf.paired_stats``), and a learning curve (nnU-Net's pseudo validation Dice per epoch, both arms, mean and min-max over seeds).

Results go to ``benchmarks/results/pretraining_gain_<setting>.{json,md}`` and ``..._curves.png``; a gain is claimed
only where the interval excludes zero.

    python benchmarks/pretraining_gain.py                      # CPU study (hippocampus; see README for the time)
    python benchmarks/pretraining_gain.py --setting smoke      # minutes: checks the pipeline, no conclusion
    python benchmarks/pretraining_gain.py --setting gpu --device cuda   # left atrium, paper PCT-Net
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import (Arm, Study, add_study_arguments, plot_learning_curves, resolve_setting,  # noqa: E402
                    study_environment, validation_split, write_report)

from nnunetv2_vf.architectures.pctnet_sizes import PAPER_FEATURES, SMALL_FEATURES  # noqa: E402

SMALL = list(SMALL_FEATURES)
SETTINGS = {
    # small PCT-Net on hippocampus MRI; pretraining on the hippocampus AND left-atrium MRI of ../shared/data
    "cpu": dict(dataset="Dataset004_Hippocampus", budgets=[2, 4, 8], seeds=[0, 1, 2], val_cases=20,
                pretrain_datasets={"Dataset004_Hippocampus": 20, "Dataset010_LeftAtrium": 16},
                pretrain_iterations=2400, pretrain_patch=[16, 32, 32], pretrain_batch=4, features=SMALL,
                trainer="VFPretrainedTrainer_small_10epochs", iterations_per_epoch=15, device="cpu",
                lr_step=1000, num_workers=0, val_every=100),
    # the whole pipeline in minutes (CI-sized): no conclusion can be drawn from it
    "smoke": dict(dataset="Dataset004_Hippocampus", budgets=[2], seeds=[0], val_cases=3,
                  pretrain_datasets={"Dataset004_Hippocampus": 3}, pretrain_images=12,
                  pretrain_iterations=4, pretrain_patch=[16, 32, 32], pretrain_batch=2, features=SMALL,
                  trainer="VFPretrainedTrainer_small_2epochs", iterations_per_epoch=4, device="cpu",
                  lr_step=1000, num_workers=0, val_every=2),
    # the GPU check's last minutes: left atrium, small PCT-Net, short pretraining, 4 labelled cases, 2 seeds
    "gpu-mini": dict(dataset="Dataset010_LeftAtrium", budgets=[4], seeds=[0, 1], val_cases=16,
                     pretrain_datasets={"Dataset010_LeftAtrium": 16}, pretrain_iterations=1000,
                     pretrain_patch=[32, 64, 64], pretrain_batch=4, features=SMALL,
                     trainer="VFPretrainedTrainer_small_10epochs", iterations_per_epoch=15, device="cuda",
                     lr_step=500, num_workers=8, val_every=100),
    # paper PCT-Net, left atrium LGE-MRI (the MIS-FM demo target), 100 epochs
    "gpu": dict(dataset="Dataset010_LeftAtrium", budgets=[4, 8, 16, 32], seeds=[0, 1, 2], val_cases=16,
                pretrain_datasets={"Dataset010_LeftAtrium": 16, "Dataset004_Hippocampus": 20},
                pretrain_iterations=20000, pretrain_patch=[64, 128, 128], pretrain_batch=4,
                features=list(PAPER_FEATURES), trainer="VFPretrainedTrainer_100epochs",
                iterations_per_epoch=250, device="cuda", lr_step=5000, num_workers=8, val_every=500),
}
DATASET_ID = 951
PLANS = "nnUNetPlans_VF"


def pretraining_images(shared: Path, datasets: dict, target: Path, limit: int | None = None) -> int:
    """Symlink every image of ``datasets`` except their validation cases into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, n_val in datasets.items():
        source = shared / "data" / name
        val_ids, _ = validation_split(source, n_val)
        for f in sorted((source / "imagesTr").iterdir()):
            if limit is not None and n >= limit:
                break
            if not any(f.name.startswith(v + "_") for v in val_ids):
                if not (target / f.name).exists():
                    os.symlink(f, target / f.name)
                n += 1
    return n


def ensure_pretraining(args, s: dict, shared: Path, work: Path, env: dict) -> Path:
    """The study's pretraining folder: ``--pretrained`` as given, or ``work/pretrain`` pretrained (or resumed) now on
    the unlabelled images of ``s["pretrain_datasets"]`` without their validation cases."""
    from nnunetv2_vf.workflow import run_nnunet
    pretrain_dir = Path(args.pretrained) if args.pretrained else work / "pretrain"
    if (pretrain_dir / "checkpoint_final.pth").is_file():
        return pretrain_dir
    if args.pretrained:
        raise SystemExit(f"--pretrained {pretrain_dir} holds no checkpoint_final.pth")
    n = pretraining_images(shared, s["pretrain_datasets"], work / "unlabelled", s.get("pretrain_images"))
    print(f"step 1: VF pretraining on {n} unlabelled images (validation cases left out)", flush=True)
    resume = ["--continue"] if (pretrain_dir / "config.json").is_file() else []  # an interrupted run
    run_nnunet(["nnUNetv2_vf_pretrain", work / "unlabelled", "-o", pretrain_dir, *resume,
                "--iterations", s["pretrain_iterations"], "--batch-size", s["pretrain_batch"],
                "--patch-size", *s["pretrain_patch"], "--features", *s.get("features", SMALL),
                "--modality", "MR", "--device", s["device"], "--num-workers", s.get("num_workers", 0),
                "--lr-step", s["lr_step"], "--val-every", s["val_every"]], env, log_file=work / "pretrain.log",
               echo=False)
    return pretrain_dir


def prepare_adapted_dataset(source: Path, env: dict, work: Path, dataset_id: int, suffix: str, case_ids: list,
                            splits: list, pretrain_dir: Path, plans: str = PLANS) -> str:
    """The study's nnU-Net dataset (``case_ids`` of ``source``) with ``splits`` as its folds, planned, adapted to the
    pretraining (``plans``) and preprocessed; skipped when the adapted plans exist. Returns the dataset name."""
    from nnunetv2_vf.workflow import make_subset_dataset, run_nnunet
    name = f"Dataset{dataset_id:03d}_{suffix}"
    pre_dir = Path(env["nnUNet_preprocessed"]) / name
    if (pre_dir / f"{plans}.json").is_file():
        return name
    print("step 2: nnU-Net dataset, plans adapted to the pretraining, preprocessing", flush=True)
    log = dict(log_file=work / "prepare.log", echo=False)
    make_subset_dataset(source, env["nnUNet_raw"], dataset_id, suffix, case_ids)
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1"], env, **log)
    (pre_dir / "splits_final.json").write_text(json.dumps(splits, indent=2))
    run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", dataset_id, "-a", pretrain_dir / "adaptation_plan.json",
                "-p", plans], env, **log)
    run_nnunet(["nnUNetv2_preprocess", "-d", dataset_id, "-plans_name", plans, "-c", "3d_fullres", "-np", "1"],
               env, **log)
    return name


def pretext_curve(pretrain_dir: Path) -> dict:
    """The pretraining's fixed-set fusion Dice and loss per validation point (its own checkpoint log)."""
    import torch
    ckpt = pretrain_dir / "checkpoint_latest.pth"
    if not ckpt.is_file():
        return {}
    logs = torch.load(ckpt, map_location="cpu", weights_only=False)["logs"]
    return {k: [float(x) for x in logs[k]] for k in ("iteration", "val_dice", "train_loss") if k in logs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu", help="study size (default: %(default)s)")
    p.add_argument("--budgets", type=int, nargs="+", help="labelled training cases per fold (default: setting's)")
    p.add_argument("--trainer", help="base fine-tuning trainer; its _seedN variants are used (default: setting's)")
    p.add_argument("--pretrained", help="a finished nnUNetv2_vf_pretrain output folder to reuse (skips step 1)")
    add_study_arguments(p, "/tmp/vf_pretraining_gain")
    args = p.parse_args()
    s = resolve_setting(SETTINGS, args, ("budgets", "seeds", "trainer", "device"))

    shared = Path(args.shared)
    work, env = study_environment(args)
    source = shared / "data" / s["dataset"]
    val_ids, rest = validation_split(source, s["val_cases"])
    train_ids = rest[: max(s["budgets"])]
    timings = {}

    # 1. pretraining
    t0 = time.time()
    pretrain_dir = ensure_pretraining(args, s, shared, work, env)
    timings["pretraining_s"] = round(time.time() - t0)

    # 2./3. labelled dataset, one fold per budget, adapted plans
    t0 = time.time()
    name = prepare_adapted_dataset(source, env, work, DATASET_ID, "VFGain", train_ids + val_ids,
                                   [{"train": train_ids[:b], "val": val_ids} for b in s["budgets"]], pretrain_dir)
    timings["prepare_s"] = round(time.time() - t0)

    # 4. fine-tuning, seeded and paired
    weights = pretrain_dir / "checkpoint_final.pth"
    study = Study(name=f"pretraining_gain_{args.setting}", dataset_id=DATASET_ID, dataset_name=name,
                  configuration="3d_fullres", plans=PLANS, trainer=s["trainer"], budgets=s["budgets"],
                  seeds=s["seeds"], device=s["device"], env=env, log_dir=work,
                  arms=[Arm("scratch"), Arm("pretrained", lambda seed: ["-pretrained_weights", weights])])
    study.load(work / "runs.json", keep=args.keep)
    t0 = time.time()
    if not args.report_only:
        study.run_all()
    timings["finetuning_s"] = round(time.time() - t0) if not args.report_only else round(
        sum(r["seconds"] for r in study.results["runs"]))

    # 5. paired statistics, curves, report
    comparisons = [c for b in s["budgets"] if (c := study.compare(b, "pretrained", "scratch"))]
    results_dir = Path(args.results_dir)
    figure = f"{study.name}_curves.png"
    plot_learning_curves(study, s["iterations_per_epoch"], results_dir / figure,
                         f"VF-pretrained vs scratch, {s['trainer']}, {s['dataset']}")
    pretext = pretext_curve(pretrain_dir)
    header = (f"# Volume Fusion pretraining gain ({args.setting} setting)\n\n"
              f"Dataset {s['dataset']}: validation cases {', '.join(val_ids)}; labelled training cases (nested, "
              f"first N per budget) {', '.join(train_ids)}. Fine-tuning trainer {s['trainer']}_seed"
              f"{{{','.join(map(str, s['seeds']))}}}, plans {PLANS} (same network and patch for both arms). "
              f"Pretraining: {pretrain_dir}, fixed-set fusion Dice "
              + (" -> ".join(f"{d:.3f}@{i}" for i, d in zip(pretext.get('iteration', []),
                                                           pretext.get('val_dice', []))) or "n/a")
              + f". Times: {timings}.")
    report = write_report(study.name, header, comparisons,
                          {"setting": s, "val_ids": val_ids, "train_ids": train_ids, "timings": timings,
                           "pretext_curve": pretext, "runs": study.results["runs"]}, results_dir, [figure])
    for c in comparisons:
        print(f"{c['budget']:3d} labelled: pretrained {c['treatment_mean']:.3f} vs scratch {c['control_mean']:.3f}: "
              f"{c['statement']}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
