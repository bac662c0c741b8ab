"""The feature probe (benchmarks/feature_probe.py) on real hippocampus MRI: its report, its determinism, its
BatchNorm re-estimation and its refusal of files that are not a pretraining's checkpoint.

The checkpoint is written the way ``nnUNetv2_vf_pretrain`` writes its final one (``CheckpointStore.save_final`` and
``AdaptationPlan.for_network`` on a network built by nnU-Net's ``get_network_from_plans``), with a tiny PCT-Net so
that the probe runs in seconds; its weights are an initialisation, so nothing is claimed about pretraining here."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "feature_probe.py"
TINY_FEATURES = [4, 8, 16, 16, 16]  # the smallest widths PCT-Net's heads (4, 8, 16) divide


def _probe_module():
    spec = importlib.util.spec_from_file_location("feature_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _architecture(features) -> dict:
    from nnunetv2_vf.architectures.pctnet import pctnet_strides
    return {"network_class_name": "nnunetv2_vf.architectures.pctnet.PCTNet",
            "arch_kwargs": {"features_per_stage": list(features), "resolution_mode": 1,
                            "strides": pctnet_strides(1)},
            "_kw_requires_import": []}


def _network(arch: dict, seed: int):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    torch.manual_seed(seed)
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, 5, allow_init=True,
                                  deep_supervision=True)


def write_checkpoint(folder: Path, features=TINY_FEATURES, weights_features=None, seed: int = 12345) -> Path:
    """checkpoint_final.pth + adaptation_plan.json as a pretraining writes them; ``weights_features``: weights of
    another network than the recorded one (a wrong file)."""
    from nnunetv2_vf.pretrain.adaptation_plan import AdaptationPlan
    from nnunetv2_vf.pretrain.checkpoints import CheckpointStore
    folder.mkdir(parents=True, exist_ok=True)
    arch = _architecture(features)
    net = _network(_architecture(weights_features or features), seed)
    CheckpointStore(folder).save_final(net.state_dict(), 2, arch)
    AdaptationPlan.for_network(
        arch, trainer_name="nnUNetv2_vf_pretrain", patch_size=[16, 32, 32], weights_file="checkpoint_final.pth",
        preprocessing={"spacing": None, "normalization": "MR", "nnunet_normalization_scheme": "ZScoreNormalization",
                       "intensity_properties": None, "ct_window": None}).save(folder / "adaptation_plan.json")
    return folder / "checkpoint_final.pth"


def _run_probe(weights: Path, dataset: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--weights", str(weights), "--dataset", str(dataset),
                           "--labelled", "2", "--validation", "3", "--random-inits", "2", "--voxels-per-case", "1500",
                           "--out", str(out), *map(str, extra)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _numbers(result: dict) -> dict:
    """Everything but the timings and the output folder (the command names it)."""
    return {k: v for k, v in result.items() if k not in ("timings", "command")}


@pytest.fixture(scope="module")
def hippocampus(shared_dir) -> Path:
    return shared_dir / "data" / "Dataset004_Hippocampus"


def test_probe_report_is_complete_and_deterministic(tmp_path, hippocampus):
    weights = write_checkpoint(tmp_path / "pretrain")
    results = []
    for run in ("first", "second"):
        # balanced classes: at the data's class frequencies the intensity arm never outweighs the background
        proc = _run_probe(weights, hippocampus, tmp_path / run, "--class-prior", "balanced")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "arm pretrained" in proc.stdout and "arm intensity" in proc.stdout  # progress lines
        assert (tmp_path / run / "feature_probe.md").read_text().startswith("# Feature probe")
        results.append(json.loads((tmp_path / run / "feature_probe.json").read_text()))
    first = results[0]
    effect = first["pretrained_vs_random"]
    assert all(np.isfinite(effect[k]) for k in ("mean", "low", "high"))
    assert effect["low"] <= effect["mean"] <= effect["high"]
    assert (effect["n_seeds"], effect["n_cases"]) == (2, 3)
    assert effect["verdict"].startswith("no claim")  # 2 random initialisations < paired_stats.MIN_SEEDS
    assert set(first["arms"]) == {"pretrained", "random_0", "random_1", "intensity"}
    for arm in first["arms"].values():
        assert len(arm["dice_per_case"]) == 3
        assert all(0.0 <= d <= 1.0 for d in arm["dice_per_case"])
        assert 0.0 <= arm["mean_dice"] <= 1.0
    assert first["arms"]["intensity"]["mean_dice"] > 0  # hippocampus is partly separable by intensity
    assert first["arms"]["pretrained"]["feature_dims"] == sum(TINY_FEATURES) * 2  # every stage, encoder + decoder
    assert set(first["cases"]["labelled"]).isdisjoint(first["cases"]["validation"])
    assert first["cases"]["validation_seen_in_pretraining"] is None  # no config.json beside these weights
    assert first["timings"]["total_s"] > 0
    assert _numbers(results[1]) == _numbers(first)


def test_validation_cases_are_the_studies_and_exclusions_hold(hippocampus):
    probe = _probe_module()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _study import validation_split
    excluded_from_pretraining = validation_split(hippocampus, 20)[0]
    labelled, validation = probe.select_cases(hippocampus, 8, 20, [])
    assert validation == excluded_from_pretraining and not set(labelled) & set(validation)
    labelled, validation = probe.select_cases(hippocampus, 2, 3, excluded_from_pretraining[:2])
    assert validation == excluded_from_pretraining[2:5]
    with pytest.raises(ValueError, match="not in"):
        probe.select_cases(hippocampus, 2, 3, ["no_such_case"])


def test_batchnorm_statistics_are_reestimated_on_the_target_images(hippocampus):
    probe = _probe_module()
    from nnunetv2_vf.pretrain.dataset import Preprocessing
    net = _network(_architecture(TINY_FEATURES), seed=3)
    first_norm = net.stem.conv0[0]
    assert torch.equal(first_norm.running_mean, torch.zeros_like(first_norm.running_mean))
    preprocessing = Preprocessing("MR", None)
    images = [preprocessing(p) for p in sorted((hippocampus / "imagesTr").iterdir())[:3]]
    divisor = probe.network_divisor(_architecture(TINY_FEATURES))
    assert probe.reestimate_batchnorm(net, images, divisor, torch.device("cpu")) > 0
    assert not net.training and first_norm.momentum == 0.1  # back to eval mode and nnU-Net's momentum
    # direct computation: the first BatchNorm sees stem.proj's output; each image is one batch, averaged equally
    with torch.no_grad():
        maps = [net.stem.proj(torch.from_numpy(probe.pad_to_multiple(im, divisor)[0][None])) for im in images]
    means = torch.stack([m.mean(dim=(0, 2, 3, 4)) for m in maps]).mean(0)
    variances = torch.stack([m.transpose(0, 1).flatten(1).var(1, unbiased=True) for m in maps]).mean(0)
    assert not torch.allclose(first_norm.running_mean, torch.zeros_like(means))
    torch.testing.assert_close(first_norm.running_mean, means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_norm.running_var, variances, rtol=1e-4, atol=1e-5)


def test_wrong_files_are_refused_with_a_clear_message(tmp_path, hippocampus):
    probe = _probe_module()
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    proc = _run_probe(text, hippocampus, tmp_path / "out")
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

    no_architecture = tmp_path / "nnunet_style.pth"
    torch.save({"network_weights": _network(_architecture(TINY_FEATURES), 0).state_dict()}, no_architecture)
    with pytest.raises(ValueError, match="no 'architecture' record"):
        probe.read_checkpoint(no_architecture)

    other = write_checkpoint(tmp_path / "other", features=TINY_FEATURES, weights_features=list(SMALL_FEATURES))
    weights, arch = probe.read_checkpoint(other)
    with pytest.raises(ValueError, match="do not fit the architecture recorded"):
        probe.load_weights(probe.build_network(arch, probe.classifier_classes(weights)), weights, str(other))
