"""Volume Fusion pretraining loop (iteration based, single process or torch DDP via ``torchrun``).

Pieces reused from nnU-Net / batchgenerators: preprocessing (see ``dataset.py``), the per-sample training
transforms, ``DC_and_CE_loss`` (do_bg=True, K fusion classes, the paper's 5 by default) with
``DeepSupervisionWrapper``, the batchgenerators augmenters, ``get_network_from_plans`` for the ``plans`` network
option. The paper's optimiser: Adam lr 1e-3, weight decay 1e-5, lr halved every ``lr_step`` iterations.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nnunetv2_vf.architectures.pctnet import PAPER_FEATURES
from nnunetv2_vf.checkpoint_io import atomic_write, read_weights_file, remove_stale_tmp_files, save_torch
from nnunetv2_vf.pretrain.adaptation_plan import FORMAT as ADAPTATION_PLAN_FORMAT, AdaptationPlan, network_keys
from nnunetv2_vf.pretrain.dataset import (Preprocessing, VFPretrainDataLoader, VolumeCache, check_volume_headers,
                                          crop_or_pad, detect_modality, find_images)
from nnunetv2_vf.pretrain.volume_fusion import (PAPER_PARAMETERS, FusionParameters, VolumeFusionTransform,
                                                volume_fusion)

__all__ = ["PretrainConfig", "VFPretrainer", "build_network", "deep_supervision_scales", "PAPER_FEATURES",
           "ADAPTATION_PLAN_FORMAT", "RESUMABLE_SETTINGS", "RUN_FILES"]

PCTNET_CLASS_NAME = "nnunetv2_vf.architectures.pctnet.PCTNet"
# what --continue may change: the schedule length and how the run executes; every other setting defines the run
RESUMABLE_SETTINGS = ("iterations", "device", "num_workers", "val_every", "save_every", "cache_dir", "output_dir")
# a folder with one of these holds a run (training_log.txt alone: a start that was killed before it wrote anything)
RUN_MARKERS = ("config.json", "checkpoint_latest.pth", "checkpoint_final.pth")
# what --overwrite deletes (the preprocessed cache stays: it only depends on the files and the preprocessing)
RUN_FILES = RUN_MARKERS + ("adaptation_plan.json", "validation_set.npz", "progress.png", "training_log.txt")


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
    augment: bool = True
    seed: int = 12345
    cache_dir: Optional[str] = None              # default: OUTPUT_DIR/cache
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


def deep_supervision_scales(strides) -> list[list[float]]:
    """nnU-Net's ``_get_deep_supervision_scales`` for an architecture's strides."""
    return [list(map(float, s)) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]


def build_network(cfg: PretrainConfig) -> tuple[nn.Module, dict, list[int]]:
    """(network with deep supervision, nnU-Net ``architecture`` dict, patch size)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    if cfg.network == "pctnet":
        from nnunetv2_vf.architectures.pctnet import fit_patch_size, pctnet_strides
        patch = fit_patch_size(cfg.patch_size or (64, 128, 128), cfg.resolution_mode)
        arch = {"network_class_name": PCTNET_CLASS_NAME,
                "arch_kwargs": {"features_per_stage": [int(f) for f in cfg.features],
                                "resolution_mode": int(cfg.resolution_mode),
                                "strides": pctnet_strides(cfg.resolution_mode)},
                "_kw_requires_import": []}
    elif cfg.network == "plans":
        if not cfg.plans_file or not os.path.isfile(cfg.plans_file):
            raise FileNotFoundError(f"--network plans needs --plans PATH/TO/nnUNetPlans.json (got {cfg.plans_file!r})")
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        conf = PlansManager(cfg.plans_file).get_configuration(cfg.plans_configuration)
        if len(conf.patch_size) != 3:
            raise ValueError(f"configuration {cfg.plans_configuration!r} of {cfg.plans_file} is 2D; Volume Fusion "
                             f"pretraining needs a 3D configuration (3d_fullres)")
        arch = {"network_class_name": conf.network_arch_class_name, "arch_kwargs": dict(conf.network_arch_init_kwargs),
                "_kw_requires_import": list(conf.network_arch_init_kwargs_req_import)}
        patch = [int(p) for p in (cfg.patch_size or conf.patch_size)]
        div = np.prod(np.vstack(arch["arch_kwargs"]["strides"]), axis=0)
        if any(p % d for p, d in zip(patch, div)):
            raise ValueError(f"patch {patch} is not divisible by the plans network's total stride {div.tolist()}")
    else:
        raise ValueError(f"--network must be 'pctnet' or 'plans', got {cfg.network!r}")
    keys = network_keys(arch["network_class_name"])  # an undeclared network fails now, not at export
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, int(cfg.vf_classes), allow_init=True, deep_supervision=True)
    weights = net.state_dict()
    missing = [k for k in keys.keys_to_in_proj if f"{k}.weight" not in weights]
    if missing:
        raise ValueError(f"{arch['network_class_name']} declares input projection(s) {missing} that its state dict "
                         f"lacks; correct its keys_to_in_proj (or its entry in NNUNET_NETWORK_KEYS)")
    return net, arch, patch


