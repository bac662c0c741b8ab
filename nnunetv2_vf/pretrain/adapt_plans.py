"""Make a fine-tuning dataset's nnU-Net plans match a Volume Fusion pretraining run, and convert the MIS-FM
authors' PCT-Net weights into an nnU-Net ``-pretrained_weights`` file.

Modelled on ``nnUNetv2_move_plans_between_datasets`` (nnU-Net's documented pretraining recipe): a copy of the
dataset's plans under a new name, with the pretraining's spacing, normalisation, patch and network.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from nnunetv2_vf.architectures.pctnet import (PAPER_FEATURES, TABLE_LAYOUT_FIX, check_table_layout,
                                              table_layout_record)
from nnunetv2_vf.checkpoint_io import atomic_write, refuse_nnunet_own_plans, refuse_overwrite, save_torch
from nnunetv2_vf.plans import effective_configuration
from nnunetv2_vf.pretrain.adaptation_plan import AdaptationPlan, build_network, input_projection_keys
from nnunetv2_vf.pretrain.dataset import CT_WINDOW, Preprocessing
from nnunetv2_vf.pretrain.nnssl_format import nnssl_checkpoint_fields

__all__ = ["load_adaptation_plan", "adapted_plans", "adapt_plans", "convert_misfm_checkpoint",
           "MISFM_ADAPTATION_PLAN", "repeat_stem_over_channels", "write_multichannel_weights",
           "INPUT_CHANNEL_RULE"]

INPUT_CHANNEL_RULE = ("single-channel input kernels repeated over the C channels and scaled by 1/C (timm's "
                      "adapt_input_conv rule): on C identical channels, or any channels' mean, the network "
                      "computes what the pretrained one computes on that image")


def load_adaptation_plan(path: str | os.PathLike) -> AdaptationPlan:
    """:meth:`AdaptationPlan.load` (the name earlier releases exported)."""
    return AdaptationPlan.load(path)


def adapted_plans(plans: dict, plan: AdaptationPlan | dict, configuration: str, plans_name: str,
                  keep_patch_size: bool = False, num_input_channels: Optional[int] = None) -> dict:
    """Pure function: ``plans`` with ``configuration`` set up like the pretraining described by ``plan`` (an
    :class:`AdaptationPlan`, or its dict form, which is validated)."""
    if not isinstance(plan, AdaptationPlan):
        plan = AdaptationPlan.from_dict(plan)
    plans = copy.deepcopy(plans)
    configurations = plans["configurations"]
    if configuration not in configurations:
        raise KeyError(f"configuration {configuration!r} not in the plans (have {sorted(configurations)})")
    if (num_input_channels is not None and num_input_channels != plan.pretrain_num_input_channels
            and plan.pretrain_num_input_channels != 1):  # 1 -> C: repeat_stem_over_channels
        raise ValueError(f"the dataset has {num_input_channels} input channels but the pretrained network takes "
                         f"{plan.pretrain_num_input_channels}; pretrain on images with as many channels (or on "
                         f"single-channel images, whose stem is then repeated over the channels), or fine-tune a "
                         f"dataset with {plan.pretrain_num_input_channels} channels")
    old_name = plans["plans_name"]
    for c, cfg in configurations.items():  # as nnUNetv2_move_plans_between_datasets: own preprocessed folders
        if "data_identifier" in cfg:
            ident = cfg["data_identifier"]
            cfg["data_identifier"] = (plans_name + ident[len(old_name):] if ident.startswith(old_name)
                                      else f"{plans_name}_{ident}")
    plans["plans_name"] = plans_name
    cfg = configurations[configuration]
    effective = effective_configuration(plans, configuration)
    if len(effective["patch_size"]) != 3:
        raise ValueError(f"configuration {configuration!r} is 2D; Volume Fusion weights are 3D: use 3d_fullres")

    pre = plan.preprocessing
    n_channels = len(effective.get("normalization_schemes", ["x"]))
    if pre.get("spacing") is not None:
        cfg["spacing"] = [float(s) for s in pre["spacing"]]
    cfg["normalization_schemes"] = [pre["nnunet_normalization_scheme"]] * n_channels
    cfg["use_mask_for_norm"] = [False] * n_channels
    if pre["nnunet_normalization_scheme"] == "CTNormalization":
        props = pre.get("intensity_properties") or Preprocessing("CT").ct_intensity_properties
        plans["foreground_intensity_properties_per_channel"] = {str(i): dict(props) for i in range(n_channels)}

    architecture = plan.nnunet_architecture()
    strides = architecture["arch_kwargs"].get("strides")
    patch = list(effective["patch_size"]) if keep_patch_size else list(plan.patch_size)
    if strides is not None:
        import numpy as np
        div = np.prod(np.vstack(strides), axis=0)
        patch = [int(-(-int(p) // int(d)) * int(d)) for p, d in zip(patch, div)]
    cfg["patch_size"] = patch
    cfg["architecture"] = architecture
    plans["pretrain_info"] = pretrain_info(plan, configuration)
    return plans


def pretrain_info(plan: AdaptationPlan, configuration: str) -> dict:
    """The plans' ``pretrain_info`` block. nnU-Net master's nnssl route writes one too; its fields are used here
    with their meaning (``checkpoint_path``: the pretrained checkpoint, single-channel as pretrained; ``key_to_*``;
    ``pt_num_in_channels``, ``pt_used_patchsize``, ``pt_recommended_downstream_patchsize``; ``citations``). This
    plugin's own: ``source``, ``method``, ``configuration``, ``adaptation_plan`` (the whole record) and
    ``pretrained_weights`` (the file to give ``-pretrained_weights``: for a multi-channel dataset the adapted
    ``_<C>ch.pth``, see ``input_channel_adaptation``); the file fields are added by :func:`adapt_plans`, which
    knows the weights."""
    from nnunetv2_vf.pretrain.nnssl_format import CITATIONS
    nnssl_source = (plan.source or {}).get("format") == "nnssl"
    info = {"method": f"nnssl pretraining ({plan.trainer_name})" if nnssl_source else "Volume Fusion (MIS-FM)",
            "source": "nnunetv2_vf", "adaptation_plan": plan.to_dict(), "configuration": configuration,
            "key_to_encoder": plan.key_to_encoder, "key_to_stem": plan.key_to_stem,
            "keys_to_in_proj": list(plan.keys_to_in_proj), "key_to_lpe": plan.key_to_lpe,
            "pt_num_in_channels": plan.pretrain_num_input_channels, "pt_used_patchsize": list(plan.patch_size),
            "pt_recommended_downstream_patchsize": list(plan.recommended_downstream_patchsize or plan.patch_size),
            "citations": [] if nnssl_source else copy.deepcopy(CITATIONS)}
    return info


def repeat_stem_over_channels(weights: dict, keys_to_in_proj, channels: int) -> dict:
    """Pure function: ``weights`` (a state dict) whose single-channel input projections ``keys_to_in_proj`` take
    ``channels`` inputs, by :data:`INPUT_CHANNEL_RULE`; every other tensor is shared, not copied. Give every name
    of a shared projection (:func:`nnunetv2_vf.pretrain.adaptation_plan.input_projection_keys`)."""
    from nnunetv2_vf.architectures.inflate import adapt_input_conv_weight
    out = dict(weights)
    for key in keys_to_in_proj:
        weight = weights.get(f"{key}.weight")
        if weight is None:
            raise ValueError(f"the pretrained weights hold no {key}.weight (the network's declared input "
                             f"projection): they do not belong to the adaptation plan's network")
        if weight.shape[1] != 1:
            raise ValueError(f"{key}.weight takes {weight.shape[1]} input channels; only single-channel "
                             f"pretrained stems are repeated over the channels")
        # timm's rule maps an RGB kernel to C channels (repeat, scale 3/C); the RGB kernel that equals this
        # grey one on grey input is a third of it per channel, so the result is the kernel repeated and / C
        rgb = weight.detach().float().repeat(1, 3, *([1] * (weight.ndim - 2))) / 3
        out[f"{key}.weight"] = adapt_input_conv_weight(rgb, channels).to(weight.dtype)
    return out


def plan_input_projections(plan: AdaptationPlan) -> list[str]:
    """The plan's declared input projections and every other state-dict name of the same parameters, read from the
    plan's network built on the meta device."""
    return input_projection_keys(build_network(plan.nnunet_architecture()), plan.keys_to_in_proj)


