"""Volume Fusion pretraining (iteration based, single process or torch DDP via ``torchrun``): the orchestration.

The pieces: ``config`` (the run's settings and what ``--continue`` may change), ``distributed`` (rank, device,
process group), ``checkpoints`` (the run folder's files, resume state), ``loop`` (training step, validation,
nnU-Net's ``DC_and_CE_loss`` with ``DeepSupervisionWrapper``), ``progress`` (training_log.txt, progress.png).
Reused from nnU-Net / batchgenerators besides the loss: preprocessing (see ``dataset.py``), the per-sample
training transforms, the batchgenerators augmenters, ``get_network_from_plans`` for the ``plans`` network option.
The paper's optimiser: Adam lr 1e-3, weight decay 1e-5, lr halved every ``lr_step`` iterations.
"""
from __future__ import annotations

import os
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from nnunetv2_vf.architectures.pctnet import PAPER_FEATURES
from nnunetv2_vf.checkpoint_io import RunLock, atomic_write
from nnunetv2_vf.pretrain.adaptation_plan import FORMAT as ADAPTATION_PLAN_FORMAT, AdaptationPlan, network_keys
from nnunetv2_vf.pretrain.checkpoints import RUN_FILES, RUN_LOCK, CheckpointStore, plain, rng_state, set_rng_state
from nnunetv2_vf.pretrain.config import (FUSION_SETTINGS, RESUMABLE_SETTINGS, PretrainConfig, check_config,
                                         check_fusion_options, fusion_parameters, input_manifest, new_run_config,
                                         resumed_config, show)
from nnunetv2_vf.pretrain.dataset import (CACHE_SUFFIX, LEGACY_CACHE_SUFFIX, Preprocessing, VFPretrainDataLoader,
                                          VolumeCache, check_volume_headers, crop_or_pad, default_num_processes,
                                          detect_modality, find_images, preprocess_volumes)
from nnunetv2_vf.pretrain.distributed import Distributed
from nnunetv2_vf.pretrain.nnssl_format import nnssl_checkpoint_fields
from nnunetv2_vf.pretrain.loop import Optimisation, build_loss, deep_supervision_scales, evaluate, train_step
from nnunetv2_vf.pretrain.progress import PLATEAU_RISE, empty_logs, late_rise, log_line, plot_progress, train_log_every
from nnunetv2_vf.pretrain.volume_fusion import VolumeFusionTransform, grid_source_shape, volume_fusion

__all__ = ["PretrainConfig", "VFPretrainer", "build_network", "rank_share", "deep_supervision_scales", "PAPER_FEATURES",
           "ADAPTATION_PLAN_FORMAT", "RESUMABLE_SETTINGS", "RUN_FILES", "FUSION_SETTINGS", "input_manifest"]

PCTNET_CLASS_NAME = "nnunetv2_vf.architectures.pctnet.PCTNet"


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
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, int(cfg.vf_classes), allow_init=True, deep_supervision=True)
    keys = network_keys(net)  # an undeclared network fails now, not at export
    weights = net.state_dict()
    missing = [k for k in keys.keys_to_in_proj if f"{k}.weight" not in weights]
    if missing:
        raise ValueError(f"{arch['network_class_name']} declares input projection(s) {missing} that its state dict "
                         f"lacks; correct its keys_to_in_proj")
    return net, arch, patch


def rank_share(usable: list[int], rank: int, world_size: int, seed: int) -> tuple[list[int], int]:
    """(the volumes rank ``rank`` samples from, its sampling seed): disjoint volume sets and distinct seeds, so no
    two ranks train on the same crops (DistributedSampler's strided sharding)."""
    return usable[rank::world_size], seed + 1000 * rank


