"""Forward+backward time and peak memory of PCT-Net against nnU-Net's planned PlainConvUNet, same patch, one run.

The baseline is the network nnU-Net's default planner builds for this patch and spacing (same topology rules:
``get_pool_and_conv_props``, features 32 doubling to 320, two convs per stage, instance norm, leaky ReLU).
Each network is measured in its own fresh process so peak-memory numbers do not mix.

    python benchmarks/pctnet_speed.py                      # CPU-sized: hippocampus patch, batch 2
    python benchmarks/pctnet_speed.py --device cuda --patch 64 128 128 --batch 2 --repeats 20   # paper patch
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch


def plain_conv_unet(patch, spacing, in_channels: int, num_classes: int):
    """nnU-Net's default 3d_fullres network for this patch (as ExperimentPlanner would configure it)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    axes, pools, kernels, patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n_stages = len(kernels)
    net = PlainConvUNet(in_channels, n_stages, [min(32 * 2 ** i, 320) for i in range(n_stages)], torch.nn.Conv3d,
                        kernels, pools, [2] * n_stages, num_classes, [2] * (n_stages - 1), conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return net, [int(p) for p in patch]


def build(name: str, patch, spacing, in_channels, num_classes):
    if name == "nnU-Net PlainConvUNet":
        return plain_conv_unet(patch, spacing, in_channels, num_classes)
    from nnunetv2_vf.architectures.pctnet import PCTNet, fit_patch_size
    feats = (24, 48, 128, 256, 512) if name == "PCT-Net (paper)" else (8, 16, 32, 64, 128)
    return PCTNet(in_channels, num_classes, features_per_stage=feats), fit_patch_size(patch, 1)


def _measure(name, patch, spacing, batch, repeats, device, queue):
    torch.manual_seed(0)
    net, patch = build(name, patch, spacing, 1, 3)
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, 1, *patch, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = sum(o.float().mean() for o in (out if isinstance(out, list) else [out]))
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, cudnn autotune)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # ru_maxrss is the process high-water mark in KiB (includes weights, optimizer, activations)
        peak_mb = max(rss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    queue.put(dict(name=name, patch=patch, params=params, seconds=statistics.median(times), peak_mb=peak_mb))


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
    if args.threads:
        torch.set_num_threads(args.threads)

    ctx = mp.get_context("spawn")
    rows = []
    for name in ("nnU-Net PlainConvUNet", "PCT-Net (paper)", "PCT-Net (small, 8-128)"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(name, args.patch, args.spacing, args.batch, args.repeats,
                                                   args.device, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    base = rows[0]
    print(f"\ndevice {args.device}, batch {args.batch}, requested patch {args.patch}, median of {args.repeats} "
          f"forward+backward+SGD steps; memory = {'CUDA max allocated' if args.device == 'cuda' else 'process peak RSS'}")
    print(f"{'network':26s} {'patch':>14s} {'params (M)':>10s} {'s/step':>8s} {'x time':>7s} {'peak MiB':>9s} "
          f"{'x mem':>6s}")
    for r in rows:
        print(f"{r['name']:26s} {str(r['patch']):>14s} {r['params'] / 1e6:10.2f} {r['seconds']:8.3f} "
              f"{r['seconds'] / base['seconds']:7.2f} {r['peak_mb']:9.0f} {r['peak_mb'] / base['peak_mb']:6.2f}")


if __name__ == "__main__":
    main()
