"""Fine-tuning safeguards (:mod:`nnunetv2_vf.trainers.safeguards`): every bad ``-pretrained_weights`` file gets an
error naming the file, the problem and the fix BEFORE nnU-Net's loader touches it (from the command line and from
Python ``run_training``), and nnU-Net's checkpoints are written atomically (a full disk keeps the previous one)."""
from __future__ import annotations

import errno
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from nnunetv2.run import run_training as nnunet_run_training

from nnunetv2_vf.architectures.encoder_unet import EncoderUNet3D
from nnunetv2_vf.architectures.pctnet import PCTNet, table_layout_record
from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES
from nnunetv2_vf.checkpoint_io import _writer_id
from nnunetv2_vf.trainers.pctnet_trainer import PCTNetTrainer_small_2epochs
from nnunetv2_vf.trainers.safeguards import (AtomicCheckpoints, CheckpointWriteError, PretrainedWeightsCheck,
                                             PretrainedWeightsError, PretrainedWeightsNotFoundError, RunContext,
                                             check_pretrained_compatibility)
from nnunetv2_vf.trainers.seeded import PCTNetTrainer_small_2epochs_seed1
from nnunetv2_vf.workflow import run_nnunet

SMALL = SMALL_FEATURES
DATASET = "Dataset999_Tiny"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz",
                "numTraining": 4}
RUN = RunContext(DATASET, "3d_fullres", 0, "PCTNetTrainer_small_2epochs", "nnUNetPlans")
RUN_LINE = "nnUNetv2_train Dataset999_Tiny 3d_fullres 0 -tr PCTNetTrainer_small_2epochs -p nnUNetPlans"
NNUNET_LOADER_TEXT = ("KeyError", "is missing in the pretrained model weights", "The shape of the parameters")


# ------------------------------------------------------------------------------------------------ bad weight files
def _pctnet(features=SMALL) -> PCTNet:
    return PCTNet(1, 3, features_per_stage=features)


def _bad_file(case: str, folder, net: torch.nn.Module):
    """(path, regexes the message must contain) for one kind of bad -pretrained_weights file."""
    path = folder / f"{case}.pth"
    good = {"network_weights": net.state_dict()}
    if case == "missing":
        return path, [r"not found"]
    if case == "empty":
        path.write_bytes(b"")
        return path, [r"is empty", r"copy or download it again"]
    if case == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, [r"cannot read", r"corrupt or not a checkpoint", r"copy or download it again"]
    if case == "not_a_checkpoint":
        path.write_text("<html>404 Not Found</html>")
        return path, [r"is not a PyTorch checkpoint \(it starts with b'<html>404", r"Fix: copy or download it again"]
    if case == "runs_code":
        class RunsCode:
            def __reduce__(self):
                return (os.system, ("echo should never run",))
        torch.save({**good, "extra": RunsCode()}, path)
        return path, [r"could run code", r"system", r"weights_only=False; it is refused before that"]
    if case == "misfm_raw":
        torch.save({"model_state_dict": {"embeddings.1.proj.weight": torch.zeros(8, 1, 3, 3, 3)}}, path)
        return path, [r"MIS-FM authors' format.*nnUNetv2_vf_convert_misfm", r"Fix: nnUNetv2_vf_convert_misfm .* "
                      r"converted\.pth"]
    if case == "bare_state_dict":
        torch.save(net.state_dict(), path)
        return path, [r"holds no 'network_weights'", r"bare state_dict: save it as torch\.save\(\{'network_weights'"]
    if case == "other_architecture":
        torch.save({"network_weights": _pctnet((8, 16, 32, 64, 96)).state_dict()}, path)
        return path, [r"does not fit the PCTNet network", r"shape mismatch: encoder\.pct4\S* checkpoint \(\d+",
                      r"nnUNetv2_vf_adapt_plans", r"nnUNetv2_move_plans_between_datasets"]
    if case == "missing_keys":
        torch.save({"network_weights": {k: v for k, v in net.state_dict().items() if not k.startswith("decoder.")}},
                   path)
        return path, [r"missing in checkpoint: decoder\.", r"problem\(s\)"]
    if case == "nan":
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        key = next(k for k, v in weights.items() if v.is_floating_point() and ".seg_layers." not in k and v.numel() > 3)
        weights[key].view(-1)[:3] = float("nan")
        torch.save({"network_weights": weights}, path)
        return path, [r"NaN/Inf in 1 tensor", rf"{re.escape(key)}: 3 of \d+ values NaN/Inf", r"earlier checkpoint"]
    raise AssertionError(case)


