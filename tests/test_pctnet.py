"""PCT-Net unit tests: conformance with the authors' implementation, shapes, patch flexibility, weight loading."""
import importlib.util
from pathlib import Path

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunetv2_vf.architectures import pctnet as pctnet_module
from nnunetv2_vf.architectures.pctnet import (PCTNet, convert_misfm_state_dict, fit_patch_size, load_misfm_weights,
                                              SMALL_FEATURES, misfm_relative_position_index, pctnet_strides,
                                              required_divisibility)

SMALL = SMALL_FEATURES


@pytest.fixture(scope="module")
def fixture_files(shared_dir):
    folder = shared_dir / "fixtures" / "pctnet"
    return folder / "pctnet_public_checkpoint.pt", folder / "pctnet_public_io.pt"


def test_conformance_with_reference_outputs(fixture_files):
    ckpt, io_file = fixture_files
    io = torch.load(io_file, weights_only=True)
    cfg = io["config"]
    model = PCTNet(cfg["in_chns"], cfg["class_num"], features_per_stage=cfg["feature_chns"],
                   resolution_mode=cfg["resolution_mode"], dropout=cfg["dropout"])
    report = load_misfm_weights(model, ckpt)
    assert len(report["loaded"]) == len(model.state_dict())
    model.eval()
    with torch.no_grad():
        outputs = model(io["input"])
    assert len(outputs) == len(io["outputs"]) == 4
    for ours, ref in zip(outputs, io["outputs"]):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-4


