"""The pretraining contract: what fine-tuning needs to reproduce a Volume Fusion pretraining (or a converted
MIS-FM checkpoint), as one typed, versioned record.

Written by ``nnUNetv2_vf_pretrain`` and ``nnUNetv2_vf_convert_misfm`` (``adaptation_plan.json``), read by
``nnUNetv2_vf_adapt_plans`` and the fine-tuning trainers. The field names follow nnssl / nnU-Net master's
adaptation plan (``architecture_plans``, ``recommended_downstream_patchsize``, ``key_to_encoder``, ...), so a reader
of either finds the same things here. Plans of formats 1 and 2 still load, except those of a network with
relative-position tables (PCT-Net): format 3 records the tables' layout (``pctnet_table_layout``), and a PCT-Net plan
without it describes weights this version would compute differently with, so it is refused.

Which state-dict keys are a network's stem, encoder and input projection is declared by the network itself:
attributes ``key_to_stem``, ``key_to_encoder``, ``keys_to_in_proj`` (and ``key_to_lpe``), class attributes in PCTNet,
instance attributes in dynamic-network-architectures >= 0.4 (PlainConvUNet, ResidualEncoderUNet).
"""
from __future__ import annotations

import copy
import json
import os
import pydoc
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

__all__ = ["AdaptationPlan", "AdaptationPlanError", "NetworkKeys", "network_keys", "network_table_layout",
           "build_network", "input_projection_keys", "state_dict_names", "FORMAT", "FORMAT_V1", "FORMAT_V2", "READABLE_FORMATS", "PLAN_FILE_NAME"]

FORMAT_V1 = "nnunetv2_vf.adaptation_plan/1"
FORMAT_V2 = "nnunetv2_vf.adaptation_plan/2"  # added weights_file
FORMAT_V3 = "nnunetv2_vf.adaptation_plan/3"  # added pctnet_table_layout
FORMAT = "nnunetv2_vf.adaptation_plan/4"  # added key_to_lpe, pretrained_tensors, source
READABLE_FORMATS = (FORMAT_V1, FORMAT_V2, FORMAT_V3, FORMAT)
PLAN_FILE_NAME = "adaptation_plan.json"
NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization")
_FIX = "regenerate it with nnUNetv2_vf_pretrain (or nnUNetv2_vf_convert_misfm), or repair the field by hand"


class AdaptationPlanError(ValueError):
    """A missing or malformed field of an adaptation plan (a ValueError: the console scripts print it)."""


@dataclass(frozen=True)
class NetworkKeys:
    """State-dict prefixes of a network's parts: the stem (whose first conv sees the input channels), the encoder
    (what encoder-only loading keeps), the convolutions that take the input image, and a learnable positional
    embedding (None for convolutional networks). The names are dynamic-network-architectures' (>= 0.4) and nnssl's."""
    key_to_stem: str
    key_to_encoder: str
    keys_to_in_proj: tuple[str, ...]
    key_to_lpe: Optional[str] = None


_KEY_ATTRIBUTES = ("key_to_stem", "key_to_encoder", "keys_to_in_proj")


def _declared(obj) -> Optional[NetworkKeys]:
    """The keys ``obj`` (a network class or instance) declares as attributes, or None."""
    if all(isinstance(getattr(obj, a, None), (str, tuple, list)) for a in _KEY_ATTRIBUTES):
        return NetworkKeys(obj.key_to_stem, obj.key_to_encoder, tuple(obj.keys_to_in_proj),
                           getattr(obj, "key_to_lpe", None))
    return None


def _undeclared(name: str) -> ValueError:
    return ValueError(f"network {name} does not declare its stem, encoder and input-projection keys: give it the "
                      f"attributes key_to_stem, key_to_encoder and keys_to_in_proj (as PCTNet and "
                      f"dynamic-network-architectures >= 0.4 networks do)")


