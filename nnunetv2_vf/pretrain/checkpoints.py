"""The run folder's files: which ones make a run, resume state (weights, optimiser, RNG streams) written through
``checkpoint_io.atomic_write`` and read weights-only, the final checkpoint and the json records. Checkpoints of
PCT-Net record the layout of its relative-position tables (``pctnet.TABLE_LAYOUT``); a run is resumed only from
one in this layout."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nnunetv2_vf.architectures.pctnet import check_table_layout, table_layout_record
from nnunetv2_vf.checkpoint_io import atomic_write, read_weights_file, remove_stale_tmp_files, save_torch

__all__ = ["CheckpointStore", "RUN_MARKERS", "RUN_FILES", "rng_state", "set_rng_state", "plain"]

# a folder with one of these holds a run (training_log.txt alone: a start that was killed before it wrote anything)
RUN_MARKERS = ("config.json", "checkpoint_latest.pth", "checkpoint_final.pth")
# what --overwrite deletes (the preprocessed cache stays: it only depends on the files and the preprocessing)
RUN_LOCK = ".nnunetv2_vf_pretrain.lock"  # held by the run's writer (RunLock); never deleted, not a run marker
RUN_FILES = RUN_MARKERS + ("adaptation_plan.json", "validation_set.npz", "progress.png", "training_log.txt")


def plain(obj):
    """json's types only (tuples become lists): what a weights-only load accepts back."""
    return json.loads(json.dumps(obj))


class CheckpointStore:
    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.latest = output_dir / "checkpoint_latest.pth"
        self.final = output_dir / "checkpoint_final.pth"
        self.config = output_dir / "config.json"

    def refuse_existing_run(self, overwrite: bool) -> None:
        present = [n for n in RUN_MARKERS if (self.output_dir / n).exists()]
        if present and not overwrite:
            raise ValueError(f"{self.output_dir} already holds a pretraining run ({', '.join(present)}). To resume "
                             f"it: the same command with --continue; to start a new run: another -o folder, or "
                             f"--overwrite to delete that run's files (the preprocessed cache is kept)")

    def read_run(self) -> tuple[Optional[dict], dict, Optional[list]]:
        """(latest checkpoint or None, the run's settings, its input manifest) of the run to resume."""
        if self.latest.exists():
            fix = ("--continue cannot resume from it: restore it from a backup, or start again with --overwrite (or "
                   "another -o folder)")
            # allow_numpy: runs saved before the RNG states became plain lists
            saved = read_weights_file(self.latest, "the run's checkpoint", "", fix, allow_numpy=True)
            check_table_layout(saved, f"the run's checkpoint {self.latest}",
                               "--continue cannot resume it with this nnunetv2_vf: start the run again with "
                               "--overwrite (or another -o folder)")
            return saved, dict(saved["config"]), saved.get("input_files")
        if self.config.is_file():  # killed before its first checkpoint: restart it from iteration 0
            stored = json.loads(self.config.read_text())
            return None, stored, stored.pop("input_files", None)
        raise FileNotFoundError(f"--continue: {self.output_dir} holds no pretraining run to resume (no "
                                f"checkpoint_latest.pth or config.json): start without --continue")

    def prepare(self, overwrite: bool) -> list[str]:
        """Creates the folder, deletes the old run (``overwrite``) and killed writers' temporary files; returns
        the names of those temporary files."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (self.output_dir / name).unlink(missing_ok=True)
        return remove_stale_tmp_files(self.output_dir)

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write(self.output_dir / name, lambda f: f.write(json.dumps(obj, indent=2).encode()), name)

    def save_latest(self, state: dict) -> None:
        """``state`` (with ``network_weights``) plus the layout of its relative-position tables, if any."""
        save_torch({**state, **table_layout_record(state["network_weights"])}, self.latest, "checkpoint")

    def save_final(self, network_weights: dict, iteration: int, architecture: dict,
                   extra: Optional[dict] = None) -> None:
        """What nnU-Net's ``-pretrained_weights`` and the adaptation tools read; ``extra``: more plain fields (the
        embedded nnssl adaptation plan)."""
        final = {"network_weights": {k: v.detach().cpu().clone() for k, v in network_weights.items()},
                 "trainer_name": "nnUNetv2_vf_pretrain", "current_epoch": int(iteration),
                 "iteration": int(iteration), "architecture": plain(architecture),
                 **table_layout_record(network_weights), **(extra or {})}
        save_torch(final, self.final, "final checkpoint")


def rng_state(loader_rng: np.random.Generator, vf_rng: Optional[np.random.Generator]) -> dict:
    """Every random stream a resumed run must continue, as plain data (loads weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "loader": loader_rng.bit_generator.state,
            "vf": None if vf_rng is None else vf_rng.bit_generator.state}


def set_rng_state(state: dict, loader_rng: np.random.Generator, vf_transform) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_rng.bit_generator.state = state["loader"]
    if state.get("vf") is not None:
        rng = vf_transform.rng  # creates the per-process generator, then overwrite its state
        rng.bit_generator.state = state["vf"]
