"""No command replaces a file it did not create in this call (one guard, ``checkpoint_io.refuse_overwrite``), nnU-Net's
own plans are never replaced, and a pretraining folder has one writer (``checkpoint_io.RunLock``). Every refusal is
checked through the real console script: exit code, the message's last line, and the checksums of every file in
the folders involved before and after."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunetv2_vf.architectures.pctnet import PCTNet, table_layout_record
from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES
from nnunetv2_vf.checkpoint_io import FolderInUse, RunLock
from nnunetv2_vf.pretrain.adaptation_plan import AdaptationPlan
from nnunetv2_vf.workflow import console_script

SMALL = SMALL_FEATURES
DATASET = "Dataset777_TwoChannels"


def checksums(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(Path(f).rglob("*"))
            if p.is_file()}


def run(script: str, *args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([console_script(script), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env, stdin=subprocess.DEVNULL)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or [""])[-1]


def _pretraining(folder: Path, seed: int = 0) -> Path:
    """A small single-channel pretraining output: checkpoint_final.pth + adaptation_plan.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = PCTNet(1, 5, features_per_stage=SMALL)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetv2_vf_pretrain",
                **table_layout_record(net.state_dict())}, folder / "checkpoint_final.pth")
    AdaptationPlan.for_network(
        {"network_class_name": f"{PCTNet.__module__}.{PCTNet.__name__}",
         "arch_kwargs": {"features_per_stage": list(SMALL), "resolution_mode": 1, "strides": None},
         "_kw_requires_import": []},
        pretrain_num_input_channels=1, patch_size=[16, 32, 32], recommended_downstream_patchsize=[16, 32, 32],
        weights_file="checkpoint_final.pth", trainer_name="nnUNetv2_vf_pretrain",
        preprocessing={"spacing": None, "normalization": "MR", "nnunet_normalization_scheme": "ZScoreNormalization",
                       "intensity_properties": None, "ct_window": None}).save(folder / "adaptation_plan.json")
    return folder


@pytest.fixture
def preprocessed(two_channel_preprocessed) -> Path:
    return two_channel_preprocessed


def test_convert_misfm_keeps_an_existing_run_and_announces_both_files(shared_dir, tmp_path):
    fixture = shared_dir / "fixtures" / "pctnet" / "pctnet_public_checkpoint.pt"
    run_dir = _pretraining(tmp_path / "vf_run")
    before = checksums(run_dir)
    proc = run("nnUNetv2_vf_convert_misfm", fixture, run_dir / "checkpoint_final.pth", "--features", *SMALL)
    assert proc.returncode != 0
    assert last_line(proc) == "Fix: give an output file in a new folder (the converted weights and their " \
                              "adaptation_plan.json belong together), or pass --overwrite to replace them."
    assert str(run_dir / "checkpoint_final.pth") in proc.stderr and str(run_dir / "adaptation_plan.json") in proc.stderr
    assert checksums(run_dir) == before and sorted(p.name for p in run_dir.iterdir()) == [
        "adaptation_plan.json", "checkpoint_final.pth"]
    new = tmp_path / "misfm" / "weights.pth"
    ok = run("nnUNetv2_vf_convert_misfm", fixture, new, "--features", *SMALL)
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {new}" in ok.stdout and f"wrote {new.parent / 'adaptation_plan.json'}" in ok.stdout
    assert AdaptationPlan.load(new.parent).weights_file == "weights.pth"
    again = run("nnUNetv2_vf_convert_misfm", fixture, run_dir / "checkpoint_final.pth", "--features", *SMALL,
                "--overwrite")
    assert again.returncode == 0 and AdaptationPlan.load(run_dir).weights_file == "checkpoint_final.pth"
    assert checksums(run_dir) != before  # replaced, as asked


def test_adapt_plans_refuses_nnunets_own_plans_even_with_overwrite(preprocessed, tmp_path):
    run_dir = _pretraining(tmp_path / "vf_run")
    before = checksums(preprocessed, run_dir)
    env = {"nnUNet_preprocessed": str(preprocessed)}
    for extra in ([], ["--overwrite"]):
        proc = run("nnUNetv2_vf_adapt_plans", "-d", DATASET, "-a", run_dir / "adaptation_plan.json", "-p",
                   "nnUNetPlans", *extra, env_extra=env)
        assert proc.returncode != 0
        assert "-p nnUNetPlans names nnU-Net's own plans" in proc.stderr
        assert last_line(proc).endswith("train with that -p."), proc.stderr
    same = run("nnUNetv2_vf_adapt_plans", "-d", DATASET, "-a", run_dir / "adaptation_plan.json", "-sp", "mine",
               "-p", "mine", env_extra=env)
    assert same.returncode != 0 and "also the plans adapted from (-sp)" in last_line(same)
    assert checksums(preprocessed, run_dir) == before


