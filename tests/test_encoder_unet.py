"""Unit tests of the encoder U-Nets (Omnia-Net 2D, DX-Net 3D, DS-Net) and the trainers' plans handling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_vf.architectures.encoder_unet import (DepthStackUNet, EncoderUNet2D, EncoderUNet3D, InstanceNormAct,
                                                    depth_reduction_plan)
from nnunetv2_vf.trainers.cross_dimensional import with_encoder_unet_architecture
from nnunetv2_vf.trainers.lr_schedule import WarmupPolyLRScheduler

torch.manual_seed(0)

HIPPO_2D = [[1, 1], [2, 2], [2, 2], [2, 2]]
ANISO_2D_DEEP = [[1, 1], [2, 2], [2, 1], [2, 2], [1, 2], [2, 2], [2, 2], [2, 2]]  # 7 pooling steps > 5 stages
SHALLOW_2D = [[1, 1], [2, 2]]


def nnunet_scales(strides):
    """Deep-supervision scales exactly as nnUNetTrainer._get_deep_supervision_scales computes them."""
    return list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1]


def expected_shapes(batch, classes, patch, strides):
    return [(batch, classes, *[int(np.ceil(p * s)) for p, s in zip(patch, scale)]) for scale in nnunet_scales(strides)]


@pytest.mark.parametrize("encoder", ["efficientnet_lite0", "resnet18"])
@pytest.mark.parametrize("strides,patch", [(HIPPO_2D, (56, 40)), (ANISO_2D_DEEP, (128, 96)), (SHALLOW_2D, (20, 14))])
def test_2d_deep_supervision_shapes_follow_nnunet_scales(encoder, strides, patch):
    net = EncoderUNet2D(2, 3, strides, encoder, deep_supervision=True).eval()
    x = torch.randn(3, 2, *patch)
    with torch.no_grad():
        outs = net(x)
        assert [tuple(o.shape) for o in outs] == expected_shapes(3, 3, patch, strides)
        net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
        single = net(x)
    assert tuple(single.shape) == (3, 3, *patch)
    torch.testing.assert_close(single, outs[0])


def test_2d_patch_not_divisible_is_padded_and_cropped():
    net = EncoderUNet2D(1, 2, HIPPO_2D, "efficientnet_lite0", deep_supervision=True).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 1, 57, 43))
    assert [tuple(o.shape) for o in outs] == [(1, 2, 57, 43), (1, 2, 29, 22), (1, 2, 15, 11)]


def test_2d_multi_channel_and_batch_independence():
    net = EncoderUNet2D(4, 2, HIPPO_2D, "resnet18").eval()
    x = torch.randn(5, 4, 56, 40)
    with torch.no_grad():
        together = net(x)
        alone = net(x[2:3])
    torch.testing.assert_close(together[2:3], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expects \[B, 4, H, W\]"):
        net(torch.randn(1, 3, 56, 40))


def test_anisotropic_plan_pools_only_where_planned():
    net = EncoderUNet2D(1, 2, ANISO_2D_DEEP, "efficientnet_lite0")
    feats = net.encode(torch.randn(1, 1, 128, 128))
    sizes = [tuple(f.shape[2:]) for f in feats]
    cum = np.cumprod(np.vstack(ANISO_2D_DEEP), axis=0)
    assert sizes == [(128 // a, 128 // b) for a, b in cum]
    assert len(net.extra_stages) == 2  # 7 pooling steps: 5 encoder stages + 2 plain conv stages


def test_seg_layers_are_skipped_by_nnunet_pretrained_loader(tmp_path):
    source = EncoderUNet2D(1, 5, HIPPO_2D, "efficientnet_lite0")
    target = EncoderUNet2D(1, 3, HIPPO_2D, "efficientnet_lite0")
    assert any(".seg_layers." in k for k in target.state_dict())
    path = tmp_path / "ckpt.pth"
    torch.save({"network_weights": source.state_dict()}, path)
    load_pretrained_weights(target, str(path))  # nnU-Net's own loader: every key except seg_layers must match
    torch.testing.assert_close(target.state_dict()["encoder.conv_stem.weight"],
                               source.state_dict()["encoder.conv_stem.weight"])


def test_instance_norm_option_keeps_affine_and_drops_batch_norm():
    torch.manual_seed(1)
    batch = EncoderUNet2D(1, 2, HIPPO_2D, "efficientnet_lite0", norm="batch")
    torch.manual_seed(1)
    inst = EncoderUNet2D(1, 2, HIPPO_2D, "efficientnet_lite0", norm="instance")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in inst.modules())
    assert isinstance(inst.encoder.bn1, InstanceNormAct)
    # same keys for weight/bias: pretrained affine parameters load; running statistics are gone
    assert "encoder.bn1.weight" in inst.state_dict() and "encoder.bn1.running_mean" not in inst.state_dict()
    assert isinstance(inst.encoder.bn1.act[1], torch.nn.ReLU6)  # timm's fused activation survives the swap
    out = inst(torch.randn(2, 1, 56, 40))
    assert out.shape == (2, 2, 56, 40) and torch.isfinite(out).all()
    assert set(batch.state_dict()) - set(inst.state_dict()) == {
        k for k in batch.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_learned_stem_feeds_the_encoder():
    net = EncoderUNet2D(4, 2, HIPPO_2D, "efficientnet_lite0", input_adaptation="learned_stem", stem_channels=16)
    assert net.encoder.conv_stem.in_channels == 16
    assert net(torch.randn(2, 4, 56, 40)).shape == (2, 2, 56, 40)


def test_bad_encoder_names_say_what_to_do():
    with pytest.raises(ValueError, match="close matches.*efficientnet_lite0"):
        EncoderUNet2D(1, 2, HIPPO_2D, "efficientnet_lite")
    with pytest.raises(ValueError, match="five stride-2 stages"):
        EncoderUNet2D(1, 2, HIPPO_2D, "convnext_atto")
    with pytest.raises(ValueError, match="pool_op_kernel_sizes"):
        EncoderUNet2D(1, 2, [[1, 1, 1], [2, 2, 2]], "resnet18")


# ---------------------------------------------------------------- DX-Net (3D, inflated)
ISO_3D = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
ANISO_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
ANISO_3D_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize("strides,kernels", [(ISO_3D, None), (ANISO_3D, ANISO_3D_KERNELS)])
def test_3d_deep_supervision_shapes(strides, kernels):
    net = EncoderUNet3D(2, 3, strides, kernels, "efficientnet_lite0", deep_supervision=True).eval()
    patch = (8, 32, 24)
    with torch.no_grad():
        outs = net(torch.randn(2, 2, *patch))
    assert [tuple(o.shape) for o in outs] == expected_shapes(2, 3, patch, strides)
    assert set(net.state_dict()) == set(net.planar_counterpart().state_dict())


def test_3d_planar_stages_do_not_touch_depth():
    net = EncoderUNet3D(1, 2, ANISO_3D, ANISO_3D_KERNELS, "efficientnet_lite0")
    assert net.encoder.conv_stem.kernel_size == (1, 3, 3) and net.encoder.conv_stem.stride == (1, 2, 2)
    assert net.stem[0].kernel_size == (1, 3, 3)
    feats = net.encode(torch.randn(1, 1, 6, 32, 24))
    assert [f.shape[2] for f in feats] == [6, 6, 3, 3]


@pytest.mark.parametrize("encoder,strides,kernels", [("efficientnet_lite0", ISO_3D, None),
                                                     ("resnet18", ANISO_3D, ANISO_3D_KERNELS)])
def test_whole_2d_network_inflated_with_centre_is_depth_constant_equivalent(encoder, strides, kernels):
    """Dimensional transfer of a trained 2D network: on a depth-constant volume the 3D net reproduces the 2D net on
    every slice (mode 'centre' is exact, also at the depth borders)."""
    torch.manual_seed(3)
    net3d = EncoderUNet3D(2, 3, strides, kernels, encoder, inflation="centre", deep_supervision=True).eval()
    net2d = net3d.planar_counterpart().eval()
    net2d.decoder.deep_supervision = True
    for m in net2d.modules():  # non-trivial batch-norm statistics, so that copying them is tested
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    loaded = net3d.load_inflated(net2d.state_dict())
    assert len(loaded) == len(net3d.state_dict())
    x2d = torch.randn(2, 2, 32, 24)
    depth = 8
    with torch.no_grad():
        out2d = net2d(x2d)
        out3d = net3d(x2d.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous())
    scale_depth = np.cumprod([s[0] for s in strides])
    for level, (o2, o3) in enumerate(zip(out2d, out3d)):
        assert o3.shape[2] == depth // scale_depth[level]
        for d in range(o3.shape[2]):
            torch.testing.assert_close(o3[:, :, d], o2, atol=2e-4, rtol=1e-3)


def test_load_inflated_rejects_another_encoder():
    net3d = EncoderUNet3D(1, 2, ISO_3D, None, "efficientnet_lite0")
    other = EncoderUNet2D(1, 2, [s[1:] for s in ISO_3D], "resnet18")
    with pytest.raises(ValueError, match="another architecture/encoder"):
        net3d.load_inflated(other.state_dict())
    more_classes = EncoderUNet2D(1, 4, [s[1:] for s in ISO_3D], "efficientnet_lite0")
    with pytest.raises(ValueError, match="does not inflate"):
        net3d.load_inflated(more_classes.state_dict())


# ---------------------------------------------------------------- DS-Net
@pytest.mark.parametrize("depth", [3, 4, 5, 9, 40])
def test_depth_stack_restores_depth_and_keeps_batch_axis(depth):
    net = DepthStackUNet(2, 3, ISO_3D, (depth, 32, 24), "efficientnet_lite0", depth_features=4).eval()
    x = torch.randn(3, 2, depth, 32, 24)
    with torch.no_grad():
        out = net(x)
        alone = net(x[1:2])
    assert out.shape == (3, 3, depth, 32, 24)
    torch.testing.assert_close(out[1:2], alone, atol=1e-5, rtol=1e-4)  # samples never mix


def test_depth_stack_reduction_plan_and_errors():
    assert depth_reduction_plan(3) == (0, 1)
    assert depth_reduction_plan(40) == (3, 3)  # 40 -> 20 -> 10 -> 5 -> 3
    with pytest.raises(ValueError, match="at least 3 slices"):
        DepthStackUNet(1, 2, ISO_3D, (2, 32, 24))
    net = DepthStackUNet(1, 2, ISO_3D, (8, 32, 24))
    with pytest.raises(ValueError, match="patch depth"):
        net(torch.randn(1, 1, 9, 32, 24))
    with pytest.raises(ValueError, match="deep_supervision=False"):
        DepthStackUNet(1, 2, ISO_3D, (8, 32, 24), deep_supervision=True)


# ---------------------------------------------------------------- plans / trainer helpers
def _plans(dim: int) -> dict:
    strides = HIPPO_2D if dim == 2 else ISO_3D
    cfg = {"patch_size": [56, 40] if dim == 2 else [16, 56, 40], "batch_size": 12,
           "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                            "arch_kwargs": {"strides": strides, "kernel_sizes": [[3] * dim] * len(strides)},
                            "_kw_requires_import": []}}
    return {"dataset_name": "Dataset999_X", "configurations": {"2d" if dim == 2 else "3d_fullres": cfg}}


@pytest.mark.parametrize("network,dim,configuration", [("EncoderUNet2D", 2, "2d"), ("EncoderUNet3D", 3, "3d_fullres"),
                                                       ("DepthStackUNet", 3, "3d_fullres")])
def test_plans_build_the_network_through_nnunet(network, dim, configuration):
    plans = _plans(dim)
    new = with_encoder_unet_architecture(plans, configuration, network, "efficientnet_lite0", None, batch_size=2,
                                         norm="instance")
    assert plans == _plans(dim)  # input untouched
    cfg = json.loads(json.dumps(new))["configurations"][configuration]  # JSON round trip, like plans.json
    assert cfg["batch_size"] == 2 and cfg["encoder_init"]["encoder_name"] == "efficientnet_lite0"
    arch = cfg["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                 deep_supervision=False)
    assert type(net).__name__ == network
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *cfg["patch_size"]))
    assert out.shape == (1, 3, *cfg["patch_size"])
    with pytest.raises(ValueError, match="needs a"):
        with_encoder_unet_architecture(_plans(5 - dim), "2d" if dim == 3 else "3d_fullres", network,
                                       "efficientnet_lite0", None)


def test_group_poly_scheduler_keeps_lower_encoder_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4}])
    sched = WarmupPolyLRScheduler(opt, 10)
    sched.step(5)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(1e-3 * 0.5 ** 0.9) and lrs[1] == pytest.approx(lrs[0] / 10)
