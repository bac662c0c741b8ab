"""The whole GPU check as one prepared command: writes ``gpu_check.md`` + ``gpu_check.json`` (default
``benchmarks/results/``), section by section, so a run cut short still leaves what it measured.

Sections (each one timed, its failure recorded with the exact error, the next one still run):
  precision    PCT-Net (paper configuration) forward/backward in fp32, bf16 autocast and fp16 autocast with
               GradScaler: outputs and gradients finite, relative differences to fp32; torch.compile on vs off
               (inductor; the CPU smoke run traces with aot_eager, which skips the C++ code generation).
  speed        training step time and peak GPU memory of PCT-Net vs nnU-Net's PlainConvUNet planned for the left
               atrium and vs the frozen pre-optimisation PCT-Net, same patch and batch, AMP as nnU-Net uses it
               (fp16 autocast + GradScaler), plus the current PCT-Net in bf16, bf16 with activation checkpointing and
               bf16 + torch.compile (the GPU targets): ratios, and the achieved fraction of the GPU's dense
               bf16 peak (FLOPs counted by torch.utils.flop_counter).
  pretrain     ``nnUNetv2_vf_pretrain`` on CUDA with the default workers: iterations per second and the fraction of
               step time spent waiting for data (goal < 5 %); then ``torchrun --nproc_per_node 1`` (NCCL DDP) trains
               and checkpoints.
  nnunet       nnU-Net end to end on CUDA with its defaults (torch.compile on): plan and preprocess the left atrium,
               ``nnUNetv2_train -tr PCTNetTrainer_2epochs``, ``nnUNetv2_predict``.
  vf_gain      in the minutes left: a mini VF-gain study (``pretraining_gain.py --setting gpu-mini``).

    python benchmarks/gpu_check.py --shared DIR_WITH_data            # on the GPU machine (about 10 minutes)
    python benchmarks/gpu_check.py --cpu-smoke                       # tiny sizes on CPU (CI): the script runs

On the project's borrowed GPU machine nnU-Net is not installed: the wheels from ``shared/gpu/fetch_wheels.sh`` are
unpacked to /tmp/site and ``PYTHONPATH=/tmp/site:$PWD``; console scripts that are not installed are started as
``python -c`` of their entry point (``nnunetv2_vf.workflow.command_line``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnunetv2_vf.architectures.pctnet_sizes import PAPER_FEATURES, SMALL_FEATURES  # noqa: E402

PAPER = list(PAPER_FEATURES)
SMALL = list(SMALL_FEATURES)
# dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity)
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def bf16_peak(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():  # most specific first
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return value
    return None


class Report:
    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.data = out_dir, {"meta": meta, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn, *args) -> dict:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            result = {"status": "ok", **fn(*args)}
        except Exception as e:  # a failed section is a finding: keep it and go on
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:4000],
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.time() - t0, 1)
        self.data["sections"][name] = result
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, indent=1, default=str)[:3000],
              flush=True)
        self.write()
        return result

    def write(self) -> None:
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out_dir / "gpu_check.md").write_text(to_markdown(self.data))


def to_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# GPU check — {meta['device_name']}", "",
             f"{meta['date']}, torch {meta['torch']}, CUDA {meta['cuda']}, Python {meta['python']}, "
             f"{'CPU smoke run (tiny sizes, no conclusions)' if meta['cpu_smoke'] else 'full check'}.", ""]
    for name, r in data["sections"].items():
        lines.append(f"## {name}: {r['status']} ({r['seconds']} s)")
        if r["status"] != "ok":
            lines += ["", "```", r["error"], "```", ""]
            continue
        for key, value in r.items():
            if key in ("status", "seconds", "rows"):
                continue
            lines.append(f"- {key}: {value}")
        if "rows" in r:
            header = list(r["rows"][0])
            lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_fmt(row[h]) for h in header) + " |" for row in r["rows"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- precision ----------------------------------------------------------------------------------------------------
def _forward_backward(net, x, dtype, scaler=None):
    net.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(o.float().square().mean() for o in outs)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(_DummyOpt(net))
    grads = torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])
    return outs[0].detach().float(), grads.detach()


class _DummyOpt(torch.optim.SGD):
    """GradScaler.unscale_ wants an optimiser; gradients are compared, never applied."""
    def __init__(self, net):
        super().__init__(net.parameters(), lr=0.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_precision(device: str, features, patch, batch: int, compile_backend: str | None) -> dict:
    if device != "cpu":
        return _check_precision(device, features, patch, batch, compile_backend)
    # the CPU smoke run: oneDNN's bf16 Conv3d weight gradients are nondeterministic in torch 2.14.1 (at times inf or
    # NaN at PCT-Net's deepest stage, with the same weights and input); ATen's own CPU kernels are not, so use them
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return {**_check_precision(device, features, patch, batch, compile_backend),
                "cpu kernels": "ATen (oneDNN off: its bf16 Conv3d weight gradients are nondeterministic)"}
    finally:
        torch.backends.mkldnn.enabled = enabled


def _check_precision(device: str, features, patch, batch: int, compile_backend: str | None) -> dict:
    from nnunetv2_vf.architectures.pctnet import PCTNet
    torch.manual_seed(0)
    net = PCTNet(1, 5, features_per_stage=features).to(device).eval()  # eval: no dropout, comparable runs
    x = torch.randn(batch, 1, *patch, device=device)
    ref_out, ref_grad = _forward_backward(net, x, None)
    rows = [{"mode": "fp32", "output rel. diff": 0.0, "grad rel. diff": 0.0, "finite": bool(
        torch.isfinite(ref_out).all() and torch.isfinite(ref_grad).all())}]
    modes = [("bf16 autocast", torch.bfloat16, False)]
    if device == "cuda":
        modes.append(("fp16 autocast + GradScaler", torch.float16, True))
    for label, dtype, scaled in modes:
        scaler = torch.amp.GradScaler(device) if scaled else None
        out, grad = _forward_backward(net, x, dtype, scaler)
        rows.append({"mode": label, "output rel. diff": _rel(out, ref_out), "grad rel. diff": _rel(grad, ref_grad),
                     "finite": bool(torch.isfinite(out).all() and torch.isfinite(grad).all())})
    result = {"network": f"PCT-Net features {list(features)}", "input": [batch, 1, *patch], "rows": rows}
    if compile_backend:
        compiled = torch.compile(net, backend=compile_backend)
        result["torch.compile backend"] = compile_backend
        t0 = time.time()
        out_c, grad_c = _forward_backward(compiled, x, None)
        result["compile (first call) s"] = round(time.time() - t0, 1)
        result["torch.compile vs eager: output rel. diff"] = _rel(out_c, ref_out)
        result["torch.compile vs eager: grad rel. diff"] = _rel(grad_c, ref_grad)
    return result


# ---- speed --------------------------------------------------------------------------------------------------------
def _train_step_factory(net, x, device: str, amp: str | None):
    """One AdamW training step; ``amp``: None, "fp16" (autocast + GradScaler, nnU-Net's) or "bf16" (autocast)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    use_amp = amp is not None and device == "cuda"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device) if use_amp and amp == "fp16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype, enabled=use_amp):
            outs = net(x)
            loss = sum(o.float().mean() for o in (outs if isinstance(outs, (list, tuple)) else [outs]))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return step


def _time_network(net, x, device: str, repeats: int, amp: str | None, compile_net: bool = False) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    model = torch.compile(net) if compile_net else net
    step = _train_step_factory(model, x, device, amp)
    if compile_net:
        step()  # compile outside the FLOP counter
    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    flops = counter.get_total_flops()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else float("nan")
    return {"s_per_step": float(np.median(times)), "peak_MiB": peak, "tflop_per_step": flops / 1e12,
            "params_M": params / 1e6}


def check_speed(device: str, features, patch, batch: int, repeats: int, device_name: str) -> dict:
    """nnU-Net's PlainConvUNet and the frozen pre-optimisation PCT-Net (``_pctnet_baseline.py``) with nnU-Net's fp16
    AMP, against the current PCT-Net with the same AMP, with bf16 autocast, with activation checkpointing, and (CUDA)
    with bf16 + ``torch.compile``: the GPU targets are the current network at <= 0.6x the frozen baseline's time and
    <= 1.5x PlainConvUNet's for the same region."""
    import _pctnet_baseline
    from _measure import nnunet_default_unet
    from nnunetv2_vf.architectures.pctnet import PCTNet, fit_patch_size
    patch = fit_patch_size(patch, 1)
    torch.manual_seed(0)
    unet, _, _, unet_patch = nnunet_default_unet(patch, [1.25, 1.25, 1.25])
    if list(unet_patch) != list(patch):
        raise RuntimeError(f"nnU-Net's planner changed the patch {patch} to {unet_patch}: choose a patch both accept")
    x = torch.randn(batch, 1, *patch, device=device)
    rows, peak = [], bf16_peak(device_name)
    runs = [("nnU-Net PlainConvUNet", lambda: unet, "fp16", False),
            ("PCT-Net frozen baseline", lambda: _pctnet_baseline.PCTNet(1, 2, features_per_stage=features), "fp16",
             False),
            ("PCT-Net", lambda: PCTNet(1, 2, features_per_stage=features), "fp16", False),
            ("PCT-Net checkpoint_blocks",
             lambda: PCTNet(1, 2, features_per_stage=features, checkpoint_blocks=True), "bf16", False)]
    if device == "cuda":  # on the CPU autocast is off (a bf16 row would repeat the fp32 one) and inductor compiles
        # for minutes and made steps slower (docs/pctnet_profile.md)
        runs += [("PCT-Net bf16", lambda: PCTNet(1, 2, features_per_stage=features), "bf16", False),
                 ("PCT-Net bf16 compiled", lambda: PCTNet(1, 2, features_per_stage=features), "bf16", True)]
    for name, make, amp, compile_net in runs:
        torch.manual_seed(0)
        net = make()
        r = _time_network(net, x, device, repeats, amp, compile_net)
        r["achieved TFLOP/s"] = r["tflop_per_step"] / r["s_per_step"]
        r["fraction of bf16 peak"] = r["achieved TFLOP/s"] / peak if peak else float("nan")
        rows.append({"network": name, "amp": amp if device == "cuda" else "none",
                     **{k: round(v, 4) for k, v in r.items()}})
        del net
        if device == "cuda":
            torch.cuda.empty_cache()
    by = {r["network"]: r for r in rows}
    base, frozen = by["nnU-Net PlainConvUNet"], by["PCT-Net frozen baseline"]
    best = min((r for r in rows if r["network"].startswith("PCT-Net") and r is not frozen
                and "checkpoint" not in r["network"]), key=lambda r: r["s_per_step"])
    result = {"patch x batch": f"{patch} x {batch}",
              "AMP": "per row: fp16 = autocast + GradScaler (nnU-Net's), bf16 = autocast" if device == "cuda"
              else "none (CPU)", "bf16 peak TFLOP/s": peak, "rows": rows,
              "PCT-Net / PlainConvUNet time": round(by["PCT-Net"]["s_per_step"] / base["s_per_step"], 3),
              "PCT-Net / frozen baseline time (same AMP)": round(by["PCT-Net"]["s_per_step"] / frozen["s_per_step"], 3),
              "fastest PCT-Net": best["network"],
              "fastest PCT-Net / frozen baseline time (target <= 0.6)": round(best["s_per_step"] / frozen["s_per_step"],
                                                                             3),
              "fastest PCT-Net / PlainConvUNet time (target <= 1.5)": round(best["s_per_step"] / base["s_per_step"],
                                                                           3)}
    if device == "cuda":
        result["PCT-Net / PlainConvUNet memory"] = round(by["PCT-Net"]["peak_MiB"] / base["peak_MiB"], 3)
        result["PCT-Net checkpoint_blocks (bf16) / PlainConvUNet memory (target <= 2)"] = round(
            by["PCT-Net checkpoint_blocks"]["peak_MiB"] / base["peak_MiB"], 3)
    else:
        result["PCT-Net / PlainConvUNet memory"] = "n/a on CPU"
    return result


# ---- pretraining on the device ----------------------------------------------------------------------------------
def check_pretrain(device: str, data: Path, work: Path, iterations: int, patch, batch: int, features,
                   workers: int, ddp: bool) -> dict:
    from nnunetv2_vf.workflow import run_nnunet
    work.mkdir(parents=True, exist_ok=True)
    images = data / "imagesTr"
    common = ["--batch-size", batch, "--patch-size", *patch, "--features", *features, "--modality", "MR",
              "--device", device, "--num-workers", workers, "--val-every", max(2, iterations // 2),
              "--val-samples", 2, "--lr-step", 1000]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    run_nnunet(["nnUNetv2_vf_pretrain", images, "-o", work / "single", "--iterations", iterations, *common], env,
               log_file=work / "pretrain.log", echo=False)
    wall = time.time() - t0
    log = (work / "single" / "training_log.txt").read_text()
    rate = re.findall(r"([0-9.]+) it/s", log)
    wait = re.findall(r"data wait ([0-9.]+) ?%", log)
    result = {"iterations": iterations, "wall s (incl. start-up, preprocessing)": round(wall, 1),
              "iterations per second (logged)": float(rate[-1]) if rate else "not logged",
              "data wait % of step time (logged)": float(wait[-1]) if wait else "not logged",
              "workers": workers}
    if ddp:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--module",
                    "nnunetv2_vf.pretrain.cli"]
        import subprocess
        proc = subprocess.run([*launcher, str(images), "-o", str(work / "ddp"), "--iterations", "4",
                               *map(str, common)], env=env, capture_output=True, text=True, timeout=900)
        ok = proc.returncode == 0 and (work / "ddp" / "checkpoint_final.pth").is_file()
        backend = re.findall(r"backend[ =:]+(\w+)", proc.stdout + proc.stderr)
        result["torchrun DDP trained and checkpointed"] = ok
        result["DDP backend (logged)"] = backend[-1] if backend else ("nccl" if device == "cuda" else "gloo")
        if not ok:
            raise RuntimeError(f"torchrun pretraining failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return result


# ---- nnU-Net end to end -------------------------------------------------------------------------------------------
def check_nnunet(device: str, data: Path, work: Path, n_cases: int, trainer: str, compile_on: bool) -> dict:
    from nnunetv2_vf.workflow import make_subset_dataset, nnunet_environment, run_nnunet
    env = nnunet_environment(work, n_proc=4, extra={"nnUNet_compile": "t" if compile_on else "f",
                                                   "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "8")})
    if device == "cpu":
        env["nnUNet_n_proc_DA"] = "0"
    raw = make_subset_dataset(data, env["nnUNet_raw"], 910, "GPUCheck", n_cases)
    timings = {}
    t0 = time.time()
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", 910, "-c", "3d_fullres", "-np", 4], env,
               log_file=work / "nnunet.log", echo=False)
    timings["plan_and_preprocess s"] = round(time.time() - t0, 1)
    t0 = time.time()
    log = run_nnunet(["nnUNetv2_train", 910, "3d_fullres", 0, "-tr", trainer, "-device", device], env,
                     log_file=work / "nnunet.log", echo=False)
    timings["train s"] = round(time.time() - t0, 1)
    epoch_times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    summary = next(Path(env["nnUNet_results"]).glob(f"*/{trainer}__*/fold_0/validation/summary.json"))
    dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    images = work / "predict_in"
    images.mkdir(exist_ok=True)
    for f in sorted((raw / "imagesTr").iterdir())[:2]:
        (images / f.name).write_bytes(f.read_bytes())
    t0 = time.time()
    run_nnunet(["nnUNetv2_predict", "-i", images, "-o", work / "predict_out", "-d", 910, "-c", "3d_fullres",
                "-tr", trainer, "-f", 0, "-device", device], env, log_file=work / "nnunet.log", echo=False)
    timings["predict 2 cases s"] = round(time.time() - t0, 1)
    n_pred = len(list((work / "predict_out").glob("*.nii.gz")))
    if n_pred != 2:
        raise RuntimeError(f"nnUNetv2_predict wrote {n_pred} of 2 predictions")
    return {"trainer": trainer, "cases": n_cases, "torch.compile": compile_on, **timings,
            "epoch times s": epoch_times, "validation Dice (foreground mean)": round(dice, 4),
            "compile used (logged)": "Using torch.compile" in log}


def check_vf_gain(setting: str, shared: Path, work: Path, device: str) -> dict:
    import subprocess
    script = Path(__file__).resolve().parent / "pretraining_gain.py"
    proc = subprocess.run([sys.executable, str(script), "--setting", setting, "--device", device, "--shared",
                           str(shared), "--workdir", str(work), "--results-dir", str(work / "results")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-1500:] + proc.stderr[-1500:])
    lines = [l for l in proc.stdout.splitlines() if "labelled:" in l]
    return {"setting": setting, "result lines": lines,
            "report": (work / "results" / f"pretraining_gain_{setting}.md").read_text()[:3000]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"),
                   help="folder holding data/Dataset010_LeftAtrium (default: ../shared beside the checkout)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="report folder (default: %(default)s)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary folder)")
    p.add_argument("--sections", nargs="+", default=["precision", "speed", "pretrain", "nnunet", "vf_gain"],
                   help="which sections to run (default: all)")
    p.add_argument("--deadline-s", type=float, default=540,
                   help="skip sections that would start after this many seconds (default: %(default)s)")
    args = p.parse_args()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --cpu-smoke")
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    meta = {"device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "python":
            platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_smoke": smoke}
    out = Path(args.out) / ("gpu_check_cpu_smoke" if smoke else "")
    report = Report(out, meta)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    data = Path(args.shared) / "data" / "Dataset010_LeftAtrium"
    t_start = time.time()
    plan = {
        "precision": (check_precision, device, SMALL if smoke else PAPER, [16, 32, 32] if smoke else [64, 128, 128],
                      1 if smoke else 2, "aot_eager" if smoke else "inductor"),
        "speed": (check_speed, device, SMALL if smoke else PAPER, [16, 32, 32] if smoke else [48, 96, 96],
                  1 if smoke else 2, 2 if smoke else 20, name),
        "pretrain": (check_pretrain, device, data, work / "pretrain", 4 if smoke else 300,
                     # the paper's patch and batch 2 with the default 4 workers: the real data wait on a GPU
                     [16, 32, 32] if smoke else [64, 128, 128], 2, SMALL if smoke else PAPER,
                     0 if smoke else 4, True),
        "nnunet": (check_nnunet, device, data, work / "nnunet", 6 if smoke else 40,
                   "PCTNetTrainer_small_2epochs" if smoke else "PCTNetTrainer_2epochs", not smoke),
        "vf_gain": (check_vf_gain, "smoke" if smoke else "gpu-mini", Path(args.shared), work / "vf_gain", device),
    }
    for section in args.sections:
        if time.time() - t_start > args.deadline_s:
            report.data["sections"][section] = {"status": "skipped (deadline)", "error": "not started: deadline",
                                                "seconds": 0}
            report.write()
            continue
        fn, *fn_args = plan[section]
        report.section(section, fn, *fn_args)
    print(f"report: {out / 'gpu_check.md'}")
    failed = [s for s, r in report.data["sections"].items() if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"failed sections: {failed} (see {out / 'gpu_check.md'})")


if __name__ == "__main__":
    main()
