"""Does Volume Fusion pretraining help when labels are scarce?  Pretrained vs from-scratch PCT-Net, same run.

1. ``nnUNetv2_vf_pretrain`` on the unlabelled development images (labels ignored; the validation cases are left
   out of pretraining too).
2. One nnU-Net dataset with max(budgets) training cases + a fixed validation set; ``splits_final.json`` has one
   fold per label budget (fold i = the first ``budgets[i]`` cases, validation always the same cases).
3. ``nnUNetv2_vf_adapt_plans`` + ``nnUNetv2_preprocess``: both arms use exactly the same plans (network,
   patch, normalisation), so the only difference is the initialisation.
4. For each budget and repeat: ``nnUNetv2_train ... -tr TRAINER -p nnUNetPlans_VF`` with and without
   ``-pretrained_weights``; nnU-Net's own validation (``fold_X/validation/summary.json``, foreground mean Dice).

The baseline is the same PCT-Net trained from scratch in the same run; the printed ratio is pretrained / scratch.
nnU-Net does not seed its runs: repeats differ by initialisation and sampling.

    python benchmarks/pretraining_gain.py                                  # CPU default (42 min on 2 idle cores)
    python benchmarks/pretraining_gain.py --budgets 8 --repeats 1 --pretrain-iterations 150 \
        --trainer VFPretrainedTrainer_small_3epochs                      # smoke, ~10 min on an idle CPU
    python benchmarks/pretraining_gain.py --setting gpu --device cuda       # GPU setting (left atrium)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    # small PCT-Net, hippocampus MRI (35x50x36 voxels), 10 epochs x 15 iterations of fine-tuning
    "cpu": dict(dataset="Dataset004_Hippocampus", budgets=[4, 8, 16], repeats=2, val_cases=20,
                pretrain_iterations=300, pretrain_patch=[16, 32, 32], pretrain_batch=2,
                features=[8, 16, 32, 64, 128], trainer="VFPretrainedTrainer_small_10epochs", device="cpu",
                lr_step=20000, num_workers=0),
    # paper PCT-Net, left atrium LGE-MRI, 100 epochs; the MIS-FM demo used 72 training cases
    "gpu": dict(dataset="Dataset010_LeftAtrium", budgets=[4, 8, 16, 32], repeats=3, val_cases=16,
                pretrain_iterations=20000, pretrain_patch=[64, 128, 128], pretrain_batch=4,
                features=[24, 48, 128, 256, 512], trainer="VFPretrainedTrainer_100epochs", device="cuda",
                lr_step=5000, num_workers=8),
}
DATASET_ID = 951
PLANS = "nnUNetPlans_VF"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--budgets", type=int, nargs="+")
    p.add_argument("--repeats", type=int)
    p.add_argument("--val-cases", type=int)
    p.add_argument("--pretrain-iterations", type=int)
    p.add_argument("--trainer")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"),
                   help="folder holding data/<dataset> (development data)")
    p.add_argument("--workdir", default="/tmp/vf_pretraining_gain")
    p.add_argument("--keep", action="store_true", help="reuse an existing workdir (pretraining, preprocessing)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    s = dict(SETTINGS[args.setting])
    for key in ("budgets", "repeats", "val_cases", "pretrain_iterations", "trainer", "device"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)

    from nnunetv2_vf.workflow import make_subset_dataset, nnunet_environment, run_nnunet
    work = Path(args.workdir)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    env = nnunet_environment(work, extra={"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    source = Path(args.shared) / "data" / s["dataset"]
    ending = json.loads((source / "dataset.json").read_text())["file_ending"]
    all_ids = sorted(f.name[: -len(ending)] for f in (source / "labelsTr").iterdir() if f.name.endswith(ending))
    rng = np.random.default_rng(0)
    order = [all_ids[i] for i in rng.permutation(len(all_ids))]
    val_ids = order[: s["val_cases"]]
    train_ids = order[s["val_cases"]: s["val_cases"] + max(s["budgets"])]
    timings = {}

    # 1. pretraining on every development image except the validation cases
    unlabelled = work / "unlabelled"
    pretrain_dir = work / "pretrain"
    t0 = time.time()
    if not (pretrain_dir / "checkpoint_final.pth").is_file():
        unlabelled.mkdir(parents=True, exist_ok=True)
        for f in (source / "imagesTr").iterdir():
            if not any(f.name.startswith(v + "_") for v in val_ids):
                dst = unlabelled / f.name
                if not dst.exists():
                    os.symlink(f, dst)
        run_nnunet(["nnUNetv2_vf_pretrain", unlabelled, "-o", pretrain_dir,
                    "--iterations", s["pretrain_iterations"], "--batch-size", s["pretrain_batch"],
                    "--patch-size", *s["pretrain_patch"], "--features", *s["features"], "--modality", "MR",
                    "--device", s["device"], "--num-workers", s["num_workers"], "--lr-step", s["lr_step"],
                    "--val-every", max(1, s["pretrain_iterations"] // 10)], env, log_file=work / "pretrain.log")
    timings["pretraining_s"] = time.time() - t0

    # 2./3. labelled dataset, splits (one fold per budget), adapted plans
    t0 = time.time()
    name = f"Dataset{DATASET_ID:03d}_VFGain"
    pre_dir = Path(env["nnUNet_preprocessed"]) / name
    if not (pre_dir / f"{PLANS}.json").is_file():
        make_subset_dataset(source, env["nnUNet_raw"], DATASET_ID, "VFGain", train_ids + val_ids)
        run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1"], env,
                   log_file=work / "prepare.log", echo=False)
        splits = [{"train": train_ids[:b], "val": val_ids} for b in s["budgets"]]
        (pre_dir / "splits_final.json").write_text(json.dumps(splits, indent=2))
        run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", DATASET_ID, "-a", pretrain_dir / "adaptation_plan.json",
                    "-p", PLANS], env, log_file=work / "prepare.log", echo=False)
        run_nnunet(["nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", PLANS, "-c", "3d_fullres", "-np", "1"],
                   env, log_file=work / "prepare.log", echo=False)
    timings["prepare_s"] = time.time() - t0

    # 4. fine-tuning with / without the pretrained weights
    results = {"setting": s, "runs": []}
    model_dir = Path(env["nnUNet_results"]) / name / f"{s['trainer']}__{PLANS}__3d_fullres"
    for fold, budget in enumerate(s["budgets"]):
        for repeat in range(s["repeats"]):
            for arm in ("scratch", "pretrained"):
                cmd = ["nnUNetv2_train", DATASET_ID, "3d_fullres", fold, "-tr", s["trainer"], "-p", PLANS,
                       "-device", s["device"]]
                if arm == "pretrained":
                    cmd += ["-pretrained_weights", pretrain_dir / "checkpoint_final.pth"]
                t0 = time.time()
                run_nnunet(cmd, env, log_file=work / f"train_{budget}_{repeat}_{arm}.log", echo=False)
                seconds = time.time() - t0
                summary = json.loads((model_dir / f"fold_{fold}" / "validation" / "summary.json").read_text())
                dice = summary["foreground_mean"]["Dice"]
                per_class = {k: v["Dice"] for k, v in summary["mean"].items()}
                os.replace(model_dir / f"fold_{fold}", model_dir / f"fold_{fold}_{arm}_r{repeat}")
                results["runs"].append({"budget": budget, "repeat": repeat, "arm": arm, "dice": dice,
                                        "dice_per_class": per_class, "seconds": seconds})
                print(f"budget {budget:3d} repeat {repeat} {arm:10s}: validation Dice {dice:.4f} "
                      f"({seconds:.0f} s)", flush=True)

    print("\nlabelled cases | scratch Dice (mean +- sd) | pretrained Dice | ratio pretrained/scratch")
    summary_rows = []
    for budget in s["budgets"]:
        sc = [r["dice"] for r in results["runs"] if r["budget"] == budget and r["arm"] == "scratch"]
        pt = [r["dice"] for r in results["runs"] if r["budget"] == budget and r["arm"] == "pretrained"]
        ratio = np.mean(pt) / max(np.mean(sc), 1e-8)
        summary_rows.append({"budget": budget, "scratch": float(np.mean(sc)), "pretrained": float(np.mean(pt)),
                             "ratio": float(ratio)})
        print(f"{budget:14d} | {np.mean(sc):.4f} +- {np.std(sc):.4f}        | {np.mean(pt):.4f} +- {np.std(pt):.4f}"
              f" | {ratio:.3f}")
    results["summary"] = summary_rows
    results["timings"] = timings
    print(f"pretraining {timings['pretraining_s']:.0f} s, preparation {timings['prepare_s']:.0f} s")
    out = Path(args.output_json) if args.output_json else work / "pretraining_gain.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
