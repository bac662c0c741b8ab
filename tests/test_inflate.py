"""2D -> 3D inflation: weight rules and depth-constant equivalence for every supported timm family."""
import copy
import pickle
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_vf.architectures.inflate import (LearnedStem, adapt_input_conv_weight, depth_receptive_radius,
                                               inflate_2d_to_3d, inflate_conv_weight, inflate_state_dict,
                                               stage_depth_strides)

FAMILIES = ["resnet18", "resnext26ts", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0",
            "convnext_atto", "regnetx_002", "regnety_002"]


def make_encoder(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    for m in model.modules():  # non-trivial statistics and affine weights, so copying mistakes show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def depth_constant(x2d, depth):
    return x2d.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()


def assert_slices_equal(out2d, out3d, slices=None, tol=1e-5):
    for a, b in zip(out2d, out3d):
        scale = a.abs().max().clamp_min(1e-6)
        for d in (range(b.shape[2]) if slices is None else slices):
            err = ((b[:, :, d] - a).abs().max() / scale).item()
            assert err < tol, f"slice {d}: relative error {err:.2e}"


# ----------------------------------------------------------------------------------------- weight rules
def test_inflate_conv_weight_rules():
    w = torch.randn(8, 4, 3, 3)
    i3d = inflate_conv_weight(w, 5, "i3d")
    assert i3d.shape == (8, 4, 5, 3, 3)
    torch.testing.assert_close(i3d.sum(2), w)
    centre = inflate_conv_weight(w, 3, "centre")
    torch.testing.assert_close(centre[:, :, 1], w)
    assert centre[:, :, [0, 2]].abs().sum() == 0
    assert inflate_conv_weight(w, 1, "planar").shape == (8, 4, 1, 3, 3)
    assert i3d.data_ptr() != w.data_ptr()
    with pytest.raises(ValueError, match="odd depth"):
        inflate_conv_weight(w, 4, "centre")
    with pytest.raises(ValueError, match="2D conv kernel"):
        inflate_conv_weight(i3d, 3)
    with pytest.raises(ValueError, match="unknown inflation mode"):
        inflate_conv_weight(w, 3, "bogus")


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1), (3, 1, 1)])
def test_transposed_conv_inflation_keeps_depth_constant_inputs(kernel, stride, padding):
    torch.manual_seed(0)
    up2d = nn.ConvTranspose2d(6, 4, kernel, stride, padding).eval()
    up3d = inflate_2d_to_3d(nn.Sequential(up2d))[0]
    assert isinstance(up3d, nn.ConvTranspose3d) and up3d.stride[0] == stride
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        o2, o3 = up2d(x), up3d(depth_constant(x, 6))
    interior = range(kernel, o3.shape[2] - kernel)  # borders see fewer taps
    assert_slices_equal([o2], [o3], interior)
    if kernel == stride:  # no overlap: exact everywhere, weights repeated without scaling
        assert_slices_equal([o2], [o3])
        torch.testing.assert_close(up3d.weight[:, :, 0], up2d.weight)


# ----------------------------------------------------------------------------------------- timm families
@pytest.mark.parametrize("name", FAMILIES)
def test_depth_constant_equivalence(name):
    enc = make_encoder(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out2d = enc(x)
        centre = inflate_2d_to_3d(enc, "centre", depth_stride=1).eval()
        assert_slices_equal(out2d, centre(depth_constant(x, 5)))
        i3d = inflate_2d_to_3d(enc, "i3d", depth_stride=1, depth_padding="replicate").eval()
        assert_slices_equal(out2d, i3d(depth_constant(x, 5)), tol=2e-5)
        # default: isotropic (depth pooled like H and W); centre kernels keep depth-constant maps exact
        iso = inflate_2d_to_3d(enc, "centre").eval()
        out_iso = iso(depth_constant(x, 32))
        assert [o.shape[2] for o in out_iso] == [32 // r for r in enc.feature_info.reduction()]
        assert_slices_equal(out2d, out_iso)
    assert list(centre.state_dict()) == list(enc.state_dict())
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in centre.modules())
    # the source network is untouched
    assert all(isinstance(m, nn.Conv2d) for n, m in enc.named_modules() if isinstance(m, nn.modules.conv._ConvNd))


# squeeze-excitation (efficientnet_b0, regnety) pools over the whole volume, borders included: those families are
# exact with "centre" or depth_padding="replicate" only (tested above)
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "convnext_atto", "regnetx_002"])
def test_i3d_zero_padding_exact_away_from_depth_borders(name):
    enc = make_encoder(name, out_indices=(0, 1))
    i3d = inflate_2d_to_3d(enc, "i3d", depth_stride=1).eval()
    radius = depth_receptive_radius(i3d)
    depth = 2 * radius + 1
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out2d, out3d = enc(x), i3d(depth_constant(x, depth))
    assert_slices_equal(out2d, out3d, [radius], tol=2e-5)
    border_err = (out3d[-1][:, :, 0] - out2d[-1]).abs().max() / out2d[-1].abs().max()
    if name != "convnext_atto":  # its LayerNorm cancels most of the border scaling of a depth-constant input
        assert border_err > 1e-3  # zero padding does change the border slices: the interior check is meaningful


