"""What defines a Volume Fusion pretraining run: its settings, their checks, and what ``--continue`` may change."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from nnunetv2_vf.architectures.pctnet_sizes import PAPER_FEATURES
from nnunetv2_vf.pretrain.dataset import AUGMENTATIONS, file_digest, find_images
from nnunetv2_vf.pretrain.volume_fusion import (GRID_SOURCE_SCALE, PAPER_PARAMETERS, FusionParameters,
                                                grid_source_shape)

__all__ = ["PretrainConfig", "FUSION_SETTINGS", "RESUMABLE_SETTINGS", "fusion_parameters", "check_config",
           "legacy_recipe",
           "check_fusion_options", "input_manifest", "new_run_config", "resumed_config", "show"]

# what --continue may change: the schedule length and how the run executes; every other setting defines the run
RESUMABLE_SETTINGS = ("iterations", "device", "num_workers", "num_processes", "val_every", "save_every", "cache_dir",
                      "output_dir")


@dataclass
class PretrainConfig:
    inputs: list
    output_dir: str
    iterations: int = 100_000
    batch_size: int = 4
    patch_size: Optional[list] = None           # default: 64x128x128 for PCT-Net, the plans' patch for 'plans'
    variant: str = "paper"
    normalization: Optional[str] = None          # 'CT' or 'MR'; None: from the datasets' dataset.json
    spacing: Optional[list] = None
    network: str = "pctnet"                      # 'pctnet' or 'plans'
    features: list = field(default_factory=lambda: list(PAPER_FEATURES))
    resolution_mode: int = 1
    plans_file: Optional[str] = None
    plans_configuration: str = "3d_fullres"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_step: int = 20_000
    grad_clip: float = 12.0
    device: str = "cuda"
    num_workers: int = 4
    val_every: int = 1000
    save_every: Optional[int] = None            # default: val_every
    val_samples: int = 8
    augmentation: str = "flip"                   # before fusion: 'flip' (the authors'), 'nnunet' or 'none'
    grid_source_scale: float = GRID_SOURCE_SCALE  # 'grid': crops are cut from a region this many times the patch
    seed: int = 12345
    cache_dir: Optional[str] = None              # default: OUTPUT_DIR/cache
    manifest: Optional[str] = None               # a file listing image paths (text or JSON), next to/instead of inputs
    manifest_digest: Optional[str] = None        # its sha256 when the run started: --continue refuses a changed one
    num_processes: Optional[int] = None          # preprocessing processes; default: the CPUs (at most 8)
    # the Volume Fusion knobs (FusionParameters; the paper's values by default)
    vf_classes: int = PAPER_PARAMETERS.num_classes
    vf_boxes: list = field(default_factory=lambda: list(PAPER_PARAMETERS.num_boxes))
    vf_box_min: list = field(default_factory=lambda: list(PAPER_PARAMETERS.box_fraction_min))
    vf_box_max: list = field(default_factory=lambda: list(PAPER_PARAMETERS.box_fraction_max))
    vf_foreground_ratio: float = PAPER_PARAMETERS.foreground_ratio
    vf_block_min: list = field(default_factory=lambda: list(PAPER_PARAMETERS.block_fraction_min))
    vf_block_max: list = field(default_factory=lambda: list(PAPER_PARAMETERS.block_fraction_max))


# PretrainConfig field -> FusionParameters field
FUSION_SETTINGS = {"vf_classes": "num_classes", "vf_boxes": "num_boxes", "vf_box_min": "box_fraction_min",
                   "vf_box_max": "box_fraction_max", "vf_foreground_ratio": "foreground_ratio",
                   "vf_block_min": "block_fraction_min", "vf_block_max": "block_fraction_max"}


def fusion_parameters(cfg: PretrainConfig) -> FusionParameters:
    """The run's Volume Fusion knobs (validated: a bad value raises naming its option and the fix)."""
    return FusionParameters(**{knob: getattr(cfg, setting) for setting, knob in FUSION_SETTINGS.items()})


def _absolute(paths) -> list[str]:
    """Absolute paths: the run is stored with them, so --continue works from any working directory."""
    return [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths]


