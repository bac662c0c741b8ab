"""All plugin trainers, importable by name (``nnUNetv2_train ... -tr NAME``)."""
from nnunetv2_vf.trainers.pctnet_trainer import *  # noqa: F401,F403
from nnunetv2_vf.trainers.cross_dimensional import *  # noqa: F401,F403
from nnunetv2_vf.trainers.vf_pretrained_trainer import *  # noqa: F401,F403
from nnunetv2_vf.trainers.plans_network_trainer import *  # noqa: F401,F403
from nnunetv2_vf.trainers.finetuning_variants import *  # noqa: F401,F403
from nnunetv2_vf.trainers.seeded import *  # noqa: F401,F403
