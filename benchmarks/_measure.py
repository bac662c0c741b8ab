"""Shared by the speed benchmarks: nnU-Net's default network for a patch (the baseline), and the time and memory
of one training step measured in a fresh process (so peak-memory numbers of different networks never mix)."""
from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from typing import Callable, Sequence

import torch


def nnunet_default_unet(patch: Sequence[int], spacing: Sequence[float] | None = None, in_channels: int = 1,
                        num_classes: int = 3):
    """The PlainConvUNet nnU-Net's default planner builds for this patch and spacing (``get_pool_and_conv_props``,
    32 features doubling to 320 in 3D / 512 in 2D, two convs per stage, instance norm, leaky ReLU).

    Returns ``(network, strides, kernel_sizes, patch)``; the patch is the planner's (divisible by the strides)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    dim = len(patch)
    spacing = [1.0] * dim if spacing is None else list(spacing)
    _, pools, kernels, patch, _ = get_pool_and_conv_props(spacing, list(patch), 4, 999999)
    n = len(kernels)
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    net = PlainConvUNet(in_channels, n, [min(32 * 2 ** i, 512 if dim == 2 else 320) for i in range(n)], conv, kernels,
                        pools, [2] * n, num_classes, [2] * (n - 1), conv_bias=True, norm_op=norm,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return net, [list(p) for p in pools], [list(k) for k in kernels], [int(p) for p in patch]


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(build: Callable, build_args: tuple, batch: int, repeats: int, device: str, threads, queue) -> None:
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    net, patch = build(*build_args)
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, 1, *patch, device=device)  # all benchmarked networks take one channel
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        loss.backward()
        opt.step()

    rss_model = _proc_status_mb("VmRSS")
    step()  # warm-up (allocator, cudnn autotune)
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
    # CUDA: max allocated; CPU: high-water RSS above the RSS with the model built (activations, gradients, optimiser)
    peak_mb = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
               else _proc_status_mb("VmHWM") - rss_model)
    queue.put(dict(patch=list(patch), batch=batch, params=params, seconds=statistics.median(times), peak_mb=peak_mb))


def measure_training_step(build: Callable, build_args: tuple, batch: int, repeats: int, device: str,
                          threads: int | None = None) -> dict:
    """Median seconds of ``repeats`` forward+backward+AdamW steps after one warm-up step, and peak memory, for the
    network ``build(*build_args) -> (network, patch)`` (a module-level function: it is pickled into the child)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(build, build_args, batch, repeats, device, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def memory_label(device: str) -> str:
    return "CUDA max allocated" if device == "cuda" else "peak RSS above the built model"
