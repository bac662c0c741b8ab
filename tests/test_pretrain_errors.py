"""``nnUNetv2_vf_pretrain`` on bad input and in used output folders: each case ends with a message that names the
problem and the fix (SystemExit from the real entry point, no traceback), before anything is trained or written.

Fast: the entry point is called in-process (and once as the real console script); nothing here trains.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES
from nnunetv2_vf.checkpoint_io import WriteError, _writer_id, atomic_write, remove_stale_tmp_files, save_torch
from nnunetv2_vf.pretrain.cli import pretrain_main
from nnunetv2_vf.pretrain.dataset import Preprocessing, check_volume_headers, detect_modality, find_images
from nnunetv2_vf.pretrain.pretrainer import PretrainConfig, VFPretrainer, input_manifest
from nnunetv2_vf.workflow import console_script

SMALL = ["--features", *map(str, SMALL_FEATURES), "--patch-size", "16", "32", "32", "--batch-size", "2",
         "--device", "cpu", "--num-workers", "0"]


@pytest.fixture()
def images(tmp_path, shared_dir) -> Path:
    """A plain folder with three real hippocampus MRI volumes."""
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted((shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]:
        shutil.copy2(f, folder / f.name)
    return folder


def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        pretrain_main([str(a) for a in argv])
    assert isinstance(e.value.code, str), "expected a message, got a bare exit code"
    return e.value.code


def _fake_run(out: Path, images: Path, **changes) -> None:
    """The config.json a run writes before its first checkpoint (all --continue needs without a checkpoint)."""
    settings = dict(normalization="MR", batch_size=2, patch_size=[16, 32, 32], features=list(SMALL_FEATURES),
                    device="cpu", num_workers=0)
    cfg = PretrainConfig(inputs=[str(images)], output_dir=str(out), **{**settings, **changes})
    out.mkdir(parents=True, exist_ok=True)
    manifest = input_manifest(find_images([images]))
    (out / "config.json").write_text(json.dumps({**cfg.__dict__, "input_files": manifest}))


@pytest.mark.parametrize("bad, expected", [
    (["--patch-size", "0", "32", "32"], "--patch-size needs three positive sizes"),
    (["--patch-size", "-16", "32", "32"], "--patch-size needs three positive sizes"),
    (["--val-every", "0"], "--val-every must be >= 1 (got 0): e.g. --val-every"),
    (["--batch-size", "0"], "--batch-size must be >= 1 (got 0): e.g. --batch-size"),
    (["--batch-size", "0", "--variant", "grid"], "--batch-size must be >= 1 (got 0)"),
    (["--batch-size", "1"], "use --batch-size >= 2 or --variant grid"),
    (["--iterations", "0"], "--iterations must be >= 1 (got 0): e.g. --iterations"),
    (["--iterations", "-5"], "--iterations must be >= 1 (got -5)"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--vf-classes", "1"], "--vf-classes (fusion classes K) must be an integer from 2 to 256 (got 1)"),
    (["--vf-boxes", "5", "2"], "--vf-boxes needs MIN MAX with 1 <= MIN <= MAX boxes per sample (got 5 2)"),
    (["--vf-box-min", "0", "0.1", "0.1"], "--vf-box-min needs three fractions of the crop D H W, each in (0, 1]"),
    (["--vf-box-max", "0.1", "0.1", "0.1"], "--vf-box-min 0.125 0.0625 0.0625 exceeds --vf-box-max 0.1 0.1 0.1"),
    (["--variant", "grid", "--vf-foreground-ratio", "0"], "--vf-foreground-ratio (fraction of grid blocks fused"),
    (["--variant", "grid", "--vf-block-min", "2", "0.1", "0.1"], "--vf-block-min needs three fractions"),
    (["--variant", "grid", "--vf-block-max", "0.5", "0.5", "1.5"], "--vf-block-max needs three fractions"),
    (["--vf-foreground-ratio", "0.5"], "--vf-foreground-ratio acts in the 'grid' Volume Fusion variant only, but "
                                       "this run uses --variant paper: drop --vf-foreground-ratio, or give "
                                       "--variant grid"),
    (["--variant", "grid", "--vf-boxes", "2", "4"], "--vf-boxes acts in the 'paper' Volume Fusion variant only"),
])
def test_impossible_settings_are_refused_before_anything_is_written(tmp_path, images, bad, expected):
    out = tmp_path / "run"
    msg = _error([images, "-o", out, *SMALL, "--modality", "MR", *bad])
    assert expected in msg
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, images):
    target = tmp_path / "notes.txt"
    target.write_text("x")
    msg = _error([images, "-o", target, *SMALL, "--modality", "MR"])
    assert "is a file, not a folder" in msg and "give a folder" in msg


def test_modality_is_never_assumed(tmp_path, images):
    msg = _error([images, "-o", tmp_path / "run", *SMALL])
    assert "--modality CT" in msg and "--modality MR" in msg and str(images) in msg
    ct = tmp_path / "Dataset001_CT"
    (ct / "imagesTr").mkdir(parents=True)
    (ct / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    mr = tmp_path / "Dataset002_MR"
    (mr / "imagesTr").mkdir(parents=True)
    (mr / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}}))
    assert detect_modality([ct]) == "CT" and detect_modality([mr]) == "MR"
    with pytest.raises(ValueError, match="mix CT and MR"):
        detect_modality([ct, mr])
    with pytest.raises(ValueError, match="--modality"):
        detect_modality([ct, images])


def test_second_run_into_a_used_folder_is_refused_by_the_console_script(tmp_path, images):
    out = tmp_path / "run"
    _fake_run(out, images)
    before = (out / "config.json").read_text()
    proc = subprocess.run([console_script("nnUNetv2_vf_pretrain"), str(images), "-o", str(out), *SMALL,
                           "--modality", "MR"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "already holds a pretraining run" in proc.stderr
    assert "--continue" in proc.stderr and "--overwrite" in proc.stderr and "another -o folder" in proc.stderr
    assert (out / "config.json").read_text() == before  # nothing touched


def test_continue_refuses_every_change_of_the_run_and_names_it(tmp_path, images):
    out = tmp_path / "run"
    _fake_run(out, images)
    other = tmp_path / "other_images"
    other.mkdir()
    shutil.copy2(next(images.iterdir()), other / "x_0000.nii.gz")
    msg = _error([other, "-o", out, "--continue", "--features", "8", "16", "32", "64", "96", "--modality", "CT",
                  "--variant", "grid", "--patch-size", "32", "32", "32", "--network", "plans", "--vf-classes", "3",
                  "--vf-boxes", "2", "4"])
    for expected in ("--features: the run has 8 16 32 64 128, the command line asks for 8 16 32 64 96",
                     "--vf-classes: the run has 5, the command line asks for 3",
                     "--vf-boxes: the run has 10 40, the command line asks for 2 4",
                     "--modality: the run has MR", "--variant: the run has paper", "--patch-size: the run has 16 32 32",
                     "--network: the run has pctnet", "inputs: the run was started on"):
        assert expected in msg, expected
    assert "Drop these options" in msg


def test_continue_compares_the_fusion_knobs_also_with_runs_that_predate_them(tmp_path, images):
    out = tmp_path / "run"
    _fake_run(out, images, vf_classes=3, vf_foreground_ratio=0.5, variant="grid")
    msg = _error(["-o", out, "--continue", "--vf-classes", "5", "--vf-foreground-ratio", "0.7"])
    assert "--vf-classes: the run has 3, the command line asks for 5" in msg
    assert "--vf-foreground-ratio: the run has 0.5, the command line asks for 0.7" in msg
    resumed = VFPretrainer(PretrainConfig(inputs=[], output_dir=str(out), vf_classes=3), resume=True,
                           explicit={"output_dir", "vf_classes"})  # the same value: accepted
    assert resumed.fusion.num_classes == 3 and resumed.fusion.foreground_ratio == 0.5
    old = tmp_path / "old_run"  # a config.json of the release without the knobs: it ran the paper's values
    _fake_run(old, images)
    stored = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in stored.items() if not k.startswith("vf_")}))
    assert "--vf-classes: the run has 5, the command line asks for 3" in _error(["-o", old, "--continue",
                                                                                 "--vf-classes", "3"])
    assert VFPretrainer(PretrainConfig(inputs=[], output_dir=str(old)), resume=True,
                        explicit={"output_dir"}).fusion.num_classes == 5


def test_fusion_knobs_are_recorded_and_used(tmp_path, images):
    """A real one-iteration run with K = 3 and 2..4 boxes: the network, the validation set, config.json and the
    adaptation plan all follow the knobs."""
    out = tmp_path / "run"
    pretrain_main([str(images), "-o", str(out), *SMALL, "--modality", "MR", "--iterations", "1", "--val-samples",
                   "2", "--no-augmentation", "--vf-classes", "3", "--vf-boxes", "2", "4"])
    config = json.loads((out / "config.json").read_text())
    assert config["vf_classes"] == 3 and config["vf_boxes"] == [2, 4] and config["vf_foreground_ratio"] == 0.7
    plan = json.loads((out / "adaptation_plan.json").read_text())
    assert plan["format"] == "nnunetv2_vf.adaptation_plan/4" and plan["pctnet_table_layout"] == "centre-v2"
    assert plan["volume_fusion"] == {"variant": "paper", "num_classes": 3, "num_boxes": [2, 4],
                                     "box_fraction_min": [0.125, 0.0625, 0.0625], "box_fraction_max": [0.625] * 3,
                                     "foreground_ratio": 0.7, "block_fraction_min": [0.078125, 0.0625, 0.0625],
                                     "block_fraction_max": [0.3125, 0.25, 0.25], "augmentation": "none",
                                     "padding": "reflect"}
    with np.load(out / "validation_set.npz") as f:
        assert set(np.unique(f["target"])) <= {0, 1, 2} and f["target"].max() == 2
    final = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert final["pctnet_table_layout"] == "centre-v2"  # as every PCT-Net checkpoint of a run
    weights = final["network_weights"]
    assert weights["decoder.seg_layers.0.weight"].shape[0] == 3


def test_continue_uses_the_runs_settings_from_any_folder_and_accepts_moved_data(tmp_path, images, monkeypatch):
    out = tmp_path / "run"
    _fake_run(out, images)
    monkeypatch.chdir(tmp_path / "..")
    same = VFPretrainer(PretrainConfig(inputs=[], output_dir=str(out), iterations=9), resume=True,
                        explicit={"output_dir", "iterations"})
    assert same.cfg.inputs == [str(images)] and same.cfg.iterations == 9 and same.cfg.features == list(SMALL_FEATURES)
    moved = tmp_path / "moved"
    shutil.move(str(images), moved)
    msg = _error(["-o", out, "--continue"])  # the stored folder is gone: say how to point at the new place
    assert "does not exist" in msg and "--continue and the new input folders" in msg
    resumed = VFPretrainer(PretrainConfig(inputs=[str(moved)], output_dir=str(out)), resume=True,
                           explicit={"inputs", "output_dir"})
    assert resumed.cfg.inputs == [str(moved)]
    (moved / sorted(os.listdir(moved))[0]).unlink()  # not the same data any more
    msg = _error([moved, "-o", out, "--continue"])
    assert "1 of the run's 3 files missing or changed" in msg


def test_continue_without_a_run_and_with_a_damaged_checkpoint(tmp_path, images):
    msg = _error(["-o", tmp_path / "nothing", "--continue"])
    assert "holds no pretraining run to resume" in msg and "start without --continue" in msg
    out = tmp_path / "run"
    _fake_run(out, images)
    (out / "checkpoint_latest.pth").write_bytes(b"")
    assert "is empty" in _error(["-o", out, "--continue"])
    torch.save({"network_weights": {"w": torch.zeros(1000)}}, out / "full.pth")
    data = (out / "full.pth").read_bytes()
    (out / "checkpoint_latest.pth").write_bytes(data[: len(data) // 2])
    msg = _error(["-o", out, "--continue"])
    assert "corrupt" in msg and "--overwrite" in msg


def test_full_disk_during_a_checkpoint_write(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as RuntimeError after writing part of the file: no temporary file may stay."""
    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoint_latest.pth"
    with pytest.raises(WriteError) as e:
        save_torch({"w": torch.zeros(2 ** 20)}, target)
    msg = str(e.value)
    assert "it needs about 4.0 MiB" in msg and "MiB free" in msg and "Free disk space" in msg and "--continue" in msg
    assert os.listdir(tmp_path) == []