def _rank_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _dice_stats(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-class (tp, fp, fn) of the hard prediction, shape [classes, 3]."""
    pred = logits.argmax(1)
    tgt = target[:, 0].long()
    out = np.zeros((logits.shape[1], 3))
    for c in range(logits.shape[1]):
        p, t = pred == c, tgt == c
        out[c] = [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
    return out


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
    return {"normalization": "--modality", "plans_file": "--plans", "augment": "--no-augmentation"}.get(
        setting, "--" + setting.replace("_", "-"))


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def input_manifest(files) -> list[list]:
    """[name, size] of each input file, sorted: identifies the data independently of where it lies."""
    return sorted([f.name, f.stat().st_size] for f in files)


def _same_files(inputs, manifest) -> Optional[str]:
    """None if ``inputs`` hold the run's files (same names and sizes), else what differs."""
    if manifest is None:
        return "this run recorded no file list to compare with"
    try:
        now = input_manifest(find_images(inputs))
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


def _check_config(cfg: PretrainConfig) -> None:
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
        raise ValueError(f"--patch-size needs three positive sizes D H W in voxels (got {_show(cfg.patch_size)}): "
                         f"e.g. --patch-size 64 128 128")
    if cfg.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0 (got {cfg.num_workers}); 0 runs augmentation in-process")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0 (got {cfg.lr}): e.g. --lr 1e-3")
    if cfg.variant == "paper" and cfg.batch_size < 2:
        raise ValueError("the 'paper' Volume Fusion variant fuses samples of a batch: use --batch-size >= 2 "
                         "or --variant grid")
    if not cfg.inputs:
        raise ValueError("no inputs: give nnU-Net raw dataset folders and/or folders of images")
    fusion_parameters(cfg)


def _check_fusion_options(cfg: PretrainConfig, given: set) -> None:
    """A knob of the other variant would be silently ignored: refuse it."""
    for setting in sorted(given & set(FUSION_SETTINGS)):
        option, variant = FusionParameters.OPTIONS[FUSION_SETTINGS[setting]]
        if variant is not None and variant != cfg.variant:
            raise ValueError(f"{option} acts in the '{variant}' Volume Fusion variant only, but this run uses "
                             f"--variant {cfg.variant}: drop {option}, or give --variant {variant}")