def test_planar_mode_is_slicewise_2d():
    enc = make_encoder("efficientnet_lite0")  # no squeeze-excitation (which would pool over the whole volume)
    planar = inflate_2d_to_3d(enc, "planar").eval()
    assert all(m.kernel_size[0] == 1 and m.stride[0] == 1 for m in planar.modules() if isinstance(m, nn.Conv3d))
    x = torch.randn(1, 3, 4, 32, 32)  # NOT depth-constant: each slice is its own 2D image
    with torch.no_grad():
        out3d = planar(x)
        for d in range(4):
            assert_slices_equal(enc(x[:, :, d]), [o[:, :, d:d + 1] for o in out3d], [0])


def test_training_mode_and_gradients():
    enc = make_encoder("regnety_002").train()
    net = inflate_2d_to_3d(enc, "i3d")
    assert net.training and all(m.training for m in net.modules())
    out = net(torch.randn(2, 3, 8, 32, 32))
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.eval().training is False


def test_depth_stride_per_stage_and_dict():
    enc = make_encoder("resnet18")
    strides = stage_depth_strides(enc, [False, False, True, True, True])
    assert strides["conv1"] == 1 and strides["maxpool"] == 1 and strides["layer2.0.conv1"] == 2
    net = inflate_2d_to_3d(enc, "centre", depth_stride=strides).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net(depth_constant(x, 16))
        assert [o.shape[2] for o in out] == [16, 16, 8, 4, 2]
        assert_slices_equal(enc(x), out)
    convs = dict(inflate_2d_to_3d(enc, depth_kernel=lambda name, m: 1 if name == "conv1" else None,
                                  depth_stride=1).named_modules())
    assert convs["conv1"].kernel_size == (1, 7, 7) and convs["layer1.0.conv1"].kernel_size == (3, 3, 3)
    assert convs["layer2.0.conv1"].stride == (1, 2, 2)


# families with no family-specific rule: every module is replaced (conv/norm/pool layers) or judged rank-agnostic
# from its forward (nnunetv2_vf.architectures.inflation.rank_check); centre weights, depth stride 1, depth 7 (the
# unpadded 3x3 pools of VoVNet take 2 slices each)
RANK_AGNOSTIC_FAMILIES = ["mobilenetv2_050", "mobilenetv3_small_050", "mnasnet_050", "lcnet_050", "ghostnet_050",
                          "fbnetc_100", "semnasnet_050", "mixnet_s", "rexnet_100", "densenet121", "dla34", "dpn48b",
                          "res2net50_14w_8s", "cspresnet50", "darknet17", "repvgg_a0", "mobileone_s0", "gernet_s",
                          "regnetz_005", "xception41", "resnetv2_50", "selecsls42b", "vgg11", "hrnet_w18_small",
                          "ese_vovnet19b_dw"]
# refused, naming the module, its class and the operation that would act on the wrong axes of a 5D tensor
REFUSED_FAMILIES = {
    "resnest14d": ("layer1.0.conv2", "SplitAttn", "`B, RC, H, W = x.shape` unpacks a 4D shape"),
    "skresnet18": ("layer1.0.conv1.attn", "SelectiveKernelAttn", "`B, C, H, W = x.shape` unpacks a 4D shape"),
    "tresnet_m": ("body_s2d", "SpaceToDepth", "unpacks a 4D shape"),
    "inception_v3": ("Mixed_5b", "InceptionA", "`F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)` a 2D operator"),
    "nf_resnet26": ("stem_conv", "ScaledStdConv2d", "own tensor 'weight' (64, 3, 7, 7) has 3+ axes"),
    "edgenext_xx_small": ("stages_0.blocks.0", "ConvBlock", "`x.permute(0, 2, 3, 1)` lays out axes by position"),
    "convnextv2_atto": ("stages_0.blocks.0.mlp.grn", "GlobalResponseNorm", "axis computed at run time"),
    "fastvit_t8": ("stages_0.blocks.0.token_mixer.layer_scale", "LayerScale2d", "own tensor 'gamma' (48, 1, 1)"),
    "mobilevit_xxs": ("stages_2.1", "MobileVitBlock", "unpacks a 4D shape"),
    "efficientvit_b0": ("stages_2.blocks.1.context_module.main", "LiteMLA", "unpacks a 4D shape"),
    "vit_tiny_patch16_224": ("model", "VisionTransformer", "own tensor 'cls_token' (1, 1, 192) has 3+ axes"),
}


