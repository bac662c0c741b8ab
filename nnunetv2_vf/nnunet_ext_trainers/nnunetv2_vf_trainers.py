# Re-export only: nnU-Net imports this file as a top-level module (see __init__.py for why).
from nnunetv2_vf.trainers import *  # noqa: F401,F403