def multichannel_weights_file(weights_file: str | os.PathLike, channels: int) -> Path:
    """Where :func:`write_multichannel_weights` writes: ``<weights>_<C>ch.pth`` next to ``weights_file``."""
    weights_file = Path(weights_file)
    return weights_file.with_name(f"{weights_file.stem}_{channels}ch.pth")


def write_multichannel_weights(weights_file: str | os.PathLike, plan: AdaptationPlan, channels: int,
                               overwrite: bool = False) -> Path:
    """Write ``<weights>_<C>ch.pth`` next to ``weights_file`` (an nnU-Net ``-pretrained_weights`` file with a
    single-channel stem) with the stem for ``channels`` inputs; returns its path. An existing file with the same
    tensors is kept as it is; one with other tensors is replaced only with ``overwrite``."""
    from nnunetv2_vf.checkpoint_io import read_weights_file
    weights_file = Path(weights_file)
    ckpt = read_weights_file(weights_file, "pretrained weights",
                             "nnUNetv2_vf_pretrain writes OUTPUT_DIR/checkpoint_final.pth; give it with -w",
                             "give an intact checkpoint_final.pth of nnUNetv2_vf_pretrain or nnUNetv2_vf_convert_misfm",
                             allow_numpy=True)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ValueError(f"{weights_file} holds no 'network_weights': give the checkpoint_final.pth of "
                         f"nnUNetv2_vf_pretrain or the file nnUNetv2_vf_convert_misfm wrote, with -w")
    check_table_layout(ckpt, f"pretrained weights {weights_file}",
                       f"{TABLE_LAYOUT_FIX}, then run nnUNetv2_vf_adapt_plans with the new adaptation_plan.json")
    weights = repeat_stem_over_channels(ckpt["network_weights"], plan_input_projections(plan), channels)
    target = multichannel_weights_file(weights_file, channels)
    if target.exists() and not overwrite and _same_weights(target, weights):
        return target  # written by an earlier adaptation of the same weights: nothing to change
    refuse_overwrite([target], overwrite, "nnUNetv2_vf_adapt_plans",
                     f"the existing {target.name} holds other weights than {weights_file.name} with a {channels}-channel "
                     f"stem; move it away")
    save_torch({**{k: v for k, v in ckpt.items() if k in ("trainer_name", "architecture")},
                "network_weights": weights, "input_channel_adaptation": INPUT_CHANNEL_RULE,
                **table_layout_record(weights), **nnssl_checkpoint_fields(plan, channels)}, target,
               "converted weights")
    return target


