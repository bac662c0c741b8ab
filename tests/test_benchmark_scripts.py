"""The benchmark scripts run (tiny sizes, CPU): the GPU check's --cpu-smoke (every section, including a smoke-sized
pretraining-gain study) and the ImageNet-initialisation study. They measure nothing here; they must not rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args, env_extra=None, timeout=1500):
    import os
    env = dict(os.environ, OMP_NUM_THREADS="2", **(env_extra or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path, shared_dir):
    _run([REPO / "benchmarks" / "gpu_check.py", "--cpu-smoke", "--shared", shared_dir, "--out", tmp_path,
          "--work", tmp_path / "work", "--deadline-s", 100000])
    report = json.loads((tmp_path / "gpu_check_cpu_smoke" / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"precision", "speed", "pretrain", "nnunet", "vf_gain"}
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    rows = {r["mode"]: r for r in sections["precision"]["rows"]}
    assert rows["fp32"]["finite"] and rows["bf16 autocast"]["finite"]
    assert rows["bf16 autocast"]["output rel. diff"] < 0.1  # bf16 keeps ~3 significant digits
    assert rows["bf16 autocast"]["grad rel. diff"] < 0.1  # not the garbage of a broken bf16 backward kernel
    assert sections["precision"]["torch.compile vs eager: output rel. diff"] < 1e-4
    assert sections["speed"]["PCT-Net / PlainConvUNet time"] > 0
    assert sections["speed"]["fastest PCT-Net / frozen baseline time (target <= 0.6)"] > 0
    assert {r["network"] for r in sections["speed"]["rows"]} >= {"PCT-Net frozen baseline", "PCT-Net checkpoint_blocks"}
    assert sections["pretrain"]["torchrun DDP trained and checkpointed"] is True
    assert isinstance(sections["pretrain"]["data wait % of step time (logged)"], float)
    assert 0 <= sections["nnunet"]["validation Dice (foreground mean)"] <= 1
    assert "paired difference" in sections["vf_gain"]["report"]
    assert "# GPU check" in (tmp_path / "gpu_check_cpu_smoke" / "gpu_check.md").read_text()


def test_imagenet_init_study_smoke(tmp_path, shared_dir):
    out = _run([REPO / "benchmarks" / "imagenet_init_accuracy.py", "--setting", "smoke", "--shared", shared_dir,
                "--workdir", tmp_path / "work", "--results-dir", tmp_path / "results"])
    result = json.loads((tmp_path / "results" / "imagenet_init_smoke.json").read_text())
    pairs = {(c["treatment"], c["control"]) for c in result["comparisons"]}
    assert pairs == {("imagenet", "random"), ("imagenet_inflated", "random"), ("from_2d", "random")}
    assert all(c["n_seeds"] == 1 and c["n_cases"] == 3 for c in result["comparisons"])
    assert (tmp_path / "results" / "imagenet_init_smoke_2d_curves.png").stat().st_size > 0
    assert "ImageNet" in out or "imagenet" in out


def test_pctnet_speed_benchmark_smoke():
    """pctnet_speed.py runs the four networks (small PCT-Net, tiny patch) and reports the deterministic heap peak:
    activation checkpointing must need less memory than the same network without it, and the current PCT-Net no
    more than its frozen pre-optimisation copy (it saves fewer attention tensors)."""
    out = _run([REPO / "benchmarks" / "pctnet_speed.py", "--features", "small", "--patch", 16, 32, 32,
                "--repeats", 1, "--threads", 1])
    rows = {}
    for line in out.splitlines():
        for name in ("nnU-Net PlainConvUNet", "PCT-Net frozen baseline", "PCT-Net checkpoint_blocks", "PCT-Net"):
            if line.startswith(name + " "):
                rows[name] = line[len(name):].split()
                break
    assert set(rows) == {"nnU-Net PlainConvUNet", "PCT-Net frozen baseline", "PCT-Net", "PCT-Net checkpoint_blocks"}
    heap = {name: float(cols[-3]) for name, cols in rows.items()}  # heap MiB, x nnU-Net, x frozen
    assert heap["PCT-Net checkpoint_blocks"] < heap["PCT-Net"] <= heap["PCT-Net frozen baseline"]
    assert rows["nnU-Net PlainConvUNet"][-2] == "1.00" and rows["PCT-Net frozen baseline"][-1] == "1.00"


def test_head_start_study_help_and_analysis():
    """head_start.py: --help names its settings and arms (the smoke setting takes several minutes on CPU, so it is
    not run here); its flatness check and leak check on small inputs."""
    out = _run([REPO / "benchmarks" / "head_start.py", "--help"], timeout=300)
    assert "--setting {converged,cpu,smoke}" in out and "pretrained_peakLr1em4" in out and "--report-only" in out
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import head_start
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rising = [[0.1 * e for e in range(10)]] * 3
    flat = [[0.5] * 8 + [0.51, 0.5], [0.6] * 10]
    assert not head_start.flatness(rising)["flat"] and head_start.flatness(flat)["flat"]
    assert head_start.flatness([[0.3]]) is None  # one epoch: nothing to judge
    assert head_start.flatness(rising)["window_epochs"] == 2
    from nnunetv2_vf.trainers import seeded
    for trainer in {t for setting in head_start.SETTINGS.values() for t in setting["budgets"].values()}:
        for suffix, _ in head_start.ARMS.values():  # every budget trainer and recipe exists, seeded
            assert hasattr(seeded, f"{trainer}{suffix}_seed4"), f"{trainer}{suffix}_seed4"


def test_demo_step_times_reads_finished_demos_into_the_table_shape(tmp_path):
    """benchmarks/demo_step_times.py turns the timings.json of finished demo runs into the table the demo reads."""
    from nnunetv2_vf import demo
    folders = []
    for mode, scale in (("quick", 1.0), ("default", 3.0)):
        folder = tmp_path / mode
        folder.mkdir()
        seconds = {k: round(v * scale, 1) for k, v in demo.step_time_estimates()["quick"].items()}
        (folder / "timings.json").write_text(json.dumps({"mode": mode, "seconds": seconds,
                                                          "steps": [[k, v] for k, v in seconds.items()]}))
        folders.append(folder)
    out = tmp_path / "result.json"
    _run(["benchmarks/demo_step_times.py", "--from-output", *folders, "--results", out, "--no-write-table"])
    result = json.loads(out.read_text())
    assert result["default"] == {k: round(v * 3.0, 1) for k, v in demo.step_time_estimates()["quick"].items()}
    assert set(result) >= {"quick", "default", "source", "runs"}
    swapped = subprocess.run([sys.executable, "benchmarks/demo_step_times.py", "--from-output", str(folders[1]),
                              str(folders[0]), "--results", str(out), "--no-write-table"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert swapped.returncode != 0 and "expected quick" in swapped.stderr


def test_pretrain_scale_benchmark_smoke(tmp_path):
    """pretrain_scale.py at 300 volumes: the compressed cache is at most 2 bytes/voxel (the .npy baseline 4), a
    restart on the filled cache reads no volume again, and the training run on it preprocesses nothing."""
    _run([REPO / "benchmarks" / "pretrain_scale.py", "--volumes", "300", "--results-dir", tmp_path], timeout=900)
    result = json.loads((tmp_path / "pretrain_scale_cpu.json").read_text())
    sizes = result["cache_bytes_per_voxel"]
    assert all(v <= 2.0 for k, v in sizes.items() if ".b2nd" in k), sizes
    baseline = [v for k, v in sizes.items() if k.startswith("baseline")]
    assert all(v >= 4.0 for v in baseline)  # float32 .npy (+ its header), when git history is there to run it
    assert result["training_preprocessed_nothing"] is True
    assert result["rows"]["this code: restart on the filled cache"]["volumes"] == 300
    assert result["first_iteration_s"] > 0 and result["first_iteration_rss_mb"] > 0


def test_pretrain_data_rate_benchmark_smoke(tmp_path, shared_dir):
    """pretrain_data_rate.py at a tiny size: every (data, cache, variant, reads) row and the measured waits."""
    _run([REPO / "benchmarks" / "pretrain_data_rate.py", "--smoke", "--shared", shared_dir, "--results-dir",
          tmp_path], timeout=900)
    result = json.loads((tmp_path / "pretrain_data_rate_cpu.json").read_text())
    assert len(result["rows"]) == 3 * 2 * 2 * 2 and len(result["waits"]) == 3 * 2  # data x cache x variant x reads
    assert all(r["samples_per_s_per_worker"] > 0 and r["workers_needed"] >= 1 for r in result["rows"])
    assert all(r["bytes_per_voxel"] <= 2.0 for r in result["rows"] if r["cache"] == "b2nd")
    assert all(0 <= w["wait_percent"] <= 100 for w in result["waits"])