def build_network(architecture: dict, input_channels: int = 1, output_channels: int = 2,
                  device: str = "meta") -> "torch.nn.Module":
    """The network of an nnU-Net ``architecture`` block (``network_class_name``, ``arch_kwargs``,
    ``_kw_requires_import``), with deep supervision, not initialised; on the meta device by default, where building
    even a 100M-parameter network allocates nothing (for reading its declared keys and its parameter sharing)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    with torch.device(device):
        return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                      architecture.get("_kw_requires_import", []), input_channels, output_channels,
                                      allow_init=False, deep_supervision=True)


def network_keys(network) -> NetworkKeys:
    """The keys a network declares: ``network`` is an instance, an nnU-Net ``architecture`` block (class attributes
    such as PCTNet's, else the attributes dynamic-network-architectures sets in ``__init__``, read from the network
    built on the meta device) or a class name (class attributes only)."""
    import torch
    if isinstance(network, torch.nn.Module):
        keys = _declared(network)
        if keys is None:
            raise _undeclared(f"{type(network).__module__}.{type(network).__qualname__}")
        return keys
    name = network["network_class_name"] if isinstance(network, dict) else network
    cls = pydoc.locate(name)
    keys = _declared(cls) if cls is not None else None
    if keys is None and isinstance(network, dict) and isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        keys = _declared(build_network(network))
    if keys is None:
        raise _undeclared(name)
    return keys


def state_dict_names(network: "torch.nn.Module") -> dict[int, list[str]]:
    """{id of a parameter or buffer: every state-dict key that holds it}. A module reachable along two paths appears
    under both (nnU-Net's decoders keep a reference to their encoder), so one tensor can have several keys."""
    names: dict[int, list[str]] = {}
    for key, value in network.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    return names


def input_projection_keys(network: "torch.nn.Module", keys_to_in_proj) -> list[str]:
    """Every state-dict prefix whose ``weight`` is the same parameter as a declared input projection's, found by
    identity, not by name: nnU-Net's U-Nets list their first convolution four times (``encoder.stages.0.0.convs.0.conv``,
    its ``all_modules.0`` and the decoder's two ``decoder.encoder.*`` references), and all of them must change shape
    together."""
    names = state_dict_names(network)
    keys = [k for proj in keys_to_in_proj for k in names[id(network.get_submodule(proj).weight)]]
    return list(dict.fromkeys(k[: -len(".weight")] for k in keys))


def network_table_layout(arch_class_name: str) -> Optional[str]:
    """The relative-position table layout ``arch_class_name`` declares (class attribute ``table_layout``: PCTNet's
    ``pctnet.TABLE_LAYOUT``), or None: a network without such tables (nnU-Net's own) or a class not importable
    here."""
    try:
        cls = pydoc.locate(arch_class_name)
    except pydoc.ErrorDuringImport:
        return None
    return getattr(cls, "table_layout", None) if isinstance(cls, type) else None


def _problem(source: str, name: str, what: str) -> AdaptationPlanError:
    return AdaptationPlanError(f"adaptation plan {source}: field {name!r} {what}; {_FIX}")


def _positive_ints(value, n: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


@dataclass
class AdaptationPlan:
    """What fine-tuning needs to reproduce pretraining. ``architecture_plans``: ``arch_class_name``,
    ``arch_kwargs``, ``arch_kwargs_requiring_import`` (nnU-Net's plans ``architecture`` block under nnssl's names);
    ``preprocessing``: ``spacing`` (mm, D H W, or None for native), ``normalization`` ('CT'/'MR'),
    ``nnunet_normalization_scheme`` and the CT ``intensity_properties``/``ct_window``; ``volume_fusion``: the
    pretext task's settings (variant, number of classes and the other knobs of ``FusionParameters``);
    ``weights_file``: the pretrained weights (``-pretrained_weights``), a file name in the plan's folder."""
    architecture_plans: dict
    patch_size: list
    preprocessing: dict
    trainer_name: str
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: list
    pretrain_num_input_channels: int = 1
    recommended_downstream_patchsize: Optional[list] = None
    volume_fusion: dict = field(default_factory=dict)
    optimizer: Optional[dict] = None
    iterations: Optional[int] = None
    num_pretraining_images: Optional[int] = None
    weights_file: Optional[str] = None  # the weights' file name, next to the plan (format 2; format 1 had none)
    # pctnet.TABLE_LAYOUT for a network with relative-position tables, None for one without (format 3)
    pctnet_table_layout: Optional[str] = None
    key_to_lpe: Optional[str] = None  # a learnable positional embedding's key (nnssl's field; format 4)
    # which tensors of the weights are pretrained, when not all are (an encoder-only nnssl checkpoint completed with
    # a seeded fresh decoder): {"pretrained": prefixes, "fresh": prefixes, "fresh_init_seed": int} (format 4)
    pretrained_tensors: Optional[dict] = None
    source: Optional[dict] = None  # where converted weights came from: {"format": ..., "file": ..., ...} (format 4)
    format: str = FORMAT

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_network(cls, architecture: dict, **values) -> "AdaptationPlan":
        """A plan for an nnU-Net ``architecture`` block (``network_class_name``, ``arch_kwargs``,
        ``_kw_requires_import``); the keys and the table layout come from the network's own declaration."""
        keys = network_keys(architecture)
        values.setdefault("pctnet_table_layout", network_table_layout(architecture["network_class_name"]))
        return cls(architecture_plans={"arch_class_name": architecture["network_class_name"],
                                       "arch_kwargs": copy.deepcopy(architecture["arch_kwargs"]),
                                       "arch_kwargs_requiring_import": list(architecture.get("_kw_requires_import",
                                                                                             []))},
                   key_to_encoder=keys.key_to_encoder, key_to_stem=keys.key_to_stem,
                   keys_to_in_proj=list(keys.keys_to_in_proj), key_to_lpe=keys.key_to_lpe, **values).validate()

    def nnunet_architecture(self) -> dict:
        """``architecture_plans`` as nnU-Net's plans spell it (``network_class_name``, ``arch_kwargs``,
        ``_kw_requires_import``)."""
        arch = self.architecture_plans
        return {"network_class_name": arch["arch_class_name"], "arch_kwargs": copy.deepcopy(arch["arch_kwargs"]),
                "_kw_requires_import": list(arch.get("arch_kwargs_requiring_import") or [])}

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "(in memory)") -> "AdaptationPlan":
        """Raise :class:`AdaptationPlanError` naming the first wrong field and the fix; returns self."""
        if self.format not in READABLE_FORMATS:
            raise AdaptationPlanError(
                f"adaptation plan {source}: format {self.format!r} is not one this nnunetv2_vf reads "
                f"({', '.join(READABLE_FORMATS)}); a newer nnunetv2_vf wrote it: upgrade the plugin, or regenerate "
                f"the plan with this version's nnUNetv2_vf_pretrain")
        arch = self.architecture_plans
        if not isinstance(arch, dict):
            raise _problem(source, "architecture_plans", f"must be an object, got {type(arch).__name__}")
        for key, kind in (("arch_class_name", str), ("arch_kwargs", dict)):
            if not isinstance(arch.get(key), kind):
                raise _problem(source, f"architecture_plans.{key}",
                               "is missing" if key not in arch else f"must be a {kind.__name__}")
        if not _positive_ints(self.patch_size, 3):
            raise _problem(source, "patch_size", f"must be three positive integers D H W, got {self.patch_size!r}")
        if self.recommended_downstream_patchsize is not None and not _positive_ints(
                self.recommended_downstream_patchsize, 3):
            raise _problem(source, "recommended_downstream_patchsize",
                           f"must be three positive integers, got {self.recommended_downstream_patchsize!r}")
        pre = self.preprocessing
        if not isinstance(pre, dict):
            raise _problem(source, "preprocessing", f"must be an object, got {type(pre).__name__}")
        scheme = pre.get("nnunet_normalization_scheme")
        if scheme not in NORMALIZATION_SCHEMES:
            raise _problem(source, "preprocessing.nnunet_normalization_scheme",
                           "is missing" if scheme is None else f"must be one of {list(NORMALIZATION_SCHEMES)}, got "
                                                               f"{scheme!r}")
        spacing = pre.get("spacing")
        if spacing is not None and not (isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(
                isinstance(s, (int, float)) and s > 0 for s in spacing)):
            raise _problem(source, "preprocessing.spacing",
                           f"must be null (native spacing) or three positive numbers in mm, got {spacing!r}")
        channels = self.pretrain_num_input_channels
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise _problem(source, "pretrain_num_input_channels", f"must be an integer >= 1, got {channels!r}")
        if self.weights_file is not None and (not isinstance(self.weights_file, str) or "/" in self.weights_file):
            raise _problem(source, "weights_file", f"must be the weights' file name next to the plan, got "
                                                   f"{self.weights_file!r}")
        for name in ("key_to_encoder", "key_to_stem", "trainer_name"):
            if not isinstance(getattr(self, name), str):
                raise _problem(source, name, f"must be a string, got {getattr(self, name)!r}")
        proj = self.keys_to_in_proj
        if not (isinstance(proj, (list, tuple)) and proj and all(isinstance(k, str) for k in proj)):
            raise _problem(source, "keys_to_in_proj", f"must be a non-empty list of state-dict prefixes, got "
                                                      f"{proj!r}")
        if not isinstance(self.volume_fusion, dict):
            raise _problem(source, "volume_fusion", f"must be an object, got {type(self.volume_fusion).__name__}")
        if network_table_layout(arch["arch_class_name"]) is not None:
            from nnunetv2_vf.architectures.pctnet import TABLE_LAYOUT_FIX, table_layout_problem
            problem = table_layout_problem(self.pctnet_table_layout,
                                           f"adaptation plan {source} (network {arch['arch_class_name']})")
            if problem:
                raise AdaptationPlanError(f"{problem}\nFix: {TABLE_LAYOUT_FIX}, then run nnUNetv2_vf_adapt_plans "
                                          f"with the adaptation_plan.json written next to the new weights")
        return self

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return json.loads(json.dumps({**asdict(self), "format": FORMAT}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "(in memory)") -> "AdaptationPlan":
        if not isinstance(data, dict):
            raise AdaptationPlanError(f"adaptation plan {source} is not a JSON object (got {type(data).__name__}); "
                                      f"give the adaptation_plan.json that nnUNetv2_vf_pretrain or "
                                      f"nnUNetv2_vf_convert_misfm wrote")
        if "format" not in data:
            raise AdaptationPlanError(
                f"adaptation plan {source}: field 'format' is missing, so this is not an adaptation plan of "
                f"nnUNetv2_vf_pretrain / nnUNetv2_vf_convert_misfm (expected e.g. \"format\": \"{FORMAT}\"); give "
                f"OUTPUT_DIR/adaptation_plan.json of the pretraining run")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        for name in required:
            if name not in data:
                raise _problem(source, name, "is missing")
        values = {k: v for k, v in data.items() if k in known}
        # formats 1 and 2 have no pctnet_table_layout: validate() refuses them for a network with such tables
        if data["format"] == FORMAT_V1:  # v1: the same fields; it recorded only the variant and K of the task
            values["volume_fusion"] = dict(data.get("volume_fusion") or {})
            values["format"] = FORMAT_V1
        plan = cls(**values).validate(source)
        plan.format = FORMAT  # validated: from now on it is a current plan
        return plan

    @classmethod
    def from_json(cls, text: str, source: str = "(in memory)") -> "AdaptationPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdaptationPlanError(f"adaptation plan {source} is not valid JSON ({e}); {_FIX}") from e
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AdaptationPlan":
        """Read ``path`` (a plan file, or a pretraining output folder holding ``adaptation_plan.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"adaptation plan {path} not found; it is written by nnUNetv2_vf_pretrain (or "
                                    f"nnUNetv2_vf_convert_misfm) into its output folder")
        return cls.from_json(path.read_text(), str(path))

    def save(self, path: str | os.PathLike) -> Path:
        from nnunetv2_vf.checkpoint_io import atomic_write
        path = Path(path)
        text = self.to_json().encode()
        atomic_write(path, lambda f: f.write(text), "adaptation plan")
        return path



def plan_recorded_in_plans(plans: dict, configuration: str) -> Optional[AdaptationPlan]:
    """The adaptation plan ``nnUNetv2_vf_adapt_plans`` recorded in ``plans['pretrain_info']``, validated, or None for
    plans that were not adapted (a from-scratch run). Raises :class:`AdaptationPlanError` when the record is damaged
    or when ``configuration``'s network is no longer the pretrained one (plans edited by hand or by another tool)."""
    info = plans.get("pretrain_info")
    if not isinstance(info, dict) or info.get("source") != "nnunetv2_vf":
        return None
    source = f"pretrain_info.adaptation_plan of plans {plans.get('plans_name', '?')!r}"
    fix = ("write the plans again with nnUNetv2_vf_adapt_plans -d DATASET -a PRETRAIN_DIR/adaptation_plan.json "
           "-p NEW_PLANS_NAME, then nnUNetv2_preprocess -plans_name NEW_PLANS_NAME")
    if "adaptation_plan" not in info:
        raise AdaptationPlanError(f"{source} is missing: {fix}")
    plan = AdaptationPlan.from_dict(info["adaptation_plan"], source)
    if info.get("configuration", configuration) != configuration:
        return plan  # the plans were adapted for another configuration; this one trains from its own network
    from nnunetv2_vf.plans import effective_configuration
    arch = effective_configuration(plans, configuration).get("architecture", {})
    expected = plan.architecture_plans.get("arch_class_name")
    if arch.get("network_class_name") != expected:
        raise AdaptationPlanError(
            f"configuration {configuration!r} of plans {plans.get('plans_name', '?')!r} builds "
            f"{arch.get('network_class_name')} but its recorded pretraining used {expected}: the pretrained weights "
            f"cannot initialise it; {fix}")
    return plan
