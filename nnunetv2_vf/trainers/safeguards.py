"""Fine-tuning safeguards for every plugin trainer: ``-pretrained_weights`` checked before nnU-Net loads it, and
checkpoints that are never half-written.

* :class:`PretrainedWeightsCheck` turns what nnU-Net's loader would report as ``KeyError: 'network_weights'``, a zip
  reader error or a bare ``AssertionError`` into an error naming the file, the problem and the fix.
* :class:`AtomicCheckpoints` writes nnU-Net's ``checkpoint_latest/best/final.pth`` through a temporary file, so a
  kill or a full disk leaves the previous checkpoint intact and ``--c`` can resume.
* :func:`check_pretrained_compatibility` is the check itself, a pure function for scripts and converters.

Both mixins go before nnU-Net's trainer in the bases (``class T(PretrainedWeightsCheck, AtomicCheckpoints, ...,
nnUNetTrainer)``); they add no ``__init__``, so nnU-Net's recorded init args and the ``_seedN`` twins are unchanged.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from nnunetv2_vf.architectures.pctnet import (TABLE_LAYOUT, TABLE_LAYOUT_FIX, TABLE_LAYOUT_KEY,
                                              has_relative_position_tables, table_layout_problem)
from nnunetv2_vf.checkpoint_io import (TMP_MARK, WriteError, atomic_write, payload_bytes, read_weights_file,
                                       remove_stale_tmp_files)

__all__ = ["PretrainedWeightsCheck", "AtomicCheckpoints", "check_pretrained_compatibility",
           "pending_pretrained_weights", "PretrainedWeightsError", "PretrainedWeightsNotFoundError",
           "CheckpointWriteError", "RunContext", "CLASSIFIER_MARK"]

CLASSIFIER_MARK = ".seg_layers."  # nnU-Net's loader skips the final classifiers (class counts may differ)
_SHOWN = 20  # listed problems; the rest are counted


class PretrainedWeightsError(ValueError):
    """``-pretrained_weights`` cannot initialise the trainer's network; the message names the file, the problem and
    the fix."""


class PretrainedWeightsNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """``-pretrained_weights`` names no file."""


class CheckpointWriteError(WriteError):
    """nnU-Net's checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The ``nnUNetv2_train`` run a message is about, so that fixes are commands to copy (placeholders when the check
    runs outside a trainer)."""

    dataset: str = "DATASET"
    configuration: str = "CONFIGURATION"
    fold: Any = "FOLD"
    trainer: str = "TRAINER"
    plans: str = "PLANS"
    plans_folder: Optional[str] = None  # nnUNet_preprocessed/<dataset>: where the recorded adaptations are read

    @classmethod
    def of(cls, trainer) -> "RunContext":
        pm = trainer.plans_manager
        return cls(pm.dataset_name, trainer.configuration_name, trainer.fold, type(trainer).__name__, pm.plans_name,
                   getattr(trainer, "preprocessed_dataset_folder_base", None))

    def train(self, *extra: str, plans: Optional[str] = None) -> str:
        return " ".join(["nnUNetv2_train", self.dataset, self.configuration, str(self.fold), "-tr", self.trainer,
                         "-p", plans or self.plans, *map(str, extra)])


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    network = getattr(network, "module", network)  # DDP
    return getattr(network, "_orig_mod", network)  # torch.compile


# ------------------------------------------------------------------------------------ -pretrained_weights check
_MISSING_FIX = ("give an existing nnU-Net fold_X/checkpoint_final.pth, nnUNetv2_vf_pretrain's "
                "OUTPUT_DIR/checkpoint_final.pth or a converted file (relative paths start from the directory "
                "nnUNetv2_train runs in)")
_REREAD_FIX = "copy or download it again, or give an intact nnUNetv2_vf_pretrain or nnU-Net checkpoint_final.pth"


def _fail(problem: str, fix: Optional[str], run: Optional[RunContext], cls=PretrainedWeightsError) -> Exception:
    """``problem`` (naming the file), ``Fix: ...`` (None: the problem line already says it) and the run."""
    where = f"\n(run: {run.train()}; nothing was loaded, nothing trained)" if run is not None else ""
    return cls(problem + (f"\nFix: {fix}" if fix else "") + where)


def _architecture_of(ckpt: dict) -> tuple[Optional[str], str]:
    """Network class name recorded in an nnU-Net checkpoint's init_args, and a provenance phrase."""
    init = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    plans, cfg = init.get("plans"), init.get("configuration")
    arch = None
    if isinstance(plans, dict) and cfg in plans.get("configurations", {}):
        from nnunetv2_vf.plans import effective_configuration
        try:
            arch = effective_configuration(plans, cfg).get("architecture", {}).get("network_class_name")
        except (KeyError, TypeError, ValueError):
            arch = None
    top = ckpt.get("architecture")  # nnUNetv2_vf_pretrain records its network at the top level
    if isinstance(top, dict):
        top = top.get("arch_class_name") or top.get("network_class_name")
    arch = arch or (top if isinstance(top, str) else None)
    parts = [f"{k} {v}" for k, v in (("trainer", ckpt.get("trainer_name")),
                                      ("dataset", plans.get("dataset_name") if isinstance(plans, dict) else None),
                                      ("plans", plans.get("plans_name") if isinstance(plans, dict) else None),
                                      ("configuration", cfg), ("network", arch)) if v]
    return arch, (f" (checkpoint: {', '.join(parts)})" if parts else "")