def _normal(value):
    """Settings as compared on --continue: tuples/lists and ints/floats of json and argparse alike."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _option(setting: str) -> str:
    """The command-line option of a PretrainConfig field."""
    return {"normalization": "--modality", "plans_file": "--plans"}.get(
        setting, "--" + setting.replace("_", "-"))


def show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def input_manifest(files) -> list[list]:
    """[name, size] of each input file, sorted: identifies the data independently of where it lies."""
    return sorted([f.name, f.stat().st_size] for f in files)


def _same_files(inputs, manifest, manifest_file=None) -> Optional[str]:
    """None if ``inputs`` (and ``manifest_file``) hold the run's files (same names and sizes), else what
    differs."""
    if manifest is None:
        return "this run recorded no file list to compare with"
    try:
        now = input_manifest(find_images(inputs, manifest_file))
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    if now == [list(m) for m in manifest]:
        return None
    old = {tuple(m) for m in manifest}
    new = {tuple(m) for m in now}
    only_old, only_new = sorted(old - new), sorted(new - old)
    example_old, example_new = (only_old or [("-",)])[0][0], (only_new or [("-",)])[0][0]
    return (f"{len(only_old)} of the run's {len(old)} files missing or changed (e.g. {example_old}), "
            f"{len(only_new)} new (e.g. {example_new})")


def check_config(cfg: PretrainConfig) -> None:
    """Settings that cannot work, rejected before anything is written, each with what to give instead."""
    def positive(name, value, example):
        if value is None or not isinstance(value, (int, float)) or value < 1:
            raise ValueError(f"--{name} must be >= 1 (got {value}): e.g. --{name} {example}")
    positive("iterations", cfg.iterations, 100000)
    positive("batch-size", cfg.batch_size, 4)
    positive("val-every", cfg.val_every, 1000)
    positive("val-samples", cfg.val_samples, 8)
    positive("lr-step", cfg.lr_step, 20000)
    if cfg.save_every is not None:
        positive("save-every", cfg.save_every, cfg.val_every)
    if cfg.patch_size is not None and (len(cfg.patch_size) != 3 or min(cfg.patch_size) < 1):
        raise ValueError(f"--patch-size needs three positive sizes D H W in voxels (got {show(cfg.patch_size)}): "
                         f"e.g. --patch-size 64 128 128")
    if cfg.num_processes is not None and cfg.num_processes < 1:
        raise ValueError(f"-np must be >= 1 (got {cfg.num_processes}): the number of preprocessing processes")
    if cfg.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0 (got {cfg.num_workers}); 0 runs augmentation in-process")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0 (got {cfg.lr}): e.g. --lr 1e-3")
    if cfg.augmentation not in AUGMENTATIONS:
        raise ValueError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)} (got {cfg.augmentation!r}): "
                         f"'flip' is the authors' recipe")
    grid_source_shape((1, 1, 1), cfg.grid_source_scale)  # raises naming --grid-source-scale
    if cfg.variant == "paper" and cfg.batch_size < 2:
        raise ValueError("the 'paper' Volume Fusion variant fuses samples of a batch: use --batch-size >= 2 "
                         "or --variant grid")
    if not cfg.inputs and not cfg.manifest:
        raise ValueError("no inputs: give nnU-Net raw dataset folders and/or folders of images, or --manifest FILE")
    fusion_parameters(cfg)


def legacy_recipe(run_cfg: dict) -> dict:
    """What a run recorded before the augmentation and grid source settings existed ran with: nnU-Net's transforms
    (its ``augment`` flag) and grid crops cut from the patch itself."""
    out = {}
    if "augmentation" not in run_cfg:
        out["augmentation"] = "nnunet" if run_cfg.get("augment", True) else "none"
    if "grid_source_scale" not in run_cfg:
        out["grid_source_scale"] = 1.0
    return out


def check_fusion_options(cfg: PretrainConfig, given: set) -> None:
    """A knob of the other variant would be silently ignored: refuse it."""
    if "grid_source_scale" in given and cfg.variant != "grid":
        raise ValueError(f"--grid-source-scale acts in the 'grid' Volume Fusion variant only, but this run uses "
                         f"--variant {cfg.variant}: drop --grid-source-scale, or give --variant grid")
    for setting in sorted(given & set(FUSION_SETTINGS)):
        option, variant = FusionParameters.OPTIONS[FUSION_SETTINGS[setting]]
        if variant is not None and variant != cfg.variant:
            raise ValueError(f"{option} acts in the '{variant}' Volume Fusion variant only, but this run uses "
                             f"--variant {cfg.variant}: drop {option}, or give --variant {variant}")


def new_run_config(cfg: PretrainConfig, output_dir: Path) -> PretrainConfig:
    """``cfg`` with absolute paths, as the run stores it (modality still to be detected when None)."""
    manifest = None if cfg.manifest is None else _absolute([cfg.manifest])[0]
    return PretrainConfig(**{**asdict(cfg), "inputs": _absolute(cfg.inputs), "output_dir": str(output_dir),
                             "cache_dir": None if cfg.cache_dir is None else _absolute([cfg.cache_dir])[0],
                             "manifest": manifest,
                             "manifest_digest": None if manifest is None or not os.path.isfile(manifest)
                             else file_digest(manifest)})


def _manifest_change(run_cfg: dict, given: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(what is wrong with the manifest on --continue or None, the manifest to read): the run's manifest, or the
    one given (moved data); its content must be the one the run started with (sha256)."""
    recorded = run_cfg.get("manifest")
    if recorded is None:
        return ((f"--manifest: the run was started without a manifest, the command line gives {given}", None)
                if given else (None, None))
    path = _absolute([given])[0] if given else recorded
    if not os.path.isfile(path):
        return ((f"--manifest: {path} does not exist: give the manifest the run started with ({recorded}), in its "
                 f"new place if it moved", None) if given else
                (f"--manifest: the run's manifest {path} does not exist any more: restore it, or give its new place "
                 f"with --manifest", None))
    digest = file_digest(path)
    if run_cfg.get("manifest_digest") and digest != run_cfg["manifest_digest"]:
        return (f"--manifest: {path} changed since the run started (sha256 {digest[:12]}..., the run recorded "
                f"{run_cfg['manifest_digest'][:12]}...): restore the manifest the run started with, or start a "
                f"new run (another -o folder) on the new list", None)
    return None, path