class VFPretrainer:
    """Runs Volume Fusion pretraining as configured; ``run()`` trains and writes the export files."""

    def __init__(self, cfg: PretrainConfig, resume: bool = False, overwrite: bool = False,
                 explicit: Optional[set] = None, preprocess_only: bool = False):
        """``explicit``: the settings the user gave (command line); on ``resume`` only those are compared with the
        run's own, the others are taken from the run. None: every setting of ``cfg`` counts as given.
        ``preprocess_only``: :meth:`preprocess` fills the cache of this configuration; -o may hold a run."""
        self.preprocess_only = preprocess_only
        self.dist = Distributed.from_env()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        if resume and overwrite:
            raise ValueError("--continue and --overwrite contradict each other: --continue resumes the run in "
                             f"{cfg.output_dir}, --overwrite deletes it; give one of them")
        self.output_dir = Path(os.path.abspath(os.path.expanduser(cfg.output_dir)))
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"-o {self.output_dir} is a file, not a folder: give a folder for the run's outputs "
                             f"(it is created if missing)")
        # one writer per run folder (rank 0 writes for all ranks): a running run's lock stops this process before
        # anything in the folder is read (a probe, released at once); run() holds the lock from its first write on,
        # and only then creates the lock file
        self.run_lock = RunLock(self.output_dir, RUN_LOCK, "nnUNetv2_vf_pretrain")
        if self.rank == 0:
            self.run_lock.acquire(create=False).release()
        self._init_run(cfg, resume, overwrite, explicit)

    def _init_run(self, cfg: PretrainConfig, resume: bool, overwrite: bool, explicit: Optional[set]) -> None:
        self.store = CheckpointStore(self.output_dir)
        self.moved_inputs = None
        self.detected_modality = False
        self.manifest = None
        if resume:
            self.saved, run_cfg, self.manifest = self.store.read_run()
            cfg, self.moved_inputs = resumed_config(cfg, set(asdict(cfg)) if explicit is None else set(explicit),
                                                    run_cfg, self.manifest, self.output_dir)
        else:
            if not self.preprocess_only:
                self.store.refuse_existing_run(overwrite)
            self.saved = None
            cfg = new_run_config(cfg, self.output_dir)
            if cfg.normalization is None:  # MR and CT need different normalisations: never assume one
                if cfg.manifest is not None:
                    raise ValueError(f"cannot tell whether the images of manifest {cfg.manifest} are CT or MR (a "
                                     f"manifest lists files, no dataset.json): give --modality CT (clip HU to "
                                     f"[-1000, 1000]) or --modality MR (per-image z-score)")
                cfg.normalization = detect_modality(cfg.inputs)
                self.detected_modality = True
        check_config(cfg)
        if explicit is not None and not resume:
            check_fusion_options(cfg, set(explicit))
        self.fusion = fusion_parameters(cfg)
        self.overwrite = overwrite
        self.resuming = resume
        self.cfg = cfg
        self.device = self.dist.setup_device(cfg.device)

    @property
    def source_shape(self) -> list[int]:
        """What the loader crops: the patch, or for "grid" the larger region both crops of a pair come from."""
        if self.cfg.variant == "grid":
            return list(grid_source_shape(self.patch_size, self.cfg.grid_source_scale))
        return list(self.patch_size)

    @property
    def latest(self) -> Path:
        return self.output_dir / "checkpoint_latest.pth"

    def log(self, msg: str, stderr: bool = False) -> None:
        if self.rank == 0:
            log_line(self.output_dir, msg, stderr)

    # ------------------------------------------------------------------ setup
    def _build(self, files) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.network, self.architecture, self.patch_size = build_network(cfg)
        self.usable = self._prepare_cache(files)
        # nnU-Net's transforms draw from the global generators: seed them per rank for reproducible runs
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        self.network.to(self.device)
        self.ds_scales = deep_supervision_scales(self.architecture["arch_kwargs"]["strides"])
        self.loss, self.base_loss = build_loss(len(self.ds_scales), self.dist.is_ddp)
        self.optimisation = Optimisation.build(self.network, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.grad_clip,
                                               self.device)
        self.model = self.dist.wrap(self.network, self.device)
        shard, loader_seed = rank_share(self.usable, self.rank, self.world_size, cfg.seed)
        self.loader = VFPretrainDataLoader(self.cache, shard, self.source_shape, cfg.batch_size,
                                           augmentation=cfg.augmentation, seed=loader_seed)
        self.vf_transform = VolumeFusionTransform(cfg.variant, seed=loader_seed + 1,
                                                  deep_supervision_scales=self.ds_scales, params=self.fusion,
                                                  output_shape=self.patch_size)
        self.iteration = 0
        self.logs = empty_logs()

    def _prepare_cache(self, files) -> list[int]:
        """Check the inputs' headers (those not cached yet), then preprocess the volumes missing from the cache,
        each rank its share, in a pool: unreadable ones are known before training and not counted, and workers only
        memory-map. Returns the indices of the usable volumes."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            processes, mine = self._open_cache(files)
            todo = self.cache.missing(mine)
            legacy = len(set(self.cache.legacy_entries()).intersection(mine))
            if todo:
                self.log(f"preprocessing {len(todo)} of {len(self.cache)} volume(s) into {self.cache.cache_dir} "
                         f"({processes} process(es){f' on each of {self.world_size} ranks' if self.dist.is_ddp else ''}"
                         f"; nnUNetv2_vf_pretrain --preprocess-only does this ahead of training)")
            else:
                self.log(f"all {len(mine)} volume(s){' of this rank' if self.dist.is_ddp else ''} found "
                         f"preprocessed in {self.cache.cache_dir}: nothing to preprocess")
            if legacy:
                self.log(f"{legacy} cached volume(s) are in the uncompressed {LEGACY_CACHE_SUFFIX} format of earlier "
                         f"versions (4 bytes/voxel): read as they are; nnUNetv2_vf_pretrain --preprocess-only with "
                         f"the same settings rewrites them compressed ({CACHE_SUFFIX})")
            preprocess_volumes(self.cache, todo, processes, progress=self.rank == 0)
        for w in caught:  # skipped files and NaN voxels: in training_log.txt too, not only on the terminal
            self.log(f"warning: {w.message}", stderr=True)
        self.cache.failed = self.dist.union(self.cache.failed)
        usable = [i for i in range(len(self.cache)) if i not in self.cache.failed]
        if not usable:
            raise ValueError(f"none of the {len(self.cache)} input volume(s) could be read and preprocessed (reasons "
                             f"above and in {self.output_dir / 'training_log.txt'}): replace the broken files "
                             f"(truncated downloads, all-NaN images) or give other inputs")
        return usable

    def _open_cache(self, files) -> tuple[int, list[int]]:
        """Open ``self.cache`` on the inputs whose headers show single-channel 3D volumes (the headers of inputs
        cached already are not read again: a restart on a filled cache reads none). Returns (the preprocessing
        processes, the indices of this rank's share)."""
        processes = self.cfg.num_processes or default_num_processes()
        self.preprocessing = Preprocessing(self.cfg.normalization, self.cfg.spacing)
        root = self.cfg.cache_dir or self.output_dir / "cache"
        every = VolumeCache(files, root, self.preprocessing, self.source_shape)
        good = check_volume_headers(files, processes, {every.files[i] for i in every.cached()}, self.rank == 0)
        self.cache = every if len(good) == len(every) else VolumeCache(good, root, self.preprocessing,
                                                                       self.source_shape)
        return processes, list(range(self.rank, len(self.cache), self.world_size))

    def preprocess(self) -> dict:
        """``--preprocess-only``: fill the cache (each rank its share, legacy entries rewritten compressed) and
        exit, like ``nnUNetv2_preprocess``. Returns counts of this rank."""
        files = self._input_files()
        _, _, self.patch_size = build_network(self.cfg)  # the crop, which the cache's chunking follows
        processes, mine = self._open_cache(files)
        todo = self.cache.missing(mine, rewrite_legacy=True)
        t0 = time.time()
        failed = preprocess_volumes(self.cache, todo, processes, progress=True,
                                    desc=f"preprocessing{f' (rank {self.rank})' if self.dist.is_ddp else ''}")
        report = {"rank": self.rank, "volumes": len(mine), "preprocessed": len(todo) - len(failed),
                  "failed": len(failed), "already_cached": len(mine) - len(todo), "seconds": time.time() - t0}
        print(f"rank {self.rank}: preprocessed {report['preprocessed']} of its {len(mine)} volume(s) "
              f"({report['already_cached']} already cached, {len(failed)} unreadable) in {report['seconds']:.1f} s "
              f"with {processes} process(es) into {self.cache.cache_dir}", flush=True)
        self.dist.teardown()
        return report

    def _augmenter(self):
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        if self.cfg.num_workers <= 0:
            return SingleThreadedAugmenter(self.loader, self.vf_transform)
        seeds = [self.cfg.seed + 1000 * self.rank + 7 + i + self.iteration for i in range(self.cfg.num_workers)]
        return MultiThreadedAugmenter(self.loader, self.vf_transform, self.cfg.num_workers, num_cached_per_queue=2,
                                      seeds=seeds, pin_memory=self.device.type == "cuda")

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
            crops = [crop_or_pad(self.cache.load(readable[k % len(readable)]), self.source_shape, rng)
                     for k in range(max(2, self.cfg.val_samples))]
            fused, labels = volume_fusion(np.stack(crops), rng, self.cfg.variant, params=self.fusion,
                                          output_shape=self.patch_size)
            atomic_write(path, lambda f: np.savez(f, data=fused, target=labels), "validation set",
                         fused.nbytes + labels.nbytes)
        self.dist.barrier()
        with np.load(path) as f:
            return f["data"], f["target"]

    def validate(self) -> tuple[float, float]:
        return evaluate(self.network, self.base_loss, self.val_data, self.val_target, self.cfg.batch_size,
                        self.device, self.fusion.num_classes)

    # ------------------------------------------------------------------ checkpoints and exports
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.store.save_latest({
            "network_weights": self.network.state_dict(), **self.optimisation.state(),
            "iteration": self.iteration, "logs": self.logs,
            "rng_state": rng_state(self.loader.rng, self.vf_transform._rng),
            "config": asdict(self.cfg), "input_files": self.manifest, "architecture": plain(self.architecture),
            **self.nnssl_fields()})

    def nnssl_fields(self) -> dict:
        """The nnssl-shaped adaptation plan every checkpoint embeds (nnU-Net master reads it); computed once."""
        if getattr(self, "_nnssl_fields", None) is None:
            self._nnssl_fields = nnssl_checkpoint_fields(self.adaptation_plan())
        return self._nnssl_fields

    def _load_checkpoint(self, ckpt: dict) -> None:
        self.network.load_state_dict(ckpt["network_weights"])
        self.optimisation.load_state(ckpt)
        self.iteration = int(ckpt["iteration"])
        self.logs = {**self.logs, **ckpt["logs"]}  # runs saved before fine-grained logs existed lack those
        if self.rank == 0:  # other ranks continue with fresh streams derived from the seed
            set_rng_state(ckpt["rng_state"], self.loader.rng, self.vf_transform)
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
            volume_fusion={"variant": self.cfg.variant, **self.fusion.to_dict(),
                           "augmentation": self.cfg.augmentation, "padding": "reflect",
                           **({"grid_source_scale": self.cfg.grid_source_scale} if self.cfg.variant == "grid"
                              else {})},
            optimizer={"name": "Adam", "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay,
                       "lr_halved_every": self.cfg.lr_step, "batch_size": self.cfg.batch_size,
                       "world_size": self.world_size},
            iterations=self.iteration,
            num_pretraining_images=len(self.usable),
            weights_file="checkpoint_final.pth")

    def export_final(self) -> None:
        if self.rank != 0:
            return
        self.store.save_final(self.network.state_dict(), self.iteration, self.architecture, self.nnssl_fields())
        # only now: an adaptation plan must always describe a network that exists
        self.adaptation_plan().save(self.output_dir / "adaptation_plan.json")

    def plot_progress(self) -> None:
        if self.rank != 0 or not self.logs["iteration"]:
            return
        network = self.architecture["network_class_name"].split(".")[-1]
        plot_progress(self.output_dir / "progress.png", self.logs,
                      f"Volume Fusion pretraining ({self.cfg.variant}) of {network} in {self.output_dir.name}: "
                      f"iteration {self.iteration}/{self.cfg.iterations}",
                      train_log_every(self.cfg.val_every), self.cfg.vf_classes)

    # ------------------------------------------------------------------ main loop
    def _prepare_output_dir(self) -> list:
        """Rank 0: create the folder, delete the old run (--overwrite), remove killed writers' temporary files.
        Returns the input files."""
        files = self._input_files()
        if self.rank != 0:
            return files
        self.run_lock.acquire()  # before the first write; held already if the folder had a lock file
        removed = self.store.prepare(self.overwrite)
        if removed:
            self.log(f"removed temporary files of an interrupted run: {', '.join(removed)}")
        if self.manifest is None:
            self.manifest = input_manifest(files)
        if self.moved_inputs:
            self.log(f"inputs moved: {show(self.moved_inputs[0])} -> {show(self.moved_inputs[1])} (same "
                     f"{len(self.manifest)} files by name and size)")
        if self.detected_modality:
            self.log(f"modality {self.cfg.normalization} from the inputs' dataset.json channel_names "
                     f"(--modality to override)")
        return files

    def _input_files(self) -> list:
        try:
            return find_images(self.cfg.inputs, self.cfg.manifest)
        except FileNotFoundError as e:
            if self.saved is None and not self.store.config.exists():
                raise
            raise FileNotFoundError(f"{e}. If the data moved, continue on its new place: the same command with "
                                    f"--continue and the new input folders (they must hold the same files, "
                                    f"compared by name and size)") from e

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.run_lock.release()

    def _run(self) -> dict:
        cfg = self.cfg
        files = self._prepare_output_dir()
        self.dist.barrier()
        self._build(files)
        if self.rank == 0:  # only for usable inputs: a run refused for its data is no run to --continue
            self.store.write_json("config.json", {**asdict(self.cfg), "input_files": self.manifest})
        if self.saved is not None:
            self._load_checkpoint(self.saved)
            self.log(f"resumed from {self.latest} at iteration {self.iteration}")
        elif self.resuming:
            self.log("no checkpoint yet: the run starts again from iteration 0")
        self.val_data, self.val_target = self._validation_set()
        nparams = sum(p.numel() for p in self.network.parameters())
        skipped = len(self.cache) - len(self.usable)
        self.log(f"Volume Fusion pretraining ({cfg.variant}) of {self.architecture['network_class_name']} "
                 f"({nparams / 1e6:.2f} M parameters) on {len(self.usable)} volumes"
                 f"{f' ({skipped} skipped)' if skipped else ''}, patch {self.patch_size}, batch "
                 f"{cfg.batch_size} x {self.world_size} process(es), device {self.device}, "
                 f"modality {cfg.normalization}, augmentation before fusion: {cfg.augmentation}"
                 + (f", grid source region {self.source_shape}" if cfg.variant == "grid" else ""))
        save_every = cfg.save_every or cfg.val_every
        log_every = train_log_every(cfg.val_every)
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
                loss = train_step(self.model, self.loss, self.optimisation, batch, self.device,
                                  f"at iteration {self.iteration}; lower --lr or check the input intensities "
                                  f"(normalisation {cfg.normalization})")
                self.iteration += 1
                interval_losses.append(loss)
                recent.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                done = self.iteration >= cfg.iterations
                if self.iteration % log_every == 0 or done:
                    self.logs["train_iteration"].append(self.iteration)
                    self.logs["train_loss_recent"].append(float(np.mean(recent)))
                    self.logs["train_lr"].append(self.optimisation.lr)
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
        self.dist.barrier()
        self.dist.teardown()
        return {"iteration": self.iteration, "logs": self.logs}

    def _end_interval(self, losses: list, t0: float) -> None:
        elapsed = time.time() - t0  # the interval's training steps, before validation
        if self.rank == 0:
            val_loss, val_dice = self.validate()
            lr = self.optimisation.lr
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
            rise = late_rise(self.logs["iteration"], self.logs["val_dice"])
            if rise is not None:
                self.log(f"  fusion Dice rise over the last quarter of the iterations so far: {rise:+.4f} "
                         f"({'plateau' if rise < PLATEAU_RISE else 'still rising'}: plateau below {PLATEAU_RISE})")
            self.plot_progress()
        self.dist.barrier()
