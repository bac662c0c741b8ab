"""The built-in demo: PCT-Net through nnU-Net on 40 bundled real hippocampus MRI cases, with and without Volume
Fusion pretraining, ending with a Dice table and overlay pictures.

    nnUNetv2_vf_demo                    # default: about 10 min on 2 CPU cores
    nnUNetv2_vf_demo --quick            # smoke run (about 3 min)
    nnUNetv2_vf_demo --device cuda      # same on a GPU

Every step is a real nnU-Net / plugin console script, printed before it runs, so the demo doubles as a recipe.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from nnunetv2_vf.workflow import nnunet_environment, run_nnunet

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "Dataset004_HippocampusDemo"
DATASET_ID = 4
DATASET_NAME = "Dataset004_HippocampusDemo"
SMALL_FEATURES = (8, 16, 32, 64, 128)  # PCTNetTrainer_small
VF_PLANS = "nnUNetPlans_VF"
# Covers most of a hippocampus crop (about 36 x 50 x 35 voxels) and is 3x faster per step on CPU than the planned
# 40 x 64 x 48; the adapted plans fine-tune on it too.
PRETRAIN_PATCH = (32, 48, 32)


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def _dice_table(summary: dict, label_names: dict) -> dict:
    return {label_names.get(str(k), k): v["Dice"] for k, v in summary["mean"].items()}


def evaluate(pred_dir: Path, gt_dir: Path, env: dict, labels) -> dict:
    out = pred_dir / "summary.json"
    run_nnunet(["nnUNetv2_evaluate_simple", gt_dir, pred_dir, "-l", *labels, "-o", out, "-np", 1], env, echo=False)
    return json.loads(out.read_text())


def render_overlays(images: Path, gt: Path, preds: dict[str, Path], target: Path) -> list[Path]:
    import SimpleITK as sitk

    from nnunetv2_vf.visualize import save_overlay

    target.mkdir(parents=True, exist_ok=True)
    written = []
    for gt_file in sorted(gt.glob("*.nii.gz")):
        case = gt_file.name[: -len(".nii.gz")]
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))).astype(np.float32)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_file)))
        for name, folder in preds.items():
            prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / gt_file.name)))
            inter = {lab: 2 * np.sum((prediction == lab) & (reference == lab)) /
                     max(1, np.sum(prediction == lab) + np.sum(reference == lab)) for lab in (1, 2)}
            path = target / f"{case}_{name}.png"
            save_overlay(image, reference, prediction, path,
                         f"{case} — {name}: Dice anterior {inter[1]:.2f}, posterior {inter[2]:.2f}")
            written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="nnunetv2_vf_demo_output", help="work folder (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the pipeline, not the accuracy")
    parser.add_argument("--no-pretraining", action="store_true", help="only train PCT-Net from scratch")
    args = parser.parse_args(argv)

    started = time.time()
    out = Path(args.output).resolve()
    if out.exists():
        shutil.rmtree(out)
    env = nnunet_environment(out)
    dataset_json = json.loads((DEMO_DATA / "dataset.json").read_text())
    label_names = {str(v): k for k, v in dataset_json["labels"].items()}
    labels = [v for k, v in dataset_json["labels"].items() if v != 0]

    t = _step("1/5 copy the bundled dataset (40 real hippocampus MRI cases: 32 train, 8 test)")
    raw = Path(env["nnUNet_raw"]) / DATASET_NAME
    shutil.copytree(DEMO_DATA, raw)
    test_images, test_labels = raw / "imagesTs", raw / "labelsTs"

    t = _step("2/5 nnUNetv2_plan_and_preprocess")
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1], env)
    print(f"[{time.time() - t:.0f} s]")

    scratch_trainer = "PCTNetTrainer_small_2epochs" if args.quick else "PCTNetTrainer_small_10epochs"
    runs = {"scratch": (scratch_trainer, [], "nnUNetPlans")}
    if not args.no_pretraining:
        runs.update(_pretrain(args, env, raw, out))

    predictions = {}
    for name, (trainer, extra, plans) in runs.items():
        t = _step(f"3/5 nnUNetv2_train {DATASET_ID} 3d_fullres 0 -tr {trainer} ({name})")
        run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", trainer, "-p", plans, "-device",
                    args.device, *extra], env)
        print(f"[{time.time() - t:.0f} s]")
        t = _step(f"4/5 nnUNetv2_predict on the 8 held-out test cases ({name})")
        pred = out / f"predictions_{name}"
        run_nnunet(["nnUNetv2_predict", "-i", test_images, "-o", pred, "-d", DATASET_ID, "-c", "3d_fullres",
                    "-tr", trainer, "-p", plans, "-f", 0, "-device", args.device, "-npp", 1, "-nps", 1], env)
        predictions[name] = pred
        print(f"[{time.time() - t:.0f} s]")

    t = _step("5/5 evaluate (nnUNetv2_evaluate_simple) and draw overlays")
    results = {name: _dice_table(evaluate(p, test_labels, env, labels), label_names)
               for name, p in predictions.items()}
    pictures = render_overlays(test_images, test_labels, predictions, out / "pictures")
    model_dirs = {name: Path(env["nnUNet_results"]) / DATASET_NAME / f"{tr}__{plans}__3d_fullres" / "fold_0"
                  for name, (tr, _, plans) in runs.items()}
    model_dirs["vf_pretraining"] = out / "vf_pretraining"  # the pretraining stage's own progress plot
    for name, folder in model_dirs.items():
        if (folder / "progress.png").exists():
            shutil.copy2(folder / "progress.png", out / "pictures" / f"progress_{name}.png")

    lines = ["# nnunetv2-vf demo result", "", f"Test set: 8 held-out hippocampus MRI cases, device {args.device}, "
             f"total {(time.time() - started) / 60:.1f} min.", "",
             "| run | " + " | ".join(f"Dice {n}" for n in next(iter(results.values()))) + " | mean |",
             "|---|" + "---|" * (len(labels) + 1)]
    for name, dice in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{d:.3f}" for d in dice.values()) +
                     f" | {np.mean(list(dice.values())):.3f} |")
    lines += ["", f"Pictures: {out / 'pictures'} ({len(pictures)} overlays, progress_*.png training curves)"]
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    print("\n" + report)
    print(f"\nreport written to {out / 'report.md'}")


def _pretrain(args, env: dict, raw: Path, out: Path) -> dict:
    """Volume Fusion pretraining on the 32 training images (labels unused; test images never seen), then plans
    that reproduce the pretraining preprocessing and network. Returns the two runs to compare on those plans."""
    iterations = 20 if args.quick else 150
    pretrain_dir = out / "vf_pretraining"
    t = _step(f"pretrain: nnUNetv2_vf_pretrain on imagesTr ({iterations} iterations, Volume Fusion 'paper')")
    run_nnunet(["nnUNetv2_vf_pretrain", raw / "imagesTr", "-o", pretrain_dir, "--iterations", iterations,
                "--batch-size", 2, "--patch-size", *PRETRAIN_PATCH, "--modality", "MR", "--features", *SMALL_FEATURES,
                "--device", args.device, "--num-workers", 0, "--val-every", max(10, iterations // 6)], env)
    print(f"[{time.time() - t:.0f} s]")
    t = _step("adapt plans: nnUNetv2_vf_adapt_plans + nnUNetv2_preprocess (same network and preprocessing)")
    run_nnunet(["nnUNetv2_vf_adapt_plans", "-d", DATASET_ID, "-a", pretrain_dir / "adaptation_plan.json",
                "-p", VF_PLANS], env)
    run_nnunet(["nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", VF_PLANS, "-c", "3d_fullres", "-np", 1], env)
    print(f"[{time.time() - t:.0f} s]")
    suffix = "2epochs" if args.quick else "10epochs"
    return {"scratch": (f"PCTNetTrainer_small_{suffix}", [], VF_PLANS),
            "vf_pretrained": (f"VFPretrainedTrainer_small_{suffix}",
                              ["-pretrained_weights", pretrain_dir / "checkpoint_final.pth"], VF_PLANS)}


if __name__ == "__main__":
    main()
