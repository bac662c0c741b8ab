"""nnssl's checkpoint format, both ways: every checkpoint this plugin writes embeds an nnssl-shaped
``nnssl_adaptation_plan`` (what nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` / ``PretrainedTrainer`` read), and
``nnUNetv2_vf_convert_nnssl`` turns an nnssl checkpoint into this plugin's ``checkpoint_final.pth`` +
``adaptation_plan.json``.

The format, as nnssl (MIC-DKFZ/nnssl) writes it: a ``torch.save`` dict with ``network_weights`` (the pretraining
network's state dict: a whole ResEnc U-Net, or only an encoder and a projection head for the contrastive methods),
``trainer_name``, ``init_args`` and ``nnssl_adaptation_plan``: ``architecture_plans`` (``arch_class_name``: a preset
such as ``ResEncL`` or a dynamic-network-architectures class with ``arch_kwargs``), ``pretrain_plan`` (an nnssl plans
dict whose one configuration carries ``spacing``, ``patch_size`` and ``normalization_schemes``),
``pretrain_num_input_channels``, ``recommended_downstream_patchsize``, ``key_to_encoder``, ``key_to_stem``,
``keys_to_in_proj`` and ``key_to_lpe``. nnU-Net master reads those fields, plus an optional top-level ``citations``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional

from nnunetv2_vf.pretrain.adaptation_plan import AdaptationPlan, network_keys

__all__ = ["NNSSL_PLAN_KEY", "nnssl_adaptation_plan", "nnssl_checkpoint_fields", "CITATIONS", "NNSSL_PRESETS",
           "architecture_from_nnssl", "convert_nnssl_checkpoint"]

NNSSL_PLAN_KEY = "nnssl_adaptation_plan"
MISFM_CITATION = ("Wang, G., Wu, J., Luo, X., Liu, X., Li, K., & Zhang, S. (2023). MIS-FM: 3D Medical Image "
                  "Segmentation using Foundation Models Pretrained on a Large-Scale Unannotated Dataset. "
                  "arXiv:2306.16925.")
# nnU-Net master prints these when it fine-tunes from the checkpoint (type, name, apa_citations)
CITATIONS = [{"type": "pretraining method", "name": "Volume Fusion (MIS-FM)", "apa_citations": [MISFM_CITATION]}]
_RESAMPLING = {"resampling_fn_data": "resample_data_or_seg_to_shape",
               "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
               "resampling_fn_mask": "resample_data_or_seg_to_shape",
               "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}
_DNA_UNET = "dynamic_network_architectures.architectures.unet."
_IMPORTED_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")
# nnssl's ResEnc-L preset ("Revisiting MAE pre-training", arXiv:2410.23132), in nnU-Net's plans notation
NNSSL_PRESETS = {
    "ResEncL": {"network_class_name": _DNA_UNET + "ResidualEncoderUNet",
                "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
                                "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
                                "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
}
# nnssl networks with no counterpart that nnU-Net 2.8 can build and this plugin can fine-tune
_UNSUPPORTED = {
    "NoSkipResEncL": "nnssl's ResEnc-L without skip connections exists only in nnssl",
    **{f"Primus{s}": "Primus is a transformer with a learnable positional embedding (key_to_lpe) that must be "
                     "resized to the downstream patch; nnU-Net 2.8 has no Primus trainer" for s in "SBML"},
}


# ---------------------------------------------------------------------------------------------------------- export
def nnssl_adaptation_plan(plan: AdaptationPlan, num_input_channels: Optional[int] = None,
                          dataset_name: str = "nnunetv2_vf_pretraining") -> dict:
    """``plan`` in nnssl's serialised ``AdaptationPlan`` layout, filled with nnssl's conventions: the spacing style
    (``onemmiso`` / ``median`` / ``noresample``) names the configuration, the channels' normalisation repeats the
    plan's scheme. ``num_input_channels``: the weights' input channels (default: the plan's)."""
    channels = int(num_input_channels or plan.pretrain_num_input_channels)
    spacing = plan.preprocessing.get("spacing")
    style = ("noresample" if spacing is None else
             "onemmiso" if all(abs(float(s) - 1.0) < 1e-6 for s in spacing) else "median")
    configuration = {"data_identifier": f"nnunetv2_vf_{style}", "preprocessor_name": "DefaultPreprocessor",
                     "spacing_style": style,
                     "normalization_schemes": [plan.preprocessing["nnunet_normalization_scheme"]] * channels,
                     "use_mask_for_norm": [False] * channels, **copy.deepcopy(_RESAMPLING),
                     "spacing": None if spacing is None else [float(s) for s in spacing],
                     "patch_size": [int(p) for p in plan.patch_size]}
    arch = plan.architecture_plans
    return {
        "architecture_plans": {"arch_class_name": arch["arch_class_name"],
                               "arch_kwargs": copy.deepcopy(arch["arch_kwargs"]),
                               "arch_kwargs_requiring_import": list(arch.get("arch_kwargs_requiring_import") or [])},
        "pretrain_plan": {"dataset_name": dataset_name, "plans_name": "nnunetv2_vfPlans",
                          "original_median_spacing_after_transp": configuration["spacing"],
                          "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
                          "transpose_backward": [0, 1, 2], "configurations": {style: configuration},
                          "experiment_planner_used": "nnunetv2_vf"},
        "pretrain_num_input_channels": channels,
        "recommended_downstream_patchsize": [int(p) for p in (plan.recommended_downstream_patchsize
                                                              or plan.patch_size)],
        "key_to_encoder": plan.key_to_encoder, "key_to_stem": plan.key_to_stem,
        "keys_to_in_proj": list(plan.keys_to_in_proj), "key_to_lpe": plan.key_to_lpe,
        "pretrain_patch_size": [int(p) for p in plan.patch_size],
    }


def nnssl_checkpoint_fields(plan: AdaptationPlan, num_input_channels: Optional[int] = None) -> dict:
    """What a checkpoint adds to be read as an nnssl one: ``nnssl_adaptation_plan`` and ``citations``."""
    return {NNSSL_PLAN_KEY: nnssl_adaptation_plan(plan, num_input_channels), "citations": copy.deepcopy(CITATIONS)}


# ---------------------------------------------------------------------------------------------------------- import
def architecture_from_nnssl(architecture_plans: dict) -> dict:
    """nnssl's ``architecture_plans`` -> an nnU-Net ``architecture`` block: presets expanded, the bare class names
    ``ResidualEncoderUNet`` / ``PlainConvUNet`` qualified (their ``n_blocks_per_stage`` is PlainConvUNet's
    ``n_conv_per_stage``), full class names kept. Unsupported networks raise ValueError naming why."""
    name = architecture_plans.get("arch_class_name")
    if name in _UNSUPPORTED:
        raise ValueError(f"nnssl architecture {name!r} is not supported: {_UNSUPPORTED[name]}. Fine-tune it with "
                         f"nnU-Net master's nnUNetv2_train_pretrained, or pretrain a ResEnc network "
                         f"(ResEncL / ResidualEncoderUNet) in nnssl")
    if name in NNSSL_PRESETS:
        return copy.deepcopy(NNSSL_PRESETS[name])
    kwargs = architecture_plans.get("arch_kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ValueError(f"nnssl architecture {name!r} without arch_kwargs: known presets are "
                         f"{sorted(NNSSL_PRESETS)}; other networks need arch_class_name and arch_kwargs")
    kwargs = copy.deepcopy(kwargs)
    if name in ("ResidualEncoderUNet", "PlainConvUNet"):
        if name == "PlainConvUNet" and "n_blocks_per_stage" in kwargs:
            kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
        name = _DNA_UNET + name
    imports = architecture_plans.get("arch_kwargs_requiring_import")
    if imports is None:
        imports = [k for k in _IMPORTED_KWARGS if isinstance(kwargs.get(k), str)]
    return {"network_class_name": name, "arch_kwargs": kwargs, "_kw_requires_import": list(imports)}


def _preprocessing_from_nnssl(nnssl_plan: dict, source: str) -> tuple[dict, list]:
    """(the adaptation plan's ``preprocessing``, the pretraining patch) from nnssl's ``pretrain_plan``."""
    configurations = (nnssl_plan.get("pretrain_plan") or {}).get("configurations") or {}
    if not configurations:
        raise ValueError(f"{source}: nnssl_adaptation_plan.pretrain_plan has no configuration, so the pretraining's "
                         f"spacing, patch and normalisation are unknown; the checkpoint is incomplete")
    config = next(iter(configurations.values()))
    schemes = config.get("normalization_schemes") or ["ZScoreNormalization"]
    ct = schemes[0] == "CTNormalization"
    preprocessing = {"spacing": None if config.get("spacing") is None else [float(s) for s in config["spacing"]],
                     "normalization": "CT" if ct else "MR",
                     "nnunet_normalization_scheme": "CTNormalization" if ct else "ZScoreNormalization",
                     "nnssl_spacing_style": config.get("spacing_style"),
                     "resampling": f"{config.get('resampling_fn_data')} {config.get('resampling_fn_data_kwargs')}"}
    patch = config.get("patch_size") or nnssl_plan.get("pretrain_patch_size")
    if patch is None:
        raise ValueError(f"{source}: the nnssl pretraining configuration records no patch_size")
    return preprocessing, [int(p) for p in patch]


def _load_nnssl_checkpoint(path: Path) -> dict:
    from nnunetv2_vf.checkpoint_io import read_weights_file
    ckpt = read_weights_file(path, "nnssl checkpoint", "give the checkpoint_final.pth an nnssl pretraining wrote",
                             "give an intact nnssl checkpoint", allow_numpy=True)
    missing = [k for k in ("network_weights", NNSSL_PLAN_KEY) if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        hint = (" (a checkpoint of this plugin or of nnU-Net: give it to nnUNetv2_vf_adapt_plans / "
                "-pretrained_weights directly)" if isinstance(ckpt, dict) and "network_weights" in ckpt else "")
        raise ValueError(f"{path} is not an nnssl checkpoint: it lacks {missing}{hint}")
    return ckpt


def convert_nnssl_checkpoint(source: str | os.PathLike, output_dir: str | os.PathLike, seed: int = 0,
                             overwrite: bool = False) -> dict:
    """An nnssl checkpoint -> ``OUTPUT_DIR/checkpoint_final.pth`` (weights-only: the whole U-Net, every tensor that
    nnU-Net's ``-pretrained_weights`` loader checks) + ``OUTPUT_DIR/adaptation_plan.json``. An encoder-only checkpoint
    gets the rest of the network from a fresh initialisation seeded with ``seed``; the plan's ``pretrained_tensors``
    says which prefixes are pretrained and which fresh. Returns a report (counts, files)."""
    import torch
    from nnunetv2_vf.checkpoint_io import refuse_overwrite, save_torch
    from nnunetv2_vf.pretrain.adaptation_plan import state_dict_names
    source, output_dir = Path(source), Path(output_dir)
    target, plan_file = output_dir / "checkpoint_final.pth", output_dir / "adaptation_plan.json"
    refuse_overwrite([target, plan_file], overwrite, "nnUNetv2_vf_convert_nnssl",
                     "give a new output folder (the weights and their adaptation_plan.json belong together)")
    ckpt = _load_nnssl_checkpoint(source)
    nnssl_plan = ckpt[NNSSL_PLAN_KEY]
    architecture = architecture_from_nnssl(nnssl_plan.get("architecture_plans") or {})
    preprocessing, patch = _preprocessing_from_nnssl(nnssl_plan, str(source))
    channels = int(nnssl_plan.get("pretrain_num_input_channels", 1))

    torch.manual_seed(seed)  # the fresh part (encoder-only checkpoints) is reproducible
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    net = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], channels, 2, allow_init=True,
                                 deep_supervision=True)
    keys = network_keys(net)
    given = ckpt["network_weights"]
    state = net.state_dict(keep_vars=True)
    # every name of a parameter: an encoder-only checkpoint holds encoder.* but not the decoder's decoder.encoder.*
    names_of = state_dict_names(net)
    weights, pretrained, fresh = {}, [], []
    for k, v in state.items():
        found = next((n for n in names_of[id(v)] if n in given), None)
        if found is not None and ".seg_layers." not in k:
            if tuple(given[found].shape) != tuple(v.shape):
                raise ValueError(f"{source}: tensor {found} has shape {tuple(given[found].shape)}, the network of "
                                 f"its adaptation plan ({architecture['network_class_name']}) expects "
                                 f"{tuple(v.shape)}: the checkpoint and its plan disagree")
            weights[k] = given[found].detach().cpu().clone()
            pretrained.append(k)
        else:
            weights[k] = v.detach().cpu().clone()
            fresh.append(k)
    encoder_prefix = keys.key_to_encoder + "."
    if not any(k.startswith(encoder_prefix) for k in pretrained):
        raise ValueError(f"{source}: no tensor of the encoder ({keys.key_to_encoder}.*) of "
                         f"{architecture['network_class_name']} is in the checkpoint's network_weights (keys like "
                         f"{sorted(given)[:3]}): the weights do not belong to the network of its adaptation plan")
    unused = sorted(k for k in given if k not in state)
    plan = AdaptationPlan.for_network(
        architecture, trainer_name=str(ckpt.get("trainer_name", "nnssl")), pretrain_num_input_channels=channels,
        patch_size=patch, recommended_downstream_patchsize=[int(p) for p in nnssl_plan.get(
            "recommended_downstream_patchsize") or patch],
        preprocessing=preprocessing, weights_file=target.name,
        pretrained_tensors={"pretrained": _prefixes(pretrained), "fresh": _prefixes(
            [k for k in fresh if ".seg_layers." not in k]), "fresh_init_seed": seed if fresh else None,
                            "count_pretrained": len(pretrained), "count_fresh": len(fresh)},
        source={"format": "nnssl", "file": str(source.resolve()), "trainer_name": ckpt.get("trainer_name"),
                "arch_class_name": (nnssl_plan.get("architecture_plans") or {}).get("arch_class_name"),
                "unused_tensors": len(unused)})
    output_dir.mkdir(parents=True, exist_ok=True)
    # the embedded plan as this plugin exports it, with the nnssl checkpoint's own citations (not MIS-FM's)
    embedded = {**nnssl_checkpoint_fields(plan), "citations": list(ckpt.get("citations") or [])}
    save_torch({"network_weights": weights, "trainer_name": "nnUNetv2_vf_convert_nnssl",
                "architecture": architecture, **embedded}, target, "converted weights")
    plan.save(plan_file)
    return {"weights": str(target.resolve()), "adaptation_plan": str(plan_file.resolve()),
            "network": architecture["network_class_name"], "pretrained": len(pretrained), "fresh": len(fresh),
            "unused": unused, "encoder_only": bool(
                [k for k in fresh if k.startswith("decoder.") and ".seg_layers." not in k])}


def _prefixes(keys: list[str], depth: int = 3) -> list[str]:
    """Short summary of state-dict keys: their distinct first ``depth`` name parts, in order."""
    return list(dict.fromkeys(".".join(k.split(".")[:depth]) for k in keys))