@pytest.mark.parametrize("name", RANK_AGNOSTIC_FAMILIES)
def test_rank_agnostic_family_inflates_exactly(name):
    enc = make_encoder(name)
    # torch's avg_pool3d refuses a 2x2 plane under a padded 3x3 kernel (avg_pool2d takes it): Res2Net's last stage
    side = 64 if name.startswith("res2net") else 32
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        out2d = enc(x)
        net = inflate_2d_to_3d(enc, "centre", depth_stride=1).eval()
        assert_slices_equal(out2d, net(depth_constant(x, 7)))
    assert list(net.state_dict()) == list(enc.state_dict())
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)) for m in net.modules())


@pytest.mark.parametrize("name", sorted(REFUSED_FAMILIES))
def test_family_with_2d_specific_forward_is_refused_naming_the_module(name):
    path, cls, why = REFUSED_FAMILIES[name]
    with pytest.raises(NotImplementedError) as refusal:
        inflate_2d_to_3d(make_encoder(name))
    message = str(refusal.value)
    assert f"cannot inflate module {path!r} of class " in message and f".{cls}:" in message, message
    assert why in message and "passthrough" in message, message


def test_rank_check_reads_what_forward_does():
    from nnunetv2_vf.architectures.inflate import rank_problems

    class ChannelOps(nn.Module):  # channel-wise / whole-tensor ops only: rank-agnostic
        def forward(self, x):
            a, b = torch.split(x, x.shape[1] // 2, 1)
            y = torch.cat([a.sigmoid(), b.mean(1, keepdim=True).expand_as(b)], dim=1)
            y = F.normalize(y) * y.new_ones(x.shape[:2] + x.shape[2:])
            return y.flatten(2).softmax(1).view_as(y) + x.view(x.shape[0], -1).mean()

    class Pinned(nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            return F.interpolate(x, size=(h, w)).sum(-1) + x.squeeze(-1) + x.size(3) + x.new_ones(x.shape[-2:])

    assert rank_problems(ChannelOps) == ()
    found = " | ".join(rank_problems(Pinned))
    for snippet in ("unpacks a 4D shape", "`F.interpolate(x, size=(h, w))` lays out axes", "along axis -1",
                    "`x.size(3)` reads a spatial size", "`x.shape[-2:]` reads a spatial size"):
        assert snippet in found, found


# ----------------------------------------------------------------------------------------- plain 2D networks
class TinyUNet(nn.Module):
    """A custom (non-timm) container of plain 2D layers: its children are inflated."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(),
                                  nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU(),
                                  nn.MaxPool2d(3, 2, 1), nn.Dropout2d(0.0))
        self.up = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, 2), nn.BatchNorm2d(8), nn.Upsample(scale_factor=2),
                                nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return [self.up(self.down(x))]


def test_plain_2d_network_centre_exact():
    torch.manual_seed(0)
    net2d = TinyUNet().eval()
    net2d.up[1].running_mean.uniform_(-1, 1)
    net3d = inflate_2d_to_3d(net2d, "centre", depth_stride=1).eval()
    assert isinstance(net3d.down[1], nn.InstanceNorm3d) and isinstance(net3d.up[2], nn.Upsample)
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        assert_slices_equal(net2d(x), net3d(depth_constant(x, 6)))
    iso = inflate_2d_to_3d(net2d, "centre").eval()
    with torch.no_grad():
        assert iso(torch.randn(1, 2, 8, 16, 16))[0].shape == (1, 3, 8, 16, 16)


# ----------------------------------------------------------------------------------------- unsupported layers
class Attention2d(nn.Module):
    def forward(self, x):
        return x * x.mean((2, 3), keepdim=True)


def test_unsupported_layers_raise_naming_the_module():
    from timm.layers import EcaModule

    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Sequential(nn.ReLU(), EcaModule(16)))
    with pytest.raises(NotImplementedError, match=r"'1\.1'.*EcaModule"):
        inflate_2d_to_3d(net)
    with pytest.raises(NotImplementedError, match=r"'0'.*Softmax2d"):
        inflate_2d_to_3d(nn.Sequential(nn.Softmax2d()))
    custom = nn.Sequential(nn.Conv2d(3, 4, 1), Attention2d())
    with pytest.raises(NotImplementedError,
                       match=r"(?s)'1'.*Attention2d.*x\.mean\(\(2, 3\).*spatial axis.*passthrough"):
        inflate_2d_to_3d(custom)
    assert isinstance(inflate_2d_to_3d(custom, passthrough=(Attention2d,))[0], nn.Conv3d)


# ----------------------------------------------------------------------------------------- checkpoints
def test_inflate_state_dict_matches_module_inflation_and_reports_mismatches():
    enc = make_encoder("efficientnet_lite0")
    net3d = inflate_2d_to_3d(make_encoder("efficientnet_lite0"), "i3d")
    for p in net3d.parameters():
        p.data.zero_()
    inflated = inflate_state_dict(enc.state_dict(), net3d, "i3d")
    net3d.load_state_dict(inflated)
    reference = inflate_2d_to_3d(enc, "i3d")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(net3d.state_dict()[key], value)
    assert enc.state_dict()["conv_stem.weight"].ndim == 4  # pure: the 2D dict is unchanged

    other = make_encoder("efficientnet_b0").state_dict()
    with pytest.raises(ValueError, match=r"(?s)mismatches.*blocks\.\d.*another architecture"):
        inflate_state_dict(other, net3d)
    partial = {k: v for k, v in enc.state_dict().items() if k.startswith("conv_stem")}
    assert list(inflate_state_dict(partial, net3d)) == ["conv_stem.weight"]
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        inflate_state_dict(partial, net3d, require_all_keys=True)


@pytest.mark.parametrize("mode", ["i3d", "centre", "planar"])
def test_state_dict_path_follows_the_module_paths_depth_geometry(mode):
    """One geometry rule: a 2D checkpoint inflated key by key onto a network equals the 2D network inflated module by
    module (3x3, 1x1, strided transposed convs; in centre mode an even depth kernel falls back to i3d on both paths)."""
    torch.manual_seed(0)
    net2d = TinyUNet().eval()
    depth_kernel = {"down.4": 2} if mode == "centre" else None
    reference = inflate_2d_to_3d(net2d, mode, depth_kernel=depth_kernel)
    target = inflate_2d_to_3d(TinyUNet(), mode, depth_kernel=depth_kernel)  # other weights, same geometry
    target.load_state_dict(inflate_state_dict(net2d.state_dict(), target, mode))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    if mode == "centre":
        w2d, w3d = net2d.down[4].weight, reference.down[4].weight
        assert w3d.shape[2] == 2 and torch.equal(w3d, w2d.unsqueeze(2).repeat(1, 1, 2, 1, 1) / 2)


def test_inflated_model_pickles_in_a_fresh_process(tmp_path):
    net = inflate_2d_to_3d(make_encoder("regnety_002", out_indices=(0, 1)), "centre")
    copy.deepcopy(net)
    path = tmp_path / "net.pt"
    torch.save(net, path)
    code = (f"import torch; net = torch.load({str(path)!r}, weights_only=False); "
            f"print(type(net.s1.b1.se).__name__, [tuple(o.shape) for o in net(torch.zeros(1, 3, 4, 32, 32))])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SEModule3d" in result.stdout
    pickle.loads(pickle.dumps(net))


# ----------------------------------------------------------------------------------------- input channels
def test_input_adaptation_one_and_many_channels():
    from timm.models._manipulate import adapt_input_conv

    w = torch.randn(16, 3, 3, 3)
    torch.testing.assert_close(adapt_input_conv_weight(w, 1), w.sum(1, keepdim=True))
    torch.testing.assert_close(adapt_input_conv_weight(w, 4), adapt_input_conv(4, w.clone()))
    w3d = inflate_conv_weight(w, 3, "i3d")
    torch.testing.assert_close(adapt_input_conv_weight(w3d, 1), inflate_conv_weight(w.sum(1, keepdim=True), 3))
    with pytest.raises(ValueError, match="RGB"):
        adapt_input_conv_weight(torch.randn(8, 5, 3, 3), 2)

    rgb = make_encoder("resnet18")
    for channels in (1, 6):
        enc = make_encoder("resnet18", in_chans=channels)
        state = rgb.state_dict()
        state["conv1.weight"] = adapt_input_conv_weight(state["conv1.weight"], channels)
        enc.load_state_dict(state)
        grey = torch.randn(1, 1, 64, 64)
        with torch.no_grad():
            # 1 channel: grey == RGB net on grey replicated; 6 channels: RGB image given twice == RGB net
            x_rgb = grey.expand(-1, 3, -1, -1) + torch.tensor([0.0, 0.1, 0.2]).view(1, 3, 1, 1) * (channels > 1)
            x_in = grey if channels == 1 else x_rgb.repeat(1, 2, 1, 1)
            assert_slices_equal(rgb(x_rgb), [o.unsqueeze(2) for o in enc(x_in)], tol=2e-5)
            enc3d = inflate_2d_to_3d(enc, "centre").eval()
            assert_slices_equal(rgb(x_rgb), enc3d(depth_constant(x_in, 8)), tol=2e-5)


def test_learned_stem():
    stem = LearnedStem(4, 16, dim=3)
    assert stem(torch.randn(2, 4, 4, 8, 8)).shape == (2, 16, 4, 8, 8)
    assert LearnedStem(1)(torch.randn(2, 1, 8, 8)).shape == (2, 3, 8, 8)