CASES = ["missing", "empty", "truncated", "not_a_checkpoint", "runs_code", "misfm_raw", "bare_state_dict",
         "other_architecture", "missing_keys", "nan"]


@pytest.mark.parametrize("case", CASES)
def test_each_bad_file_is_named_with_problem_and_fix(tmp_path, case):
    net = _pctnet()
    path, patterns = _bad_file(case, tmp_path, net)
    error = PretrainedWeightsNotFoundError if case == "missing" else PretrainedWeightsError
    with pytest.raises(error) as e:
        check_pretrained_compatibility(net, path, RUN)
    msg = str(e.value)
    assert str(path) in msg and len(msg.splitlines()) >= 2, msg
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)
    assert f"(run: {RUN_LINE}; nothing was loaded" in msg
    assert isinstance(e.value, ValueError)  # existing callers catch ValueError


def test_channel_mismatch_names_the_adapted_file_and_the_plans_recorded_for_it(tmp_path):
    """Where nnUNetv2_vf_adapt_plans recorded what to use, the mismatch error names it: the ``_<C>ch.pth`` file the
    run's plans were adapted for, or the ``-p`` that was adapted for the given file."""
    import json
    folder = tmp_path / "nnUNet_preprocessed" / DATASET
    folder.mkdir(parents=True)
    single = tmp_path / "vf_run" / "checkpoint_final.pth"
    single.parent.mkdir()
    torch.save({"network_weights": _pctnet().state_dict()}, single)  # 1-channel stem
    two = single.with_name("checkpoint_final_2ch.pth")
    (folder / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    (folder / "nnUNetPlans_VF.json").write_text(json.dumps({"plans_name": "nnUNetPlans_VF", "pretrain_info": {
        "pretrained_weights": str(single), "input_channel_adaptation": {"channels": 2, "weights": str(two)}}}))
    net = PCTNet(2, 3, features_per_stage=SMALL)
    adapted = RunContext(DATASET, "3d_fullres", 0, "VFPretrainedTrainer", "nnUNetPlans_VF", str(folder))
    with pytest.raises(PretrainedWeightsError) as e:
        check_pretrained_compatibility(net, single, adapted)
    msg = str(e.value)
    assert "shape mismatch: stem" in msg and f"were adapted (nnUNetv2_vf_adapt_plans) for {two}" in msg, msg
    assert f"-p nnUNetPlans_VF -pretrained_weights {two}" in msg, msg
    base = RunContext(DATASET, "3d_fullres", 0, "VFPretrainedTrainer", "nnUNetPlans", str(folder))
    with pytest.raises(PretrainedWeightsError) as e:
        check_pretrained_compatibility(net, single, base)
    msg = str(e.value)
    assert f"{single} was adapted for the plans nnUNetPlans_VF" in msg, msg
    assert f"-p nnUNetPlans_VF -pretrained_weights {two}" in msg and "-plans_name nnUNetPlans_VF" in msg, msg
    with pytest.raises(PretrainedWeightsError) as e:  # no plans folder known: the general advice
        check_pretrained_compatibility(net, single, RUN)
    assert "train with the plans and trainer the weights were made for" in str(e.value)


def test_good_file_and_classifiers_of_other_class_count_pass(tmp_path):
    """nnU-Net's rule: every tensor but the .seg_layers. classifiers must fit; extra checkpoint keys are ignored."""
    pretrained = PCTNet(1, 5, features_per_stage=SMALL)  # 5 classes: only the classifiers differ
    weights = {**pretrained.state_dict(), "unused.extra": torch.zeros(2)}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights, "current_epoch": 3, **table_layout_record(weights)}, path)
    net = _pctnet()
    n = check_pretrained_compatibility(net, path, RUN)
    assert n == sum(1 for k in net.state_dict() if ".seg_layers." not in k) > 100
    # a NaN in a skipped classifier is not loaded by nnU-Net, hence no error either
    weights[next(k for k in weights if ".seg_layers." in k and k.endswith("weight"))].fill_(float("nan"))
    torch.save({"network_weights": weights, **table_layout_record(weights)}, path)
    assert check_pretrained_compatibility(net, path) == n


