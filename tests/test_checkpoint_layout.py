"""The layout of PCT-Net's relative-position bias tables is recorded wherever PCT-Net weights are written, and
weights without the record (the offset layout) are refused wherever this plugin loads them; networks without
such tables (nnU-Net's PlainConvUNet) need no record. Fast: small networks, no training."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from nnunetv2_vf.architectures.pctnet import (SMALL_FEATURES, TABLE_LAYOUT, TABLE_LAYOUT_KEY, PCTNet,
                                              TableLayoutError, misfm_relative_position_index, pctnet_strides)
from nnunetv2_vf.pretrain.adapt_plans import write_multichannel_weights
from nnunetv2_vf.pretrain.adaptation_plan import (FORMAT, FORMAT_V2, AdaptationPlan, AdaptationPlanError,
                                                   plan_recorded_in_plans)
from nnunetv2_vf.pretrain.checkpoints import CheckpointStore
from nnunetv2_vf.trainers.safeguards import PretrainedWeightsError, check_pretrained_compatibility

PCTNET = "nnunetv2_vf.architectures.pctnet.PCTNet"
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NO_RECORD = f"has no '{TABLE_LAYOUT_KEY}' record, so its PCT-Net relative-position bias tables are in the offset layout"


def _pctnet() -> PCTNet:
    torch.manual_seed(0)
    return PCTNet(1, 3, features_per_stage=SMALL_FEATURES)


def _plain():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True)


def _without_record(path) -> dict:
    """The file at ``path`` rewritten as a file written without the record; returns what it holds now."""
    ckpt = torch.load(path, weights_only=True)
    del ckpt[TABLE_LAYOUT_KEY]
    torch.save(ckpt, path)
    return ckpt


def _offset_layout_index(window: int, table_window: int) -> torch.Tensor:
    """Rows read by weights without the record: the quirky index with the table window's strides and offset shift."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (table_window - 1)
    return rel[..., 0] * (3 * table_window - 1) + rel[..., 1] * (2 * table_window - 1) + rel[..., 2]


def test_offset_layout_agrees_at_the_full_window_only_and_cannot_be_converted():
    """Why old files are refused rather than converted: no table in the centre layout gives their outputs."""
    assert torch.equal(misfm_relative_position_index(6, 6), _offset_layout_index(6, 6))
    for window in (4, 2):
        centre, offset = misfm_relative_position_index(window, 6).flatten(), _offset_layout_index(window, 6).flatten()
        assert not torch.equal(centre, offset)
        old_rows = {}
        for new, old in zip(centre.tolist(), offset.tolist()):
            old_rows.setdefault(new, set()).add(old)
        assert any(len(rows) > 1 for rows in old_rows.values())  # one centre row, several old rows


# ------------------------------------------------------------------------------------- pretraining checkpoints
def test_pretraining_checkpoints_record_the_layout_and_continue_refuses_one_without(tmp_path):
    from nnunetv2_vf.pretrain.cli import pretrain_main
    store = CheckpointStore(tmp_path)
    weights = _pctnet().state_dict()
    store.save_final(weights, 3, {"network_class_name": PCTNET, "arch_kwargs": {}})
    store.save_latest({"network_weights": weights, "config": {"iterations": 3}, "input_files": None})
    for path in (store.final, store.latest):
        assert torch.load(path, weights_only=True)[TABLE_LAYOUT_KEY] == TABLE_LAYOUT == "centre-v2"
    saved, config, _ = store.read_run()
    assert config == {"iterations": 3}
    _without_record(store.latest)
    with pytest.raises(TableLayoutError) as e:
        store.read_run()
    msg = str(e.value)
    assert f"the run's checkpoint {store.latest} {NO_RECORD}" in msg and "cannot be converted" in msg
    assert "Fix: --continue cannot resume it with this nnunetv2_vf: start the run again with --overwrite" in msg
    with pytest.raises(SystemExit) as e:  # the console script: that message, no traceback
        pretrain_main(["-o", str(tmp_path), "--continue"])
    assert NO_RECORD in e.value.code