def resumed_config(cfg: PretrainConfig, explicit: set, run_cfg: dict, manifest, output_dir: Path
                   ) -> tuple[PretrainConfig, Optional[tuple]]:
    """(the run's configuration ``run_cfg`` with the allowed changes of ``cfg``, (old, new) inputs if the data
    moved, else None); refuses any other change, naming it. ``explicit``: the settings the user gave."""
    given = asdict(cfg)
    # a run from before a setting existed ran with its default (e.g. the paper's Volume Fusion knobs)
    run_cfg = {**{k: v for k, v in asdict(PretrainConfig(inputs=[], output_dir="")).items()
                  if k in FUSION_SETTINGS}, **legacy_recipe(run_cfg), **run_cfg}
    differences = [f"{_option(k)}: the run has {show(run_cfg.get(k))}, the command line asks for "
                   f"{show(given[k])}"
                   for k in sorted(explicit - set(RESUMABLE_SETTINGS) - {"inputs", "manifest", "manifest_digest"})
                   if k in run_cfg and _normal(given[k]) != _normal(run_cfg[k])]
    inputs, moved = run_cfg["inputs"], None
    manifest_problem, manifest_file = _manifest_change(run_cfg, given["manifest"] if "manifest" in explicit
                                                       else None)
    if manifest_problem:
        differences.append(manifest_problem)
    elif manifest_file != run_cfg.get("manifest"):  # the manifest moved (same content): continue on it
        problem = _same_files(inputs, manifest, manifest_file)
        if problem is None:
            moved = (run_cfg["manifest"], manifest_file)
        else:
            differences.append(f"--manifest: {manifest_file} has the run's content but lists other files "
                               f"({problem})")
    if "inputs" in explicit and given["inputs"] and _absolute(given["inputs"]) != _absolute(inputs):
        problem = _same_files(given["inputs"], manifest, manifest_file)
        if problem:
            differences.append(f"inputs: the run was started on {show(inputs)}, the command line gives "
                               f"{show(_absolute(given['inputs']))} ({problem})")
        else:  # the same files in a new place: continue on them
            moved = (inputs, _absolute(given["inputs"]))
            inputs = _absolute(given["inputs"])
    if differences:
        raise ValueError("--continue would change the run in " + str(output_dir) + ":\n  " +
                         "\n  ".join(differences) + "\nDrop these options to continue the run as it was started "
                         "(only " + ", ".join(_option(k) for k in RESUMABLE_SETTINGS[:-1]) + " may change), or "
                         "start a new run in another -o folder")
    keep = {k: given[k] for k in RESUMABLE_SETTINGS if k in explicit and k != "output_dir"}
    if keep.get("cache_dir") is not None:
        keep["cache_dir"] = _absolute([keep["cache_dir"]])[0]
    fields = set(PretrainConfig.__dataclass_fields__)
    merged = {k: v for k, v in run_cfg.items() if k in fields}
    return PretrainConfig(**{**merged, **keep, "inputs": inputs, "output_dir": str(output_dir),
                             "manifest": manifest_file}), moved
