"""Short training budgets anneal per iteration (``variants.PerIterationSchedule``): warm-up and poly decay over all
``epochs x iterations`` steps, driven by nnU-Net's own ``on_train_epoch_start`` / ``train_step`` on real trainers
(synthetic plans, no dataset), identical after a ``--c``-style checkpoint round trip; the lower-peak variant."""
from __future__ import annotations

import pytest
import torch

import nnunetv2_vf.trainers as all_trainers
from nnunetv2_vf.trainers import finetuning_variants as fv
from nnunetv2_vf.trainers.finetuning import encoder_parameters
from nnunetv2_vf.trainers.lr_schedule import PerIterationWarmupPolyLRScheduler
from nnunetv2_vf.trainers.plans_network_trainer import VFPlansNetworkTrainer_cpu_10epochs
from nnunetv2_vf.trainers.variants import PerIterationSchedule, TrainingBudget
from test_finetuning_options import _batch, make_trainer  # noqa: F401 (make_trainer is a fixture)


def _nnunet_order(scheduler, epochs: int, iterations: int, start_epoch: int = 0):
    """The lr of every iteration when stepped as nnU-Net + PerIterationSchedule do: ``step(epoch)`` at the epoch
    start, ``step_iteration`` before each iteration; also the lr nnU-Net logs per epoch."""
    group = scheduler.optimizer.param_groups[0]
    lrs, logged = [], []
    for epoch in range(start_epoch, epochs):
        scheduler.step(epoch)
        logged.append(group["lr"])
        for i in range(iterations):
            scheduler.step_iteration(epoch, i)
            lrs.append(group["lr"])
    return lrs, logged


def _check_annealed(lrs: list, peak: float, warmup: int) -> None:
    assert lrs[:warmup] == sorted(lrs[:warmup]) and all(lr < peak for lr in lrs[:warmup])  # warm-up rises
    assert lrs[warmup] == pytest.approx(peak)
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # strictly decaying every iteration
    assert 0 < lrs[-1] < 0.02 * peak


def test_scheduler_warms_up_and_anneals_every_iteration():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = PerIterationWarmupPolyLRScheduler(opt, iterations_per_epoch=15, max_steps=150, warmup_steps=15)
    lrs, logged = _nnunet_order(scheduler, 10, 15)
    assert len(lrs) == 150 and len(set(lrs)) == 150  # a new lr every iteration, not a staircase
    _check_annealed(lrs, 1e-3, 15)
    assert logged == lrs[::15]  # nnU-Net's epoch-start call sets (and logs) the epoch's first lr: no extra step
    again, _ = _nnunet_order(scheduler, 10, 15, start_epoch=4)  # from an epoch boundary, nothing else stored
    assert again == lrs[60:]


def _record_lrs(trainer) -> list:
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append([g["lr"] for g in
                                                                                   opt.param_groups]))
    return lrs


def _train_epochs(trainer, epochs) -> None:
    for epoch in epochs:  # nnU-Net's run_training loop, minus validation and data loading
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        for i in range(trainer.num_iterations_per_epoch):
            trainer.train_step(_batch(trainer, seed=100 * epoch + i))


def test_trainer_anneals_per_iteration_and_continues_identically(make_trainer, tmp_path):
    trainer = make_trainer(VFPlansNetworkTrainer_cpu_10epochs)  # 10 x 15 iterations, 5 % warm-up, SGD peak 1e-3
    assert isinstance(trainer.lr_scheduler, PerIterationWarmupPolyLRScheduler)
    assert (trainer.lr_scheduler.max_steps, trainer.lr_scheduler.warmup_steps) == (150, 8)  # round(0.05 * 150)
    lrs = _record_lrs(trainer)
    _train_epochs(trainer, range(4))
    trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))  # as on_epoch_end of epoch 3: next is 4
    _train_epochs(trainer, range(4, 10))
    flat = [step[0] for step in lrs]
    assert len(flat) == 150
    _check_annealed(flat, 1e-3, 8)
    # nnU-Net logs/plots one lr per epoch: the lr of the epoch's first iteration, so it was not stepped twice
    assert [trainer.logger.get_value("lrs", step=e) for e in range(10)] == pytest.approx(flat[::15])

    resumed = make_trainer(VFPlansNetworkTrainer_cpu_10epochs)
    resumed.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))  # what --c does
    assert resumed.current_epoch == 4
    lrs_resumed = _record_lrs(resumed)
    _train_epochs(resumed, range(resumed.current_epoch, 10))
    assert [step[0] for step in lrs_resumed] == flat[60:]