def test_pretraining_checkpoints_of_plain_conv_unet_need_no_record(tmp_path):
    store = CheckpointStore(tmp_path)
    weights = _plain().state_dict()
    store.save_final(weights, 1, {"network_class_name": PLAIN, "arch_kwargs": {}})
    store.save_latest({"network_weights": weights, "config": {}, "input_files": None})
    assert TABLE_LAYOUT_KEY not in torch.load(store.latest, weights_only=True)
    assert TABLE_LAYOUT_KEY not in torch.load(store.final, weights_only=True)
    assert store.read_run()[0]["network_weights"].keys() == weights.keys()


# ------------------------------------------------------------------------------------------ -pretrained_weights
def test_pretrained_weights_without_the_record_are_refused(tmp_path):
    net = _pctnet()
    path = tmp_path / "checkpoint_final.pth"
    CheckpointStore(tmp_path).save_final(net.state_dict(), 1, {"network_class_name": PCTNET, "arch_kwargs": {}})
    assert check_pretrained_compatibility(net, path) > 100
    ckpt = _without_record(path)
    with pytest.raises(PretrainedWeightsError) as e:
        check_pretrained_compatibility(net, path)
    msg = str(e.value)
    assert f"-pretrained_weights {path} {NO_RECORD}" in msg and "cannot be converted" in msg
    assert "Fix: pretrain again with this nnunetv2_vf (nnUNetv2_vf_pretrain), or convert" in msg
    assert f"checkpoint['{TABLE_LAYOUT_KEY}'] = '{TABLE_LAYOUT}'" in msg  # weights saved by one's own code
    torch.save({**ckpt, TABLE_LAYOUT_KEY: "centre-v9"}, path)
    with pytest.raises(PretrainedWeightsError, match="records the relative-position table layout 'centre-v9'.*"
                                                     "a newer nnunetv2_vf wrote it"):
        check_pretrained_compatibility(net, path)


def test_nnunet_training_checkpoints_and_plain_conv_unet_weights_load_without_record(tmp_path):
    """nnU-Net writes its training checkpoints (init_args) and has no place for the record; PlainConvUNet has no
    tables."""
    net = _pctnet()
    nnunet_ckpt = tmp_path / "fold_0_checkpoint_final.pth"
    torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "3d_fullres"},
                "trainer_name": "PCTNetTrainer"}, nnunet_ckpt)
    assert check_pretrained_compatibility(net, nnunet_ckpt) > 100
    plain = _plain()
    path = tmp_path / "plain.pth"
    torch.save({"network_weights": plain.state_dict()}, path)
    assert check_pretrained_compatibility(plain, path) > 0


def test_multichannel_stem_keeps_the_record_and_refuses_weights_without(tmp_path):
    plan = AdaptationPlan.for_network(
        {"network_class_name": PCTNET, "arch_kwargs": {"features_per_stage": list(SMALL_FEATURES),
                                                       "resolution_mode": 1, "strides": pctnet_strides(1)}},
        trainer_name="test", patch_size=[16, 32, 32],
        preprocessing={"spacing": None, "normalization": "MR", "nnunet_normalization_scheme": "ZScoreNormalization"})
    store = CheckpointStore(tmp_path)
    store.save_final(_pctnet().state_dict(), 1, {"network_class_name": PCTNET, "arch_kwargs": {}})
    two = write_multichannel_weights(store.final, plan, 2)
    assert torch.load(two, weights_only=True)[TABLE_LAYOUT_KEY] == TABLE_LAYOUT
    _without_record(store.final)
    with pytest.raises(TableLayoutError, match=f"pretrained weights {store.final} {NO_RECORD}"):
        write_multichannel_weights(store.final, plan, 2)


