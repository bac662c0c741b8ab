"""What the demo's training logs carry: a progress line at least every minute during long epochs (the trainers'
ProgressLines mixin), and no torch.jit FutureWarning from importing the plugin trainers."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np

from nnunetv2_vf.trainers import progress
from nnunetv2_vf.trainers.progress import ProgressLines


class _FakeTrainer:
    current_epoch = 3
    num_iterations_per_epoch = 250

    def __init__(self):
        self.lines = []

    def on_train_epoch_start(self):
        pass

    def train_step(self, batch):
        return {"loss": np.float32(-0.25)}

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        self.lines.append(" ".join(map(str, args)))


class _Trainer(ProgressLines, _FakeTrainer):
    pass


def test_progress_line_when_a_minute_has_passed(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    trainer = _Trainer()
    trainer.on_train_epoch_start()
    for now in (1010, 1030, 1060):  # 60 s exactly is not "more than" 60 s
        clock[0] = now
        assert trainer.train_step({}) == {"loss": np.float32(-0.25)}
    assert trainer.lines == []
    clock[0] = 1061.4
    trainer.train_step({})
    assert trainer.lines == ["epoch 3: iteration 4/250, loss -0.2500, elapsed 61 s"]
    clock[0] = 1100
    trainer.train_step({})
    assert len(trainer.lines) == 1  # the next line only 60 s after the last one
    clock[0] = 1122
    trainer.train_step({})
    assert trainer.lines[-1] == "epoch 3: iteration 6/250, loss -0.2500, elapsed 122 s"
    # a new epoch restarts the count and the clock
    trainer.current_epoch = 4
    clock[0] = 1200
    trainer.on_train_epoch_start()
    clock[0] = 1230
    trainer.train_step({})
    assert len(trainer.lines) == 2


def test_plugin_trainers_carry_the_mixin():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_vf.trainers.cross_dimensional import DepthStackUNetTrainer, EncoderUNet2DTrainer_2epochs
    from nnunetv2_vf.trainers.pctnet_trainer import PCTNetTrainer_small_10epochs
    from nnunetv2_vf.trainers.vf_pretrained_trainer import VFPretrainedTrainer_small_10epochs

    for cls in (PCTNetTrainer_small_10epochs, VFPretrainedTrainer_small_10epochs, EncoderUNet2DTrainer_2epochs,
                DepthStackUNetTrainer):
        mro = cls.__mro__
        assert mro.index(ProgressLines) < mro.index(nnUNetTrainer), cls  # its train_step runs nnU-Net's


def test_importing_the_trainers_warns_nothing_about_torch_jit():
    """timm's import calls torch.jit.interface (FutureWarning on recent torch) in every nnU-Net process that loads
    the plugin trainers; progress.py does that import with exactly that warning ignored."""
    result = subprocess.run([sys.executable, "-W", "always", "-c", "import nnunetv2_vf.trainers, timm"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.jit" not in result.stderr, result.stderr