def test_adapt_plans_keeps_existing_plans_and_a_different_multichannel_file(preprocessed, tmp_path):
    run_dir = _pretraining(tmp_path / "vf_run")
    env = {"nnUNet_preprocessed": str(preprocessed)}
    args = ["-d", DATASET, "-a", run_dir / "adaptation_plan.json"]
    first = run("nnUNetv2_vf_adapt_plans", *args, env_extra=env)
    assert first.returncode == 0, first.stderr
    plans = preprocessed / DATASET / "nnUNetPlans_VF.json"
    two = run_dir / "checkpoint_final_2ch.pth"
    assert f"wrote {plans}" in first.stdout and f"wrote {two}" in first.stdout
    # a second pretraining adapted under the same -p would replace the first one's plans
    other = _pretraining(tmp_path / "vf_run_2", seed=1)
    before = checksums(preprocessed, run_dir, other)
    proc = run("nnUNetv2_vf_adapt_plans", "-d", DATASET, "-a", other / "adaptation_plan.json", env_extra=env)
    assert proc.returncode != 0 and str(plans) in proc.stderr
    assert last_line(proc) == "Fix: choose another -p for these plans (models trained with -p nnUNetPlans_VF read " \
                              "the existing file), or pass --overwrite to replace them."
    assert checksums(preprocessed, run_dir, other) == before
    # the same weights adapted again under a new -p: the identical _2ch.pth is kept, not rewritten
    again = run("nnUNetv2_vf_adapt_plans", *args, "-p", "nnUNetPlans_VF2", env_extra=env)
    assert again.returncode == 0, again.stderr
    assert checksums(run_dir) == {k: v for k, v in before.items() if k.startswith(str(run_dir) + os.sep)}
    # other weights under the old name: refused
    torch.save({"network_weights": {}}, two)
    before = checksums(preprocessed, run_dir)
    proc = run("nnUNetv2_vf_adapt_plans", *args, "-p", "nnUNetPlans_VF3", env_extra=env)
    assert proc.returncode != 0 and "holds other weights" in proc.stderr and str(two) in proc.stderr
    assert checksums(preprocessed, run_dir) == before
    assert not (preprocessed / DATASET / "nnUNetPlans_VF3.json").exists()


def test_inflate_checkpoint_keeps_an_existing_output(tmp_path):
    out = tmp_path / "inflated.pth"
    out.write_bytes(b"someone's file")
    src = tmp_path / "2d.pth"
    src.write_bytes(b"x")
    before = checksums(tmp_path)
    from nnunetv2_vf.inflate_checkpoint import inflate_checkpoint
    with pytest.raises(ValueError, match=r"(?s)would replace 1 existing file.*inflated.pth.*Fix: give another -o"):
        inflate_checkpoint(src, {}, {}, out)
    assert checksums(tmp_path) == before


def test_plan_network_refuses_nnunets_own_plans(tmp_path):
    from nnunetv2_vf.plan_network import plan_network
    folder = tmp_path / DATASET
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text("{}")
    before = checksums(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="-p nnUNetPlans names nnU-Net's own plans"):
            plan_network(DATASET, "3d_fullres", "PCTNet", "nnUNetPlans", overwrite=overwrite,
                         preprocessed_dir=tmp_path)
    assert checksums(tmp_path) == before


HOLDER = """
import sys, time
from nnunetv2_vf.checkpoint_io import RunLock
lock = RunLock(sys.argv[1], ".nnunetv2_vf_pretrain.lock", "nnUNetv2_vf_pretrain").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_pretraining_folder_has_one_writer_and_sigkill_frees_it(tmp_path):
    out = tmp_path / "vf_run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        images = tmp_path / "images"
        images.mkdir()
        before = checksums(out, images)
        started = time.time()
        proc = run("nnUNetv2_vf_pretrain", images, "-o", out, "--modality", "MR", "--device", "cpu")
        assert proc.returncode != 0 and time.time() - started < 120
        assert f"in use by another nnUNetv2_vf_pretrain: PID {holder.pid} on " in proc.stderr, proc.stderr
        assert "started 20" in proc.stderr and "give another -o" in last_line(proc)
        assert checksums(out, images) == before
        resumed = run("nnUNetv2_vf_pretrain", "-o", out, "--continue")
        assert resumed.returncode != 0 and f"PID {holder.pid}" in resumed.stderr  # --continue waits its turn too
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock file stays, its lock does not
    assert (out / ".nnunetv2_vf_pretrain.lock").is_file()
    with RunLock(out, ".nnunetv2_vf_pretrain.lock") as lock:
        assert lock.held
        with pytest.raises(FolderInUse, match=f"PID {os.getpid()} on "):
            RunLock(out, ".nnunetv2_vf_pretrain.lock").acquire()  # a second writer in the same process, too
    assert not lock.held


def test_an_nnunet_training_checkpoint_is_named_as_such_where_it_does_not_belong(tmp_path):
    """nnU-Net's own checkpoints hold numpy scalars and dtypes: they are read weights-only (never 'could run code')
    and named for what they are, with where they belong, by the MIS-FM converter and by plan_network --weights."""
    import numpy as np

    from nnunetv2_vf.architectures.imagenet_weights import read_checkpoint
    from nnunetv2_vf.pretrain.adapt_plans import convert_misfm_checkpoint
    net = PCTNet(1, 3, features_per_stage=SMALL)
    plans = {"configurations": {"3d_fullres": {"architecture": {"network_class_name": "x.PCTNet"}}}}
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": net.state_dict(), "trainer_name": "PCTNetTrainer", "current_epoch": 2,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0},
                "logging": {"mean_fg_dice": [np.float64(0.5)], "dtype": np.dtype("float32")}}, ckpt)
    before = checksums(tmp_path)
    with pytest.raises(ValueError) as e:
        convert_misfm_checkpoint(ckpt, tmp_path / "out" / "w.pth", SMALL, 1)
    msg = str(e.value)
    assert "is an nnU-Net training checkpoint (trainer PCTNetTrainer, network PCTNet)" in msg, msg
    assert "needs no conversion" in msg and "could run code" not in msg
    with pytest.raises(ValueError) as e:
        read_checkpoint(ckpt)
    assert "is an nnU-Net training checkpoint" in str(e.value) and "-pretrained_weights" in str(e.value)
    assert checksums(tmp_path) == before and not (tmp_path / "out").exists()