def _listing(lines: list[str]) -> str:
    shown = "\n  ".join(lines[:_SHOWN])
    return "  " + shown + (f"\n  ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else "")


def _refuse_foreign_file(path: str, run: Optional[RunContext]) -> None:
    """A file that is neither torch's zip format nor a pickle (an HTML error page saved as the download, a NIfTI)
    would otherwise be reported as holding unsafe Python objects."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full) or os.path.getsize(full) == 0:
        return  # read_weights_file words these
    with open(full, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip / legacy pickle format
        return
    raise _fail(f"-pretrained_weights {path} is not a PyTorch checkpoint (it starts with {head!r}; an error page or "
                f"another file saved under this name?)", _REREAD_FIX, run)


def check_pretrained_compatibility(network: torch.nn.Module, path: str | os.PathLike,
                                   run: Optional[RunContext] = None) -> int:
    """Raise :class:`PretrainedWeightsError` (a ValueError; :class:`PretrainedWeightsNotFoundError` for a missing
    file) for everything nnU-Net's ``-pretrained_weights`` loader would reject or load silently wrong; returns the
    number of tensors it will load (all but the ``.seg_layers.`` classifiers).

    The file is read with ``torch.load(weights_only=True)`` (numpy data types allowed, as in nnU-Net's own
    checkpoints): a file that would need arbitrary unpickling is refused, never executed. Checked in order: missing,
    empty, corrupt or code-carrying file; the MIS-FM authors' raw format; no ``network_weights``; a 2D checkpoint for
    a 3D network; missing keys and shape mismatches (the rule of nnU-Net's loader); NaN/Inf in the tensors that load;
    PCT-Net tables in another layout than ``pctnet.TABLE_LAYOUT`` (:func:`_check_table_layout`). ``run`` fills the fix
    commands in.
    """
    given = os.fspath(path)
    path = os.path.abspath(os.path.expanduser(given))  # messages name absolute paths
    _refuse_foreign_file(path, run)
    try:
        ckpt = read_weights_file(path, "-pretrained_weights", _MISSING_FIX, _REREAD_FIX, allow_numpy=True)
    except FileNotFoundError as e:
        where = "" if os.path.isabs(os.path.expanduser(given)) else f"\n(given as {given!r}, relative to {os.getcwd()})"
        raise _fail(str(e) + where, None, run, PretrainedWeightsNotFoundError) from None
    except ValueError as e:  # read_weights_file's message names the problem and the fix
        unsafe = "could run code" in str(e)
        note = ("\n(nnU-Net's own loader would unpickle it with weights_only=False; it is refused before that)"
                if unsafe else "")
        raise _fail(str(e) + note, None, run) from None

    if isinstance(ckpt, dict) and "model_state_dict" in ckpt and "network_weights" not in ckpt:
        raise _fail(f"-pretrained_weights {path} is in the MIS-FM authors' format (model_state_dict, no nnU-Net "
                    f"'network_weights'): convert it first with nnUNetv2_vf_convert_misfm.",
                    f"nnUNetv2_vf_convert_misfm {path} converted.pth, then nnUNetv2_vf_adapt_plans -d DATASET -a "
                    f"adaptation_plan.json (written next to converted.pth) -p nnUNetPlans_VF, nnUNetv2_preprocess "
                    f"-plans_name nnUNetPlans_VF, and train with -p nnUNetPlans_VF -pretrained_weights converted.pth",
                    run)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        bare = isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        raise _fail(f"-pretrained_weights {path} holds no 'network_weights' (found: {found}); nnU-Net loads only "
                    f"checkpoints of the form {{'network_weights': state_dict}}.",
                    ("it looks like a bare state_dict: save it as torch.save({'network_weights': state_dict}, "
                     "'pretrained.pth') (without 'module.' / '_orig_mod.' key prefixes)") if bare else
                    "give an nnU-Net or nnUNetv2_vf_pretrain checkpoint_final.pth, or convert the file "
                    "(nnUNetv2_vf_convert_misfm for the MIS-FM authors' weights)", run)

    pretrained = ckpt["network_weights"]
    net = _unwrap(network)
    own = net.state_dict()
    loaded = [k for k in own if CLASSIFIER_MARK not in k]
    arch, provenance = _architecture_of(ckpt)
    net_name = type(net).__name__
    ctx = run or RunContext()

    flat = [k for k in loaded if own[k].ndim == 5 and getattr(pretrained.get(k), "ndim", None) == 4]
    is_3d = any(v.ndim == 5 for v in own.values())
    from_2d_encoder_unet = bool(arch and arch.endswith(".EncoderUNet2D"))
    if is_3d and (flat or from_2d_encoder_unet):
        example = f", e.g. {flat[0]} {tuple(pretrained[flat[0]].shape)} vs {tuple(own[flat[0]].shape)}" if flat \
            else ""
        problem = (f"-pretrained_weights {path} is a 2D checkpoint{provenance}; this {net_name} network is 3D "
                   f"({len(flat)} kernel(s) are 2D in the checkpoint{example}).")
        if net_name == "EncoderUNet3D":
            fix = (f"inflate it into the 3D network of these plans, then train from the converted file:\n"
                   f"  nnUNetv2_vf_inflate_checkpoint {path} -d {ctx.dataset} -p {ctx.plans} -c {ctx.configuration} "
                   f"-tr {ctx.trainer} -o inflated.pth\n  {ctx.train('-pretrained_weights', 'inflated.pth')}")
        else:
            fix = ("a 2D EncoderUNet2D checkpoint initialises only the 3D EncoderUNet3DTrainer, after "
                   "nnUNetv2_vf_inflate_checkpoint (see docs/inflate.md); for this trainer give a 3D checkpoint of "
                   "the same network, or train the 2d configuration with the 2D trainer")
        raise _fail(problem, fix, run)

    problems = []
    for key in loaded:
        if key not in pretrained:
            problems.append(f"missing in checkpoint: {key} {tuple(own[key].shape)}")
        elif not isinstance(pretrained[key], torch.Tensor):
            problems.append(f"not a tensor: {key} ({type(pretrained[key]).__name__})")
        elif pretrained[key].shape != own[key].shape:
            problems.append(f"shape mismatch: {key} checkpoint {tuple(pretrained[key].shape)} vs network "
                            f"{tuple(own[key].shape)}")
    if problems:
        raise _fail(
            f"-pretrained_weights {path} does not fit the {net_name} network of these plans{provenance}: "
            f"{len(problems)} problem(s) ({sum(p.startswith('missing') for p in problems)} key(s) missing in the "
            f"checkpoint, {sum(p.startswith('shape') for p in problems)} shape mismatch(es), of {len(loaded)} "
            f"tensors to load):\n{_listing(problems)}",
            _recorded_fix(path, run) or
            "train with the plans and trainer the weights were made for. For Volume Fusion / MIS-FM weights: "
            "'nnUNetv2_vf_adapt_plans -d DATASET -a PRETRAIN_DIR/adaptation_plan.json -p nnUNetPlans_VF', "
            "nnUNetv2_preprocess -plans_name nnUNetPlans_VF, and train with '-p nnUNetPlans_VF'. For an nnU-Net "
            "checkpoint of another dataset: transfer its plans (nnUNetv2_move_plans_between_datasets, nnU-Net's "
            "pretraining_and_finetuning.md). For another network, subclass the trainer and override initialize()",
            run)

    bad = []
    for key in loaded:
        value = pretrained[key]
        if value.is_floating_point() or value.is_complex():
            n = int((~torch.isfinite(value)).sum())
            if n:
                bad.append(f"{key}: {n} of {value.numel()} values NaN/Inf")
    if bad:
        raise _fail(f"-pretrained_weights {path} contains NaN/Inf in {len(bad)} tensor(s) nnU-Net would load "
                    f"(the run that wrote it diverged):\n{_listing(bad)}",
                    "use an earlier checkpoint of that run (checkpoint_best.pth or an older checkpoint_latest.pth), "
                    "or pretrain again with a lower learning rate", run)
    if has_relative_position_tables(own):
        _check_table_layout(ckpt, path, run)
    return len(loaded)


def recorded_adaptations(plans_folder: str | os.PathLike) -> dict[str, str]:
    """{plans name: the -pretrained_weights file it was adapted for} for every plans file in ``plans_folder`` that
    ``nnUNetv2_vf_adapt_plans`` wrote (its ``pretrain_info``; the multi-channel ``_<C>ch.pth`` file where one was
    written)."""
    found = {}
    for plans_file in sorted(Path(plans_folder).glob("*.json")):
        try:
            info = json.loads(plans_file.read_text()).get("pretrain_info")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(info, dict):
            continue
        weights = (info.get("input_channel_adaptation") or {}).get("weights") or info.get("pretrained_weights")
        if weights:
            found[plans_file.stem] = str(weights)
    return found


def _recorded_fix(path: str, run: Optional[RunContext]) -> Optional[str]:
    """The exact fix for a shape mismatch where the dataset's plans record it: the file these plans were adapted
    for (e.g. the ``_<C>ch.pth`` stem for a multi-channel dataset), or the ``-p`` that was adapted for this file."""
    if run is None or not run.plans_folder or not Path(run.plans_folder).is_dir():
        return None
    adaptations = recorded_adaptations(run.plans_folder)
    given = Path(path).expanduser().resolve()
    own = adaptations.get(run.plans)
    if own and Path(own).resolve() != given:
        return (f"the plans {run.plans} were adapted (nnUNetv2_vf_adapt_plans) for {own}; train from that file:\n"
                f"  {run.train('-pretrained_weights', own)}")
    for name, weights in adaptations.items():
        source = Path(weights).resolve()
        if name != run.plans and (source == given or source.parent == given.parent and
                                  source.stem.startswith(given.stem + "_")):
            return (f"{path} was adapted for the plans {name} (nnUNetv2_vf_adapt_plans recorded it there); train "
                    f"with them:\n  {run.train('-pretrained_weights', weights, plans=name)}\n(and preprocess them "
                    f"first if you have not: nnUNetv2_preprocess -d {run.dataset} -plans_name {name} -c "
                    f"{run.configuration})")
    return None


def _check_table_layout(ckpt: dict, path: str, run: Optional[RunContext]) -> None:
    """Refuse PCT-Net weights whose relative-position tables are not in this version's layout.

    nnU-Net's own training checkpoints (``init_args``) are exempt when they carry no record: nnU-Net writes them
    (stock trainers too can train a PCTNet from plans) and has no place for one, so a missing record says nothing
    about their layout. The PCT-Net weight files this plugin writes (pretraining, MIS-FM conversion, multi-channel
    stems) all carry one."""
    layout = ckpt.get(TABLE_LAYOUT_KEY)
    if layout is None and "init_args" in ckpt:
        return
    problem = table_layout_problem(layout, f"-pretrained_weights {path}")
    if problem:
        raise _fail(problem, f"{TABLE_LAYOUT_FIX}, and fine-tune from the new weights (with nnUNetv2_vf_adapt_plans "
                             f"on their adaptation_plan.json). Weights your own code saved from this nnunetv2_vf's "
                             f"PCTNet only lack the record: add checkpoint[{TABLE_LAYOUT_KEY!r}] = {TABLE_LAYOUT!r} "
                             f"to the saved dict", run)


def pending_pretrained_weights(trainer) -> Optional[str]:
    """The ``-pretrained_weights`` file nnU-Net's ``run_training.maybe_load_checkpoint`` is about to load into
    ``trainer`` (None when nothing is pending, or when the trainer was not started by it). Reads the caller's frame
    only; nothing of nnU-Net is changed."""
    try:
        from nnunetv2.run import run_training
        code = run_training.maybe_load_checkpoint.__code__
    except (ImportError, AttributeError):
        return None
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code is code and frame.f_locals.get("nnunet_trainer") is trainer:
                local = frame.f_locals
                if local.get("continue_training") or local.get("validation_only"):
                    return None  # nnU-Net ignores (validation) or refuses (--c) pretrained weights there
                found = local.get("pretrained_weights_file")
                return None if found is None else os.fspath(found)
            frame = frame.f_back
        return None
    finally:
        del frame  # no reference cycle through the frames


class PretrainedWeightsCheck:
    """Check ``-pretrained_weights`` in ``initialize()``, before nnU-Net's loader touches the file.

    Why the frame lookup: nnU-Net 2.8 gives the trainer no hook for pretrained weights.
    ``run_training.maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only,
    pretrained_weights_file)`` calls ``nnunet_trainer.initialize()`` and then the module function
    ``load_pretrained_weights(network, file)``, which unpickles the file with ``weights_only=False`` and asserts key by
    key. Reading ``sys.argv`` would miss training started from Python (``run_training(...)``) and patching nnU-Net is
    ruled out, so ``initialize()`` (first call only, after the network is built) looks up the calling frames for
    ``maybe_load_checkpoint`` (same code object, ``nnunet_trainer is self``) and reads its
    ``pretrained_weights_file`` local, read-only. This works from ``nnUNetv2_train`` and from ``run_training(...)``,
    single process and DDP (``run_ddp`` calls the same function). When that frame is absent (a trainer driven by its
    own script, another launcher) the check silently does nothing; call :func:`check_pretrained_compatibility`
    yourself there. The file is read twice (here weights-only, then by nnU-Net); the first read is what keeps a
    code-carrying pickle from ever reaching nnU-Net's unrestricted ``torch.load``.

    nnU-Net's GitHub master (checked November 2026) still loads pretrained weights from ``run_training`` with the
    module function and has no trainer method for it; should one appear, overriding it is the cleaner place, but
    this check does not depend on it.
    """

    def initialize(self):
        first = not self.was_initialized
        try:
            super().initialize()
            path = pending_pretrained_weights(self) if first else None
            if path is not None:
                n = check_pretrained_compatibility(self.network, path, RunContext.of(self))
        except Exception as e:  # a refused run's log says why it stopped (nnU-Net has already created it)
            if first:
                self.print_to_log_file(f"refused: {type(e).__name__}: {e}", also_print_to_console=False)
            raise
        if path is not None:
            self.print_to_log_file(f"-pretrained_weights {path}: checked, {n} tensors fit this network "
                                   f"(final classifiers {CLASSIFIER_MARK} start fresh)", also_print_to_console=True)


# --------------------------------------------------------------------------------------------- atomic checkpoints
class AtomicCheckpoints:
    """nnU-Net's ``save_checkpoint`` writes into a temporary file next to the target, then ``os.replace``\\ s it.

    nnU-Net 2.8 ``torch.save``\\ s straight onto ``checkpoint_latest.pth``: a kill or a full disk in the middle leaves
    a truncated file that ``--c`` cannot load, and the last good checkpoint is gone. Here the previous file stays until
    the new one is complete; a failed write removes its temporary file and raises :class:`CheckpointWriteError`
    naming the folder, the space a checkpoint needs and the ``--c`` command. Temporary files of killed writers are
    removed at the next save. nnU-Net's own conditions (rank 0 only, ``--disable_checkpointing``) and checkpoint
    content are kept: the write itself is nnU-Net's ``save_checkpoint``.
    """

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # writes nothing (nnU-Net logs why)
        filename = os.fspath(filename)
        folder = os.path.dirname(os.path.abspath(filename))
        remove_stale_tmp_files(folder, f"{glob.escape(os.path.basename(filename))}.*{TMP_MARK}")
        needed, basis = self._checkpoint_size(folder)
        try:
            atomic_write(filename, lambda f: super(AtomicCheckpoints, self).save_checkpoint(f.name),
                         "nnU-Net checkpoint", needed)
        except WriteError as e:
            cause = e.__cause__ or e
            raise CheckpointWriteError(self._write_failure(filename, folder, e, needed, basis)) from cause

    def _checkpoint_size(self, folder: str) -> tuple[int, str]:
        """Bytes a checkpoint needs: the largest earlier checkpoint of this fold, else the weights and optimizer
        state in memory."""
        earlier = [(os.path.getsize(p), os.path.basename(p))
                   for p in glob.glob(os.path.join(folder, "checkpoint_*.pth")) if os.path.isfile(p)]
        if earlier:
            size, name = max(earlier)
            return size, f"the size of the previous {name}"
        state = {"network": _unwrap(self.network).state_dict() if self.network is not None else {},
                 "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {}}
        return payload_bytes(state), "weights and optimizer state"

    def _write_failure(self, filename: str, folder: str, error: WriteError, needed: int, basis: str) -> str:
        """The message of a failed checkpoint write: the real cause, the free space once the temporary file is
        gone, and only the checkpoints that exist."""
        free_bytes = getattr(error, "free_bytes", None)
        free = "free space unknown" if free_bytes is None else f"{free_bytes / 2 ** 20:.1f} MiB free"
        name = os.path.basename(filename)
        kept = [n for n in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
                if os.path.isfile(os.path.join(folder, n))]
        state = (f"the earlier {name} is unchanged" if name in kept else f"there was no earlier {name}")
        if kept:  # nnU-Net's --c loads the first of final, latest, best that exists
            resume = (f"then resume (--c loads {kept[0]}, the first of checkpoint_final / _latest / _best that "
                      f"exists):\n  {RunContext.of(self).train('--c')}")
        else:
            resume = f"then start the training again (no checkpoint of this fold exists yet):\n  {RunContext.of(self).train()}"
        return (f"cannot write nnU-Net checkpoint {os.path.abspath(filename)} "
                f"({getattr(error, 'reason', None) or error}).\n"
                f"  {folder}: {free} once the temporary file is removed; a checkpoint needs about "
                f"{needed / 2 ** 20:.1f} MiB ({basis}).\n"
                f"  Nothing half-written is left: the temporary file was removed, {state}.\n"
                f"Fix: free disk space in {folder} (or fix its permissions), {resume}")