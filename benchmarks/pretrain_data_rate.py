"""Does Volume Fusion pretraining's data pipeline keep a GPU fed? Samples per second per worker at the paper's patch,
the workers that implies, and the measured wait of the default workers against a simulated GPU-class step.

The pipeline is the pretraining's own: ``VolumeCache`` (nnU-Net's compressed ``.b2nd``; the uncompressed ``.npy`` of
earlier versions as the baseline, measured in the same run) -> ``VFPretrainDataLoader`` (random crop, the authors'
flips) -> ``VolumeFusionTransform`` ('paper' and 'grid', with the deep-supervision label pyramid), one batch of 2 at
64x128x128. Inputs: CT-sized synthetic volumes (quantised smooth noise in HU, 160x320x320, like an abdominal CT at
about 1.5 mm) preprocessed with the CT window, and the bundled hippocampus and left-atrium MRI (smaller than the
patch: read whole and padded by reflection). Reads come from the page cache, and from the disk with the page cache
evicted before every batch (``posix_fadvise``; a corpus larger than the node's memory).

1. Per worker: batches generated in-process, single-threaded (like one batchgenerators worker), -> samples/s.
2. Workers needed for a step of ``--step-s`` (0.5 s) with a wait under 5 %: ceil(batch / step / (0.95 x rate)).
3. Measured: the default ``--num-workers`` (4) behind batchgenerators' MultiThreadedAugmenter, the main process
   "training" by sleeping ``--step-s`` per step (the GPU's time; the CPU stays free for the workers, as on a GPU node),
   and the wait per step as the pretraining logs it.

    python benchmarks/pretrain_data_rate.py                       # writes benchmarks/results/pretrain_data_rate_cpu.*
    python benchmarks/pretrain_data_rate.py --smoke               # tiny: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _measure import code_version  # noqa: E402


def synthetic_ct(path: Path, shape, seed: int) -> None:
    """A CT-like volume in integer HU: air outside an ellipsoid body, smooth soft-tissue texture and bone-bright
    blobs inside, written as .nii.gz with 1.5 mm spacing."""
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    texture = gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 3) * 400
    hu = np.where(body, 40 + texture + np.where(texture > 60, 600, 0), -1000)
    hu = (hu + rng.normal(0, 15, shape)).round().astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.5, 1.5))
    sitk.WriteImage(image, str(path), useCompression=True)


def evict(cache) -> None:
    """Drop the cache files from the page cache (``posix_fadvise`` DONTNEED, no root needed): the next read comes
    from the disk, as for a corpus larger than the node's memory."""
    for i in range(len(cache)):
        fd = os.open(cache.entry(i), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def per_worker_rate(cache, indices, variant: str, patch, batch: int, batches: int, seed: int,
                    cold: bool = False) -> float:
    """Samples per second of one in-process worker: loader + Volume Fusion transform, single-threaded; ``cold``:
    every batch read from the disk (the page cache evicted before it, not timed)."""
    from threadpoolctl import threadpool_limits
    import torch
    from nnunetv2_vf.pretrain.dataset import VFPretrainDataLoader
    from nnunetv2_vf.pretrain.volume_fusion import VolumeFusionTransform, grid_source_shape
    torch.set_num_threads(1)
    source = list(grid_source_shape(patch, 1.5)) if variant == "grid" else list(patch)
    loader = VFPretrainDataLoader(cache, indices, source, batch, augmentation="flip", seed=seed)
    vf = VolumeFusionTransform(variant, seed=seed + 1, deep_supervision_scales=[[1, 1, 1], [.5, .5, .5],
                                                                             [.25, .25, .25]],
                               output_shape=list(patch))
    with threadpool_limits(1):
        vf(**loader.generate_train_batch())  # warm-up: first touch of the files
        elapsed = 0.0
        for _ in range(batches):
            if cold:
                evict(cache)
            t0 = time.perf_counter()
            vf(**loader.generate_train_batch())
            elapsed += time.perf_counter() - t0
        return batch * batches / elapsed


def measured_wait(cache, indices, variant: str, patch, batch: int, workers: int, step_s: float, steps: int,
                  seed: int) -> float:
    """% of the time waiting for data with ``workers`` batchgenerators workers and a simulated step."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from nnunetv2_vf.pretrain.dataset import VFPretrainDataLoader
    from nnunetv2_vf.pretrain.volume_fusion import VolumeFusionTransform, grid_source_shape
    source = list(grid_source_shape(patch, 1.5)) if variant == "grid" else list(patch)
    loader = VFPretrainDataLoader(cache, indices, source, batch, augmentation="flip", seed=seed)
    vf = VolumeFusionTransform(variant, seed=seed + 1, deep_supervision_scales=[[1, 1, 1], [.5, .5, .5],
                                                                             [.25, .25, .25]],
                               output_shape=list(patch))
    aug = MultiThreadedAugmenter(loader, vf, workers, num_cached_per_queue=2, seeds=list(range(seed, seed + workers)))
    try:
        for _ in range(workers * 2):  # the queues fill once at start (the pretraining's first steps)
            next(aug)
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            next(aug)
            wait += time.perf_counter() - t
            time.sleep(step_s)  # the GPU step
        return 100 * wait / (time.perf_counter() - t0)
    finally:
        aug._finish()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--step-s", type=float, default=0.5, help="the simulated GPU step (s)")
    p.add_argument("--num-workers", type=int, default=4, help="workers of the measured pipeline (the default)")
    p.add_argument("--ct-volumes", type=int, default=4)
    p.add_argument("--ct-shape", type=int, nargs=3, default=[160, 320, 320])
    p.add_argument("--batches", type=int, default=12, help="batches per per-worker measurement")
    p.add_argument("--steps", type=int, default=40, help="simulated steps of the measured wait")
    p.add_argument("--shared", default=str(REPO.parent / "shared"))
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="pretrain_data_rate_cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.patch, a.ct_volumes, a.ct_shape, a.batches, a.steps, a.step_s = [16, 32, 32], 2, [24, 48, 48], 2, 4, 0.05
        a.num_workers = 2
    from nnunetv2_vf.pretrain.dataset import Preprocessing, VolumeCache, preprocess_volumes

    work = Path(tempfile.mkdtemp(prefix="vf_data_rate_"))
    ct_files = []
    for i in range(a.ct_volumes):
        ct_files.append(work / f"ct_{i:03d}_0000.nii.gz")
        synthetic_ct(ct_files[-1], a.ct_shape, i)
    sources = {"synthetic CT": (ct_files, Preprocessing("CT"))}
    for name, dataset in (("hippocampus MRI", "Dataset004_Hippocampus"), ("left atrium MRI", "Dataset010_LeftAtrium")):
        files = sorted((Path(a.shared) / "data" / dataset / "imagesTr").glob("*.nii.gz"))[:8]
        if files:  # the bundled datasets
            sources[name] = (files, Preprocessing("MR"))
    rows, waits = [], []
    for name, (files, prep) in sources.items():
        caches = {}
        for fmt in ("b2nd", "npy"):
            cache = VolumeCache(files, work / "cache" / fmt, prep, a.patch)
            preprocess_volumes(cache, range(len(files)), 1, progress=False)
            if fmt == "npy":  # the format of earlier versions, as the baseline
                for i in range(len(files)):
                    np.save(cache.legacy_path(i), np.asarray(cache.load(i)[:]))
                    cache.cache_path(i).unlink()
            caches[fmt] = cache
            voxels = sum(int(np.prod(cache.load(i).shape)) for i in range(len(files)))
            size = sum(cache.entry(i).stat().st_size for i in range(len(files)))
            for variant in ("paper", "grid"):
                for cold in (False, True):
                    rate = per_worker_rate(cache, list(range(len(files))), variant, a.patch, a.batch, a.batches, 0,
                                           cold)
                    needed = math.ceil(a.batch / a.step_s / (0.95 * rate))
                    reads = "disk" if cold else "page cache"
                    rows.append({"data": name, "cache": fmt, "variant": variant, "reads": reads,
                                 "bytes_per_voxel": size / voxels, "samples_per_s_per_worker": rate,
                                 "workers_needed": needed})
                    print(f"{name:16s} {fmt:5s} {variant:5s} {reads:10s}: {size / voxels:.2f} bytes/voxel, "
                          f"{rate:.2f} samples/s per worker -> {needed} worker(s) for a {a.step_s} s step with "
                          f"batch {a.batch}", flush=True)
        for variant in ("paper", "grid"):
            wait = measured_wait(caches["b2nd"], list(range(len(files))), variant, a.patch, a.batch, a.num_workers,
                                 a.step_s, a.steps, 0)
            waits.append({"data": name, "variant": variant, "workers": a.num_workers, "wait_percent": wait})
            print(f"{name:16s} b2nd  {variant:5s}: {a.num_workers} workers, {a.step_s} s step -> data wait "
                  f"{wait:.1f} % of the time", flush=True)
    for row in rows:  # the compressed cache's rate relative to the .npy baseline of the same data and variant
        base = next(r for r in rows if r["data"] == row["data"] and r["variant"] == row["variant"]
                    and r["reads"] == row["reads"] and r["cache"] == "npy")
        row["rate_vs_npy"] = row["samples_per_s_per_worker"] / base["samples_per_s_per_worker"]
    result = {"patch": a.patch, "batch": a.batch, "step_s": a.step_s, "ct_shape": a.ct_shape,
              "ct_volumes": a.ct_volumes, "rows": rows, "waits": waits,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "smoke": a.smoke,
              "commit": code_version(REPO)}
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Pretraining data rate at patch {'x'.join(map(str, a.patch))}, batch {a.batch}",
             "", f"Machine: {result['machine']}; commit {result['commit']}. Produced by "
             f"`benchmarks/pretrain_data_rate.py`.", "",
             "| data | cache | variant | reads from | bytes/voxel | samples/s per worker | vs .npy | workers for a "
             f"{a.step_s} s step (wait < 5 %) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['cache']} | {r['variant']} | {r['reads']} | {r['bytes_per_voxel']:.2f} | "
              f"{r['samples_per_s_per_worker']:.2f} | {r['rate_vs_npy']:.2f} | {r['workers_needed']} |" for r in rows]
    lines += ["", f"Measured with {a.num_workers} workers (the default) and a simulated {a.step_s} s step:", "",
              "| data | variant | data wait (% of time) |", "|---|---|---|"]
    lines += [f"| {w['data']} | {w['variant']} | {w['wait_percent']:.1f} |" for w in waits]
    (out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