class VFPretrainer:
    """Runs Volume Fusion pretraining as configured; ``run()`` trains and writes the export files."""

    def __init__(self, cfg: PretrainConfig, resume: bool = False, overwrite: bool = False,
                 explicit: Optional[set] = None):
        """``explicit``: the settings the user gave (command line); on ``resume`` only those are compared with the
        run's own, the others are taken from the run. None: every setting of ``cfg`` counts as given."""
        self.rank, self.local_rank, self.world_size = _rank_info()
        self.is_ddp = self.world_size > 1
        if resume and overwrite:
            raise ValueError("--continue and --overwrite contradict each other: --continue resumes the run in "
                             f"{cfg.output_dir}, --overwrite deletes it; give one of them")
        self.output_dir = Path(os.path.abspath(os.path.expanduser(cfg.output_dir)))
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"-o {self.output_dir} is a file, not a folder: give a folder for the run's outputs "
                             f"(it is created if missing)")
        self.latest = self.output_dir / "checkpoint_latest.pth"
        self.moved_inputs = None
        self.detected_modality = False
        self.manifest = None
        given = explicit
        explicit = set(asdict(cfg)) if explicit is None else set(explicit)
        if resume:
            self.saved, cfg = self._resume_config(cfg, explicit)
        else:
            self._refuse_existing_run(overwrite)
            self.saved = None
            cfg = PretrainConfig(**{**asdict(cfg), "inputs": _absolute(cfg.inputs), "output_dir": str(self.output_dir),
                                    "cache_dir": None if cfg.cache_dir is None else _absolute([cfg.cache_dir])[0]})
            if cfg.normalization is None:  # MR and CT need different normalisations: never assume one
                cfg.normalization = detect_modality(cfg.inputs)
                self.detected_modality = True
        _check_config(cfg)
        if given is not None and not resume:
            _check_fusion_options(cfg, set(given))
        self.fusion = fusion_parameters(cfg)
        self.overwrite = overwrite
        self.resuming = resume
        self.cfg = cfg
        self.device = self._setup_device()

    # ------------------------------------------------------------------ run identity
    def _refuse_existing_run(self, overwrite: bool) -> None:
        present = [n for n in RUN_MARKERS if (self.output_dir / n).exists()]
        if present and not overwrite:
            raise ValueError(f"{self.output_dir} already holds a pretraining run ({', '.join(present)}). To resume "
                             f"it: the same command with --continue; to start a new run: another -o folder, or "
                             f"--overwrite to delete that run's files (the preprocessed cache is kept)")

    def _resume_config(self, cfg: PretrainConfig, explicit: set) -> tuple[Optional[dict], PretrainConfig]:
        """(checkpoint or None, the run's configuration with the allowed changes); refuses any other change."""
        config_file = self.output_dir / "config.json"
        saved = None
        if self.latest.exists():
            fix = ("--continue cannot resume from it: restore it from a backup, or start again with --overwrite (or "
                   "another -o folder)")
            # allow_numpy: runs saved before the RNG states became plain lists
            saved = read_weights_file(self.latest, "the run's checkpoint", "", fix, allow_numpy=True)
            run_cfg, manifest = dict(saved["config"]), saved.get("input_files")
        elif config_file.is_file():  # killed before its first checkpoint: restart it from iteration 0
            stored = json.loads(config_file.read_text())
            manifest = stored.pop("input_files", None)
            run_cfg = stored
        else:
            raise FileNotFoundError(f"--continue: {self.output_dir} holds no pretraining run to resume (no "
                                    f"checkpoint_latest.pth or config.json): start without --continue")
        self.manifest = manifest
        given = asdict(cfg)
        # a run from before a setting existed ran with its default (e.g. the paper's Volume Fusion knobs)
        run_cfg = {**{k: v for k, v in asdict(PretrainConfig(inputs=[], output_dir="")).items()
                      if k in FUSION_SETTINGS}, **run_cfg}
        differences = [f"{_option(k)}: the run has {_show(run_cfg.get(k))}, the command line asks for "
                       f"{_show(given[k])}" for k in sorted(explicit - set(RESUMABLE_SETTINGS) - {"inputs"})
                       if k in run_cfg and _normal(given[k]) != _normal(run_cfg[k])]
        inputs = run_cfg["inputs"]
        if "inputs" in explicit and given["inputs"] and _absolute(given["inputs"]) != _absolute(inputs):
            problem = _same_files(given["inputs"], manifest)
            if problem:
                differences.append(f"inputs: the run was started on {_show(inputs)}, the command line gives "
                                   f"{_show(_absolute(given['inputs']))} ({problem})")
            else:  # the same files in a new place: continue on them
                self.moved_inputs = (inputs, _absolute(given["inputs"]))
                inputs = _absolute(given["inputs"])
        if differences:
            raise ValueError("--continue would change the run in " + str(self.output_dir) + ":\n  " +
                             "\n  ".join(differences) + "\nDrop these options to continue the run as it was started "
                             "(only " + ", ".join(_option(k) for k in RESUMABLE_SETTINGS[:-1]) + " may change), or "
                             "start a new run in another -o folder")
        keep = {k: given[k] for k in RESUMABLE_SETTINGS if k in explicit and k != "output_dir"}
        if keep.get("cache_dir") is not None:
            keep["cache_dir"] = _absolute([keep["cache_dir"]])[0]
        fields = set(PretrainConfig.__dataclass_fields__)
        merged = {k: v for k, v in run_cfg.items() if k in fields}
        return saved, PretrainConfig(**{**merged, **keep, "inputs": inputs, "output_dir": str(self.output_dir)})

    # ------------------------------------------------------------------ setup
    def _setup_device(self) -> torch.device:
        want = self.cfg.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
        if self.is_ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want == "cuda" else "gloo")
        if want == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def log(self, msg: str, stderr: bool = False) -> None:
        if self.rank != 0:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {msg}"
        from tqdm import tqdm
        tqdm.write(line, file=sys.stderr if stderr else sys.stdout)
        with open(self.output_dir / "training_log.txt", "a") as f:
            f.write(line + "\n")

    def _build(self, files) -> None:
        cfg = self.cfg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files = check_volume_headers(files)
            self.preprocessing = Preprocessing(cfg.normalization, cfg.spacing)
            self.cache = VolumeCache(files, cfg.cache_dir or self.output_dir / "cache", self.preprocessing)
            self.usable = self._prepare_volumes()
        for w in caught:  # skipped files and NaN voxels: in training_log.txt too, not only on the terminal
            self.log(f"warning: {w.message}", stderr=True)
        if not self.usable:
            raise ValueError(f"none of the {len(self.cache)} input volume(s) could be read and preprocessed (reasons "
                             f"above and in {self.output_dir / 'training_log.txt'}): replace the broken files "
                             f"(truncated downloads, all-NaN images) or give other inputs")
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.network, self.architecture, self.patch_size = build_network(cfg)
        # nnU-Net's transforms draw from the global generators: seed them per rank for reproducible runs
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        self.network.to(self.device)
        strides = self.architecture["arch_kwargs"]["strides"]
        self.ds_scales = deep_supervision_scales(strides)
        self.loss = self._build_loss()
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None
        self.model = (nn.parallel.DistributedDataParallel(self.network, device_ids=[self.local_rank]
                                                          if self.device.type == "cuda" else None)
                      if self.is_ddp else self.network)
        # DistributedSampler-like sharding of the volume index
        shard = self.usable[self.rank::self.world_size]
        self.loader = VFPretrainDataLoader(self.cache, shard, self.patch_size, cfg.batch_size, augment=cfg.augment,
                                           seed=cfg.seed + 1000 * self.rank)
        self.vf_transform = VolumeFusionTransform(cfg.variant, seed=cfg.seed + 1000 * self.rank + 1,
                                                  deep_supervision_scales=self.ds_scales, params=self.fusion)
        self.iteration = 0
        self.logs = {"iteration": [], "train_loss": [], "val_loss": [], "val_dice": [], "lr": [], "sec_per_it": [],
                     "train_iteration": [], "train_loss_recent": [], "train_lr": []}

    def _prepare_volumes(self) -> list[int]:
        """Preprocess (or find cached) every volume now, each rank its share: unreadable ones are known before
        training and not counted, and workers only memory-map. Returns the indices of the usable volumes."""
        todo = [i for i in range(self.rank, len(self.cache), self.world_size) if not self.cache.cache_path(i).exists()]
        if todo:
            self.log(f"preprocessing {len(todo)} volume(s) once into {self.cache.cache_dir}")
        for i in range(self.rank, len(self.cache), self.world_size):
            self.cache.load(i)
        failed = set(self.cache.failed)
        if self.is_ddp:
            every = [None] * self.world_size
            dist.all_gather_object(every, sorted(failed))
            failed = set().union(*every)
        self.cache.failed = failed
        return [i for i in range(len(self.cache)) if i not in failed]

    def _build_loss(self):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        self.base_loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": True, "ddp": self.is_ddp}, {},
                                        weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
        weights = np.array([1 / (2 ** i) for i in range(len(self.ds_scales))])
        weights[-1] = 1e-6 if self.is_ddp else 0  # as nnU-Net: DDP rejects parameters without gradient
        return DeepSupervisionWrapper(self.base_loss, weights / weights.sum())

    def _augmenter(self):
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        if self.cfg.num_workers <= 0:
            return SingleThreadedAugmenter(self.loader, self.vf_transform)
        seeds = [self.cfg.seed + 1000 * self.rank + 7 + i + self.iteration for i in range(self.cfg.num_workers)]
        return MultiThreadedAugmenter(self.loader, self.vf_transform, self.cfg.num_workers, num_cached_per_queue=2,
                                      seeds=seeds, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ validation set
    def _validation_set(self) -> tuple[np.ndarray, np.ndarray]:
        """Fused validation crops generated once (fixed seed) and saved, so the metric is comparable over time."""
        path = self.output_dir / "validation_set.npz"
        if self.rank == 0 and not path.is_file():
            rng = np.random.default_rng(self.cfg.seed + 99)
            order = rng.permutation(len(self.cache))
            readable = []
            for i in order:
                if self.cache.load(int(i)) is not None:
                    readable.append(int(i))
                if len(readable) == self.cfg.val_samples:
                    break
            if not readable:
                raise ValueError("no input volume could be read; see the warnings above")
            # fewer volumes than samples: several crops of the same volumes
            crops = [crop_or_pad(self.cache.load(readable[k % len(readable)]), self.patch_size, rng)
                     for k in range(max(2, self.cfg.val_samples))]
            fused, labels = volume_fusion(np.stack(crops), rng, self.cfg.variant, params=self.fusion)
            atomic_write(path, lambda f: np.savez(f, data=fused, target=labels), "validation set",
                         fused.nbytes + labels.nbytes)
        if self.is_ddp:
            dist.barrier()
        with np.load(path) as f:
            return f["data"], f["target"]

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        self.network.eval()
        stats, losses = np.zeros((self.fusion.num_classes, 3)), []
        bs = self.cfg.batch_size
        for s in range(0, len(self.val_data), bs):
            x = torch.from_numpy(self.val_data[s:s + bs]).to(self.device)
            y = torch.from_numpy(self.val_target[s:s + bs].astype(np.int64)).to(self.device)
            with self._autocast():
                out = self.network(x)
                out = out[0] if isinstance(out, (list, tuple)) else out
                if self.is_ddp:  # the loss' batch dice would all-gather across ranks; only rank 0 validates
                    self.base_loss.dc.ddp = False
                losses.append(self.base_loss(out, y).item())
                self.base_loss.dc.ddp = self.is_ddp
            stats += _dice_stats(out.float(), y)
        self.network.train()
        tp, fp, fn = stats.T
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
        return float(np.mean(losses)), float(np.nanmean(dice))

    def _autocast(self):
        from contextlib import nullcontext
        return torch.autocast("cuda", enabled=True) if self.device.type == "cuda" else nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict:
        vf_rng = self.vf_transform._rng
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "loader": self.loader.rng.bit_generator.state,
                "vf": None if vf_rng is None else vf_rng.bit_generator.state}

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.loader.rng.bit_generator.state = state["loader"]
        if state.get("vf") is not None:
            rng = self.vf_transform.rng  # creates the per-process generator, then overwrite its state
            rng.bit_generator.state = state["vf"]

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        ckpt = {"network_weights": self.network.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                "scheduler_state": self.scheduler.state_dict(),
                "grad_scaler_state": None if self.scaler is None else self.scaler.state_dict(),
                "iteration": self.iteration, "logs": self.logs, "rng_state": self._rng_state(),
                "config": asdict(self.cfg), "input_files": self.manifest,
                "architecture": json.loads(json.dumps(self.architecture))}
        save_torch(ckpt, self.latest, "checkpoint")

    def _load_checkpoint(self, ckpt: dict) -> None:
        self.network.load_state_dict(ckpt["network_weights"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        if self.scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.iteration = int(ckpt["iteration"])
        self.logs = {**self.logs, **ckpt["logs"]}  # runs saved before fine-grained logs existed lack those
        if self.rank == 0:  # other ranks continue with fresh streams derived from the seed
            self._set_rng_state(ckpt["rng_state"])
        else:
            self.loader.rng = np.random.default_rng([self.cfg.seed, self.rank, self.iteration])

    def adaptation_plan(self) -> AdaptationPlan:
        """What fine-tuning needs to reproduce pretraining."""
        p = self.preprocessing
        return AdaptationPlan.for_network(
            self.architecture,
            trainer_name="nnUNetv2_vf_pretrain",
            pretrain_num_input_channels=1,
            recommended_downstream_patchsize=list(self.patch_size),
            patch_size=list(self.patch_size),
            preprocessing={"spacing": p.spacing, "normalization": p.normalization,
                           "nnunet_normalization_scheme": p.nnunet_scheme(),
                           "intensity_properties": p.ct_intensity_properties if p.normalization == "CT" else None,
                           "ct_window": p.ct_window if p.normalization == "CT" else None,
                           "resampling": "nnunetv2 resample_data_or_seg_to_shape, order 3, order_z 0, "
                                         "separate z for anisotropic spacing"},
            volume_fusion={"variant": self.cfg.variant, **self.fusion.to_dict()},
            optimizer={"name": "Adam", "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay,
                       "lr_halved_every": self.cfg.lr_step, "batch_size": self.cfg.batch_size,
                       "world_size": self.world_size},
            iterations=self.iteration,
            num_pretraining_images=len(self.usable),
            weights_file="checkpoint_final.pth")

    def _write_json(self, name: str, obj: dict) -> None:
        atomic_write(self.output_dir / name, lambda f: f.write(json.dumps(obj, indent=2).encode()), name)

    def export_final(self) -> None:
        if self.rank != 0:
            return
        final = {"network_weights": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
                 "trainer_name": "nnUNetv2_vf_pretrain", "current_epoch": int(self.iteration),
                 "iteration": int(self.iteration), "architecture": json.loads(json.dumps(self.architecture))}
        save_torch(final, self.output_dir / "checkpoint_final.pth", "final checkpoint")
        # only now: an adaptation plan must always describe a network that exists
        self.adaptation_plan().save(self.output_dir / "adaptation_plan.json")

    # ------------------------------------------------------------------ plotting
    def plot_progress(self) -> None:
        """Training loss every few iterations (the curve), validation loss/Dice at each validation, seconds per
        iteration, and the learning rate only when it changed (a flat line says nothing)."""
        if self.rank != 0 or not self.logs["iteration"]:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        it, lg = self.logs["iteration"], self.logs
        lr_points = (lg["train_iteration"], lg["train_lr"]) if lg["train_iteration"] else (it, lg["lr"])
        show_lr = len(set(lr_points[1])) > 1
        fig, axes = plt.subplots(3 if show_lr else 2, 1, figsize=(10, 12 if show_lr else 8), squeeze=False)
        axes = axes[:, 0]
        network = self.architecture["network_class_name"].split(".")[-1]
        fig.suptitle(f"Volume Fusion pretraining ({self.cfg.variant}) of {network} in {self.output_dir.name}: "
                     f"iteration {self.iteration}/{self.cfg.iterations}")
        ax = axes[0]
        if lg["train_iteration"]:
            ax.plot(lg["train_iteration"], lg["train_loss_recent"], "b-", alpha=0.4, lw=1,
                    label=f"train loss (mean of {self._train_log_every()} it.)")
        ax.plot(it, lg["train_loss"], "b.-", label="train loss (mean since last validation)")
        ax.plot(it, lg["val_loss"], "r.-", label="val loss")
        ax.set_xlabel("iteration"), ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(it, lg["val_dice"], "g.--", label=f"val mean Dice ({self.cfg.vf_classes} fusion classes)")
        ax2.set_ylabel("mean Dice")
        ax.legend(loc="upper left"), ax2.legend(loc="upper right")
        axes[1].plot(it, lg["sec_per_it"], "b.-", label="seconds / iteration")
        axes[1].set_xlabel("iteration"), axes[1].legend(loc="upper left")
        if show_lr:
            axes[2].plot(*lr_points, "b-", label="learning rate")
            axes[2].set_xlabel("iteration"), axes[2].set_yscale("log"), axes[2].legend(loc="upper right")
        fig.tight_layout()
        atomic_write(self.output_dir / "progress.png", lambda f: fig.savefig(f, format="png"), "progress plot")
        plt.close(fig)

    def _train_log_every(self) -> int:
        """Training loss is logged this often: ~5 points per validation interval, at least every 20 iterations."""
        return max(1, min(20, self.cfg.val_every // 5))

    # ------------------------------------------------------------------ main loop
    def _prepare_output_dir(self) -> list:
        """Rank 0: create the folder, delete the old run (--overwrite), remove killed writers' temporary files.
        Returns the input files."""
        files = self._input_files()
        if self.rank != 0:
            return files
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for name in RUN_FILES:
                (self.output_dir / name).unlink(missing_ok=True)
        removed = remove_stale_tmp_files(self.output_dir)
        if removed:
            self.log(f"removed temporary files of an interrupted run: {', '.join(removed)}")
        if self.manifest is None:
            self.manifest = input_manifest(files)
        if self.moved_inputs:
            self.log(f"inputs moved: {_show(self.moved_inputs[0])} -> {_show(self.moved_inputs[1])} (same "
                     f"{len(self.manifest)} files by name and size)")
        if self.detected_modality:
            self.log(f"modality {self.cfg.normalization} from the inputs' dataset.json channel_names "
                     f"(--modality to override)")
        return files

    def _input_files(self) -> list:
        try:
            return find_images(self.cfg.inputs)
        except FileNotFoundError as e:
            if self.saved is None and not (self.output_dir / "config.json").exists():
                raise
            raise FileNotFoundError(f"{e}. If the data moved, continue on its new place: the same command with "
                                    f"--continue and the new input folders (they must hold the same files, "
                                    f"compared by name and size)") from e

    def run(self) -> dict:
        cfg = self.cfg
        files = self._prepare_output_dir()
        if self.is_ddp:
            dist.barrier()
        self._build(files)
        if self.rank == 0:  # only for usable inputs: a run refused for its data is no run to --continue
            self._write_json("config.json", {**asdict(self.cfg), "input_files": self.manifest})
        if self.saved is not None:
            self._load_checkpoint(self.saved)
            self.log(f"resumed from {self.latest} at iteration {self.iteration}")
        elif self.resuming:
            self.log("no checkpoint yet: the run starts again from iteration 0")
        self.val_data, self.val_target = self._validation_set()
        nparams = sum(p.numel() for p in self.network.parameters())
        skipped = len(self.cache.files) - len(self.usable)
        self.log(f"Volume Fusion pretraining ({cfg.variant}) of {self.architecture['network_class_name']} "
                 f"({nparams / 1e6:.2f} M parameters) on {len(self.usable)} volumes"
                 f"{f' ({skipped} skipped)' if skipped else ''}, patch {self.patch_size}, batch "
                 f"{cfg.batch_size} x {self.world_size} process(es), device {self.device}, "
                 f"modality {cfg.normalization}")
        save_every = cfg.save_every or cfg.val_every
        log_every = self._train_log_every()
        augmenter = self._augmenter() if self.iteration < cfg.iterations else None
        from tqdm import tqdm
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=self.rank != 0, desc="VF pretraining",
                   dynamic_ncols=True)
        interval_losses, recent, t0 = [], [], time.time()
        self._data_wait = 0.0  # seconds of this interval spent waiting for the augmenter
        self.network.train()
        try:
            while self.iteration < cfg.iterations:
                t_wait = time.perf_counter()
                batch = next(augmenter)
                self._data_wait += time.perf_counter() - t_wait
                loss = self._train_step(batch)  # .item() synchronises, so step times are real on CUDA too
                self.iteration += 1
                interval_losses.append(loss)
                recent.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                done = self.iteration >= cfg.iterations
                if self.iteration % log_every == 0 or done:
                    self.logs["train_iteration"].append(self.iteration)
                    self.logs["train_loss_recent"].append(float(np.mean(recent)))
                    self.logs["train_lr"].append(self.optimizer.param_groups[0]["lr"])
                    recent = []
                if self.iteration % cfg.val_every == 0 or done:
                    self._end_interval(interval_losses, t0)
                    interval_losses, t0, self._data_wait = [], time.time(), 0.0
                if self.iteration % save_every == 0 or done:
                    self.save_checkpoint()
        finally:
            bar.close()
            if augmenter is not None and hasattr(augmenter, "_finish"):
                augmenter._finish()
        self.export_final()
        if self.is_ddp:
            dist.barrier()
        return {"iteration": self.iteration, "logs": self.logs}

    def _train_step(self, batch: dict) -> float:
        cfg = self.cfg
        x = torch.as_tensor(batch["data"]).to(self.device, non_blocking=True)
        y = [torch.as_tensor(t.astype(np.int64) if isinstance(t, np.ndarray) else t).to(self.device)
             for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}; lower --lr or check "
                                     f"the input intensities (normalisation {cfg.normalization})")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(self.network.parameters(), cfg.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def _end_interval(self, losses: list, t0: float) -> None:
        elapsed = time.time() - t0  # the interval's training steps, before validation
        if self.rank == 0:
            val_loss, val_dice = self.validate()
            lr = self.optimizer.param_groups[0]["lr"]
            self.logs["iteration"].append(self.iteration)
            self.logs["train_loss"].append(float(np.mean(losses)))
            self.logs["val_loss"].append(val_loss)
            self.logs["val_dice"].append(val_dice)
            self.logs["lr"].append(lr)
            self.logs["sec_per_it"].append(elapsed / max(1, len(losses)))
            wait = 100 * self._data_wait / max(elapsed, 1e-9)
            self.logs.setdefault("data_wait_percent", []).append(wait)
            self.log(f"iteration {self.iteration}/{self.cfg.iterations}: train loss {np.mean(losses):.4f}, "
                     f"val loss {val_loss:.4f}, val mean Dice {val_dice:.4f}, lr {lr:.2e}, "
                     f"{self.logs['sec_per_it'][-1]:.2f} s/it ({1 / max(self.logs['sec_per_it'][-1], 1e-9):.2f} "
                     f"it/s), data wait {wait:.1f} % of step time")
            self.plot_progress()
        if self.is_ddp:
            dist.barrier()
