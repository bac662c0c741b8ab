"""Forward+backward time and peak memory of the encoder U-Nets against nnU-Net's default network, same plans.

For each dimensionality the baseline is the PlainConvUNet nnU-Net's planner builds for the patch and spacing
(``get_pool_and_conv_props``, features 32 doubling to 320 (2D: 512), two convs per stage, instance norm); the
encoder U-Nets use exactly the same ``strides``/``kernel_sizes``.  Each network runs in its own fresh process so
peak-memory numbers do not mix (CPU: high-water RSS above the RSS with the model built; CUDA: max
allocated).

    python benchmarks/encoder_unet_speed.py                 # CPU-sized: hippocampus patches, lite0
    python benchmarks/encoder_unet_speed.py --device cuda --patch2d 320 256 --patch3d 128 128 128 \
        --batch2d 12 --batch3d 2 --encoder efficientnet_b0 --repeats 20   # GPU-sized (left-atrium-like)
"""
from __future__ import annotations

import argparse

from _measure import measure_training_step, memory_label, nnunet_default_unet


def build(name: str, patch, encoder: str):
    # the baseline, and the strides/kernels nnU-Net plans for this patch, which the encoder U-Nets follow exactly
    net, strides, kernels, patch = nnunet_default_unet(patch)
    if name.startswith("EncoderUNet2D"):
        from nnunetv2_vf.architectures.encoder_unet import EncoderUNet2D
        net = EncoderUNet2D(1, 3, strides, encoder, deep_supervision=True)
    elif name.startswith("EncoderUNet3D"):
        from nnunetv2_vf.architectures.encoder_unet import EncoderUNet3D
        net = EncoderUNet3D(1, 3, strides, kernels, encoder, deep_supervision=True)
    elif name.startswith("DepthStackUNet"):
        from nnunetv2_vf.architectures.encoder_unet import DepthStackUNet
        net = DepthStackUNet(1, 3, strides, patch, encoder)
    return net, patch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch2d", type=int, nargs=2, default=[56, 40], help="H W (default: hippocampus 2d)")
    parser.add_argument("--patch3d", type=int, nargs=3, default=[40, 56, 40], help="D H W (hippocampus 3d_fullres)")
    parser.add_argument("--batch2d", type=int, default=32)
    parser.add_argument("--batch3d", type=int, default=2)
    parser.add_argument("--encoder", default="efficientnet_lite0", help="timm encoder name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-3d", action="store_true", help="only the 2D comparison")
    args = parser.parse_args()
    print(f"device {args.device}, encoder {args.encoder}, {args.repeats} timed forward+backward+AdamW steps (median), "
          f"fresh process each; memory = {memory_label(args.device)}")
    groups = [("2D", tuple(args.patch2d), args.batch2d, ["nnU-Net PlainConvUNet 2D", "EncoderUNet2D"])]
    if not args.skip_3d:
        groups.append(("3D", tuple(args.patch3d), args.batch3d,
                       ["nnU-Net PlainConvUNet 3D", "EncoderUNet3D (DX-Net)", "DepthStackUNet 3D (DS-Net)"]))
    print(f"{'network':30s} {'patch':>14s} {'batch':>5s} {'params(M)':>9s} {'s/step':>8s} {'peak MB':>8s} "
          f"{'time ratio':>10s} {'mem ratio':>9s}")
    for _, patch, batch, names in groups:
        base = None
        for name in names:
            r = measure_training_step(build, (name, patch, args.encoder), batch, args.repeats, args.device)
            base = base or r
            print(f"{name:30s} {str(tuple(r['patch'])):>14s} {batch:5d} {r['params'] / 1e6:9.2f} "
                  f"{r['seconds']:8.3f} {r['peak_mb']:8.0f} {r['seconds'] / base['seconds']:10.2f} "
                  f"{r['peak_mb'] / base['peak_mb']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