def test_full_disk_ends_the_run_with_a_message_and_no_temporary_file(tmp_path, images, monkeypatch):
    """The real entry point, training until its first checkpoint write fails."""
    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    msg = _error([images, "-o", out, *SMALL, "--modality", "MR", "--iterations", "1", "--val-samples", "2",
                  "--no-augmentation"])
    assert "cannot write checkpoint" in msg and "No space left on device" in msg and "it needs about" in msg
    assert "rerun the same command with --continue" in msg
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / f"case_0000_abc.npy.{_writer_id(999999999)}.tmp"  # above any pid limit: never alive
    live = tmp_path / f"case_0001_abc.npy.{_writer_id(os.getppid())}.tmp"  # a running writer (our parent)
    other_host = tmp_path / "case_0002_abc.npy.node7-12.tmp"  # maybe still being written by another machine
    for f in (dead, live, other_host):
        f.write_bytes(b"x")
    assert remove_stale_tmp_files(tmp_path) == [dead.name]
    old = time.time() - 2 * 3600
    os.utime(other_host, (old, old))
    assert remove_stale_tmp_files(tmp_path) == [other_host.name]
    atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
    assert sorted(os.listdir(tmp_path)) == ["a.json", live.name]


@pytest.mark.parametrize("image", [sitk.Image([20, 20, 20], sitk.sitkVectorFloat32, 2),  # vector voxels
                                   sitk.Image([20, 20, 20, 2], sitk.sitkFloat32)])  # a 4th (channel) axis