def test_converted_misfm_weights_and_their_plan_record_the_layout(shared_dir, tmp_path):
    from nnunetv2_vf.pretrain.adapt_plans import convert_misfm_checkpoint
    fixture = shared_dir / "fixtures" / "pctnet" / "pctnet_public_checkpoint.pt"
    out = tmp_path / "converted.pth"
    plan = convert_misfm_checkpoint(fixture, out, SMALL_FEATURES, 1)
    assert torch.load(out, weights_only=True)[TABLE_LAYOUT_KEY] == TABLE_LAYOUT
    assert plan[TABLE_LAYOUT_KEY] == TABLE_LAYOUT == AdaptationPlan.load(tmp_path).pctnet_table_layout
    from test_nnssl_interop import read_like_nnunet_master
    embedded = read_like_nnunet_master(out)  # nnU-Net master's nnssl route reads the converted file too
    assert next(iter(embedded["pretrain_plan"]["configurations"].values()))["normalization_schemes"] == [
        "CTNormalization"]  # the authors' CT window, which that route would replace by z-score (docs/interop.md)
    net = PCTNet(1, 3, features_per_stage=SMALL_FEATURES)
    assert check_pretrained_compatibility(net, out) > 100
    _without_record(out)
    with pytest.raises(PretrainedWeightsError, match=NO_RECORD):
        check_pretrained_compatibility(net, out)


# ------------------------------------------------------------------------------------------- adaptation plans
PLAIN_KWARGS = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1]}


def _plan_dict(arch_class_name: str = PCTNET) -> dict:
    # PlainConvUNet declares its keys in __init__: the plan builds it (on the meta device) from real kwargs
    arch = {"network_class_name": arch_class_name, "arch_kwargs": PLAIN_KWARGS if arch_class_name == PLAIN else {},
            "_kw_requires_import": ["conv_op"] if arch_class_name == PLAIN else []}
    return AdaptationPlan.for_network(
        arch, trainer_name="test", patch_size=[16, 32, 32],
        preprocessing={"spacing": None, "normalization": "MR", "nnunet_normalization_scheme": "ZScoreNormalization"}
    ).to_dict()


def test_adaptation_plans_record_the_layout_of_pctnet_only():
    assert TABLE_LAYOUT_KEY in {f.name for f in fields(AdaptationPlan)}  # the plan's field is the checkpoints' key
    pct = _plan_dict()
    assert pct[TABLE_LAYOUT_KEY] == TABLE_LAYOUT and pct["format"] == FORMAT == "nnunetv2_vf.adaptation_plan/4"
    assert AdaptationPlan.from_dict(pct).pctnet_table_layout == TABLE_LAYOUT
    assert _plan_dict(PLAIN)[TABLE_LAYOUT_KEY] is None


def test_pctnet_plan_without_the_record_is_refused_where_plans_are_read(tmp_path, monkeypatch):
    from nnunetv2_vf.pretrain.cli import adapt_plans_main
    old = {k: v for k, v in _plan_dict().items() if k != TABLE_LAYOUT_KEY}
    path = tmp_path / "adaptation_plan.json"
    for fmt in (FORMAT_V2, FORMAT):
        path.write_text(json.dumps({**old, "format": fmt}))
        with pytest.raises(AdaptationPlanError) as e:
            AdaptationPlan.load(path)
        assert f"adaptation plan {path} (network {PCTNET}) {NO_RECORD}" in str(e.value)
        assert "then run nnUNetv2_vf_adapt_plans with the adaptation_plan.json written next to" in str(e.value)
    with pytest.raises(SystemExit) as e:  # nnUNetv2_vf_adapt_plans: the plan is read first
        adapt_plans_main(["-d", "4", "-a", str(path)])
    assert NO_RECORD in e.value.code
    plans = {"plans_name": "nnUNetPlans_VF", "configurations": {"3d_fullres": {"architecture": {
        "network_class_name": PCTNET}}},
        "pretrain_info": {"source": "nnunetv2_vf", "adaptation_plan": old, "configuration": "3d_fullres"}}
    with pytest.raises(AdaptationPlanError, match=NO_RECORD):  # what the fine-tuning trainers read
        plan_recorded_in_plans(plans, "3d_fullres")


def test_older_plans_of_networks_without_tables_still_load():
    plain = _plan_dict(PLAIN)
    for fmt in ("nnunetv2_vf.adaptation_plan/1", FORMAT_V2):
        old = {k: v for k, v in plain.items() if k != TABLE_LAYOUT_KEY}
        plan = AdaptationPlan.from_dict({**old, "format": fmt})
        assert plan.format == FORMAT and plan.pctnet_table_layout is None