def test_relative_position_index_reproduces_reference_quirk(fixture_files):
    state = torch.load(fixture_files[0], weights_only=True)["model_state_dict"]
    stored = state["pyramid_ct.convtrans_e2.trans.blocks.0.attn.relative_position_index"]
    assert torch.equal(stored, misfm_relative_position_index(6))
    # the textbook layout would differ: make sure we are not accidentally using it
    w = 6
    coords = torch.stack(torch.meshgrid(*[torch.arange(w)] * 3, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + w - 1
    textbook = rel[..., 0] * (2 * w - 1) ** 2 + rel[..., 1] * (2 * w - 1) + rel[..., 2]
    assert not torch.equal(stored, textbook)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_output_shapes_follow_strides(mode, deep_supervision):
    div = required_divisibility(mode)
    patch = [2 * d for d in div]
    net = PCTNet(2, 4, features_per_stage=SMALL, resolution_mode=mode, deep_supervision=deep_supervision).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, *patch))
    if not deep_supervision:
        assert out.shape == (2, 4, *patch)
        return
    scale = torch.ones(3, dtype=torch.long)
    for level, o in enumerate(out):
        if level:
            scale = scale * torch.tensor(pctnet_strides(mode)[level])
        assert o.shape == (2, 4, *[p // s for p, s in zip(patch, scale.tolist())])


def test_one_set_of_weights_serves_several_patch_sizes():
    """Window masks/padding come from the input: the same weights run on patches of different shapes."""
    net = PCTNet(1, 3, features_per_stage=SMALL, resolution_mode=1).eval()
    with torch.no_grad():
        for patch in [(16, 32, 32), (8, 48, 32), (24, 16, 64), (40, 64, 48)]:
            out = net(torch.randn(1, 1, *patch))
            assert out[0].shape == (1, 3, *patch)
            assert torch.isfinite(out[0]).all()


def test_toggling_deep_supervision_attribute_changes_output():
    net = PCTNet(1, 2, features_per_stage=SMALL).eval()
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert isinstance(net(x), list)
        net.decoder.deep_supervision = False
        assert isinstance(net(x), torch.Tensor)


def test_every_parameter_receives_gradient():
    net = PCTNet(1, 3, features_per_stage=SMALL).train()
    out = net(torch.randn(2, 1, 16, 32, 32))
    sum(o.mean() for o in out).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []


def test_paper_configuration_parameter_count():
    net = PCTNet(1, 5)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 44.2e6) / 44.2e6 < 0.01, n
    assert any(".seg_layers." in f".{k}" for k in net.state_dict())
    assert all("seg_layers" not in k for k in net.state_dict() if "heads" in k)


def test_bad_inputs_give_clear_errors():
    net = PCTNet(1, 2, features_per_stage=SMALL)
    with pytest.raises(ValueError, match="3D network"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"divisible by \(8, 16, 16\)"):
        net(torch.randn(1, 1, 8, 30, 32))
    assert fit_patch_size((40, 56, 40), 1) == [40, 64, 48]
    with pytest.raises(ValueError, match="strides"):
        PCTNet(1, 2, features_per_stage=SMALL, resolution_mode=1, strides=pctnet_strides(0))


def test_loading_into_other_class_count_keeps_all_but_classifiers(fixture_files):
    reference = torch.load(fixture_files[0], weights_only=True)["model_state_dict"]
    converted = convert_misfm_state_dict(reference, resolution_mode=1)
    net = PCTNet(1, 7, features_per_stage=SMALL)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_misfm_weights(net, fixture_files[0])
    after = net.state_dict()
    assert report["skipped_classifier"] and all(".seg_layers." in k for k in report["skipped_classifier"])
    for key, value in after.items():
        if ".seg_layers." in f".{key}":
            assert torch.equal(value, before[key])  # classifiers stay freshly initialised (7 classes)
        else:
            assert torch.equal(value, converted[key]), key


def test_checkpoint_for_another_architecture_lists_mismatches(fixture_files, tmp_path):
    net = PCTNet(1, 3, features_per_stage=(16, 32, 64, 128, 256))
    with pytest.raises(ValueError, match="shape mismatch: stem.proj.weight"):
        load_misfm_weights(net, fixture_files[0])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_misfm_weights(net, tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_misfm_weights(net, tmp_path / "empty.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_misfm_weights(net, tmp_path / "corrupt.pt")
    with pytest.raises(ValueError, match="not a MIS-FM PCT-Net"):
        load_misfm_weights(net, {"network_weights": net.state_dict()})


def test_nnunet_pretrained_weights_loader_skips_only_classifiers(tmp_path):
    """nnU-Net's own -pretrained_weights path: a 5-class pretext model into a 3-class task model."""
    pretext = PCTNet(1, 5, features_per_stage=SMALL)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": pretext.state_dict()}, path)
    task = PCTNet(1, 3, features_per_stage=SMALL)
    load_pretrained_weights(task, str(path))
    for key, value in task.state_dict().items():
        if ".seg_layers." not in f".{key}":
            assert torch.equal(value, pretext.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------------------------
# the speed-ups keep the numerics of the frozen implementation (benchmarks/_pctnet_baseline.py, 2026-11-26)
# ------------------------------------------------------------------------------------------------------------------
def _baseline_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_pctnet_baseline.py"
    spec = importlib.util.spec_from_file_location("_pctnet_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the frozen copy predates the reference's placement of shrunken windows' tables (centre_table_rows): it gets
    # today's index rule, so these tests compare the speed-ups alone (this fresh module object is private to the test)
    module._relative_position_index = pctnet_module._relative_position_index
    return module


@pytest.mark.parametrize("patch, batch", [
    ((16, 48, 48), 2),   # level-2 grid 8x12x12: shifted windows, padding in D (8 -> 12)
    ((24, 112, 80), 1),  # 12x28x20: padding on every axis, shift masks at levels 2 and 3
    ((8, 32, 32), 2),    # every grid smaller than the window: shrunken windows, no shift
])
def test_eval_outputs_equal_frozen_baseline(patch, batch):
    baseline = _baseline_module()
    torch.manual_seed(0)
    old = baseline.PCTNet(1, 3, features_per_stage=SMALL).eval()
    for module in old.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    new = PCTNet(1, 3, features_per_stage=SMALL).eval()
    assert list(new.state_dict()) == list(old.state_dict())
    new.load_state_dict(old.state_dict())
    x = torch.randn(batch, 1, *patch)
    with torch.no_grad():
        expected = old(x)
        for _ in range(2):  # second call: cached masks
            for ours, ref in zip(new(x), expected):
                assert ours.shape == ref.shape
                assert (ours - ref).abs().max().item() < 1e-5
    # with gradients recorded (the explicit attention path of training) the forward is the same too
    out = new(x)
    for ours, ref in zip(out, expected):
        assert (ours - ref).abs().max().item() < 1e-5
    # the cached mask follows weight updates
    with torch.no_grad():
        for net in (old, new):
            net.encoder.pct2.swin.blocks[1].attn.relative_position_bias_table.add_(0.5)
        for ours, ref in zip(new(x), old(x)):
            assert (ours - ref).abs().max().item() < 1e-5


def test_training_gradients_match_frozen_baseline_without_dropout():
    """No dropout / drop-path: training-mode outputs and every parameter gradient agree with the baseline."""
    baseline = _baseline_module()
    kwargs = dict(features_per_stage=SMALL, dropout=(0.0,) * 5, drop_path_rate=0.0)
    torch.manual_seed(0)
    old = baseline.PCTNet(1, 3, **kwargs).train()
    new = PCTNet(1, 3, **kwargs).train()
    new.load_state_dict(old.state_dict())
    # float64: with random weights the training-mode BatchNorms make the float32 gradients ill-conditioned (for
    # some bias tables rounding alone moves the stem's gradient by 2e-4 of its maximum); in float64 the two
    # implementations agree to 1e-15, so a real difference cannot hide below the tolerance
    old.double(), new.double()
    x = torch.randn(2, 1, 16, 48, 48, dtype=torch.float64)
    for net in (old, new):
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in net(x)).backward()
    grads_old = dict(old.named_parameters())
    # biases in front of a training-mode BatchNorm have an analytic gradient of 0 (pure rounding noise), so the
    # tolerance is relative to the largest gradient of the network
    scale = max(p.grad.abs().max().item() for p in old.parameters())
    for name, p in new.named_parameters():
        assert (p.grad - grads_old[name].grad).abs().max().item() < 1e-9 * scale, name
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name  # BN running statistics


def test_dropout_keeps_its_probability_and_scaling():
    from nnunetv2_vf.architectures.pctnet import dropout
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.2, True)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.8) < 4 * (0.8 * 0.2 / x.numel()) ** 0.5  # 4 standard errors
    assert set(torch.unique(y).tolist()) == {0.0, 1.25}
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows through the kept elements, scaled the same way
    torch.manual_seed(1)
    a = dropout(torch.ones(1000), 0.5, True)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(torch.ones(1000), 0.5, True))  # torch.manual_seed makes it repeatable
    assert dropout(x, 0.2, False) is x and dropout(x, 0.0, True) is x


def test_bf16_autocast_training_step_on_cpu():
    """The numpy-backed dropout and the hand-written attention must not break mixed precision (numpy has no
    bfloat16; the attention's backward assumes one dtype): a bf16-autocast step with dropout on runs and reaches
    every parameter, and a bfloat16 tensor goes through dropout. (Finiteness is not asserted: in the full suite a
    randomly initialised network's bf16 gradients once overflowed.)"""
    from nnunetv2_vf.architectures.pctnet import dropout
    torch.manual_seed(0)
    net = PCTNet(1, 3, features_per_stage=SMALL).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 16, 32, 32))
        loss = sum(o.float().mean() for o in out)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in net.parameters())
    assert all(g.dtype == p.dtype for g, p in zip(grads, net.parameters()))
    y = dropout(torch.ones(1000, dtype=torch.bfloat16), 0.5, True)
    assert y.dtype == torch.bfloat16 and set(y.float().unique().tolist()) == {0.0, 2.0}