def test_2d_encoder_unet_checkpoint_for_3d_trainer_names_the_inflation_command(tmp_path):
    net3d = EncoderUNet3D(1, 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], encoder_name="efficientnet_lite0")
    net2d = net3d.planar_counterpart()
    plans = {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "configurations": {"2d": {"architecture": {
        "network_class_name": "nnunetv2_vf.architectures.encoder_unet.EncoderUNet2D", "arch_kwargs": {}}}}}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": net2d.state_dict(), "trainer_name": "EncoderUNet2DTrainer",
                "init_args": {"plans": plans, "configuration": "2d"}}, path)
    run = RunContext(DATASET, "3d_fullres", 1, "EncoderUNet3DTrainer", "nnUNetPlans")
    with pytest.raises(PretrainedWeightsError) as e:
        check_pretrained_compatibility(net3d, path, run)
    msg = str(e.value)
    assert "is a 2D checkpoint (checkpoint: trainer EncoderUNet2DTrainer" in msg and "network is 3D" in msg, msg
    assert (f"nnUNetv2_vf_inflate_checkpoint {path} -d {DATASET} -p nnUNetPlans -c 3d_fullres -tr "
            f"EncoderUNet3DTrainer -o inflated.pth") in msg, msg
    assert f"nnUNetv2_train {DATASET} 3d_fullres 1 -tr EncoderUNet3DTrainer -p nnUNetPlans -pretrained_weights " \
           f"inflated.pth" in msg
    # the same 2D file given to the 3D PCT-Net trainer: it cannot be inflated into PCT-Net, and says so
    with pytest.raises(PretrainedWeightsError, match="initialises only the 3D EncoderUNet3DTrainer"):
        check_pretrained_compatibility(_pctnet(), path, RUN)


# ------------------------------------------------------------------------------- trainers built by nnU-Net itself
def _plans() -> dict:
    patch = [16, 32, 32]
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "continue_training": False,
            "configurations": {"3d_fullres": {
                "data_identifier": "tiny", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": [1.0] * 3,
                "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
                "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
                "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 "arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2},
                                 "_kw_requires_import": []}}}}


@pytest.fixture
def trainer_env(tmp_path, monkeypatch):
    """nnU-Net folders for trainers built in-process (no dataset: initialize() only needs the folder's file type)."""
    pre = tmp_path / "preprocessed"
    (pre / DATASET / "tiny").mkdir(parents=True)
    (pre / DATASET / "tiny" / "case.b2nd").write_bytes(b"")
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_compile", "f")
    return tmp_path