def test_multichannel_image_gets_a_channel_message(tmp_path, image):
    sitk.WriteImage(image, str(tmp_path / "two_channels.nii.gz"))
    with pytest.raises(ValueError) as e:
        check_volume_headers(find_images([tmp_path]))
    assert "several channels" in str(e.value) and "split each channel" in str(e.value)
    assert "2D" not in str(e.value)


def test_nan_in_nifti_warns_and_all_nan_is_unusable(tmp_path):
    arr = np.random.default_rng(0).random((12, 14, 16)).astype(np.float32)
    arr[:2] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nans.nii.gz"))
    with pytest.warns(UserWarning, match=r"nans.nii.gz: 448 NaN/Inf voxel"):
        Preprocessing("MR")(tmp_path / "nans.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8, 8), np.nan, np.float32)), str(tmp_path / "all.nii.gz"))
    with pytest.raises(ValueError, match="every voxel is NaN"):
        Preprocessing("MR")(tmp_path / "all.nii.gz")


def test_dataset_of_unusable_volumes_is_refused(tmp_path):
    folder = tmp_path / "nan_images"
    folder.mkdir()
    for i in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8, 8), np.nan, np.float32)),
                        str(folder / f"n{i}_0000.nii.gz"))
    out = tmp_path / "run"
    msg = _error([folder, "-o", out, *SMALL, "--modality", "MR"])
    assert "none of the 2 input volume(s) could be read and preprocessed" in msg
    log = (out / "training_log.txt").read_text()
    assert "every voxel is NaN/Inf" in log and "n0_0000.nii.gz" in log  # the reasons are in the log too
    assert not (out / "config.json").exists()  # no run to --continue: fixed inputs start without --overwrite


