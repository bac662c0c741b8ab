"""Training-step time and peak memory of PCT-Net against its frozen pre-optimisation copy and nnU-Net's planned
PlainConvUNet, measured in one run, interleaved.

Networks (each in its own process, so peak-memory numbers do not mix; the steps alternate between the networks,
one step each per round with the order rotated every round, so a slow-down of a shared machine hits all alike):

* nnU-Net's PlainConvUNet, the network nnU-Net's default planner builds for this patch and spacing (``_measure.py``);
* PCT-Net as of 2026-11-26 before the speed work, frozen in ``_pctnet_baseline.py`` (same weights layout);
* the plugin's PCT-Net (``nnunetv2_vf.architectures.pctnet``);
* the plugin's PCT-Net with ``checkpoint_blocks=True`` (activation checkpointing: less memory, more time).

PCT-Net runs on the same patch rounded up to its strides (8, 16, 16). A step is forward + backward + AdamW, in
training mode (dropout on); the time is the median over the repeats after one warm-up step.

    python benchmarks/pctnet_speed.py --threads 1                  # CPU-sized: hippocampus patch, batch 2
    python benchmarks/pctnet_speed.py --device cuda --patch 64 128 128 --batch 2 --repeats 20 --amp bf16
    python benchmarks/pctnet_speed.py --device cuda --patch 64 128 128 --compile
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _measure import StepWorker, memory_label, nnunet_default_unet

from nnunetv2_vf.architectures.pctnet_sizes import PAPER_FEATURES, SMALL_FEATURES

NNUNET, BASELINE, PCTNET, CHECKPOINTED = ("nnU-Net PlainConvUNet", "PCT-Net frozen baseline", "PCT-Net",
                                          "PCT-Net checkpoint_blocks")
NETWORKS = (NNUNET, BASELINE, PCTNET, CHECKPOINTED)
FEATURES = {"paper": PAPER_FEATURES, "small": SMALL_FEATURES}


def build(name: str, patch, spacing, features: str = "paper"):
    if name == NNUNET:
        net, _, _, patch = nnunet_default_unet(patch, spacing)
        return net, patch
    if name == BASELINE:
        import _pctnet_baseline as pctnet
    else:
        from nnunetv2_vf.architectures import pctnet
    kwargs = {"checkpoint_blocks": True} if name == CHECKPOINTED else {}
    return (pctnet.PCTNet(1, 3, features_per_stage=FEATURES[features], **kwargs),
            pctnet.fit_patch_size(patch, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40], help="D H W (default: nnU-Net's "
                        "hippocampus 3d_fullres patch; the paper's is 64 128 128)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per network (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--features", choices=sorted(FEATURES), default="paper",
                        help="PCT-Net width: the paper's 24-48-128-256-512 or a small 8-128")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="autocast dtype for the forward pass (bf16 also works on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every network (slow first step)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS), metavar="NAME",
                        help=f"subset of {list(NETWORKS)}")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="instead: torch.profiler of one training step (after a warm-up) of the frozen baseline "
                             "and of PCT-Net, top ROWS ops by self CPU time")
    args = parser.parse_args(argv)
    if args.profile:
        return profile(args)

    print(f"device {args.device}, batch {args.batch}, requested patch {args.patch}, {args.threads or 'default'} "
          f"thread(s), amp {args.amp}, compile {args.compile}, PCT-Net features {FEATURES[args.features]}; median "
          f"of {args.repeats} interleaved forward+backward+AdamW steps; memory = {memory_label(args.device)}",
          flush=True)
    workers = {name: StepWorker(build, (name, args.patch, args.spacing, args.features), args.batch, args.device,
                                args.threads, args.amp, args.compile) for name in args.networks}
    times = {name: [] for name in workers}
    names = list(workers)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            times[name].append(workers[name].step())
    results = {}
    for name, worker in workers.items():
        peak_mb, heap_mb = worker.peak_mb()
        results[name] = dict(worker.info, seconds=statistics.median(t[0] for t in times[name]),
                             cpu_seconds=statistics.median(t[1] for t in times[name]), peak_mb=peak_mb,
                             heap_mb=heap_mb)
    heap = all(r["heap_mb"] is not None for r in results.values())

    def ratio(name, ref, key):
        return f"{results[name][key] / results[ref][key]:.2f}" if ref in results else "-"

    memory = [("peak_mb", "peak MiB")] + ([("heap_mb", "heap MiB")] if heap else [])
    print("s/step = median wall time; cpu s = median CPU time of the network's process (steadier when other jobs "
          "share the machine); x nnU-Net / x frozen = ratios to nnU-Net's network / to the frozen PCT-Net"
          + ("; heap MiB = peak malloc'd bytes above the built model during one more step, sampled after every "
             "ATen op (deterministic, unlike RSS)" if heap else ""))
    print(f"{'network':26s} {'patch':>12s} {'params (M)':>10s} {'s/step':>7s} {'x nnU-Net':>9s} {'x frozen':>8s} "
          f"{'cpu s':>7s} {'x frozen':>8s}" + "".join(f" {label:>8s} {'x nnU-Net':>9s} {'x frozen':>8s}"
                                                      for _, label in memory))
    for name, r in results.items():
        print(f"{name:26s} {'x'.join(map(str, r['patch'])):>12s} {r['params'] / 1e6:10.2f} {r['seconds']:7.2f} "
              f"{ratio(name, NNUNET, 'seconds'):>9s} {ratio(name, BASELINE, 'seconds'):>8s} {r['cpu_seconds']:7.2f} "
              f"{ratio(name, BASELINE, 'cpu_seconds'):>8s}"
              + "".join(f" {r[key]:8.0f} {ratio(name, NNUNET, key):>9s} {ratio(name, BASELINE, key):>8s}"
                        for key, _ in memory))
    print("per-step wall seconds: " + "; ".join(f"{n}: " + ", ".join(f"{t[0]:.2f}" for t in ts)
                                               for n, ts in times.items()))
    return results


def profile(args):
    """Top ops by self CPU time of one forward+backward step, frozen baseline vs PCT-Net, in this process."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = {}
    for name in (BASELINE, PCTNET):
        torch.manual_seed(0)
        net, patch = build(name, args.patch, args.spacing, args.features)
        net = net.to(args.device).train()
        x = torch.randn(args.batch, 1, *patch, device=args.device)

        def step():
            out = net(x)
            sum(o.float().mean() for o in out).backward()

        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.profile]
        tables[name] = (total, rows)
        print(f"\n{name}: patch {patch}, batch {args.batch}, {torch.get_num_threads()} thread(s), self CPU total "
              f"{total / 1e6:.2f} s")
        print(f"| {'op':<42} | {'self CPU s':>10} | {'%':>5} | {'calls':>5} |")
        print(f"|{'-' * 44}|{'-' * 11}:|{'-' * 6}:|{'-' * 6}:|")
        for e in rows:
            print(f"| {e.key[:42]:<42} | {e.self_cpu_time_total / 1e6:>10.3f} | "
                  f"{100 * e.self_cpu_time_total / total:>5.1f} | {e.count:>5d} |")
    return tables


if __name__ == "__main__":
    main()