def _same_weights(path: Path, weights: dict) -> bool:
    """Whether the weights file ``path`` holds exactly ``weights`` (False for anything unreadable)."""
    import torch
    try:
        existing = torch.load(path, map_location="cpu", weights_only=True)["network_weights"]
    except Exception:  # noqa: BLE001 - a file we cannot read is not the same file
        return False
    return existing.keys() == weights.keys() and all(torch.equal(existing[k], weights[k]) for k in weights)


def default_weights_file(adaptation_plan: str | os.PathLike, plan: AdaptationPlan) -> Path:
    """The weights that belong to a plan file: its ``weights_file`` in the plan's folder (format 1 plans: the
    folder's ``checkpoint_final.pth``)."""
    path = Path(adaptation_plan)
    folder = path if path.is_dir() else path.parent
    return folder / (plan.weights_file or "checkpoint_final.pth")


def adapt_plans(dataset: str | int, adaptation_plan: str | os.PathLike, configuration: str = "3d_fullres",
                source_plans: str = "nnUNetPlans", plans_name: str = "nnUNetPlans_VF",
                keep_patch_size: bool = False, weights_file: Optional[str | os.PathLike] = None,
                overwrite: bool = False) -> tuple[Path, Optional[Path]]:
    """Write ``nnUNet_preprocessed/DatasetXXX/<plans_name>.json``; for a dataset with more input channels than the
    single-channel pretraining also the pretrained weights with a C-channel stem (:func:`write_multichannel_weights`,
    from ``weights_file``, default :func:`default_weights_file`). Returns (plans path, converted weights or None)."""
    refuse_nnunet_own_plans(plans_name, "nnUNetv2_vf_adapt_plans")
    if plans_name == source_plans:
        raise ValueError(f"nnUNetv2_vf_adapt_plans: -p {plans_name} is also the plans adapted from (-sp): give the new "
                         f"plans their own name, e.g. -p {source_plans}_VF")
    plan = load_adaptation_plan(adaptation_plan)  # the plan first: its problems do not depend on the dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.file_path_utilities import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed:  # nnU-Net 2.8's lazy path object: falsy when the variable is unset
        raise ValueError("nnUNet_preprocessed is not set; export it as for any nnU-Net command")
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run nnUNetv2_plan_and_preprocess -d {dataset} (or "
                                f"nnUNetv2_plan_experiment) first")
    plans = json.loads(source.read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    new = adapted_plans(plans, plan, configuration, plans_name, keep_patch_size, channels)
    target = folder / f"{plans_name}.json"
    refuse_overwrite([target], overwrite, "nnUNetv2_vf_adapt_plans",
                     f"choose another -p for these plans (models trained with -p {plans_name} read the existing file)")
    converted = None
    source_weights = Path(weights_file) if weights_file else default_weights_file(adaptation_plan, plan)
    if weights_file or source_weights.is_file():
        # the file -pretrained_weights should name: the fine-tuning safeguards quote it when another one is given
        weights = str(source_weights.resolve())
        new["pretrain_info"].update(checkpoint_path=weights, checkpoint_name=source_weights.resolve().parent.name,
                                    pretrained_weights=weights)
    if channels != plan.pretrain_num_input_channels:
        if not source_weights.is_file():
            raise FileNotFoundError(f"the dataset has {channels} input channels, so the pretrained weights get a "
                                    f"{channels}-channel stem, but {source_weights} does not exist: give the "
                                    f"pretraining's checkpoint_final.pth (or the converted MIS-FM file) with -w")
        converted = write_multichannel_weights(source_weights, plan, channels, overwrite)
        new["pretrain_info"]["input_channel_adaptation"] = {"rule": INPUT_CHANNEL_RULE, "channels": channels,
                                                            "source_weights": str(source_weights.resolve()),
                                                            "weights": str(converted.resolve())}
        new["pretrain_info"]["pretrained_weights"] = str(converted.resolve())
    atomic_write(target, lambda f: f.write(json.dumps(new, indent=2).encode()), "plans")
    return target, converted


# what every converted MIS-FM checkpoint shares: the authors' pipeline (native spacing, HU clipped to
# [-1000, 1000] -> [-1, 1], 64x128x128 crops, the 'paper' fusion task with 5 classes)
MISFM_ADAPTATION_PLAN = {
    "trainer_name": "MIS-FM (converted by nnUNetv2_vf_convert_misfm)",
    "preprocessing": {"spacing": None, "normalization": "CT", "nnunet_normalization_scheme": "CTNormalization",
                      "intensity_properties": Preprocessing("CT").ct_intensity_properties,
                      "ct_window": list(CT_WINDOW)},
    "volume_fusion": {"variant": "paper", "num_classes": 5},
}


def convert_misfm_checkpoint(source: str | os.PathLike, target: str | os.PathLike,
                             features: Sequence[int] = PAPER_FEATURES, resolution_mode: int = 1,
                             overwrite: bool = False) -> dict:
    """MIS-FM ``pctnet_ct10k_volf.pt`` -> ``{'network_weights': ...}`` (weights-only loadable) + the adaptation plan
    ``adaptation_plan.json`` beside it (the name nnUNetv2_vf_adapt_plans and the loaders read). Existing files are
    replaced only with ``overwrite``. Returns the plan's dict form, with ``written_to`` (the plan file)."""
    target = Path(target)
    plan_file = target.parent / "adaptation_plan.json"
    refuse_overwrite([target, plan_file], overwrite, "nnUNetv2_vf_convert_misfm",
                     "give an output file in a new folder (the converted weights and their adaptation_plan.json "
                     "belong together)")
    from nnunetv2_vf.architectures.pctnet import PCTNet, fit_patch_size, load_misfm_weights, pctnet_strides
    from nnunetv2_vf.architectures.pctnet import _load_checkpoint_file
    state = _load_checkpoint_file(source)
    ref = state.get("model_state_dict", state) if isinstance(state, dict) else state
    proj = next((v for k, v in ref.items() if k.endswith(f"embeddings.{resolution_mode}.proj.weight")), None)
    in_channels = int(proj.shape[1]) if proj is not None else 1
    model = PCTNet(in_channels, 5, features_per_stage=features, resolution_mode=resolution_mode)
    try:
        load_misfm_weights(model, state)
    except ValueError as e:
        raise ValueError(f"{source}: {e}\n(give --features / --resolution-mode of the checkpoint; the published "
                         f"pctnet_ct10k_volf.pt uses {' '.join(map(str, PAPER_FEATURES))} and resolution mode 1)"
                         ) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    patch = fit_patch_size((64, 128, 128), resolution_mode)
    plan = AdaptationPlan.for_network(
        {"network_class_name": f"{PCTNet.__module__}.{PCTNet.__name__}",
         "arch_kwargs": {"features_per_stage": list(map(int, features)), "resolution_mode": int(resolution_mode),
                         "strides": pctnet_strides(resolution_mode)},
         "_kw_requires_import": []},
        pretrain_num_input_channels=in_channels, patch_size=patch, recommended_downstream_patchsize=list(patch),
        weights_file=target.name, source={"format": "MIS-FM PCT-Net", "file": str(Path(source).resolve())},
        **copy.deepcopy(MISFM_ADAPTATION_PLAN))
    # the authors' tables are read as they are (load_misfm_weights places shrunken ones at the centre): this layout
    save_torch({"network_weights": weights, "trainer_name": "misfm_pctnet_converted", **table_layout_record(weights),
                **nnssl_checkpoint_fields(plan)}, target, "converted weights")
    plan.save(plan_file)
    return {**plan.to_dict(), "written_to": str(plan_file.resolve())}
