"""``nnUNetv2_vf_pretrain`` killed at any moment loses nothing: the real console script is SIGKILLed (seeded random
moments) and resumed with ``--continue`` until done; the weights equal an uninterrupted run's, no temporary file
and no augmentation worker survives."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nnunetv2_vf.workflow import console_script

TINY = ["--features", "8", "16", "32", "64", "128", "--patch-size", "16", "32", "32", "--batch-size", "2",
        "--modality", "MR", "--device", "cpu", "--val-every", "3", "--val-samples", "2", "--seed", "3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def images(tmp_path_factory, shared_dir) -> Path:
    folder = tmp_path_factory.mktemp("soak") / "images"
    folder.mkdir()
    for f in sorted((shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]:
        shutil.copy2(f, folder / f.name)
    return folder


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid`` or that were re-parented from it, via /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may contain spaces
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([console_script("nnUNetv2_vf_pretrain"), *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _tmp_files(*folders) -> list[str]:
    return [str(p) for d in folders for p in Path(d).rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_sigkill_leaves_no_augmentation_worker(images, tmp_path):
    proc = _start([images, "-o", tmp_path / "run", *TINY, "--iterations", "1000", "--num-workers", "2"])
    try:
        deadline = time.time() + 240
        while len(_children(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the augmentation workers never started"
            time.sleep(0.2)
        time.sleep(1.0)  # workers busy filling their queues
        workers = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gone_by = time.time() + 5
    while _alive(workers) and time.time() < gone_by:
        time.sleep(0.1)
    orphans = _alive(workers)
    for pid in orphans:  # do not leave them running on the test machine
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"orphaned augmentation workers: {orphans}"


@pytest.mark.slow
def test_random_sigkills_then_continue_equal_an_uninterrupted_run(images, tmp_path):
    start = time.time()
    args = ["--iterations", "6", "--save-every", "1", "--num-workers", "0", *TINY]
    reference = tmp_path / "reference"
    done = subprocess.run([console_script("nnUNetv2_vf_pretrain"), str(images), "-o", str(reference), *args],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_time = time.time() - start

    out = tmp_path / "killed"
    rng = random.Random(20261126)
    kills = []
    for _ in range(4):
        # a run killed before it recorded its configuration has nothing to resume: it is simply started again
        resume = ["--continue"] if (out / "config.json").exists() else []
        proc = _start([images, "-o", out, *args, *resume])
        delay = rng.uniform(1.0, run_time)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            children = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            time.sleep(0.5)
            assert not _alive(children), "processes outlived the killed run"
        latest = out / "checkpoint_latest.pth"
        kills.append((round(delay, 1), torch.load(latest, weights_only=True)["iteration"]
                      if latest.exists() else None, proc.returncode))
    resume = ["--continue"] if (out / "config.json").exists() else []
    final = subprocess.run([console_script("nnUNetv2_vf_pretrain"), str(images), "-o", str(out), *args, *resume],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"kills (seconds after start, checkpoint iteration, exit code): {kills}; "
          f"uninterrupted run {run_time:.0f} s, test {time.time() - start:.0f} s")

    ref = torch.load(reference / "checkpoint_final.pth", weights_only=True)["network_weights"]
    got = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert got["iteration"] == 6
    for k, v in ref.items():
        assert torch.equal(v, got["network_weights"][k]), k
    assert _tmp_files(out, reference) == []
    for checkpoint in out.glob("*.pth"):  # every checkpoint loads weights-only
        torch.load(checkpoint, weights_only=True)
    assert (out / "adaptation_plan.json").is_file()
