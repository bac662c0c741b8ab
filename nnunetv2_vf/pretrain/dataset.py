"""Unlabelled image index, preprocessing and patch sampling for Volume Fusion pretraining.

The index is a list of file paths (never the images): 20 000 volumes cost a few MB. Inputs are folders and/or
manifests (text or JSON lists of paths). Each volume is preprocessed once with nnU-Net's own machinery
(``resample_data_or_seg_to_shape``, ``CTNormalization`` / ``ZScoreNormalization``), ahead of training in a process
pool, and cached in nnU-Net 2.8's own compressed format (a blosc2 ``.b2nd`` array with the chunking, codec and
filter choice of ``nnUNetDatasetBlosc2``), memory-mapped when patches are cut.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

from nnunetv2_vf.checkpoint_io import atomic_write, remove_stale_tmp_files

__all__ = ["IMAGE_EXTENSIONS", "CT_WINDOW", "AUGMENTATIONS", "Preprocessing", "find_images", "read_manifest",
           "file_digest", "check_volume_headers", "VolumeCache", "CACHE_SUFFIX", "LEGACY_CACHE_SUFFIX",
           "write_cached_volume", "read_cached_volume", "preprocess_volumes", "default_num_processes", "crop_or_pad",
           "random_flip", "VFPretrainDataLoader", "nnunet_augmentation", "detect_modality", "exit_with_parent"]

# what SimpleITK reads and nnU-Net datasets commonly use (longest first so '.nii.gz' wins over '.gz')
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl", ".tif", ".tiff",
                    ".vtk", ".img", ".hdr")
CT_WINDOW = (-1000.0, 1000.0)  # HU clip of the MIS-FM reference pipeline, mapped linearly to [-1, 1]
# what happens to a crop before fusion: 'flip' the authors' random flips, 'nnunet' nnU-Net's per-sample training
# transforms, 'none' the crop as it is
AUGMENTATIONS = ("flip", "nnunet", "none")


def _extension(name: str) -> Optional[str]:
    lower = name.lower()
    return next((e for e in IMAGE_EXTENSIONS if lower.endswith(e)), None)


def find_images(inputs: Sequence[str | os.PathLike], manifest: Optional[str | os.PathLike] = None) -> list[Path]:
    """Image files of nnU-Net raw dataset folders (``imagesTr`` and ``imagesTs``; labels are ignored), of plain
    folders (recursively), of single files and of a ``manifest`` (:func:`read_manifest`). Sorted, so every DDP rank
    sees the same order."""
    files: list[Path] = read_manifest(manifest) if manifest is not None else []
    for entry in inputs:
        root = Path(os.path.abspath(os.path.expanduser(entry)))  # absolute: a resumed run may start elsewhere
        if root.is_file():
            files.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"pretraining input {root} does not exist; give nnU-Net raw dataset folders "
                                    f"(with imagesTr/) or folders of images")
        sub = [root / s for s in ("imagesTr", "imagesTs") if (root / s).is_dir()]
        found = [p for d in (sub or [root]) for p in sorted(d.rglob("*"))
                 if p.is_file() and _extension(p.name) and not p.name.startswith(".")]
        if not found:
            raise ValueError(f"no images found in {root} (looked in {', '.join(str(d) for d in (sub or [root]))}); "
                             f"accepted extensions: {', '.join(IMAGE_EXTENSIONS)}")
        files.extend(found)
    # '.img'/'.hdr' and '.mhd'/'.raw' pairs: keep the header file only
    return sorted({f for f in files if not f.name.lower().endswith(".img") or not f.with_suffix(".hdr").exists()})


def read_manifest(path: str | os.PathLike) -> list[Path]:
    """The image paths a manifest lists: a JSON list of paths, or a text file with one path per line (blank lines
    and everything after a '#' that starts a line or follows a space are ignored). Relative paths resolve against
    the manifest's folder, so a manifest travels with its data. Every entry must be an existing image file."""
    manifest = Path(os.path.abspath(os.path.expanduser(path)))
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist: give a text file with one image path per line "
                                f"(or a JSON list of paths) to --manifest")
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read manifest {manifest} ({e}): it must be UTF-8 text, one image path per line, "
                         f"or a JSON list of paths") from e
    if manifest.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {manifest} is not valid JSON ({e}): give a JSON list of image paths, or "
                             f"a text file with one path per line") from e
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            what = "a list with non-string entries" if isinstance(entries, list) else type(entries).__name__
            raise ValueError(f"manifest {manifest} must hold a JSON list of path strings (got {what})")
    else:
        entries = []
        for line in text.splitlines():
            cut = line.find("#") if line.lstrip().startswith("#") else line.find(" #")
            entries.append((line if cut < 0 else line[:cut]).strip())
    base = manifest.parent
    files = [Path(os.path.normpath(base / os.path.expanduser(e))) for e in entries if e.strip()]
    if not files:
        raise ValueError(f"manifest {manifest} lists no image paths: one path per line ('#' comments), or a "
                         f"JSON list")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(files)} paths in manifest {manifest} are not files "
                                f"(e.g. {missing[0]}); relative paths resolve against the manifest's folder "
                                f"{base}: fix or remove those lines")
    unknown = [f for f in files if not _extension(f.name)]
    if unknown:
        raise ValueError(f"{len(unknown)} of the {len(files)} paths in manifest {manifest} are not images by "
                         f"their extension (e.g. {unknown[0]}); accepted: {', '.join(IMAGE_EXTENSIONS)}")
    return files


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a manifest's identity: ``--continue`` refuses a changed manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_num_processes() -> int:
    """Preprocessing processes when -np is not given: this process' CPUs shared among torchrun's local ranks,
    at most 8 (nnU-Net's default for 3D)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def read_image_header(path: str | os.PathLike) -> "sitk.ImageFileReader":
    """SimpleITK's reader of ``path`` with only the header read (size, dimension, components, spacing); raises
    RuntimeError for an unreadable file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _header_status(path: Path) -> tuple:
    """(kind, size, components, reason) of one file's header: kind 'ok', 'unreadable', 'multi' or '2d'."""
    try:
        reader = read_image_header(path)
    except RuntimeError as e:
        return "unreadable", None, None, str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
    size = reader.GetSize()
    if reader.GetDimension() > 3 or reader.GetNumberOfComponents() > 1:
        return "multi", size, reader.GetNumberOfComponents(), None
    if reader.GetDimension() != 3 or min(size) < 1 or size[2] == 1:
        return "2d", size, 1, None
    return "ok", size, 1, None


