"""Forward+backward time and peak memory of PCT-Net against nnU-Net's planned PlainConvUNet, same patch, one run.

The baseline is the network nnU-Net's default planner builds for this patch and spacing (see ``_measure.py``).
PCT-Net runs on the same patch rounded up to its strides (8, 16, 16). Each network is measured in its own fresh
process so peak-memory numbers do not mix.

    python benchmarks/pctnet_speed.py                      # CPU-sized: hippocampus patch, batch 2
    python benchmarks/pctnet_speed.py --device cuda --patch 64 128 128 --batch 2 --repeats 20   # paper patch
"""
from __future__ import annotations

import argparse

import torch

from _measure import measure_training_step, memory_label, nnunet_default_unet

NETWORKS = ("nnU-Net PlainConvUNet", "PCT-Net (paper)", "PCT-Net (small, 8-128)")


def build(name: str, patch, spacing):
    if name == "nnU-Net PlainConvUNet":
        net, _, _, patch = nnunet_default_unet(patch, spacing)
        return net, patch
    from nnunetv2_vf.architectures.pctnet import PCTNet, fit_patch_size
    feats = (24, 48, 128, 256, 512) if name == "PCT-Net (paper)" else (8, 16, 32, 64, 128)
    return PCTNet(1, 3, features_per_stage=feats), fit_patch_size(patch, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40], help="D H W (default: nnU-Net's "
                        "hippocampus 3d_fullres patch)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    print(f"device {args.device}, batch {args.batch}, requested patch {args.patch}, median of {args.repeats} "
          f"forward+backward+AdamW steps; memory = {memory_label(args.device)}")
    print(f"{'network':26s} {'patch':>14s} {'params (M)':>10s} {'s/step':>8s} {'x time':>7s} {'peak MiB':>9s} "
          f"{'x mem':>6s}")
    base = None
    for name in NETWORKS:
        r = measure_training_step(build, (name, args.patch, args.spacing), args.batch, args.repeats, args.device,
                                  args.threads)
        base = base or r
        print(f"{name:26s} {str(r['patch']):>14s} {r['params'] / 1e6:10.2f} {r['seconds']:8.3f} "
              f"{r['seconds'] / base['seconds']:7.2f} {r['peak_mb']:9.0f} {r['peak_mb'] / base['peak_mb']:6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
