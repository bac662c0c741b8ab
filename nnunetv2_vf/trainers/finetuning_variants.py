"""``<Trainer>_encoderOnly``, ``<Trainer>_freezeEncoder<N>ep``, ``<Trainer>_frozenEncoder``, ``<Trainer>_encoderLr0p1``,
``<Trainer>_peakLr1em4``: the fine-tuning options of :mod:`nnunetv2_vf.trainers.finetuning` for every VF fine-tuning
trainer.

nnU-Net chooses a trainer by class name only, so an option lives in the name (and hence in the model folder) like
nnU-Net's own ``_Xepochs`` variants.  The variants are generated from one table instead of written out; each is a
real module-level class of this module, so checkpoints pickle it and ``nnUNetv2_predict`` finds it again.

- ``_encoderOnly``: only the pretrained encoder is kept, decoder and classifiers start fresh.
- ``_freezeEncoder<N>ep``: encoder frozen for the first N epochs (decoder first), then all trains; N is a tenth of
  the trainer's epochs (at least 1), e.g. ``VFPretrainedTrainer_freezeEncoder100ep``; not made for one-epoch budgets.
- ``_frozenEncoder``: encoder frozen for the whole run, its BatchNorm statistics following the target data; without
  ``-pretrained_weights`` it is a frozen random encoder (the control of a frozen-features comparison).
- ``_encoderLr0p1``: the encoder learns at 0.1 x the lr of the rest.
- ``_peakLr1em4``: peak lr 1e-4 (a tenth of the default 1e-3), no warm-up.

Combinations are a three-line subclass: ``class T(FreezeEncoder, EncoderLearningRate, VFPretrainedTrainer)`` with
``freeze_encoder_epochs`` and ``encoder_lr_factor`` set.
"""
from __future__ import annotations

from nnunetv2_vf.trainers import plans_network_trainer, vf_pretrained_trainer
from nnunetv2_vf.trainers.finetuning import (EncoderLearningRate, EncoderOnlyLoading, FreezeEncoder,
                                             FrozenEncoderWholeRun, PeakLearningRate)

ENCODER_LR_FACTOR = 0.1
LOW_PEAK_LR = 1e-4
NNUNET_DEFAULT_EPOCHS = 1000


def base_trainers() -> list[type]:
    return [getattr(m, n) for m in (vf_pretrained_trainer, plans_network_trainer) for n in m.__all__
            if n.startswith("VF") and isinstance(getattr(m, n), type)]


def freeze_epochs(trainer: type) -> int:
    """A tenth of the trainer's epochs, at least one."""
    epochs = getattr(trainer, "budget", (NNUNET_DEFAULT_EPOCHS,))[0]
    return max(1, epochs // 10)


def option_variants(trainer: type, module: str = __name__) -> list[type]:
    """The fine-tuning variants of ``trainer``."""
    n = freeze_epochs(trainer)
    epochs = getattr(trainer, "budget", (NNUNET_DEFAULT_EPOCHS,))[0]
    options = [("encoderOnly", EncoderOnlyLoading, {},
                "only the pretrained encoder is loaded; decoder and classifiers keep their fresh initialisation"),
               (f"freezeEncoder{n}ep", FreezeEncoder, {"freeze_encoder_epochs": n},
                f"the encoder is frozen for the first {n} epoch(s), then trained"),
               ("frozenEncoder", FrozenEncoderWholeRun, {},
                "the encoder is frozen for the whole run (BatchNorm statistics follow the target data); without "
                "-pretrained_weights a frozen random encoder"),
               ("encoderLr0p1", EncoderLearningRate, {"encoder_lr_factor": ENCODER_LR_FACTOR},
                f"the encoder learns at {ENCODER_LR_FACTOR} x the lr of the rest"),
               ("peakLr1em4", PeakLearningRate, {"peak_lr": LOW_PEAK_LR, "peak_warmup_fraction": 0.0},
                f"peak lr {LOW_PEAK_LR:g}, no warm-up")]
    if n >= epochs:  # FreezeEncoder would refuse to start: the encoder would never train
        options = [o for o in options if o[1] is not FreezeEncoder]
    made = []
    for suffix, mixin, attrs, doc in options:
        name = f"{trainer.__name__}_{suffix}"
        made.append(type(name, (mixin, trainer), {**attrs, "__module__": module, "__qualname__": name,
                                                   "__doc__": f"{trainer.__name__}: {doc} (see finetuning.py)."}))
    return made


__all__ = ["option_variants", "base_trainers", "freeze_epochs"]
for _trainer in base_trainers():
    for _cls in option_variants(_trainer):
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
del _trainer, _cls