def _map(function, items: Sequence, num_processes: int, desc: Optional[str] = None, disable: bool = True,
         min_per_process: int = 2):
    """``function`` over ``items`` in order, in a pool of ``num_processes`` spawned processes (nnU-Net's
    preprocessing uses 'spawn' too: forking a process that holds torch's threads can deadlock) or in-process for
    one process or few items; with a progress bar unless ``disable``."""
    from tqdm import tqdm
    if num_processes <= 1 or len(items) < min_per_process * num_processes:
        return [function(x) for x in tqdm(items, desc=desc, disable=disable, dynamic_ncols=True)]
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        chunk = max(1, min(64, len(items) // (8 * num_processes)))
        return list(tqdm(pool.imap(function, items, chunksize=chunk), total=len(items), desc=desc,
                         disable=disable, dynamic_ncols=True))


def check_volume_headers(files: Sequence[Path], num_processes: int = 1, known_good: Optional[set] = None,
                         progress: bool = False) -> list[Path]:
    """Read only the headers: drop unreadable files (warning naming them) and reject 2D images.

    ``known_good``: files whose preprocessed volume is cached already (their header was read once when it was
    made): not read again, so a restart on a filled cache reads no header. The others are read in a pool of
    ``num_processes``. Raises if no file is a readable 3D volume.
    """
    known_good = known_good or set()
    todo = [f for f in files if f not in known_good]
    # a pool starts in seconds (each process imports torch), a header reads in about a millisecond
    status = dict(zip(todo, _map(_header_status, todo, num_processes, "reading image headers",
                                 disable=not progress or len(todo) < 1000, min_per_process=1000)))
    good, two_d, multi = [], [], []
    for f in files:
        kind, size, comps, reason = status.get(f, ("ok", None, 1, None))
        if kind == "unreadable":
            warnings.warn(f"skipping unreadable image {f}: {reason}")
        elif kind == "multi":
            multi.append((f, size, comps))
        elif kind == "2d":
            two_d.append((f, size))
        else:
            good.append(f)
    if multi:
        f, size, comps = multi[0]
        msg = (f"{len(multi)} image(s) have several channels (e.g. {f}, size {size}, {comps} component(s) per "
               f"voxel); Volume Fusion pretraining uses single-channel 3D volumes: split each channel into its own "
               f"3D file (nnU-Net's NAME_0000, NAME_0001, ... layout) or remove them")
        if not good and not two_d:
            raise ValueError(msg)
        warnings.warn(msg + "; they are skipped")
    if two_d:
        msg = (f"{len(two_d)} image(s) are not 3D volumes (e.g. {two_d[0][0]}, size {two_d[0][1]}); Volume Fusion "
               f"pretraining needs 3D volumes: convert 2D slices/series to 3D images or remove them")
        if not good:
            raise ValueError(msg)
        warnings.warn(msg + "; they are skipped")
    if not good:
        raise ValueError(f"none of the {len(files)} input image(s) could be read (first: {files[0] if files else '-'})"
                         f"; check the files are SimpleITK-readable images ({', '.join(IMAGE_EXTENSIONS)})")
    return good


@dataclass
class Preprocessing:
    """What is done to every volume; recorded in ``adaptation_plan.json`` so fine-tuning repeats it.

    ``spacing`` (D, H, W order, mm) or None for native spacing; ``normalization`` "CT" (clip to ``ct_window`` HU and
    map linearly to [-1, 1], nnU-Net's CTNormalization with fixed properties) or "MR" (per-image z-score, nnU-Net's
    ZScoreNormalization).
    """
    normalization: str = "CT"
    spacing: Optional[list[float]] = None
    ct_window: list[float] = field(default_factory=lambda: list(CT_WINDOW))

    def __post_init__(self):
        if self.normalization not in ("CT", "MR"):
            raise ValueError(f"normalization must be 'CT' or 'MR', got {self.normalization!r}")
        if self.spacing is not None:
            self.spacing = [float(s) for s in self.spacing]
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"--spacing needs three positive values (D H W, mm), got {self.spacing}")

    @property
    def ct_intensity_properties(self) -> dict:
        """CTNormalization properties that reproduce the fixed HU window (clip, centre, half-width)."""
        lo, hi = self.ct_window
        return {"mean": (lo + hi) / 2, "std": (hi - lo) / 2, "percentile_00_5": lo, "percentile_99_5": hi,
                "min": lo, "max": hi, "median": (lo + hi) / 2}

    def nnunet_scheme(self) -> str:
        return "CTNormalization" if self.normalization == "CT" else "ZScoreNormalization"

    def normalizer(self):
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import (CTNormalization,
                                                                                        ZScoreNormalization)
        if self.normalization == "CT":
            return CTNormalization(use_mask_for_norm=False, intensityproperties=self.ct_intensity_properties)
        return ZScoreNormalization(use_mask_for_norm=False, intensityproperties={})

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def __call__(self, path: Path) -> np.ndarray:
        """Read, check, resample and normalise one volume -> float32 [1, D, H, W]."""
        from nnunetv2.preprocessing.resampling.default_resampling import (compute_new_shape,
                                                                          resample_data_or_seg_to_shape)
        check_complete(path)
        image = sitk.ReadImage(str(path))
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{path}: Volume Fusion pretraining needs single-channel 3D volumes, got a "
                             f"{image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                             f"component(s)")
        data = sitk.GetArrayFromImage(image).astype(np.float32)[None]  # [1, D, H, W], z first like nnU-Net
        finite = np.isfinite(data)
        # ITK's NIfTI reader already turned NaN into 0: count them in the raw file data
        nonfinite = max(int(data.size - finite.sum()), _nifti_nonfinite_count(path))
        if nonfinite == data.size:
            raise ValueError("every voxel is NaN/Inf (no image content)")
        if nonfinite:
            warnings.warn(f"{path}: {nonfinite} NaN/Inf voxel(s) replaced by 0 before normalisation")
            data = np.where(finite, data, 0).astype(np.float32)
        spacing = list(image.GetSpacing())[::-1]
        if self.spacing is not None and not np.allclose(spacing, self.spacing):
            new_shape = compute_new_shape(data.shape[1:], spacing, self.spacing)
            data = resample_data_or_seg_to_shape(data, new_shape, spacing, self.spacing, is_seg=False, order=3,
                                                 order_z=0, force_separate_z=None).astype(np.float32)
        data = self.normalizer().run(data[0])[None]
        return np.nan_to_num(data, copy=False).astype(np.float32, copy=False)


def _nifti_nonfinite_count(path: Path) -> int:
    """NaN/Inf voxels of a NIfTI file's raw data (SimpleITK's NIfTI reader replaces them with 0 without a word)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return 0
    import nibabel
    raw = np.asanyarray(nibabel.load(str(path)).dataobj)
    return int(raw.size - np.isfinite(raw).sum()) if np.issubdtype(raw.dtype, np.floating) else 0


def check_complete(path: Path) -> None:
    """Raise if the file is truncated: ITK silently fills missing voxels of a cut-off file with zeros."""
    name = path.name.lower()
    if name.endswith(".gz"):
        import gzip
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
        except (EOFError, OSError) as e:
            raise ValueError(f"truncated or corrupt gzip data ({e})") from e
    elif name.endswith(".nii"):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        probe = sitk.Image([1, 1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
        expected = 348 + int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * \
            probe.GetSizeOfPixelComponent()
        if path.stat().st_size < expected:
            raise ValueError(f"file is truncated ({path.stat().st_size} bytes, expected >= {expected})")


CACHE_SUFFIX = ".b2nd"        # nnU-Net 2.8's preprocessed-data format (nnUNetDatasetBlosc2)
LEGACY_CACHE_SUFFIX = ".npy"  # float32, uncompressed: what earlier versions cached; still read


SINGLE_BLOCK_BYTES = 1 << 20  # volumes up to 1 MiB of float32 are stored as one block (see below)


def _cache_blosc2_params(shape: Sequence[int], crop_shape: Sequence[int]) -> tuple[tuple, tuple]:
    """(blocks, chunks) of a cached [1, D, H, W] volume: nnU-Net's ``comp_blosc2_params`` for the crop the loader
    cuts, except that a volume no larger than the crop (read whole anyway) or of at most 1 MiB is one block:
    nnU-Net's 128 KiB blocks compress small volumes worse (bundled hippocampus: 2.05-2.26 bytes/voxel against 1.71
    as one block), and decompressing 1 MiB costs about what the few blocks a crop touches do."""
    if all(s <= c for s, c in zip(shape[1:], crop_shape)) or int(np.prod(shape)) * 4 <= SINGLE_BLOCK_BYTES:
        return tuple(shape), tuple(shape)
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    return comp_blosc2_params(tuple(shape), tuple(crop_shape), 4)


def write_cached_volume(target: Path, data: np.ndarray, crop_shape: Sequence[int]) -> None:
    """``data`` (float32 [1, D, H, W]) as nnU-Net's ``nnUNetDatasetBlosc2.save_case`` writes a case's image
    (blosc2 NDArray, LZ4HC level 5, no filter or byte shuffle, whichever compresses smaller), lossless, written
    atomically: the array is compressed in memory and its contiguous frame written through ``atomic_write``."""
    import blosc2
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = _cache_blosc2_params(data.shape, crop_shape)
    codec, clevel = blosc2.Codec.LZ4HC, 5  # save_case's defaults

    def frame(filter_) -> bytes:
        return blosc2.asarray(data, chunks=chunks, blocks=blocks, cparams={
            "codec": codec, "clevel": clevel, "filters": [filter_], "nthreads": 1}).to_cframe()

    if tuple(chunks) == data.shape:
        # one chunk: nnU-Net's trial slab would be the whole volume, so its two trial compressions are the real
        # ones; keep the smaller (NOFILTER on a tie, as nnU-Net) instead of compressing a third time
        payload = min((frame(f) for f in (blosc2.Filter.NOFILTER, blosc2.Filter.SHUFFLE)), key=len)
    else:
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
        choose = getattr(nnUNetDatasetBlosc2, "_select_filter", None)  # nnU-Net >= 2.8; older: no filter
        payload = frame(choose(data, blocks, chunks, codec, clevel) if choose else blosc2.Filter.NOFILTER)
    atomic_write(target, lambda f: f.write(payload), "preprocessed volume", needed_bytes=len(payload))


def read_cached_volume(path: Path):
    """A cached [1, D, H, W] volume, memory-mapped: a blosc2 NDArray (``.b2nd``; slicing decompresses only the
    chunks a crop touches) or a numpy memmap (legacy ``.npy``)."""
    if path.suffix == CACHE_SUFFIX:
        import blosc2
        return blosc2.open(urlpath=str(path), mode="r", mmap_mode="r", dparams={"nthreads": 1})
    return np.load(path, mmap_mode="r")


def build_cache_entry(job: tuple) -> tuple[Optional[str], list[str]]:
    """Preprocess one volume into the cache. ``job``: (preprocessing, source file, target, crop shape). Returns
    (the reason it failed or None, the warnings raised): picklable, for the preprocessing pool."""
    preprocessing, source, target, crop_shape = job
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = preprocessing(Path(source))
        except Exception as e:  # SimpleITK raises RuntimeError for corrupt data, we raise ValueError
            text = str(e).strip()
            return f"{type(e).__name__}: {text.splitlines()[-1][:200] if text else ''}", []
        write_cached_volume(Path(target), data, crop_shape)
    return None, [str(w.message) for w in caught]


class VolumeCache:
    """Preprocessed volumes, one ``.b2nd`` per file (nnU-Net's compressed format), memory-mapped on read.

    ``crop_shape``: what the loader cuts (the blosc2 chunking follows it). Entries are made ahead of training by
    :func:`preprocess_volumes` or, failing that, on first use. Writing is atomic, so concurrent workers/ranks that
    preprocess the same volume cannot leave a half-written entry. A ``.npy`` entry of earlier versions is read as
    it is.
    """

    def __init__(self, files: Sequence[Path], cache_dir: str | os.PathLike, preprocessing: Preprocessing,
                 crop_shape: Sequence[int] = (64, 128, 128)):
        self.files = [Path(f) for f in files]
        self.cache_dir = Path(cache_dir) / preprocessing.key()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_files(self.cache_dir)  # a killed run's half-written entries would stay forever
        self.preprocessing = preprocessing
        self.crop_shape = [int(c) for c in crop_shape]
        self.failed: set[int] = set()
        self._stems: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.files)

    def _stem(self, i: int) -> str:
        if self._stems is None:  # computed once: resolving a path costs a stat per folder level
            self._stems = [f"{f.name[: -len(_extension(f.name) or '')] or f.name}_"
                           f"{hashlib.sha1(str(f.resolve()).encode()).hexdigest()[:12]}" for f in self.files]
        return self._stems[i]

    def cache_path(self, i: int) -> Path:
        return self.cache_dir / (self._stem(i) + CACHE_SUFFIX)

    def legacy_path(self, i: int) -> Path:
        return self.cache_dir / (self._stem(i) + LEGACY_CACHE_SUFFIX)

    def entry(self, i: int) -> Optional[Path]:
        """The cached file of volume ``i`` (compressed first, then legacy), or None."""
        return next((p for p in (self.cache_path(i), self.legacy_path(i)) if p.exists()), None)

    def cached(self) -> set[int]:
        """Indices with a cache entry: one directory listing, not a stat per volume."""
        return set(range(len(self))).difference(self.missing(range(len(self))))

    def missing(self, indices: Sequence[int], rewrite_legacy: bool = False) -> list[int]:
        """Those of ``indices`` without a cache entry (one directory listing); ``rewrite_legacy``: a legacy ``.npy``
        entry counts as missing too (to be rewritten compressed)."""
        present = set(os.listdir(self.cache_dir))
        return [i for i in indices if self._stem(i) + CACHE_SUFFIX not in present
                and (rewrite_legacy or self._stem(i) + LEGACY_CACHE_SUFFIX not in present)]

    def legacy_entries(self) -> list[int]:
        present = set(os.listdir(self.cache_dir))
        return [i for i in range(len(self)) if self._stem(i) + LEGACY_CACHE_SUFFIX in present
                and self._stem(i) + CACHE_SUFFIX not in present]

    def job(self, i: int) -> tuple:
        return self.preprocessing, str(self.files[i]), str(self.cache_path(i)), self.crop_shape

    def record_build(self, i: int, reason: Optional[str], caught: Sequence[str]) -> bool:
        """Take the outcome of :func:`build_cache_entry` for volume ``i``: its warnings are raised here, in the
        caller's process; a failure is warned once and marks ``i`` failed. True if the entry was made."""
        for message in caught:
            warnings.warn(message)
        if reason is None:
            return True
        warnings.warn(f"skipping {self.files[i]}: cannot read/preprocess it ({reason})")
        self.failed.add(i)
        return False

    def load(self, i: int):
        """Memory-mapped [1, D, H, W] volume, or None if the file cannot be read (warned once)."""
        if i in self.failed:
            return None
        path = self.entry(i)
        if path is None:
            if not self.record_build(i, *build_cache_entry(self.job(i))):
                return None
            path = self.cache_path(i)
        return read_cached_volume(path)


def preprocess_volumes(cache: VolumeCache, indices: Sequence[int], num_processes: int, progress: bool = True,
                       desc: str = "preprocessing") -> set[int]:
    """Fill ``cache`` for ``indices`` (those without an entry) in a pool of ``num_processes``, with a progress bar;
    legacy ``.npy`` entries among them are rewritten compressed. Warns for each volume that cannot be read and
    returns their indices (also added to ``cache.failed``)."""
    todo = cache.missing(indices, rewrite_legacy=True)
    legacy = set(cache.legacy_entries()).intersection(todo)
    if legacy:
        print(f"rewriting {len(legacy)} cached volume(s) of the uncompressed .npy format (4 bytes/voxel) as "
              f"compressed {CACHE_SUFFIX}", file=sys.stderr, flush=True)
    results = _map(_build_or_convert, [(cache.job(i), str(cache.legacy_path(i)) if i in legacy else None)
                                       for i in todo],
                   num_processes, desc, disable=not progress or not todo)
    return {i for i, result in zip(todo, results) if not cache.record_build(i, *result)}


def _build_or_convert(item: tuple) -> tuple[Optional[str], list[str]]:
    """A pool task: make the entry, from the legacy ``.npy`` if there is one (then deleted)."""
    job, legacy = item
    if legacy is None:
        return build_cache_entry(job)
    write_cached_volume(Path(job[2]), np.load(legacy), job[3])
    os.remove(legacy)
    return None, []


def crop_or_pad(volume: np.ndarray, patch_size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random crop [C, *patch] (float32) of a [C, D, H, W] volume; sides smaller than the patch are first padded by
    reflection, centred.

    Reflection, as the authors do, not a constant: after normalisation 0 is water in CT's [-1, 1] and the mean in
    z-scored MR, so a constant border would paint a false tissue slab into the pretext task.
    """
    pads = [((patch - size) // 2, patch - size - (patch - size) // 2) if size < patch else (0, 0)
            for size, patch in zip(volume.shape[1:], patch_size)]
    if any(before or after for before, after in pads):
        # 'reflect' needs two voxels on an axis; a one-voxel side is repeated instead
        mode = "reflect" if min(volume.shape[1:]) > 1 else "edge"
        volume = np.pad(np.asarray(volume, dtype=np.float32), [(0, 0)] + pads, mode=mode)
    region = [slice(None)]
    for size, patch in zip(volume.shape[1:], patch_size):
        start = int(rng.integers(0, size - patch + 1))
        region.append(slice(start, start + patch))
    return np.array(volume[tuple(region)], dtype=np.float32)


def random_flip(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip a [C, D, H, W] crop on each spatial axis with p = 0.5: the authors' only augmentation before fusion."""
    axes = tuple(1 + a for a in range(3) if rng.uniform() < 0.5)
    return np.ascontiguousarray(np.flip(crop, axis=axes)) if axes else crop


def nnunet_augmentation(patch_size: Sequence[int], deep_supervision_scales: Optional[list] = None):
    """nnU-Net's own per-sample training transforms (rotation, scaling, noise, blur, brightness, contrast,
    low-resolution simulation, gamma, mirroring; with ``deep_supervision_scales`` also its label pyramid) and the
    larger crop size its spatial transform expects, chosen as ``nnUNetTrainer`` does for a 3D patch."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.configuration import ANISO_THRESHOLD
    patch_size = [int(p) for p in patch_size]
    dummy_2d = (max(patch_size) / patch_size[0]) > ANISO_THRESHOLD
    angle = (np.pi if dummy_2d else 30. / 180 * np.pi)
    rotation = (-angle, angle)
    initial = [int(i) for i in get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))]
    if dummy_2d:
        initial[0] = patch_size[0]
    transforms = nnUNetTrainer.get_training_transforms(patch_size, rotation, deep_supervision_scales, (0, 1, 2),
                                                       dummy_2d)
    return transforms, initial


class VFPretrainDataLoader(SlimDataLoaderBase):
    """Batches of randomly cropped, per-sample augmented crops [B, 1, *crop_shape] (before Volume Fusion).

    ``crop_shape``: the patch, or for the "grid" variant the larger source region the fusion cuts its two crops
    from (:func:`~nnunetv2_vf.pretrain.volume_fusion.grid_source_shape`). ``augmentation``: one of
    :data:`AUGMENTATIONS`. ``indices`` are this rank's share of the volume index. All randomness comes from
    ``self.rng`` (saved in checkpoints), numpy's and torch's global generators (nnU-Net's transforms), so an
    in-process loader resumes exactly.
    """

    def __init__(self, cache: VolumeCache, indices: Sequence[int], crop_shape: Sequence[int], batch_size: int,
                 augmentation: str = "flip", seed: Optional[int] = None):
        super().__init__(None, batch_size, None)
        if len(indices) == 0:
            raise ValueError("this rank received no volumes: use fewer processes than input volumes")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)} (got {augmentation!r})")
        self.cache = cache
        self.indices = list(indices)
        self.patch_size = [int(p) for p in crop_shape]
        self.augmentation = augmentation
        self.transforms, self.crop_size = (nnunet_augmentation(self.patch_size) if augmentation == "nnunet"
                                           else (None, self.patch_size))
        self.rng = np.random.default_rng(seed)
        self._owner_pid = os.getpid()

    def _sample_volume(self) -> np.ndarray:
        for _ in range(10 * len(self.indices) + 10):
            i = self.indices[int(self.rng.integers(len(self.indices)))]
            volume = self.cache.load(i)
            if volume is not None:
                return volume
            if len(self.cache.failed.intersection(self.indices)) == len(self.indices):
                break
        raise RuntimeError(f"none of the {len(self.indices)} volumes of this process could be read; see the "
                           f"warnings above for the files and reasons")

    def set_thread_id(self, thread_id):
        """Called first thing in each batchgenerators worker process: tie the worker's life to its parent's."""
        super().set_thread_id(thread_id)
        if os.getpid() != self._owner_pid:
            exit_with_parent(self._owner_pid)

    def generate_train_batch(self) -> dict:
        if os.getpid() != self._owner_pid:
            # an augmenter worker: batchgenerators seeded numpy's global generator per worker; derive our own
            # stream from it so that workers do not all produce the same batches
            self.rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
            self._owner_pid = os.getpid()
        data = np.empty((self.batch_size, 1, *self.patch_size), dtype=np.float32)
        for b in range(self.batch_size):
            crop = crop_or_pad(self._sample_volume(), self.crop_size, self.rng)
            if self.augmentation == "flip":
                crop = random_flip(crop, self.rng)
            elif self.transforms is not None:
                image = torch.from_numpy(crop)
                seg = torch.zeros((1, *crop.shape[1:]), dtype=torch.int16)
                crop = self.transforms(image=image, segmentation=seg)["image"].numpy()
            data[b] = crop
        return {"data": data}


def exit_with_parent(parent_pid: int) -> None:
    """End this (worker) process when ``parent_pid`` dies, even by SIGKILL.

    batchgenerators' workers are daemon processes, but daemons are only stopped by a parent that exits normally;
    after a SIGKILL they would block on a full queue forever. Linux: the kernel sends SIGKILL on the parent's
    death (prctl PR_SET_PDEATHSIG). Elsewhere: a thread polls the parent pid.
    """
    import signal
    import sys
    import threading
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():
        import time
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def detect_modality(inputs: Sequence[str | os.PathLike]) -> str:
    """'CT' or 'MR' from the ``channel_names`` of nnU-Net raw datasets' dataset.json ("CT" -> CT, any other name
    -> MR). Raises ValueError naming the folder when an input is a plain image folder (nothing to detect from)
    or the inputs disagree, with the fix (--modality)."""
    found: dict[str, str] = {}
    for entry in inputs:
        root = Path(entry)
        ds = root / "dataset.json"
        if not ds.is_file():
            raise ValueError(f"cannot tell whether {root} holds CT or MR images (no nnU-Net dataset.json with "
                             f"channel_names): give --modality CT (clip HU to [-1000, 1000]) or --modality MR "
                             f"(per-image z-score)")
        try:
            meta = json.loads(ds.read_text())
            names = meta.get("channel_names") or meta.get("modality")  # v2 name, v1 (Decathlon) name
        except (json.JSONDecodeError, OSError) as e:
            raise ValueError(f"cannot read {ds} ({e}): fix it or give --modality CT or --modality MR") from e
        if not names:
            raise ValueError(f"{ds} has no channel_names: give --modality CT or --modality MR")
        kinds = {"CT" if str(v).strip().upper() == "CT" else "MR" for v in dict(names).values()}
        if len(kinds) > 1:
            raise ValueError(f"{ds} mixes CT and non-CT channels ({dict(names)}): pretrain each modality "
                             f"separately with --modality CT or --modality MR")
        found[str(root)] = kinds.pop()
    if len(set(found.values())) > 1:
        raise ValueError(f"the inputs mix CT and MR datasets ({found}): pretrain on one modality, or force one "
                         f"normalisation with --modality CT or --modality MR")
    if not found:
        raise ValueError("no inputs given")
    return next(iter(found.values()))
