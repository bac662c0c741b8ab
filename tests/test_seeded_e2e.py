"""``_seedN`` trainers through the real ``nnUNetv2_train`` (CPU, ``nnUNet_n_proc_DA=0``): the same seed twice gives an
identical ``validation/summary.json``, another seed a different one, and a ``-pretrained_weights`` arm with the same
seed draws exactly the same training batches as the from-scratch arm (only the initial weights differ)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from nnunetv2_vf.workflow import run_nnunet

pytestmark = pytest.mark.slow
BASE = "VFPretrainedTrainer_small_2epochs"


def _train(ds: dict, seed: int, tag: str, store: Path, pretrained: Path | None = None) -> dict:
    trainer = f"{BASE}_seed{seed}"
    cmd = ["nnUNetv2_train", ds["id"], "3d_fullres", 0, "-tr", trainer, "-device", "cpu"]
    if pretrained is not None:
        cmd += ["-pretrained_weights", pretrained]
    run_nnunet(cmd, ds["env"], echo=False)
    fold = Path(ds["env"]["nnUNet_results"]) / ds["name"] / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    kept = store / tag
    shutil.copytree(fold, kept)  # the next run with this trainer reuses the folder
    log = next(kept.glob("training_log_*.txt")).read_text()
    return {"summary": (kept / "validation" / "summary.json").read_text(),
            "digests": re.findall(r"training batch digest ([0-9a-f]+)", log),
            "checkpoint": kept / "checkpoint_final.pth"}


@pytest.fixture(scope="module")
def runs(hippo_dataset, tmp_path_factory):
    store = tmp_path_factory.mktemp("seeded_runs")
    first = _train(hippo_dataset, 0, "seed0_a", store)
    again = _train(hippo_dataset, 0, "seed0_b", store)
    other = _train(hippo_dataset, 1, "seed1", store)
    # the other seed's trained network stands in for pretrained weights: same architecture, different values
    warm = _train(hippo_dataset, 0, "seed0_pretrained", store, pretrained=other["checkpoint"])
    return {"first": first, "again": again, "other": other, "warm": warm}


def test_same_seed_reproduces_validation_exactly(runs):
    assert runs["first"]["digests"] and len(runs["first"]["digests"]) == 2  # one per epoch
    assert runs["first"]["digests"] == runs["again"]["digests"]
    assert runs["first"]["summary"] == runs["again"]["summary"]


def test_other_seed_differs(runs):
    assert runs["first"]["digests"] != runs["other"]["digests"]
    assert runs["first"]["summary"] != runs["other"]["summary"]


def test_pretrained_arm_sees_the_same_batches(runs):
    assert runs["warm"]["digests"] == runs["first"]["digests"]  # same cases, crops, augmentation
    assert runs["warm"]["summary"] != runs["first"]["summary"]  # but it started from other weights
    dice = json.loads(runs["warm"]["summary"])["foreground_mean"]["Dice"]
    assert 0.0 <= dice <= 1.0
