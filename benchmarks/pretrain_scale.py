"""Volume Fusion pretraining's start-up at scale: 20 000 synthetic small volumes, this code against the code before
manifests / the compressed cache / the preprocessing pool (``dataset.py`` of commit ``BASELINE_COMMIT``, read from git
and run in the same run on the same files).

Each measurement runs in a fresh child process (its peak RSS is its own):
- **fill the cache**: baseline = every volume preprocessed in one loop into ``.npy`` (what training did at start-up);
  this code = ``preprocess_volumes`` into nnU-Net's ``.b2nd`` with 1 and with ``--processes`` processes (what
  ``nnUNetv2_vf_pretrain --preprocess-only -np P`` runs);
- **restart on a filled cache** (index, header checks, cache lookup: the start-up of every later run): baseline =
  folder index + every header read + a stat per cache entry; this code = the manifest + headers of uncached files only
  + one listing of the cache folder;
- **to the first iteration**: ``nnUNetv2_vf_pretrain --manifest`` on the filled cache, a small PCT-Net, 1 iteration
  (wall time of the whole command, an upper bound) and its peak RSS; also at a tenth of the volumes, for the per-volume
  slopes of the extrapolation to 110 000 volumes (MIS-FM's corpus).

    python benchmarks/pretrain_scale.py                  # 20 000 volumes -> benchmarks/results/pretrain_scale_cpu.*
    python benchmarks/pretrain_scale.py --volumes 200 --results-dir /tmp/r     # smoke size
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _measure import code_version  # noqa: E402
BASELINE_COMMIT = "40661d6"  # the last commit before manifests, the .b2nd cache and the preprocessing pool
PAPER_VOLUMES = 110_000


def _generate(job) -> None:
    """One synthetic volume: quantised smooth texture inside an ellipsoid, in HU, .nii.gz."""
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter
    path, shape, seed = job
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    texture = gaussian_filter(rng.normal(0, 1, shape), 2) * 300
    hu = np.where(y ** 2 + x ** 2 < 0.8, 40 + texture, -1000).round().astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.5, 1.5))
    sitk.WriteImage(image, str(path), useCompression=True)


def generate(folder: Path, n: int, shape, processes: int) -> Path:
    """``n`` volumes in sub-folders of 1000, and a manifest (relative paths) listing them."""
    import multiprocessing
    jobs = [(folder / f"part_{i // 1000:03d}" / f"vol_{i:06d}_0000.nii.gz", tuple(shape), i) for i in range(n)]
    for part in {j[0].parent for j in jobs}:
        part.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_generate, jobs, chunksize=64)
    manifest = folder / "manifest.txt"
    manifest.write_text("# synthetic volumes of benchmarks/pretrain_scale.py\n" +
                        "\n".join(str(j[0].relative_to(folder)) for j in jobs) + "\n")
    return manifest


def _baseline_module():
    """``nnunetv2_vf/pretrain/dataset.py`` as of BASELINE_COMMIT, imported under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:nnunetv2_vf/pretrain/dataset.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_dataset.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_dataset", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_dataset"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _child(task: dict) -> dict:
    """Run one measurement (in a fresh process): time and peak RSS."""
    import warnings
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    kind, folder, cache_dir = task["kind"], Path(task["folder"]), task["cache"]
    if kind == "cli":  # the console script; its peak RSS is this process' child's
        proc = subprocess.run(task["command"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        return {"seconds": time.perf_counter() - t0,
                "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "preprocessed_nothing": "nothing to preprocess" in proc.stdout + proc.stderr}
    if kind.startswith("baseline"):
        old = _baseline_module()
        files = old.check_volume_headers(old.find_images([folder]))
        cache = old.VolumeCache(files, cache_dir, old.Preprocessing("CT"))
        ready = 0
        for i in range(len(cache)):  # what _prepare_volumes did: load (preprocess if missing) every volume
            ready += cache.load(i) is not None
    else:
        from nnunetv2_vf.pretrain.dataset import (Preprocessing, VolumeCache, check_volume_headers, find_images,
                                                  preprocess_volumes)
        files = find_images([], task["manifest"])
        every = VolumeCache(files, cache_dir, Preprocessing("CT"), task["patch"])
        files = check_volume_headers(files, task["processes"], {every.files[i] for i in every.cached()})
        cache = VolumeCache(files, cache_dir, Preprocessing("CT"), task["patch"])
        preprocess_volumes(cache, cache.missing(range(len(cache))), task["processes"], progress=False)
        ready = len(cache) - len(cache.failed)
    seconds = time.perf_counter() - t0
    entries = [p for p in Path(cache_dir).rglob("*") if p.suffix in (".npy", ".b2nd")]
    return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "volumes": ready, "cache_bytes": sum(p.stat().st_size for p in entries)}


def measure(task: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_iteration(manifest: Path, cache: Path, run: Path, patch) -> dict:
    """``nnUNetv2_vf_pretrain`` to its first iteration on a filled cache: wall time of a 1-iteration run, peak RSS."""
    from nnunetv2_vf.workflow import console_script
    cmd = [console_script("nnUNetv2_vf_pretrain"), "--manifest", str(manifest), "-o", str(run), "--cache-dir",
           str(cache), "--modality", "CT", "--iterations", "1", "--val-every", "1", "--val-samples", "2",
           "--batch-size", "2", "--patch-size", *map(str, patch), "--features", "8", "16", "32", "64", "128",
           "--device", "cpu", "--num-workers", "0", "-np", "1"]
    return measure({"kind": "cli", "command": cmd, "folder": "", "cache": ""})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, default=20_000)
    p.add_argument("--shape", type=int, nargs=3, default=[24, 32, 32], help="voxels per synthetic volume (D H W)")
    p.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32])
    p.add_argument("--processes", type=int, default=2, help="-np of the parallel preprocessing")
    p.add_argument("--workdir", default=None, help="where the volumes go (default: a temporary folder, removed)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="pretrain_scale_cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return {}
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vf_scale_"))
    try:
        return _study(a, work)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _study(a, work: Path) -> dict:
    n, small = a.volumes, max(1, a.volumes // 10)
    t0 = time.perf_counter()
    manifest = generate(work / "data", n, a.shape, a.processes)
    print(f"generated {n} volumes of {'x'.join(map(str, a.shape))} in {time.perf_counter() - t0:.0f} s", flush=True)
    small_manifest = work / "data" / "manifest_small.txt"
    small_manifest.write_text("\n".join(manifest.read_text().splitlines()[: small + 1]) + "\n")
    voxels = n * int(np.prod(a.shape))
    rows = {}

    def record(name, result):
        rows[name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)

    base = {"folder": str(work / "data"), "manifest": str(manifest), "patch": a.patch}
    try:
        record("baseline: fill the cache (1 process, .npy)", measure({**base, "kind": "baseline", "cache":
                                                                      str(work / "cache_npy")}))
        record("baseline: restart on the filled cache", measure({**base, "kind": "baseline", "cache":
                                                                 str(work / "cache_npy")}))
    except (subprocess.CalledProcessError, RuntimeError) as e:  # no git history (e.g. an exported tree)
        print(f"baseline not measured: {e}", flush=True)
    record("this code: fill the cache (1 process, .b2nd)", measure({**base, "kind": "new", "processes": 1,
                                                                   "cache": str(work / "cache_b2nd_1")}))
    record(f"this code: fill the cache ({a.processes} processes, .b2nd)",
           measure({**base, "kind": "new", "processes": a.processes, "cache": str(work / "cache_b2nd")}))
    record("this code: restart on the filled cache", measure({**base, "kind": "new", "processes": a.processes,
                                                              "cache": str(work / "cache_b2nd")}))
    first = first_iteration(manifest, work / "cache_b2nd", work / "run", a.patch)
    small_cache = work / "cache_small"
    measure({**base, "manifest": str(small_manifest), "kind": "new", "processes": a.processes,
             "cache": str(small_cache)})
    first_small = first_iteration(small_manifest, small_cache, work / "run_small", a.patch)
    record(f"this code: nnUNetv2_vf_pretrain to the first iteration ({n} volumes)", first)
    record(f"this code: nnUNetv2_vf_pretrain to the first iteration ({small} volumes)", first_small)

    def per_volume(key):  # slope between the two sizes (noise can make a tiny one negative: never below 0)
        return max(0.0, (first[key] - first_small[key]) / max(1, n - small))

    extrapolated = {k: first[k] + per_volume(k) * (PAPER_VOLUMES - n) for k in ("seconds", "rss_mb")}
    fill = rows["this code: fill the cache (1 process, .b2nd)"]
    result = {
        "volumes": n, "shape": a.shape, "patch": a.patch, "processes": a.processes, "rows": rows,
        "cache_bytes_per_voxel": {name: r["cache_bytes"] / voxels for name, r in rows.items()
                                  if "fill" in name and r.get("cache_bytes")},
        "preprocessing_volumes_per_s": {name: r["volumes"] / r["seconds"] for name, r in rows.items()
                                        if "fill" in name},
        "first_iteration_s": first["seconds"], "first_iteration_rss_mb": first["rss_mb"],
        "training_preprocessed_nothing": first["preprocessed_nothing"],
        "extrapolated_to_110k": {"first_iteration_s": extrapolated["seconds"], "rss_mb": extrapolated["rss_mb"],
                                 "fill_cache_hours_one_process":
                                     PAPER_VOLUMES / (fill["volumes"] / fill["seconds"]) / 3600},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "baseline_commit": BASELINE_COMMIT,
        "commit": code_version(REPO)}
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Pretraining start-up at {n} volumes ({'x'.join(map(str, a.shape))} voxels each)", "",
             f"Machine: {result['machine']}; commit {result['commit']}, baseline `dataset.py` of {BASELINE_COMMIT}. "
             f"Produced by `benchmarks/pretrain_scale.py`.", "",
             "| step | seconds | volumes/s | peak RSS (MB) | cache bytes/voxel |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        bpv = f"{r['cache_bytes'] / voxels:.2f}" if "fill" in name and r.get("cache_bytes") else ""
        rate = f"{r['volumes'] / r['seconds']:.0f}" if "volumes" in r else ""
        lines.append(f"| {name} | {r['seconds']:.1f} | {rate} | {r['rss_mb']:.0f} | {bpv} |")
    lines += ["", f"Extrapolated to {PAPER_VOLUMES} volumes (linear in the volumes, slope between {small} and {n}): "
              f"first iteration after {extrapolated['seconds']:.0f} s with {extrapolated['rss_mb']:.0f} MB peak RSS "
              f"on a filled cache."]
    (out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
