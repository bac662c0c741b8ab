"""Shared by the speed benchmarks: nnU-Net's default network for a patch (the baseline), and the time and memory
of one training step measured in a fresh process (so peak-memory numbers of different networks never mix).

``measure_training_step`` runs all repeats of one network in one child process; ``StepWorker`` keeps one child per
network alive and runs one step at a time, so that a benchmark can alternate the networks repeat by repeat
(interleaved: a slow-down of a shared machine hits every network alike)."""
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


class _HeapPeak:
    """Peak bytes malloc'd by this process (glibc ``mallinfo2``: arena bytes in use + mmapped chunks), sampled after
    every ATen op of the steps run inside it (a ``TorchDispatchMode``, forward and backward). Unlike the RSS
    high-water mark, it counts live allocations only, not pages glibc keeps after a free, so it is the same in
    every run: the CPU counterpart of ``torch.cuda.max_memory_allocated``."""

    def __init__(self):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                              "usmblks", "fsmblks", "uordblks", "fordblks",
                                                              "keepcost")]
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):  # not glibc >= 2.33
            self._mallinfo2 = None
        else:
            self._mallinfo2.restype = MallInfo2

    @property
    def available(self) -> bool:
        return self._mallinfo2 is not None

    def in_use(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def peak_during(self, fn: Callable[[], None]) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode
        heap = self

        class Sample(TorchDispatchMode):
            peak = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                Sample.peak = max(Sample.peak, heap.in_use())
                return out

        with Sample():
            fn()
        return Sample.peak


def _prepare(build: Callable, build_args: tuple, batch: int, device: str, threads, amp: str | None = None,
             compile_net: bool = False):
    """Build the network, its input and optimiser in this process; returns (step, info, rss_model)."""
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    net, patch = build(*build_args)
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, 1, *patch, device=device)  # all benchmarked networks take one channel
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model = torch.compile(net) if compile_net else net
    amp_dtype = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
            loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        loss.backward()
        opt.step()

    rss_model = _proc_status_mb("VmRSS")
    heap = _HeapPeak()
    heap_model = heap.in_use() if heap.available else 0
    step()  # warm-up (allocator, cudnn autotune, compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def timed_step() -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier one."""
        t, c = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - c

    def heap_peak_mb() -> float | None:
        """CPU: peak malloc'd bytes during one more (untimed) step above those with the model built: gradients,
        optimiser state, activations and temporaries (None off glibc, on CUDA or when compiled)."""
        if device != "cpu" or compile_net or not heap.available:
            return None
        return (heap.peak_during(step) - heap_model) / 2 ** 20

    return timed_step, dict(patch=list(patch), batch=batch, params=params), rss_model, heap_peak_mb


def _peak_mb(device: str, rss_model: float) -> float:
    # CUDA: max allocated; CPU: high-water RSS above the RSS with the model built (activations, gradients, optimiser)
    return (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
            else _proc_status_mb("VmHWM") - rss_model)


def _measure(build: Callable, build_args: tuple, batch: int, repeats: int, device: str, threads, queue) -> None:
    timed_step, info, rss_model, _ = _prepare(build, build_args, batch, device, threads)
    times = [timed_step()[0] for _ in range(repeats)]
    queue.put(dict(info, seconds=statistics.median(times), peak_mb=_peak_mb(device, rss_model)))


def _worker(build: Callable, build_args: tuple, batch: int, device: str, threads, amp, compile_net, conn) -> None:
    timed_step, info, rss_model, heap_peak_mb = _prepare(build, build_args, batch, device, threads, amp, compile_net)
    conn.send(info)
    while True:
        command = conn.recv()
        if command == "step":
            conn.send(timed_step())
        else:  # "peak": report (RSS / CUDA peak of the timed steps, then the heap peak of one more step) and exit
            conn.send((_peak_mb(device, rss_model), heap_peak_mb()))
            return


class StepWorker:
    """One network in its own (spawned) process, built and warmed up at construction; ``step()`` runs one timed
    forward+backward+AdamW step there and returns its (wall, CPU) seconds; ``peak_mb()`` returns the peak memory of
    all steps and ends the process. ``build(*build_args) -> (network, patch)`` must be a module-level function."""

    def __init__(self, build: Callable, build_args: tuple, batch: int, device: str, threads: int | None = None,
                 amp: str | None = None, compile_net: bool = False):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(build, build_args, batch, device, threads, amp, compile_net,
                                                       child), daemon=True)
        self._proc.start()
        self.info = self._conn.recv()

    def step(self) -> tuple[float, float]:
        self._conn.send("step")
        return self._conn.recv()

    def peak_mb(self) -> tuple[float, float | None]:
        """(RSS high-water mark above the built model, or CUDA max allocated; heap peak of one more step on CPU or
        None), and ends the process."""
        self._conn.send("peak")
        peaks = self._conn.recv()
        self._proc.join()
        return peaks


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


def code_version(repo) -> str:
    """The commit a measurement ran on (short hash), marked when the package or the benchmarks had uncommitted
    changes; "unknown" outside a git checkout."""
    import subprocess
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "nnunetv2_vf", "benchmarks"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head
