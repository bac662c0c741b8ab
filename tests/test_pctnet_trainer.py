"""PCTNetTrainer pieces that do not need a training run: plans rewriting and the learning-rate schedule."""
import json

import pytest
import torch

from nnunetv2_vf.architectures.pctnet import PAPER_FEATURES, SMALL_FEATURES, PCTNet
from nnunetv2_vf.trainers.lr_schedule import WarmupPolyLRScheduler
from nnunetv2_vf.trainers.pctnet_trainer import PCTNET_CLASS_NAME, with_pctnet_architecture


@pytest.fixture(scope="module")
def plans(hippo_dataset):
    path = f"{hippo_dataset['env']['nnUNet_preprocessed']}/{hippo_dataset['name']}/nnUNetPlans.json"
    with open(path) as f:
        return json.load(f)


def test_plans_rewrite_fits_patch_and_names_pctnet(plans):
    new = with_pctnet_architecture(plans, "3d_fullres", features=SMALL_FEATURES)
    cfg = new["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"] == PCTNET_CLASS_NAME
    assert cfg["patch_size"] == [40, 64, 48]
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [40, 56, 40]  # input untouched
    json.dumps(new)  # must stay JSON-serialisable: nnU-Net writes it to the model folder
    # nnU-Net's own builder instantiates the network from these plans (what prediction does)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = cfg["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                 deep_supervision=False)
    assert isinstance(net, PCTNet)
    assert net(torch.zeros(1, 1, *cfg["patch_size"])).shape == (1, 3, *cfg["patch_size"])


def test_existing_pctnet_architecture_is_kept(plans):
    first = with_pctnet_architecture(plans, "3d_fullres", features=SMALL_FEATURES, resolution_mode=0)
    second = with_pctnet_architecture(first, "3d_fullres", features=PAPER_FEATURES)
    kwargs = second["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"] == list(SMALL_FEATURES) and kwargs["resolution_mode"] == 0
    assert second["configurations"]["3d_fullres"]["patch_size"] == [48, 64, 48]


def test_2d_configuration_is_refused_with_advice(plans):
    with pytest.raises(ValueError, match="3D network.*2d"):
        with_pctnet_architecture(plans, "2d")


def test_warmup_then_poly_schedule():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = WarmupPolyLRScheduler(opt, max_steps=100, warmup_steps=4)
    lrs = []
    for epoch in range(100):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] < 1e-3
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 1e-4


def test_cpu_variants_set_budget_and_no_mirroring_and_keep_init_kwargs(plans, hippo_dataset, monkeypatch, tmp_path):
    from nnunetv2_vf.trainers import PCTNetTrainer_small_2epochs, VFPretrainedTrainer_small_3epochs
    monkeypatch.setenv("nnUNet_preprocessed", hippo_dataset["env"]["nnUNet_preprocessed"])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    with open(f"{hippo_dataset['env']['nnUNet_preprocessed']}/{hippo_dataset['name']}/dataset.json") as f:
        dataset_json = json.load(f)
    for cls, budget in ((PCTNetTrainer_small_2epochs, (2, 4, 2)), (VFPretrainedTrainer_small_3epochs, (3, 25, 5))):
        # nnU-Net 2.8's get_trainer_from_args adds 'continue_training' to the plans; __init__ pops it
        trainer = cls({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, torch.device("cpu"))
        assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == budget
        # nnU-Net stores these to rebuild the trainer (checkpoints, DDP workers): the mixin must not hide them
        assert set(trainer.my_init_kwargs) == {"plans", "configuration", "fold", "dataset_json", "device"}
        assert trainer.my_init_kwargs["plans"]["configurations"]["3d_fullres"]["patch_size"] == [40, 64, 48]
        # CPU-sized variants switch mirroring off (augmentation and test time), as nnUNetTrainerNoMirroring
        assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] is None
        assert trainer.inference_allowed_mirroring_axes is None