def test_dropout_mask_chunks_continue_one_stream():
    """Masks longer than a chunk are the mask of one draw of the whole stream (same seed -> same mask whatever the
    chunk size), so chunking changed no mask."""
    import numpy as np
    from nnunetv2_vf.architectures.pctnet import _MASK_CHUNK, _keep_mask
    for n in (5, _MASK_CHUNK - 1, _MASK_CHUNK + 3, 2 * _MASK_CHUNK + 1):
        torch.manual_seed(3)
        mask = _keep_mask((n,), 0.2).numpy()
        torch.manual_seed(3)
        seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
        bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
        np.testing.assert_array_equal(mask, bits >= np.uint32(round(0.2 * 2 ** 32)))


@pytest.mark.parametrize("windows_per_mask", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_hand_written_attention_backward_equals_autograd(p, windows_per_mask):
    """The CPU training attention (saved softmax, in-place mask, rebuilt dropout) gives the outputs and the
    gradients of q, k, v and the bias/shift mask that autograd gives for the explicit expression, with the same
    dropout mask for the same seed; float64, so that only rounding could differ."""
    from nnunetv2_vf.architectures.pctnet import _BiasedWindowAttention, _explicit_biased_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 27, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(windows_per_mask, 2, 27, 27, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, 2, 27, 8, generator=g, dtype=torch.float64)
    results = []
    for fn in (_BiasedWindowAttention.apply, _explicit_biased_attention):
        torch.manual_seed(5)
        out = fn(q, k, v, mask, p)
        grads = torch.autograd.grad(out, (q, k, v, mask), grad_out)
        results.append((out, *grads))
    for name, a, b in zip(("out", "q", "k", "v", "mask"), *results):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    if p:
        assert (results[0][0] != _explicit_biased_attention(q, k, v, mask, 0.0)).any()  # dropout did act


def test_training_mode_statistics_match_frozen_baseline():
    """With dropout on, the outputs are random: their mean and spread over draws match the baseline's."""
    baseline = _baseline_module()
    torch.manual_seed(0)
    old = baseline.PCTNet(1, 2, features_per_stage=SMALL, deep_supervision=False).train()
    new = PCTNet(1, 2, features_per_stage=SMALL, deep_supervision=False).train()
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 1, 16, 48, 48)
    stats = []
    for net in (old, new):
        with torch.no_grad():
            draws = torch.stack([net(x) for _ in range(12)])
        stats.append((draws.mean(0), draws.std(0).mean()))
    (mean_old, std_old), (mean_new, std_new) = stats
    assert abs(std_new / std_old - 1) < 0.15
    assert (mean_new - mean_old).abs().mean() < 0.5 * std_old


