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
import multiprocessing as mp
import resource
import statistics
import time

import torch


def nnunet_topology(patch, dim: int):
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pools, kernels, patch, _ = get_pool_and_conv_props([1.0] * dim, patch, 4, 999999)
    return [list(p) for p in pools], [list(k) for k in kernels], [int(p) for p in patch]


def build(name: str, patch, encoder: str):
    dim = 2 if "2D" in name else 3
    strides, kernels, patch = nnunet_topology(patch, dim)
    if name.startswith("nnU-Net"):
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        n = len(strides)
        conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dim == 2 else (torch.nn.Conv3d,
                                                                                  torch.nn.InstanceNorm3d)
        net = PlainConvUNet(1, n, [min(32 * 2 ** i, 512 if dim == 2 else 320) for i in range(n)], conv, kernels,
                            strides, [2] * n, 3, [2] * (n - 1), conv_bias=True, norm_op=norm,
                            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                            nonlin_kwargs={"inplace": True}, deep_supervision=True)
    elif name.startswith("EncoderUNet2D"):
        from nnunetv2_vf.architectures.encoder_unet import EncoderUNet2D
        net = EncoderUNet2D(1, 3, strides, encoder, deep_supervision=True)
    elif name.startswith("EncoderUNet3D"):
        from nnunetv2_vf.architectures.encoder_unet import EncoderUNet3D
        net = EncoderUNet3D(1, 3, strides, kernels, encoder, deep_supervision=True)
    else:
        from nnunetv2_vf.architectures.encoder_unet import DepthStackUNet
        net = DepthStackUNet(1, 3, strides, patch, encoder)
    return net, patch


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _measure(name, patch, batch, encoder, repeats, device, queue):
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, patch = build(name, patch, encoder)
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, 1, *patch, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = sum(o.float().mean() for o in (out if isinstance(out, list) else [out]))
        loss.backward()
        opt.step()

    rss_model = _proc_status_mb("VmRSS")
    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # CPU: high-water RSS minus RSS with the model built (= gradients, optimiser state and activations)
    peak_mb = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
               else _proc_status_mb("VmHWM") - rss_model)
    queue.put(dict(name=name, patch=patch, batch=batch, params=params, seconds=statistics.median(times),
                   peak_mb=peak_mb))


def run_one(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
    print(f"device {args.device}, encoder {args.encoder}, {args.repeats} timed steps (median), fresh process each")
    groups = [("2D", tuple(args.patch2d), args.batch2d, ["nnU-Net PlainConvUNet 2D", "EncoderUNet2D"])]
    if not args.skip_3d:
        groups.append(("3D", tuple(args.patch3d), args.batch3d,
                       ["nnU-Net PlainConvUNet 3D", "EncoderUNet3D (DX-Net)", "DepthStackUNet 3D (DS-Net)"]))
    print(f"{'network':30s} {'patch':>14s} {'batch':>5s} {'params(M)':>9s} {'s/step':>8s} {'peak MB':>8s} "
          f"{'time ratio':>10s} {'mem ratio':>9s}")
    for _, patch, batch, names in groups:
        base = None
        for name in names:
            r = run_one(name, patch, batch, args.encoder, args.repeats, args.device)
            base = base or r
            print(f"{name:30s} {str(tuple(r['patch'])):>14s} {batch:5d} {r['params'] / 1e6:9.2f} "
                  f"{r['seconds']:8.3f} {r['peak_mb']:8.0f} {r['seconds'] / base['seconds']:10.2f} "
                  f"{r['peak_mb'] / base['peak_mb']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
