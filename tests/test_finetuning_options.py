"""The fine-tuning options (encoder-only loading, frozen encoder, encoder learning rate) on real plugin trainers,
driven through their own hooks and nnU-Net's own ``train_step`` and ``-pretrained_weights`` loader, on synthetic
plans (no dataset needed)."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunetv2_vf.architectures.pctnet import PCTNet
from nnunetv2_vf.architectures.pctnet_sizes import SMALL_FEATURES
from nnunetv2_vf.trainers import finetuning_variants as fv
from nnunetv2_vf.trainers.finetuning import (EncoderLearningRate, FreezeEncoder, encoder_modules,
                                             encoder_tensor_names, unwrap_network)
from nnunetv2_vf.trainers.plans_network_trainer import VFPlansNetworkTrainer_cpu_2epochs

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PATCH = [16, 16, 16]
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
                "file_ending": ".nii.gz", "numTraining": 4}


def _arch(name: str) -> dict:
    common = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    extra = ({"n_blocks_per_stage": [1, 1, 2], "n_conv_per_stage_decoder": [1, 1]} if name == RESENC else
             {"n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2]})
    return {"network_class_name": name, "arch_kwargs": {**common, **extra},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _plans(arch: str = PLAIN) -> dict:
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": PATCH, "median_image_size_in_voxels": PATCH, "spacing": [1.0] * 3,
           "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
           "batch_dice": False, "architecture": _arch(arch)}
    return {"dataset_name": "Dataset999_Synthetic", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "original_median_spacing_after_transp": [1.0] * 3, "original_median_shape_after_transp": PATCH,
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0}},
            "configurations": {"3d_fullres": cfg}}


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_compile", "f")
    data = tmp_path / "pre" / "Dataset999_Synthetic" / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case_000.b2nd").touch()  # initialize() only infers the dataset format from the file ending

    def make(cls, arch=PLAIN):
        torch.manual_seed(0)
        # nnU-Net 2.8's get_trainer_from_args adds 'continue_training' to the plans; __init__ pops it
        trainer = cls({**_plans(arch), "continue_training": False}, "3d_fullres", 0, DATASET_JSON,
                      torch.device("cpu"))
        trainer.initialize()
        return trainer
    return make


def _batch(trainer, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    data = torch.randn(2, 1, *patch, generator=g)
    target = [torch.randint(0, 3, (2, 1, *[round(p * f) for p, f in zip(patch, s)]), generator=g).float()
              for s in scales]
    return {"data": data, "target": target}


def _pretrained_file(trainer, path) -> dict:
    """A '-pretrained_weights' file for the trainer's network with values no initialisation produces."""
    g = torch.Generator().manual_seed(123)
    by_tensor = {}  # nnU-Net's decoder.encoder.* keys alias the encoder's tensors: one value per tensor
    weights = {}
    for k, t in unwrap_network(trainer.network).state_dict(keep_vars=True).items():
        if id(t) not in by_tensor:
            v = t.detach()
            by_tensor[id(t)] = (v + torch.rand(v.shape, generator=g) + 1.0) if v.is_floating_point() else v.clone()
        weights[k] = by_tensor[id(t)]
    torch.save({"network_weights": weights}, path)
    return weights


def _snapshot(trainer) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_network(trainer.network).state_dict().items()}


# -------------------------------------------------------------------------------------------- encoder split
@pytest.mark.parametrize("arch", [PLAIN, RESENC])
def test_nnunet_networks_encoder_is_encoder_prefix(make_trainer, arch):
    trainer = make_trainer(VFPlansNetworkTrainer_cpu_2epochs, arch)
    net = unwrap_network(trainer.network)
    names = encoder_tensor_names(net)
    assert names and all(k.startswith(("encoder.", "decoder.encoder.")) for k in names)
    # every encoder key (also the decoder's alias of the encoder), nothing of the decoder's own layers
    assert {k for k in net.state_dict() if k.startswith(("encoder.", "decoder.encoder."))} == names