def test_checkpoint_blocks_gives_the_same_step():
    """Activation checkpointing: same outputs, gradients and BatchNorm statistics (running stats counted once)."""
    torch.manual_seed(0)
    plain = PCTNet(1, 3, features_per_stage=SMALL).train()
    ckpt = PCTNet(1, 3, features_per_stage=SMALL, checkpoint_blocks=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.checkpoint_blocks and not plain.checkpoint_blocks
    x = torch.randn(2, 1, 16, 48, 48)
    results = []
    for net in (plain, ckpt):
        torch.manual_seed(3)  # same dropout / drop-path draws
        out = net(x)
        sum(o.mean() for o in out).backward()
        results.append(([o.detach() for o in out], {n: p.grad for n, p in net.named_parameters()}))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], rtol=1e-5, atol=1e-7), name
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # no recording: checkpointing is skipped
        ckpt.eval()(x)


def test_prediction_in_inference_mode_then_training_in_the_same_process():
    """Index/mask caches filled under torch.inference_mode() must still serve a training step afterwards."""
    net = PCTNet(1, 2, features_per_stage=SMALL).eval()
    x = torch.randn(1, 1, 24, 112, 80)  # shifted + padded windows at levels 2 and 3
    with torch.inference_mode():
        net(x)
    net.train()
    sum(o.mean() for o in net(x)).backward()
    assert net.encoder.pct2.swin.blocks[0].attn.relative_position_bias_table.grad is not None


