"""The folder that ``nnUNet_extTrainer`` points at.

nnU-Net imports every module of an external trainer folder as a TOP-LEVEL module with the folder on sys.path
and then drops it from sys.modules, which breaks relative imports and pickling of classes defined there.  So the
folder holds a single re-export module (``nnunetv2_vf_trainers.py``): the classes nnU-Net finds keep their real
module ``nnunetv2_vf.trainers...`` and pickle/import normally.  This ``__init__`` is never imported by nnU-Net
(it only walks the folder's modules); it tells users what to export.
"""
import os
import sys

TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))


def with_trainer_dir(env: dict | None = None) -> dict:
    """Return a copy of ``env`` (default: os.environ) whose nnUNet_extTrainer includes this package's folder."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if TRAINER_DIR not in paths:
        paths.append(TRAINER_DIR)
    env["nnUNet_extTrainer"] = os.pathsep.join(paths)
    return env


def print_trainer_dir() -> None:
    """Console script: ``export nnUNet_extTrainer=$(nnUNetv2_vf_trainer_dir)``."""
    sys.stdout.write(TRAINER_DIR + "\n")
