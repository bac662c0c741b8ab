"""Pretraining at scale: manifests, the compressed cache in nnU-Net's format, preprocessing ahead of training (also
under torchrun), distinct samples per rank, two torchrun "nodes" killed and resumed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_vf.architectures.pctnet import SMALL_FEATURES
from nnunetv2_vf.pretrain.dataset import (Preprocessing, VFPretrainDataLoader, VolumeCache, check_volume_headers,
                                          find_images, preprocess_volumes, read_manifest)
from nnunetv2_vf.pretrain.pretrainer import rank_share
from nnunetv2_vf.workflow import console_script, run_nnunet

SMALL = [str(f) for f in SMALL_FEATURES]
COMMON = ["--batch-size", "2", "--patch-size", "16", "32", "32", "--features", *SMALL, "--modality", "MR",
          "--device", "cpu", "--num-workers", "0", "--val-samples", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def hippo_files(shared_dir) -> list[Path]:
    return sorted((shared_dir / "data" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))


def _manifest(folder: Path, files: list[Path]) -> Path:
    """A text manifest in ``folder`` with relative paths (the images copied beside it), comments, blank lines."""
    (folder / "images").mkdir(parents=True)
    lines = ["# unlabelled hippocampus MRI", ""]
    for f in files:
        shutil.copy2(f, folder / "images" / f.name)
        lines.append(f"images/{f.name}  # copied from the shared data")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def test_manifest_text_and_json_resolve_relative_paths_and_combine_with_folders(tmp_path, hippo_files):
    text = _manifest(tmp_path / "m", hippo_files[:3])
    listed = read_manifest(text)
    assert listed == [tmp_path / "m" / "images" / f.name for f in hippo_files[:3]]  # against the manifest's folder
    as_json = tmp_path / "m" / "list.json"
    as_json.write_text(json.dumps([f"images/{f.name}" for f in hippo_files[:3]]))
    assert read_manifest(as_json) == listed
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy2(hippo_files[5], folder / hippo_files[5].name)
    both = find_images([folder], text)
    assert len(both) == 4 and folder / hippo_files[5].name in both
    assert find_images([], text) == sorted(listed)


@pytest.mark.parametrize("content, message", [
    ("images/missing.nii.gz\n", "are not files"),
    ("# only a comment\n\n", "lists no image paths"),
    ('{"a": 1}', "JSON list of path strings"),
    ("[not json", "not valid JSON"),
])
def test_bad_manifest_is_refused_naming_the_problem(tmp_path, content, message):
    bad = tmp_path / ("bad.json" if content.startswith("{") else "bad.txt")  # '[' opens a JSON list in any file
    bad.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_manifest(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nowhere.txt")


def _cli_error(argv) -> str:
    from nnunetv2_vf.pretrain.cli import pretrain_main
    with pytest.raises(SystemExit) as e:
        pretrain_main([str(a) for a in argv])
    assert isinstance(e.value.code, str), "expected a message, got a bare exit code"
    return e.value.code


def test_manifest_needs_a_modality_and_continue_refuses_a_changed_manifest(tmp_path, hippo_files):
    manifest = _manifest(tmp_path / "data", hippo_files[:2])
    out = tmp_path / "run"
    assert "manifest lists files, no dataset.json): give --modality CT" in _cli_error(
        ["--manifest", manifest, "-o", out, "--device", "cpu"])
    # the config.json a run writes before its first checkpoint: all --continue reads without a checkpoint
    from nnunetv2_vf.pretrain.config import PretrainConfig, input_manifest, new_run_config
    cfg = new_run_config(PretrainConfig(inputs=[], output_dir=str(out), manifest=str(manifest), normalization="MR",
                                        device="cpu"), out)
    assert cfg.manifest_digest is not None
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**cfg.__dict__,
                                                 "input_files": input_manifest(read_manifest(manifest))}))
    manifest.write_text(manifest.read_text().splitlines()[-1] + "\n")  # one image fewer
    message = _cli_error(["-o", out, "--continue", "--device", "cpu"])
    assert f"--manifest: {manifest} changed since the run started" in message and "start a new run" in message
    moved = tmp_path / "elsewhere.txt"
    assert f"--manifest: {moved} does not exist: give the manifest the run started with ({manifest})" in _cli_error(
        ["-o", out, "--continue", "--manifest", moved])
    manifest.unlink()
    assert f"the run's manifest {manifest} does not exist any more" in _cli_error(["-o", out, "--continue"])


@pytest.mark.parametrize("crop", [(64, 128, 128), (16, 32, 32)])  # the paper's patch; one smaller than the volumes
def test_compressed_cache_is_lossless_and_at_most_2_bytes_per_voxel(tmp_path, shared_dir, crop):
    """Hippocampus and left atrium MRI as the pretraining caches them: nnU-Net's blosc2 format, exactly the
    preprocessed float32 values, at most 2 bytes per voxel (the .npy cache needed 4)."""
    for dataset in ("Dataset004_Hippocampus", "Dataset010_LeftAtrium"):
        files = sorted((shared_dir / "data" / dataset / "imagesTr").glob("*.nii.gz"))[:6]
        cache = VolumeCache(files, tmp_path / dataset, Preprocessing("MR"), crop)
        assert preprocess_volumes(cache, range(len(files)), num_processes=1, progress=False) == set()
        stored = voxels = 0
        for i, f in enumerate(files):
            volume = cache.load(i)
            assert type(volume).__module__.startswith("blosc2") and cache.cache_path(i).suffix == ".b2nd"
            np.testing.assert_array_equal(volume[:], Preprocessing("MR")(f))  # lossless
            stored += cache.cache_path(i).stat().st_size
            voxels += int(np.prod(volume.shape))
        assert stored / voxels <= 2.0, (dataset, stored / voxels)


def test_legacy_npy_cache_is_read_then_rewritten_compressed(tmp_path, hippo_files):
    cache = VolumeCache(hippo_files[:2], tmp_path, Preprocessing("MR"))
    data = Preprocessing("MR")(hippo_files[0])
    np.save(cache.legacy_path(0), data)  # what earlier versions cached
    assert cache.entry(0) == cache.legacy_path(0) and cache.legacy_entries() == [0]
    np.testing.assert_array_equal(cache.load(0), data)  # read as it is, not preprocessed again
    assert not cache.cache_path(0).exists()
    # training reads a legacy entry as it is; --preprocess-only rewrites it
    assert cache.missing([0, 1]) == [1] and cache.missing([0, 1], rewrite_legacy=True) == [0, 1]
    preprocess_volumes(cache, [0, 1], num_processes=1, progress=False)
    assert not cache.legacy_path(0).exists() and cache.cached() == {0, 1} and cache.missing([0, 1], True) == []
    np.testing.assert_array_equal(cache.load(0)[:], data)


def test_headers_of_cached_volumes_are_not_read_again(tmp_path, hippo_files):
    broken = tmp_path / "broken_0000.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert check_volume_headers([broken, hippo_files[0]]) == [hippo_files[0]]
    # a cached volume's header was read when it was preprocessed: trusted, so a restart reads no header
    assert check_volume_headers([broken, hippo_files[0]], known_good={broken}) == [broken, hippo_files[0]]


def test_ranks_draw_disjoint_volumes_and_distinct_crops(tmp_path, hippo_files):
    """The sharding and seeds each torchrun rank gets: no volume, hence no crop, is trained on by two ranks."""
    cache = VolumeCache(hippo_files[:8], tmp_path, Preprocessing("MR"), (16, 32, 32))
    drawn = {0: set(), 1: set()}
    crops = {}
    for rank in (0, 1):
        shard, seed = rank_share(list(range(8)), rank, 2, seed=7)
        loader = VFPretrainDataLoader(cache, shard, (16, 32, 32), 2, augmentation="flip", seed=seed)
        load = cache.load
        cache.load = lambda i, r=rank, load=load: (drawn[r].add(i), load(i))[1]
        crops[rank] = np.concatenate([loader.generate_train_batch()["data"] for _ in range(6)])
        del cache.load
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    assert drawn[0] | drawn[1] <= set(range(8))
    assert not any(np.array_equal(a, b) for a in crops[0] for b in crops[1])


@pytest.mark.slow
def test_preprocess_only_then_training_preprocesses_nothing_and_continue_checks_the_manifest(
        tmp_path, hippo_files, hippo_dataset):
    env = hippo_dataset["env"]
    manifest = _manifest(tmp_path / "data", hippo_files[:6])
    out, cache = tmp_path / "run", tmp_path / "cache"
    log = run_nnunet(["nnUNetv2_vf_pretrain", "--manifest", manifest, "-o", out, *COMMON, "--cache-dir", cache,
                      "--preprocess-only", "-np", "2"], env, echo=False)
    assert "preprocessed 6 of its 6 volume(s)" in log and "2 process(es)" in log
    assert "preprocessing: 100%" in log and "6/6" in log  # the progress bar
    entries = {p: p.stat().st_mtime_ns for p in cache.rglob("*.b2nd")}
    assert len(entries) == 6 and not list(cache.rglob("*.npy"))
    assert not (out / "config.json").exists()  # no run yet: a training run may start in -o
    log = run_nnunet(["nnUNetv2_vf_pretrain", "--manifest", manifest, "-o", out, *COMMON, "--cache-dir", cache,
                      "--iterations", "2", "--val-every", "2"], env, echo=False)
    assert "found preprocessed" in log and "nothing to preprocess" in log and "preprocessing 6" not in log
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.b2nd")} == entries  # untouched
    config = json.loads((out / "config.json").read_text())
    assert config["manifest"] == str(manifest) and len(config["manifest_digest"]) == 64
    assert torch.load(out / "checkpoint_final.pth", weights_only=True)["iteration"] == 2
    # a changed manifest is not the run's data any more
    manifest.write_text(manifest.read_text() + "# one more comment\n")
    with pytest.raises(RuntimeError, match="changed since the run started"):
        run_nnunet(["nnUNetv2_vf_pretrain", "-o", out, "--continue", "--iterations", "3"], env, echo=False)


@pytest.mark.slow
def test_preprocess_only_under_torchrun_gives_each_rank_its_share(tmp_path, hippo_files, hippo_dataset):
    manifest = _manifest(tmp_path / "data", hippo_files[:7])
    log = run_nnunet(["torchrun", "--nproc_per_node", "2", console_script("nnUNetv2_vf_pretrain"), "--manifest",
                      manifest, "-o", tmp_path / "run", *COMMON, "--preprocess-only", "-np", "1"],
                     dict(hippo_dataset["env"], OMP_NUM_THREADS="1"), echo=False)
    counts = {r: int(log.split(f"rank {r}: preprocessed ")[1].split(" ")[0]) for r in (0, 1)}
    assert counts == {0: 4, 1: 3}  # 7 volumes: each once
    assert len(list((tmp_path / "run" / "cache").rglob("*.b2nd"))) == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, args: list, env: dict, log: Path) -> subprocess.Popen:
    """One torchrun "node" (its own agent and process group leader) of a two-node c10d rendezvous on this host."""
    cmd = ["torchrun", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vf-test", "--max-restarts", "0",
           console_script("nnUNetv2_vf_pretrain"), *map(str, args)]
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            stdin=subprocess.DEVNULL)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts its workers in sessions of their own, so killing
    the agent's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_node(node: subprocess.Popen) -> None:
    """A node's death: its torchrun agent and every process it started, at once."""
    for pid in [node.pid, *_descendants(node.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait()


def _iteration(checkpoint: Path) -> int:
    try:
        return int(torch.load(checkpoint, weights_only=True)["iteration"])
    except Exception:  # not written yet
        return -1


@pytest.mark.slow
def test_two_nodes_c10d_killed_node_then_both_resume_to_one_consistent_checkpoint(tmp_path, hippo_files,
                                                                                  hippo_dataset):
    env = dict(hippo_dataset["env"], OMP_NUM_THREADS="1")
    manifest = _manifest(tmp_path / "data", hippo_files[:6])
    out = tmp_path / "run"
    args = ["--manifest", manifest, "-o", out, *COMMON, "--val-every", "2", "--save-every", "1", "-np", "1"]
    port = _free_port()
    nodes = [_node(r, port, [*args, "--iterations", "400"], env, tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        deadline = time.time() + 300
        while _iteration(out / "checkpoint_latest.pth") < 3:
            assert time.time() < deadline and all(n.poll() is None for n in nodes), \
                (tmp_path / "node0.log").read_text()[-3000:] + (tmp_path / "node1.log").read_text()[-3000:]
            time.sleep(1)
        _kill_node(nodes[1])  # node 1 dies: its agent, its worker, the worker's loader processes
        killed_at = _iteration(out / "checkpoint_latest.pth")
        nodes[0].wait(timeout=300)  # the survivor's next collective fails: it must end by itself
        assert nodes[0].returncode != 0
        survivor = (tmp_path / "node0.log").read_text()
    finally:
        for n in nodes:
            if n.poll() is None:
                _kill_node(n)
    reached = _iteration(out / "checkpoint_latest.pth")
    assert 3 <= killed_at <= reached <= killed_at + 1, survivor[-3000:]  # nobody trained on alone
    target = reached + 2
    port = _free_port()
    nodes = [_node(r, port, [*args, "--iterations", str(target), "--continue"], env, tmp_path / f"resume{r}.log")
             for r in (0, 1)]
    for n in nodes:
        n.wait(timeout=600)
    logs = [(tmp_path / f"resume{r}.log").read_text() for r in (0, 1)]
    assert all(n.returncode == 0 for n in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert f"resumed from {out / 'checkpoint_latest.pth'} at iteration {reached}" in logs[0] + logs[1]
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    final = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert latest["iteration"] == final["iteration"] == target
    for k, v in final["network_weights"].items():  # one model: the final export is the latest state
        assert torch.equal(v, latest["network_weights"][k]), k
    assert json.loads((out / "adaptation_plan.json").read_text())["optimizer"]["world_size"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