def test_pctnet_encoder_is_stem_and_encoder():
    net = PCTNet(1, 3, features_per_stage=list(SMALL_FEATURES))
    assert encoder_modules(net) == [net.stem, net.encoder]
    names = encoder_tensor_names(net)
    assert {k.split(".")[0] for k in names} == {"stem", "encoder"}
    assert {k for k in net.state_dict() if k.startswith(("stem.", "encoder."))} == names


def test_network_without_declared_encoder_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="which part of Conv3d is the encoder.*key_to_encoder"):
        encoder_modules(torch.nn.Conv3d(1, 1, 1))


# ------------------------------------------------------------------------------------- encoder-only loading
@pytest.mark.parametrize("base", ["VFPlansNetworkTrainer_cpu_2epochs", "VFPretrainedTrainer_small_2epochs"])
def test_encoder_only_resets_exactly_the_non_encoder_tensors(make_trainer, tmp_path, base):
    trainer = make_trainer(getattr(fv, f"{base}_encoderOnly"))
    fresh = _snapshot(trainer)
    pretrained = _pretrained_file(trainer, tmp_path / "pre.pth")
    load_pretrained_weights(trainer.network, str(tmp_path / "pre.pth"))  # nnU-Net's own loader: everything
    reset = trainer.reset_non_encoder(trainer._fresh_state)
    now = _snapshot(trainer)
    encoder = encoder_tensor_names(trainer.network)
    assert set(reset) == set(now) - encoder and reset
    for k, v in now.items():
        if k in encoder:
            assert torch.equal(v, pretrained[k]), k  # pretrained encoder kept
        else:
            assert torch.equal(v, fresh[k]), k  # decoder, heads, classifiers: back to the fresh initialisation
    loaded_decoder = [k for k in reset if ".seg_layers." not in k and now[k].is_floating_point()]
    assert any(not torch.equal(pretrained[k], fresh[k]) for k in loaded_decoder)  # the reset undid something


def test_encoder_only_without_pretrained_weights_changes_nothing(make_trainer):
    trainer = make_trainer(fv.VFPlansNetworkTrainer_cpu_2epochs_encoderOnly)
    before = _snapshot(trainer)
    assert trainer.reset_non_encoder(trainer._fresh_state) == []
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(trainer).items())


def test_encoder_only_keeps_the_decoder_of_a_continued_run(make_trainer, tmp_path):
    trainer = make_trainer(fv.VFPlansNetworkTrainer_cpu_2epochs_encoderOnly)
    trainer.save_checkpoint(str(tmp_path / "ckpt.pth"))
    trainer.load_checkpoint(str(tmp_path / "ckpt.pth"))  # what --c does
    assert trainer._fresh_state is None  # on_train_start will not reset the continued run's decoder


# ------------------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("base", ["VFPlansNetworkTrainer_cpu_2epochs", "VFPretrainedTrainer_small_3epochs"])
def test_frozen_encoder_does_not_change_then_unfreezes_on_schedule(make_trainer, base):
    cls = getattr(fv, f"{base}_freezeEncoder1ep")
    trainer = make_trainer(cls)
    assert trainer.freeze_encoder_epochs == 1
    encoder = encoder_tensor_names(trainer.network)
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        before = _snapshot(trainer)
        for step in range(2):
            trainer.train_step(_batch(trainer, seed=10 * epoch + step))
        after = _snapshot(trainer)
        changed = {k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])}
        if epoch == 0:  # frozen: parameters and BatchNorm statistics of the encoder stay, the decoder learns
            assert not changed & encoder
            assert changed - encoder
            assert all(not p.requires_grad for m in encoder_modules(trainer.network) for p in m.parameters())
        else:  # unfrozen at epoch 1
            assert changed & encoder
            assert all(p.requires_grad for p in trainer.network.parameters())
    log = open(trainer.log_file).read()
    assert "encoder frozen" in log and "encoder unfrozen at epoch 1" in log


