"""nnU-Net v2 plugin: Volume Fusion pretraining + PCT-Net (MIS-FM) and cross-dimensional transfer.

Importing this package has no side effects; trainers live in :mod:`nnunetv2_vf.trainers` and are found by
nnU-Net's ``-tr NAME`` through ``nnUNet_extTrainer`` (see :mod:`nnunetv2_vf.nnunet_ext_trainers`).
"""
__version__ = "0.1.0"
