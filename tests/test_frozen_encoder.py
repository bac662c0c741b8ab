"""``<Trainer>_frozenEncoder`` (``finetuning.FrozenEncoderWholeRun``): the encoder's parameters never change, the
decoder trains, and the encoder's BatchNorm layers keep training mode so their running statistics follow the
target data -- for a pretrained encoder and for a random one (no ``-pretrained_weights``) alike.  Real PCT-Net
trainer, nnU-Net's own ``-pretrained_weights`` loader and ``train_step``, synthetic plans."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from torch import nn

from nnunetv2_vf.trainers import finetuning_variants as fv
from nnunetv2_vf.trainers.finetuning import encoder_modules, encoder_tensor_names, unwrap_network
from test_finetuning_options import _batch, _pretrained_file, _snapshot, make_trainer  # noqa: F401 (fixture)


class _NoData:
    """Stands in for nnU-Net's on_train_start (data loaders, debug.json), which needs a preprocessed dataset."""

    def on_train_start(self):
        pass


def _frozen_trainer(make_trainer, base: str):
    cls = getattr(fv, f"{base}_frozenEncoder")
    mixin, trainer = cls.__bases__
    return make_trainer(type(cls.__name__, (mixin, _NoData, trainer), {}))


@pytest.mark.parametrize("pretrained", [False, True], ids=["random encoder", "pretrained encoder"])
def test_encoder_stays_fixed_while_decoder_and_encoder_batchnorm_statistics_follow_the_data(make_trainer, tmp_path,
                                                                                          pretrained):
    trainer = _frozen_trainer(make_trainer, "VFPretrainedTrainer_small_2epochs")
    if pretrained:
        _pretrained_file(trainer, tmp_path / "pre.pth")
        load_pretrained_weights(trainer.network, str(tmp_path / "pre.pth"))  # what -pretrained_weights does
    trainer.on_train_start()
    net = unwrap_network(trainer.network)
    encoder_norms = [m for e in encoder_modules(net) for m in e.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert encoder_norms  # PCT-Net's stem and encoder use BatchNorm: the case this mixin decides
    params = {k for k, _ in net.named_parameters()}
    encoder = encoder_tensor_names(net)

    before = _snapshot(trainer)
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()  # nnU-Net: network.train(), lr
        assert all(m.training for m in encoder_norms)  # batch statistics, running statistics updated
        for step in range(2):
            trainer.train_step(_batch(trainer, seed=10 * epoch + step))
    after = _snapshot(trainer)
    changed = {k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])}

    assert not changed & encoder & params  # every encoder weight, BatchNorm affine included, is unchanged
    assert changed & (params - encoder)  # the decoder and the classifiers learnt
    stats = {k for k in encoder if k.endswith(("running_mean", "running_var"))}
    assert stats and stats <= changed  # the encoder's BatchNorm statistics now describe the training data
    assert all(not p.requires_grad for m in encoder_modules(net) for p in m.parameters())
    assert "encoder frozen for the whole run" in open(trainer.log_file).read()


def test_frozen_encoder_variants_exist_for_every_budget_and_seed():
    from nnunetv2_vf.trainers import seeded
    for base in ("VFPretrainedTrainer", "VFPretrainedTrainer_small_1x15", "VFPlansNetworkTrainer_cpu_10epochs"):
        assert hasattr(fv, f"{base}_frozenEncoder") and hasattr(seeded, f"{base}_frozenEncoder_seed4")
    assert not hasattr(fv, "VFPretrainedTrainer_small_1x15_freezeEncoder1ep")  # would freeze its only epoch


def test_frozen_encoder_refuses_ddp(make_trainer):
    trainer = _frozen_trainer(make_trainer, "VFPlansNetworkTrainer_cpu_2epochs")
    trainer.is_ddp = True
    with pytest.raises(RuntimeError, match="cannot freeze parameters under multi-GPU"):
        trainer.on_train_start()
