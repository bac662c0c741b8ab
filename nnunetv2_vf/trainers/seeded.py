"""``<Trainer>_seed<N>``: a seeded twin of every plugin trainer (``-tr VFPretrainedTrainer_small_10epochs_seed0``).

nnU-Net has no seed option and chooses the trainer by class name only, so the seed has to live in the name, like
nnU-Net's own ``_Xepochs`` variants. The twins are generated instead of written out (five seeds x every trainer);
each is a real module-level class of this module, so checkpoints pickle it and ``nnUNetv2_predict`` finds it again.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_vf.trainers import (cross_dimensional, finetuning_variants, pctnet_trainer, plans_network_trainer,
                                  vf_pretrained_trainer)
from nnunetv2_vf.trainers.variants import Seeded

SEEDS = range(5)


def seeded_variant(trainer: type, seed: int, module: str = __name__) -> type:
    """``Seeded`` + ``trainer`` with ``seed`` fixed, named ``<trainer>_seed<seed>``."""
    name = f"{trainer.__name__}_seed{seed}"
    return type(name, (Seeded, trainer), {
        "seed": seed, "__module__": module, "__qualname__": name,
        "__doc__": f"{trainer.__name__} with every random generator seeded ({seed}); see variants.Seeded."})


def _plugin_trainers() -> list[type]:
    found = []
    for module in (pctnet_trainer, vf_pretrained_trainer, cross_dimensional, plans_network_trainer,
                   finetuning_variants):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer):
                found.append(obj)
    return found


__all__ = ["seeded_variant", "SEEDS"]
for _trainer in _plugin_trainers():
    for _seed in SEEDS:
        _cls = seeded_variant(_trainer, _seed)
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
del _trainer, _seed, _cls