def test_finetuning_weights_load_weights_only_and_refuse_code(tmp_path):
    """nnU-Net's own checkpoints (numpy floats in their logs) load weights-only; a pickle that would run code is
    refused with what to do instead."""
    from nnunetv2_vf.architectures.pctnet import PCTNet
    from nnunetv2_vf.trainers.vf_pretrained_trainer import check_pretrained_compatibility
    net = PCTNet(1, 3, features_per_stage=SMALL_FEATURES)
    nnunet_style = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": net.state_dict(), "logging": {"mean_fg_dice": [np.float64(0.5)]},
                "init_args": {"device": torch.device("cpu")}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               nnunet_style)
    assert check_pretrained_compatibility(net, str(nnunet_style)) > 100

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo should never run",))
    evil = tmp_path / "evil.pth"
    torch.save({"network_weights": net.state_dict(), "extra": RunsCode()}, evil)
    with pytest.raises(ValueError) as e:
        check_pretrained_compatibility(net, str(evil))
    assert "could run code" in str(e.value) and "system" in str(e.value)


def test_overwrite_starts_a_new_run_without_the_old_validation_set(tmp_path, images):
    out = tmp_path / "run"
    _fake_run(out, images, features=[8, 16, 32, 64, 96])
    np.savez(out / "validation_set.npz", data=np.zeros(1), target=np.zeros(1))  # the old run's, wrong shape
    (out / f"checkpoint_latest.pth.{_writer_id(999999999)}.tmp").write_bytes(b"half")  # a killed writer's
    pretrain_main([str(images), "-o", str(out), *SMALL, "--modality", "MR", "--iterations", "1", "--val-samples",
                   "2", "--no-augmentation", "--overwrite"])
    with np.load(out / "validation_set.npz") as f:
        assert f["data"].shape == (2, 1, 16, 32, 32)
    assert json.loads((out / "config.json").read_text())["features"] == list(SMALL_FEATURES)
    assert torch.load(out / "checkpoint_latest.pth", weights_only=True)["iteration"] == 1
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []


@pytest.mark.parametrize("lrs, panels", [([1e-3] * 4, 2), ([1e-3, 1e-3, 5e-4, 5e-4], 3)])
def test_progress_plot_shows_the_learning_rate_only_when_it_changes(tmp_path, lrs, panels):
    from PIL import Image
    trainer = VFPretrainer.__new__(VFPretrainer)  # only what plot_progress reads
    trainer.rank, trainer.iteration, trainer.output_dir = 0, 20, tmp_path
    trainer.cfg = PretrainConfig(inputs=[], output_dir=str(tmp_path), iterations=20, val_every=10)
    trainer.architecture = {"network_class_name": "nnunetv2_vf.architectures.pctnet.PCTNet"}
    trainer.logs = {"iteration": [10, 20], "train_loss": [1.4, 1.2], "val_loss": [1.5, 1.3], "val_dice": [0.1, 0.2],
                    "lr": [lrs[1], lrs[3]], "sec_per_it": [1.0, 1.1], "train_iteration": [5, 10, 15, 20],
                    "train_loss_recent": [1.5, 1.3, 1.25, 1.2], "train_lr": lrs}
    trainer.plot_progress()
    height = Image.open(tmp_path / "progress.png").size[1]
    assert height == (1200 if panels == 3 else 800)  # 4 inches per panel at 100 dpi