# ------------------------------------------------------------------------------------------------------------------
# the reference shrinks the window (and its bias table) of a level whose token grid is not larger than the window
# ------------------------------------------------------------------------------------------------------------------
def _spec_index(w):
    """The reference's relative_position_index for window w, written from spec/pctnet.md (not from the module)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w)] * 3, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + w - 1
    return rel[..., 0] * (3 * w - 1) + rel[..., 1] * (2 * w - 1) + rel[..., 2]


def _to_reference_layout(state):
    """Our state_dict in the authors' key layout (inverse of the converter's prefix map)."""
    inverse = {ours: ref for ref, ours in pctnet_module._reference_key_map(1, (2, 2, 2)).items()}
    prefixes = sorted(inverse, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        prefix = next(p for p in prefixes if key.startswith(p))
        out[inverse[prefix] + key[len(prefix):]] = value.clone()
    return out


def test_centre_table_rows_geometry():
    from nnunetv2_vf.architectures.pctnet import centre_table_rows, place_table_at_centre
    assert torch.equal(centre_table_rows(6, 6), torch.arange(11 ** 3))
    for w in range(1, 6):
        rows = centre_table_rows(w, 6)
        assert rows.unique().numel() == rows.numel() == (2 * w - 1) ** 3
        small = torch.randn((2 * w - 1) ** 3, 2)
        full = place_table_at_centre(small, 6).view(11, 11, 11, 2)
        margin = 6 - w
        inner = full[margin:11 - margin, margin:11 - margin, margin:11 - margin]
        assert torch.equal(inner.reshape(-1, 2), small)  # the small cube, unchanged, around the full cube's centre
        assert torch.count_nonzero(full) == torch.count_nonzero(small)  # nothing outside it
        # the module's index for a shrunken window = the reference's own index, read through that placement
        assert torch.equal(misfm_relative_position_index(w, 6), rows[_spec_index(w)])
    with pytest.raises(ValueError, match="cannot be read"):
        centre_table_rows(7, 6)
    with pytest.raises(ValueError, match=r"\(2w - 1\)\*\*3 rows"):
        place_table_at_centre(torch.zeros(100, 4), 6)


def test_shrunken_reference_tables_load_exactly_and_run_on_other_patches():
    """A reference-layout checkpoint whose levels 3 and 4 shrank their windows to 4 and 2 (tables 343 and 27 rows),
    built from the spec: the reference's block at window w' is our attention built for w' (its index is then the
    spec's quirk at w', checked against the fixture above), fed a (2w'-1)**3 table."""
    torch.manual_seed(0)
    patch = (16, 32, 32)  # resolution mode 1: token grids 8^3 (window 6, shift 3), 4^3 (window 4), 2^3 (window 2)
    reference = PCTNet(1, 3, features_per_stage=SMALL).eval()
    windows = {"encoder.pct2": 6, "decoder.pct2": 6, "encoder.pct3": 4, "decoder.pct3": 4, "encoder.pct4": 2}
    with torch.no_grad():
        for module in reference.modules():  # every part matters: BN statistics, PReLU slopes
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.05, 0.4)
        for prefix, w in windows.items():
            for block in reference.get_submodule(prefix).swin.blocks:
                block.attn.window_size = w
                block.attn.relative_position_bias_table = torch.nn.Parameter(
                    torch.randn((2 * w - 1) ** 3, block.attn.num_heads))
    state = _to_reference_layout(reference.state_dict())
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        w = (round(state[key].shape[0] ** (1 / 3)) + 1) // 2
        state[key.replace("bias_table", "index")] = _spec_index(w)
    assert state["pyramid_ct.convtrans_e3.trans.blocks.0.attn.relative_position_bias_table"].shape == (343, 8)

    model = PCTNet(1, 3, features_per_stage=SMALL)
    report = load_misfm_weights(model, {"model_state_dict": state})
    assert sorted(set(report["shrunken_tables"].values())) == [2, 4] and len(report["shrunken_tables"]) == 6
    assert model.encoder.pct3.swin.blocks[0].attn.relative_position_bias_table.shape == (1331, 8)
    model.eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        expected, ours = reference(x), model(x)
        for a, b in zip(ours, expected):
            assert (a - b).abs().max().item() < 1e-4
        # the shrunken tables matter at this tolerance: shifting one changes the output
        model.encoder.pct3.swin.blocks[0].attn.relative_position_bias_table.mul_(-1)
        assert max((a - b).abs().max().item() for a, b in zip(model(x), expected)) > 1e-3
        # one set of weights runs on any valid patch (here level 3 at the full window 6, level 4 at 4 or 2)
        for other in [(32, 64, 64), (8, 32, 48)]:
            out = model(torch.randn(1, 1, *other))
            assert out[0].shape == (1, 3, *other) and torch.isfinite(out[0]).all()