def _trainer(cls=PCTNetTrainer_small_2epochs):
    return cls(_plans(), "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))


def test_check_runs_inside_nnunets_own_maybe_load_checkpoint(trainer_env):
    """The trainer finds the file nnU-Net is about to load (no sys.argv, no patching): bad files stop at
    initialize() with the run named, good ones load through nnU-Net's loader; outside that frame nothing is
    checked."""
    trainer = _trainer()
    bad = trainer_env / "other.pth"
    torch.save({"network_weights": _pctnet((8, 16, 32, 64, 96)).state_dict()}, bad)
    with pytest.raises(PretrainedWeightsError) as e:
        nnunet_run_training.maybe_load_checkpoint(trainer, False, False, str(bad))
    msg = str(e.value)
    assert "shape mismatch: encoder.pct4" in msg and f"(run: {RUN_LINE};" in msg, msg
    assert trainer.was_initialized  # failed after the network was built, before nnU-Net's loader ran
    assert "refused: PretrainedWeightsError: -pretrained_weights" in open(trainer.log_file).read()  # the run's log says why it stopped

    trainer = _trainer()
    good = trainer_env / "good.pth"
    reference = _pctnet()
    torch.save({"network_weights": reference.state_dict(), **table_layout_record(reference.state_dict())}, good)
    nnunet_run_training.maybe_load_checkpoint(trainer, False, False, str(good))
    key = next(k for k, v in reference.state_dict().items() if k.startswith("encoder.") and v.ndim > 1)
    assert torch.equal(trainer.network.state_dict()[key], reference.state_dict()[key])  # nnU-Net loaded it
    log = open(trainer.log_file).read()
    assert f"-pretrained_weights {good}: checked" in log

    trainer = _trainer()
    # nnU-Net names log files to the second: this trainer may append to the previous one's log
    before = open(trainer.log_file).read() if os.path.isfile(trainer.log_file) else ""
    trainer.initialize()  # not started by maybe_load_checkpoint: silently no check (and no error)
    assert "checked" not in open(trainer.log_file).read()[len(before):]


def test_mixins_survive_seeded_variants_and_init_arg_pickling(trainer_env):
    trainer = _trainer(PCTNetTrainer_small_2epochs_seed1)
    mro = type(trainer).__mro__
    assert mro.index(PretrainedWeightsCheck) < mro.index(AtomicCheckpoints) < len(mro)
    assert set(trainer.my_init_kwargs) == {"plans", "configuration", "fold", "dataset_json", "device"}
    restored = pickle.loads(pickle.dumps(trainer.my_init_kwargs))
    assert restored["configuration"] == "3d_fullres" and restored["device"] == torch.device("cpu")
    assert pickle.loads(pickle.dumps(type(trainer))) is PCTNetTrainer_small_2epochs_seed1


# ---------------------------------------------------------------------------------------------- atomic checkpoints
def _failing_save(kind):
    """torch.save that writes a few bytes into its target, then fails as a full disk does."""
    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        if kind == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4054")
    return save


@pytest.mark.parametrize("kind", ["oserror", "torch_runtime_error"])
def test_full_disk_keeps_the_previous_checkpoint_and_says_how_to_resume(trainer_env, monkeypatch, kind):
    trainer = _trainer()
    trainer.initialize()
    target = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(target)
    before = open(target, "rb").read()
    assert torch.load(target, weights_only=False)["current_epoch"] == 1  # nnU-Net's content, unchanged
    assert not [f for f in os.listdir(trainer.output_folder) if f.endswith(".tmp")]

    trainer.current_epoch = 5
    monkeypatch.setattr(torch, "save", _failing_save(kind))
    with pytest.raises(CheckpointWriteError) as e:
        trainer.save_checkpoint(target)
    monkeypatch.undo()
    assert open(target, "rb").read() == before  # byte-identical: the last good checkpoint survives
    assert not [f for f in os.listdir(trainer.output_folder) if f.endswith(".tmp")]
    msg = str(e.value)
    assert trainer.output_folder in msg and "MiB free" in msg, msg
    assert f"needs about {len(before) / 2 ** 20:.1f} MiB (the size of the previous checkpoint_latest.pth)" in msg
    assert f"{RUN_LINE} --c" in msg and "--c loads checkpoint_latest.pth" in msg
    assert "the earlier checkpoint_latest.pth is unchanged" in msg
    if kind == "oserror":
        assert "(ENOSPC: No space left on device)" in msg, msg
    assert isinstance(e.value, OSError)
    # a first checkpoint that cannot be written: no earlier file to speak of, nothing for --c to load
    first = os.path.join(trainer.output_folder, "checkpoint_best.pth")
    os.remove(target)
    monkeypatch.setattr(torch, "save", _failing_save(kind))
    with pytest.raises(CheckpointWriteError) as e:
        trainer.save_checkpoint(first)
    monkeypatch.undo()
    msg = str(e.value)
    assert "there was no earlier checkpoint_best.pth" in msg and "--c" not in msg, msg
    assert msg.rstrip().endswith(RUN_LINE) and "no checkpoint of this fold exists yet" in msg


def test_checkpointing_conditions_and_stale_temporary_files(trainer_env):
    trainer = _trainer()
    trainer.initialize()
    folder = trainer.output_folder
    dead = os.path.join(folder, f"checkpoint_best.pth.{_writer_id(2 ** 22 + 12345)}.tmp")  # a killed writer's
    open(dead, "wb").write(b"half")
    trainer.disable_checkpointing = True
    trainer.save_checkpoint(os.path.join(folder, "checkpoint_best.pth"))
    assert not os.path.exists(os.path.join(folder, "checkpoint_best.pth"))  # --disable_checkpointing respected
    trainer.disable_checkpointing = False
    trainer.save_checkpoint(os.path.join(folder, "checkpoint_best.pth"))
    assert os.path.isfile(os.path.join(folder, "checkpoint_best.pth")) and not os.path.exists(dead)


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_nnunetv2_train_refuses_bad_pretrained_weights(hippo_dataset, shared_dir, tmp_path):
    """The real ``nnUNetv2_train -pretrained_weights`` and Python ``run_training(...)``: each bad file stops at
    initialize() with the plugin's message, never with nnU-Net's KeyError/assertion, and nothing is trained."""
    env, did, name = hippo_dataset["env"], str(hippo_dataset["id"]), hippo_dataset["name"]
    trainer = "PCTNetTrainer_small_2epochs"
    corrupt = tmp_path / "corrupt.pth"
    torch.save({"network_weights": _pctnet().state_dict()}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:5000])
    other = tmp_path / "other_architecture.pth"
    torch.save({"network_weights": _pctnet((8, 16, 32, 64, 96)).state_dict()}, other)
    misfm = shared_dir / "fixtures" / "pctnet" / "pctnet_public_checkpoint.pt"
    run_line = f"(run: nnUNetv2_train {name} 3d_fullres 0 -tr {trainer} -p nnUNetPlans; nothing was loaded"
    for bad, expected in ((misfm, "MIS-FM authors' format (model_state_dict, no nnU-Net 'network_weights'): "
                                  "convert it first with nnUNetv2_vf_convert_misfm"),
                          (corrupt, f"cannot read -pretrained_weights {corrupt}"),
                          (other, f"-pretrained_weights {other} does not fit the PCTNet network")):
        with pytest.raises(RuntimeError) as e:
            run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", trainer, "-pretrained_weights", bad,
                        "-device", "cpu"], env, echo=False)
        out = str(e.value)
        assert "exit code" in out and expected in out and run_line in out, out
        assert not any(t in out for t in NNUNET_LOADER_TEXT), out
    fold = os.path.join(env["nnUNet_results"], name, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")
    assert not [f for f in os.listdir(fold) if f.startswith("checkpoint")]  # nothing trained

    code = ("import torch\nfrom nnunetv2.run.run_training import run_training\n"
            f"run_training({did!r}, '3d_fullres', 0, {trainer!r}, pretrained_weights={str(other)!r}, "
            "device=torch.device('cpu'))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "PretrainedWeightsError" in out, out
    assert f"-pretrained_weights {other} does not fit the PCTNet network" in out and run_line in out, out
    assert not any(t in out for t in NNUNET_LOADER_TEXT), out