def test_freeze_longer_than_training_is_refused(make_trainer):
    cls = type("T", (FreezeEncoder, VFPlansNetworkTrainer_cpu_2epochs), {"freeze_encoder_epochs": 2})
    with pytest.raises(ValueError, match="freezes the encoder for 2 epochs but trains only 2"):
        make_trainer(cls).on_train_start()


def test_generated_variants_record_their_setting_in_the_name():
    assert fv.VFPretrainedTrainer_freezeEncoder100ep.freeze_encoder_epochs == 100  # nnU-Net's 1000 epochs / 10
    assert fv.VFPretrainedTrainer_100epochs_freezeEncoder10ep.freeze_encoder_epochs == 10
    assert fv.VFPlansNetworkTrainer_encoderLr0p1.encoder_lr_factor == 0.1
    from nnunetv2_vf.trainers import seeded
    assert issubclass(seeded.VFPlansNetworkTrainer_cpu_2epochs_encoderOnly_seed0,
                      fv.VFPlansNetworkTrainer_cpu_2epochs_encoderOnly)
    assert hasattr(seeded, "VFPlansNetworkTrainer_seed3")


# ------------------------------------------------------------------------------------- layer-wise lr
@pytest.mark.parametrize("base", ["VFPlansNetworkTrainer_cpu_2epochs", "VFPretrainedTrainer_small_2epochs"])
def test_encoder_lr_param_groups(make_trainer, base):
    plain = make_trainer(getattr(fv.vf_pretrained_trainer if base.startswith("VFPre") else
                                 fv.plans_network_trainer, base))
    trainer = make_trainer(getattr(fv, f"{base}_encoderLr0p1"))
    groups = trainer.optimizer.param_groups
    encoder = {id(p) for m in encoder_modules(trainer.network) for p in m.parameters()}
    n_plain = len(plain.optimizer.param_groups)
    new, enc = groups[:n_plain], groups[n_plain:]
    assert all(id(p) not in encoder for g in new for p in g["params"])  # non-encoder first: nnU-Net logs [0]
    assert all(id(p) in encoder for g in enc for p in g["params"]) and enc
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in trainer.network.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(trainer.network.parameters()))
    for g, ref in zip(new, plain.optimizer.param_groups):
        assert g["lr"] == pytest.approx(ref["lr"]) and g["weight_decay"] == ref["weight_decay"]
    for epoch in (0, 1):  # the ratio holds through warm-up and decay
        trainer.lr_scheduler.step(epoch)
        assert enc[0]["lr"] == pytest.approx(0.1 * groups[0]["lr"])
    assert groups[0]["lr"] > 0


def test_bad_encoder_lr_factor_is_refused(make_trainer):
    cls = type("T", (EncoderLearningRate, VFPlansNetworkTrainer_cpu_2epochs), {"encoder_lr_factor": 0})
    with pytest.raises(ValueError, match="encoder_lr_factor must be a number"):
        make_trainer(cls)


# -------------------------------------------------------------------------------- VFPlansNetworkTrainer
def test_plans_network_trainer_warms_up_with_sgd(make_trainer):
    trainer = make_trainer(VFPlansNetworkTrainer_cpu_2epochs)
    assert type(unwrap_network(trainer.network)).__name__ == "PlainConvUNet"  # the plans' network is kept
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["nesterov"]
    lrs = []
    for epoch in range(2):
        trainer.lr_scheduler.step(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[0] < lrs[1] <= 1e-3  # warm-up epoch, then the 1e-3 peak


def test_plans_network_trainer_refuses_pctnet_plans():
    from nnunetv2_vf.trainers.pctnet_trainer import with_pctnet_architecture
    plans = with_pctnet_architecture(_plans(), "3d_fullres", features=SMALL_FEATURES)
    with pytest.raises(ValueError, match="train these plans with VFPretrainedTrainer"):
        VFPlansNetworkTrainer_cpu_2epochs({**plans, "continue_training": False}, "3d_fullres", 0,
                                                  DATASET_JSON, torch.device("cpu"))