def test_encoder_lr_ratio_holds_every_iteration(make_trainer):
    trainer = make_trainer(fv.VFPlansNetworkTrainer_cpu_2epochs_encoderLr0p1)
    assert isinstance(trainer.lr_scheduler, PerIterationWarmupPolyLRScheduler)
    encoder = {id(p) for p in encoder_parameters(trainer.network)}
    is_encoder = [all(id(p) in encoder for p in g["params"]) for g in trainer.optimizer.param_groups]
    lrs = _record_lrs(trainer)
    _train_epochs(trainer, range(2))
    assert len(lrs) == 8 and len({step[0] for step in lrs}) == 8
    for step in lrs:
        for lr, enc in zip(step, is_encoder):
            assert lr == pytest.approx((0.1 if enc else 1.0) * step[0])


def test_every_budget_trainer_steps_per_iteration_and_full_trainers_per_epoch():
    classes = [getattr(all_trainers, n) for n in dir(all_trainers) if n.endswith("Trainer") or "Trainer_" in n]
    classes = [c for c in classes if isinstance(c, type) and hasattr(c, "configure_optimizers")]
    budgets = [c for c in classes if issubclass(c, TrainingBudget)]
    assert {"PCTNetTrainer_small_10epochs", "VFPretrainedTrainer_small_10epochs_seed3", "EncoderUNet2DTrainer_20epochs",
            "VFPlansNetworkTrainer_cpu_2epochs", "VFPretrainedTrainer_small_1x15_peakLr1em4"} <= {
        c.__name__ for c in budgets}
    assert all(issubclass(c, PerIterationSchedule) for c in budgets)
    full = [c for c in classes if not hasattr(c, "budget")]
    assert {"PCTNetTrainer", "VFPretrainedTrainer", "VFPlansNetworkTrainer_seed0"} <= {c.__name__ for c in full}
    assert not any(issubclass(c, PerIterationSchedule) for c in full)  # nnU-Net's per-epoch steps at 1000 epochs


@pytest.mark.parametrize("name, epochs", [("VFPretrainedTrainer_small_1x15", 1), ("VFPretrainedTrainer_small_10epochs",
                                                                                   10)])
def test_low_peak_variant_starts_at_its_peak_without_warmup(make_trainer, name, epochs):
    default = make_trainer(getattr(all_trainers, name))
    trainer = make_trainer(getattr(fv, f"{name}_peakLr1em4"))
    assert trainer.initial_lr == 1e-4 and trainer.warmup_fraction == 0
    assert trainer.lr_scheduler.warmup_steps == 0 and default.lr_scheduler.warmup_steps == round(0.1 * 15 * epochs)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    lrs, _ = _nnunet_order(sched, epochs, 15)
    assert lrs[0] == pytest.approx(1e-4) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(1e-4 * (1 / (15 * epochs)) ** 0.9)
    assert opt.param_groups[0]["initial_lr"] == 1e-4


def test_low_peak_variant_of_a_full_trainer_has_no_warmup_epoch(make_trainer):
    trainer = make_trainer(fv.VFPlansNetworkTrainer_peakLr1em4)
    assert not isinstance(trainer.lr_scheduler, PerIterationWarmupPolyLRScheduler)  # 1000 epochs: per epoch
    trainer.lr_scheduler.step(0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_bad_peak_lr_is_refused(make_trainer):
    from nnunetv2_vf.trainers.finetuning import PeakLearningRate
    cls = type("T", (PeakLearningRate, VFPlansNetworkTrainer_cpu_10epochs), {"peak_lr": 0})
    with pytest.raises(ValueError, match="peak_lr must be a number"):
        make_trainer(cls)
