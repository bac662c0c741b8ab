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

from nnunetv2_vf.checkpoint_io import atomic_write, save_torch
from nnunetv2_vf.plans import effective_configuration
from nnunetv2_vf.pretrain.dataset import CT_WINDOW, Preprocessing

__all__ = ["load_adaptation_plan", "adapted_plans", "adapt_plans", "convert_misfm_checkpoint",
           "MISFM_ADAPTATION_PLAN"]


def load_adaptation_plan(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "adaptation_plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"adaptation plan {path} not found; it is written by nnUNetv2_vf_pretrain (or "
                                f"nnUNetv2_vf_convert_misfm) into its output folder")
    with open(path) as f:
        plan = json.load(f)
    for key in ("architecture_plans", "preprocessing", "patch_size"):
        if key not in plan:
            raise ValueError(f"{path} lacks {key!r}: not an adaptation plan of nnUNetv2_vf_pretrain")
    return plan


def adapted_plans(plans: dict, plan: dict, configuration: str, plans_name: str,
                  keep_patch_size: bool = False, num_input_channels: Optional[int] = None) -> dict:
    """Pure function: ``plans`` with ``configuration`` set up like the pretraining described by ``plan``."""
    plans = copy.deepcopy(plans)
    configurations = plans["configurations"]
    if configuration not in configurations:
        raise KeyError(f"configuration {configuration!r} not in the plans (have {sorted(configurations)})")
    if num_input_channels is not None and num_input_channels != plan.get("pretrain_num_input_channels", 1):
        raise ValueError(f"the dataset has {num_input_channels} input channels but the pretrained network takes "
                         f"{plan.get('pretrain_num_input_channels', 1)}; pretrain on images with as many channels or "
                         f"fine-tune a single-channel dataset")
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

    pre = plan["preprocessing"]
    n_channels = len(effective.get("normalization_schemes", ["x"]))
    if pre.get("spacing") is not None:
        cfg["spacing"] = [float(s) for s in pre["spacing"]]
    cfg["normalization_schemes"] = [pre["nnunet_normalization_scheme"]] * n_channels
    cfg["use_mask_for_norm"] = [False] * n_channels
    if pre["nnunet_normalization_scheme"] == "CTNormalization":
        props = pre.get("intensity_properties") or Preprocessing("CT").ct_intensity_properties
        plans["foreground_intensity_properties_per_channel"] = {str(i): dict(props) for i in range(n_channels)}

    arch = plan["architecture_plans"]
    arch_kwargs = copy.deepcopy(arch["arch_kwargs"])
    strides = arch_kwargs.get("strides")
    patch = list(effective["patch_size"]) if keep_patch_size else list(plan["patch_size"])
    if strides is not None:
        import numpy as np
        div = np.prod(np.vstack(strides), axis=0)
        patch = [int(-(-int(p) // int(d)) * int(d)) for p, d in zip(patch, div)]
    cfg["patch_size"] = patch
    cfg["architecture"] = {"network_class_name": arch["arch_class_name"], "arch_kwargs": arch_kwargs,
                           "_kw_requires_import": list(arch.get("arch_kwargs_requiring_import", []))}
    # upstream nnU-Net (master) records where pretrained weights came from in a 'pretrain_info' block
    plans["pretrain_info"] = {"method": "Volume Fusion (MIS-FM)", "source": "nnunetv2_vf",
                              "adaptation_plan": plan, "configuration": configuration}
    return plans


def adapt_plans(dataset: str | int, adaptation_plan: str | os.PathLike, configuration: str = "3d_fullres",
                source_plans: str = "nnUNetPlans", plans_name: str = "nnUNetPlans_VF",
                keep_patch_size: bool = False) -> Path:
    """Write ``nnUNet_preprocessed/DatasetXXX/<plans_name>.json``; returns its path."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.file_path_utilities import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed:  # nnU-Net 2.8's lazy path object: falsy when the variable is unset
        raise RuntimeError("nnUNet_preprocessed is not set; export it as for any nnU-Net command")
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run nnUNetv2_plan_and_preprocess -d {dataset} (or "
                                f"nnUNetv2_plan_experiment) first")
    plans = json.loads(source.read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    new = adapted_plans(plans, load_adaptation_plan(adaptation_plan), configuration, plans_name, keep_patch_size,
                        channels)
    target = folder / f"{plans_name}.json"
    atomic_write(target, lambda f: f.write(json.dumps(new, indent=2).encode()), "plans")
    return target


MISFM_ADAPTATION_PLAN = {
    "format": "nnunetv2_vf.adaptation_plan/1",
    "trainer_name": "MIS-FM (converted by nnUNetv2_vf_convert_misfm)",
    "pretrain_num_input_channels": 1,
    "key_to_encoder": "encoder", "key_to_stem": "stem", "keys_to_in_proj": ["stem.proj"],
    # the authors' pipeline: native spacing, HU clipped to [-1000, 1000] -> [-1, 1], 64x128x128 crops
    "preprocessing": {"spacing": None, "normalization": "CT", "nnunet_normalization_scheme": "CTNormalization",
                      "intensity_properties": Preprocessing("CT").ct_intensity_properties,
                      "ct_window": list(CT_WINDOW)},
    "volume_fusion": {"variant": "paper", "num_classes": 5},
}


def convert_misfm_checkpoint(source: str | os.PathLike, target: str | os.PathLike,
                             features: Sequence[int] = (24, 48, 128, 256, 512), resolution_mode: int = 1) -> dict:
    """MIS-FM ``pctnet_ct10k_volf.pt`` -> ``{'network_weights': ...}`` (weights-only loadable) + adaptation plan."""
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
                         f"pctnet_ct10k_volf.pt uses 24 48 128 256 512 and resolution mode 1)") from e
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_torch({"network_weights": weights, "trainer_name": "misfm_pctnet_converted"}, target, "converted weights")
    plan = dict(copy.deepcopy(MISFM_ADAPTATION_PLAN))
    plan["pretrain_num_input_channels"] = in_channels
    plan["architecture_plans"] = {"arch_class_name": "nnunetv2_vf.architectures.pctnet.PCTNet",
                                  "arch_kwargs": {"features_per_stage": list(map(int, features)),
                                                  "resolution_mode": int(resolution_mode),
                                                  "strides": pctnet_strides(resolution_mode)},
                                  "arch_kwargs_requiring_import": []}
    plan["patch_size"] = plan["recommended_downstream_patchsize"] = fit_patch_size((64, 128, 128), resolution_mode)
    # never overwrite the plan of a pretraining run that lives in the same folder
    plan_file = target.parent / "adaptation_plan.json"
    if plan_file.exists():
        plan_file = target.parent / f"{target.stem}.adaptation_plan.json"
    atomic_write(plan_file, lambda f: f.write(json.dumps(plan, indent=2).encode()), "adaptation plan")
    plan["written_to"] = str(plan_file)
    return plan
