"""nnU-Net trainers for cross-dimensional transfer (Messaoudi et al., MedIA 2023).

* ``EncoderUNet2DTrainer`` (``2d``): Omnia-Net — a timm ImageNet encoder inside a 2D U-Net.
* ``EncoderUNet3DTrainer`` (``3d_fullres``): DX-Net — the 2D network inflated to 3D. Initialised from ImageNet
  weights (inflated), or from a whole trained ``EncoderUNet2DTrainer`` network (encoder AND decoder inflated):
  ``nnUNetv2_vf_inflate_checkpoint`` (:mod:`nnunetv2_vf.inflate_checkpoint`) converts the 2D checkpoint_final.pth
  into a 3D one that nnU-Net's own ``-pretrained_weights`` loader accepts.
* ``DepthStackUNetTrainer`` (``3d_fullres``): DS-Net — 3D depth encoder + per-channel 2D Omnia-Net + 3D decoder.

The network lives in the plans, as everywhere in nnU-Net: ``nnUNetv2_vf_plan_network`` (:mod:`nnunetv2_vf.plan_network`)
writes a plans file (``-p``) whose configuration names the network (``architecture``: encoder, norm, inflation) and
the ImageNet weight file (``encoder_init``).  The trainers read only the plans; on plans that name no encoder U-Net
(nnU-Net's own ``nnUNetPlans``) they use the documented defaults: encoder ``efficientnet_lite0``, ``batch`` norm,
``i3d`` inflation, random init (loud warning).  The choice is written into the plans dict before
``nnUNetTrainer.__init__``, so the model folder's ``plans.json`` rebuilds exactly the trained network for prediction,
``--c``, ``find_best_configuration``, ensembling and ``export_model_to_zip``; runs with different ``-p`` land in
different results folders.

Optimiser: AdamW (wd 1e-4) with poly decay, lr 1e-3 for the new parts and 1e-4 (``encoder_lr_factor``) for the
pretrained encoder, instead of nnU-Net's SGD 1e-2/momentum 0.99, which wrecks pretrained features in the first
epochs.
"""
from __future__ import annotations

import copy
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_vf.architectures.encoder_unet import check_timm_encoder_name
from nnunetv2_vf.architectures.imagenet_weights import PYPI_WEIGHT_PACKAGES
from nnunetv2_vf.checkpoint_io import read_weights_file
from nnunetv2_vf.plans import effective_configuration
from nnunetv2_vf.trainers.lr_schedule import WarmupPolyLRScheduler
from nnunetv2_vf.trainers.progress import ProgressLines
from nnunetv2_vf.trainers.safeguards import AtomicCheckpoints, PretrainedWeightsCheck
from nnunetv2_vf.trainers.variants import NoMirroring, TrainingBudget

__all__ = ["EncoderUNet2DTrainer", "EncoderUNet2DTrainer_2epochs", "EncoderUNet2DTrainer_5epochs",
           "EncoderUNet2DTrainer_20epochs", "EncoderUNet3DTrainer_10epochs",
           "EncoderUNet3DTrainer", "EncoderUNet3DTrainer_2epochs", "DepthStackUNetTrainer",
           "DepthStackUNetTrainer_2epochs",
           "with_encoder_unet_architecture", "inflate_2d_checkpoint", "check_encoder_choice", "PYPI_LITE0",
           "DEFAULT_ENCODER", "NORMS", "INFLATIONS", "PLAN_COMMAND"]

PYPI_LITE0 = "efficientnet-lite0-pypi"
DEFAULT_ENCODER = "efficientnet_lite0"
NORMS = ("batch", "instance")
INFLATIONS = ("i3d", "centre")
PLAN_COMMAND = "nnUNetv2_vf_plan_network"
ARCH_MODULE = "nnunetv2_vf.architectures.encoder_unet"
PROVENANCE_KEY = "encoder_init"


def check_encoder_choice(encoder_name: str, weights: str | None, norm: str, inflation: str | None = None) -> None:
    """Refuse, naming the ``nnUNetv2_vf_plan_network`` option to fix, a choice the network or its weights cannot
    honour: unknown timm encoder, missing weight file, packaged weights of another encoder, unknown norm/inflation.
    Run when the plans are written AND when a trainer reads them (a weight file may have moved since)."""
    check_timm_encoder_name(encoder_name)
    if weights is not None:
        packaged = PYPI_WEIGHT_PACKAGES.get(str(weights))
        if packaged is None and not os.path.isfile(weights):
            raise FileNotFoundError(f"encoder weights {weights!r} (--weights of {PLAN_COMMAND}, recorded in the plans' "
                                    f"{PROVENANCE_KEY}) is not a file: give a local ImageNet checkpoint of "
                                    f"{encoder_name!r} (a state_dict .pth/.safetensors), or {PYPI_LITE0!r} with "
                                    f"--encoder efficientnet_lite0, or leave --weights out for a random encoder; "
                                    f"then write the plans again ({PLAN_COMMAND} ... --overwrite).")
        if packaged is not None and packaged[0] != encoder_name:
            raise ValueError(f"--weights {weights} holds {packaged[0]} weights but the encoder is {encoder_name!r}: "
                             f"use --encoder {packaged[0]}, or give a local checkpoint of {encoder_name!r}.")
    if norm not in NORMS:
        raise ValueError(f"--norm must be one of {NORMS} (arch_kwargs['norm'] in the plans), got {norm!r}.")
    if inflation is not None and inflation not in INFLATIONS:
        raise ValueError(f"--inflation must be one of {INFLATIONS} (arch_kwargs['inflation'] in the plans), got "
                         f"{inflation!r}.")


def with_encoder_unet_architecture(plans: dict, configuration: str, network: str, encoder_name: str,
                                   encoder_weights: str | None, batch_size: int | None = None,
                                   patch_size=None, **arch_kwargs) -> dict:
    """Copy of ``plans`` whose ``configuration`` builds ``nnunetv2_vf.architectures.encoder_unet.<network>``.

    ``strides`` come from the configuration's own architecture (nnU-Net's pool_op_kernel_sizes), so deep-supervision
    scales and patch divisibility stay those nnU-Net planned.  The encoder choice and weight file are recorded under
    ``configurations[c]['encoder_init']`` for provenance.
    """
    plans = copy.deepcopy(plans)
    effective = effective_configuration(plans, configuration)
    cfg = plans["configurations"][configuration]
    if patch_size is not None:
        cfg["patch_size"] = [int(p) for p in patch_size]
    if batch_size is not None:
        cfg["batch_size"] = int(batch_size)
    patch = cfg.get("patch_size", effective["patch_size"])
    dim = len(patch)
    expected_dim = 2 if network == "EncoderUNet2D" else 3
    if dim != expected_dim:
        raise ValueError(f"{network} needs a {expected_dim}D configuration but {configuration!r} is {dim}D: train "
                         f"{'2d' if expected_dim == 2 else '3d_fullres'} with this trainer "
                         f"({'EncoderUNet2DTrainer' if dim == 2 else 'EncoderUNet3DTrainer / DepthStackUNetTrainer'}"
                         f" for {configuration!r}).")
    arch = effective["architecture"]
    old = arch["arch_kwargs"]
    strides = [list(map(int, s)) for s in old["strides"]]
    kwargs = {"strides": strides, "encoder_name": encoder_name, **arch_kwargs}
    if network == "EncoderUNet3D":
        kwargs["kernel_sizes"] = [list(map(int, k)) for k in old.get("kernel_sizes", [[3, 3, 3]] * len(strides))]
    if network == "DepthStackUNet":
        kwargs["patch_size"] = list(map(int, patch))
    cfg["architecture"] = {"network_class_name": f"{ARCH_MODULE}.{network}", "arch_kwargs": kwargs,
                           "_kw_requires_import": []}
    cfg[PROVENANCE_KEY] = {"encoder_name": encoder_name, "encoder_weights": encoder_weights}
    return plans


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    network = getattr(network, "module", network)  # DDP
    return getattr(network, "_orig_mod", network)  # torch.compile


class _EncoderUNetTrainerBase(PretrainedWeightsCheck, AtomicCheckpoints, ProgressLines, nnUNetTrainer):
    network_name = "EncoderUNet2D"
    default_encoder = DEFAULT_ENCODER
    input_adaptation = "timm"
    drop_path_rate = 0.1
    encoder_lr_factor = 0.1
    cpu_batch_size: int | None = None  # tiny variants: override the planned batch size
    cpu_patch_size = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # before nnUNetTrainer.__init__: only these plans reach the model folder's plans.json (prediction, --c)
        plans, weights = self.encoder_unet_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.encoder_weights = weights
        self.encoder_name = effective_configuration(plans, configuration)["architecture"]["arch_kwargs"][
            "encoder_name"]
        self.initial_lr = 1e-3
        self.weight_decay = 1e-4

    @classmethod
    def encoder_unet_plans(cls, plans: dict, configuration: str) -> tuple[dict, str | None]:
        """The plans this trainer trains with and the ImageNet weight file; no side effects.

        Plans written by ``nnUNetv2_vf_plan_network`` for this network are used as they are (only the ``cpu_*``
        batch/patch of tiny variants applied); plans of nnU-Net's own networks get :meth:`default_arch_kwargs` and
        no weights.  ``nnUNetv2_vf_inflate_checkpoint`` builds its network from them, exactly as training will."""
        planned = cls.planned_architecture(plans, configuration)
        if planned is None:
            kwargs, encoder_name, weights = cls.default_arch_kwargs(), cls.default_encoder, None
        else:
            kwargs = {k: v for k, v in planned["arch_kwargs"].items()
                      if k not in ("strides", "kernel_sizes", "patch_size")}  # rederived from the configuration
            encoder_name = kwargs.pop("encoder_name", cls.default_encoder)
            init = effective_configuration(plans, configuration).get(PROVENANCE_KEY) or {}
            weights = init.get("encoder_weights")
        check_encoder_choice(encoder_name, weights, kwargs.get("norm", "batch"), kwargs.get("inflation"))
        plans = with_encoder_unet_architecture(plans, configuration, cls.network_name, encoder_name, weights,
                                               cls.cpu_batch_size, cls.cpu_patch_size, **kwargs)
        return plans, weights

    @classmethod
    def planned_architecture(cls, plans: dict, configuration: str) -> dict | None:
        """The configuration's ``architecture`` if it builds this trainer's network; None for nnU-Net's own
        networks (the defaults apply); a readable error for another plugin network (e.g. DS-Net plans given to the
        DX-Net trainer), which would otherwise be silently replaced."""
        arch = effective_configuration(plans, configuration).get("architecture", {})
        name = arch.get("network_class_name", "")
        if name == f"{ARCH_MODULE}.{cls.network_name}":
            return arch
        if name.startswith("nnunetv2_vf."):
            plans_name = plans.get("plans_name", "these plans")
            raise ValueError(f"{plans_name} ({configuration}) build {name.rsplit('.', 1)[-1]}, but {cls.__name__} "
                             f"trains {cls.network_name}: train them with the trainer of that network, or write "
                             f"plans for this one: {PLAN_COMMAND} -d DATASET -c {configuration} --network "
                             f"{cls.network_name} -p NEW_PLANS, then train with -p NEW_PLANS.")
        return None

    @classmethod
    def default_arch_kwargs(cls) -> dict:
        """The network options beyond encoder and strides, as ``nnUNetv2_vf_plan_network`` writes them by default
        and as this trainer uses on plans that name no encoder U-Net."""
        return {"norm": "batch", "input_adaptation": cls.input_adaptation, "drop_path_rate": cls.drop_path_rate}

    # ---- weights -------------------------------------------------------------------------------------------------
    def initialize(self):
        first = not self.was_initialized
        super().initialize()
        if first:
            self._load_imagenet_encoder()

    def _imagenet_target(self) -> torch.nn.Module:
        """The 2D module whose ``encoder`` receives ImageNet weights."""
        return _unwrap(self.network)

    def _load_imagenet_encoder(self):
        if self.encoder_weights is None:
            banner = "#" * 100
            dataset = self.plans_manager.dataset_name
            self.print_to_log_file(
                f"\n{banner}\nWARNING: the plans name no ImageNet weights ({PROVENANCE_KEY}): the {self.network_name} "
                f"encoder is RANDOMLY INITIALISED (no ImageNet transfer). For ImageNet weights write plans with "
                f"{PLAN_COMMAND} -d {dataset} -c {self.configuration_name} --network {self.network_name} --encoder "
                f"{self.encoder_name} --weights PATH|{PYPI_LITE0} -p NEW_PLANS and train with -p NEW_PLANS.\n{banner}",
                also_print_to_console=True)
            return
        from nnunetv2_vf.architectures.imagenet_weights import load_encoder_weights

        load_encoder_weights(self._imagenet_target().encoder, self.encoder_weights)
        self.print_to_log_file(f"ImageNet encoder weights loaded from {self.encoder_weights}",
                               also_print_to_console=True)

    # ---- optimisation --------------------------------------------------------------------------------------------
    def _encoder_parameter_names(self) -> set[str]:
        return {n for n, _ in _unwrap(self.network).named_parameters() if n.startswith("encoder.")}

    def configure_optimizers(self):
        encoder_names = self._encoder_parameter_names()
        # new parts first: nnU-Net logs the lr of param_groups[0]
        groups = {("new", True): [], ("new", False): [], ("enc", True): [], ("enc", False): []}
        for name, p in _unwrap(self.network).named_parameters():
            if p.requires_grad:
                groups[("enc" if name in encoder_names else "new", p.ndim > 1)].append(p)
        param_groups = [{"params": params, "lr": self.initial_lr * (self.encoder_lr_factor if part == "enc" else 1),
                         "weight_decay": self.weight_decay if decay else 0.0}
                        for (part, decay), params in groups.items() if params]
        optimizer = torch.optim.AdamW(param_groups, lr=self.initial_lr)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.num_epochs)


class EncoderUNet2DTrainer(_EncoderUNetTrainerBase):
    """Omnia-Net in nnU-Net's ``2d`` configuration."""


class EncoderUNet3DTrainer(_EncoderUNetTrainerBase):
    """DX-Net in ``3d_fullres``: an inflated EncoderUNet2D.  To start from a trained 2D network, convert its
    checkpoint with ``nnUNetv2_vf_inflate_checkpoint`` and pass the converted file to ``-pretrained_weights``."""

    network_name = "EncoderUNet3D"

    @classmethod
    def default_arch_kwargs(cls) -> dict:
        return {**super().default_arch_kwargs(), "inflation": INFLATIONS[0]}

    def _load_imagenet_encoder(self):
        if self.encoder_weights is None:
            return super()._load_imagenet_encoder()
        from nnunetv2_vf.architectures.imagenet_weights import load_encoder_weights

        net3d = _unwrap(self.network)
        net2d = net3d.planar_counterpart()
        load_encoder_weights(net2d.encoder, self.encoder_weights)
        net3d.load_inflated(net2d.state_dict(), only_prefix="encoder.")
        self.print_to_log_file(f"ImageNet encoder weights loaded from {self.encoder_weights} and inflated "
                               f"({net3d.inflation})", also_print_to_console=True)

    def load_2d_checkpoint(self, fname: str, ckpt: dict | None = None) -> None:
        """Initialise the whole network (encoder, decoder, classifiers) by inflating an EncoderUNet2DTrainer
        checkpoint of the same dataset (``ckpt``: its already loaded content).  For Python use after
        ``initialize()``; from the command line use ``nnUNetv2_vf_inflate_checkpoint`` + ``-pretrained_weights``."""
        ckpt = load_2d_checkpoint_file(fname) if ckpt is None else ckpt
        net3d = _unwrap(self.network)
        loaded = inflate_2d_checkpoint(net3d, ckpt, fname, self.plans_manager.dataset_name)
        self.print_to_log_file(f"Initialised {len(loaded)} tensors (encoder AND decoder) by {net3d.inflation} "
                               f"inflation of the 2D network in {fname}", also_print_to_console=True)


def inflate_2d_checkpoint(net3d: torch.nn.Module, ckpt: dict, fname: str, dataset_name: str,
                          configuration: str = "3d_fullres") -> list[str]:
    """Check that the EncoderUNet2DTrainer checkpoint ``ckpt`` (loaded from ``fname``) fits the EncoderUNet3D
    ``net3d`` of dataset ``dataset_name``, then load it inflated (encoder, decoder and classifiers); returns the
    loaded keys.  Raises ValueError naming the problem (wrong dataset, not an EncoderUNet2D, other encoder/norm/input
    adaptation, other class count) and the fix, before any weight is changed.  Used by
    ``EncoderUNet3DTrainer.load_2d_checkpoint`` and ``nnUNetv2_vf_inflate_checkpoint``."""
    fix = (f"train the 2d configuration of {dataset_name} with EncoderUNet2DTrainer and convert its "
           f"fold_X/checkpoint_final.pth")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{fname} holds no 'network_weights' (found {keys}); it is not an nnU-Net checkpoint: {fix}.")
    init_args = ckpt.get("init_args") or {}
    src_plans = init_args.get("plans") or {}
    src_cfg = init_args.get("configuration")
    if src_plans.get("dataset_name") not in (None, dataset_name):
        raise ValueError(f"{fname} was trained on {src_plans.get('dataset_name')}, the 3D network is for "
                         f"{dataset_name}: {fix}.")
    src_arch = {}
    if src_cfg is not None and src_plans:
        src_arch = effective_configuration(src_plans, src_cfg).get("architecture", {})
        if src_arch.get("network_class_name") != f"{ARCH_MODULE}.EncoderUNet2D":
            raise ValueError(f"{fname} holds a {src_arch.get('network_class_name')} ({src_cfg}, trainer "
                             f"{ckpt.get('trainer_name')}), not an EncoderUNet2D: {fix}.")
    if not _is_2d_checkpoint(ckpt):
        raise ValueError(f"{fname} holds no 2D encoder U-Net weights (no 4D decoder/encoder kernels; a 3D or "
                         f"another network's checkpoint?): {fix}.")
    src_kwargs = src_arch.get("arch_kwargs", {})
    for key, option in (("encoder_name", "--encoder"), ("norm", "--norm"), ("input_adaptation", None)):
        if key in src_kwargs and src_kwargs[key] != getattr(net3d, key):
            how = (f"write 3D plans with {PLAN_COMMAND} -d {dataset_name} -c {configuration} --network EncoderUNet3D "
                   f"{option} {src_kwargs[key]} -p NEW_PLANS and give -p NEW_PLANS to the conversion AND the 3D "
                   f"training") if option else "use the same trainer family for 2D and 3D"
            raise ValueError(f"the 2D checkpoint {fname} has {key}={src_kwargs[key]!r} but the 3D network "
                             f"({configuration}) has {key}={getattr(net3d, key)!r}: {how}, or {fix}.")
    weights = ckpt["network_weights"]
    heads = weights.get("decoder.seg_layers.0.weight")
    if heads is not None and heads.shape[0] != net3d.num_classes:
        raise ValueError(f"the 2D checkpoint {fname} predicts {heads.shape[0]} outputs, {dataset_name} needs "
                         f"{net3d.num_classes} (classes of its dataset.json): {fix}.")
    return net3d.load_inflated(weights)


def load_2d_checkpoint_file(fname: str) -> dict:
    """An EncoderUNet2DTrainer checkpoint_final.pth (tensors and plain data only; nothing else is unpickled)."""
    return read_weights_file(fname, "2D checkpoint",
                             "give the checkpoint_final.pth of an EncoderUNet2DTrainer run (nnUNet_results/<dataset>/"
                             "EncoderUNet2DTrainer__*__2d/fold_X/checkpoint_final.pth)",
                             "re-export it from the 2D training", allow_numpy=True)


def _is_2d_checkpoint(ckpt: dict) -> bool:
    weights = ckpt.get("network_weights", {}) if isinstance(ckpt, dict) else {}
    return any(k.startswith("decoder.") for k in weights) and any(
        v.ndim == 4 for k, v in weights.items() if k.endswith(".weight"))


class DepthStackUNetTrainer(_EncoderUNetTrainerBase):
    """DS-Net in ``3d_fullres``.  ImageNet weights go to the inner 2D Omnia-Net; no deep supervision."""

    network_name = "DepthStackUNet"
    depth_features = 8

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @classmethod
    def default_arch_kwargs(cls) -> dict:
        return {"norm": "batch", "drop_path_rate": cls.drop_path_rate, "depth_features": cls.depth_features}

    def _imagenet_target(self) -> torch.nn.Module:
        return _unwrap(self.network).omnia

    def _encoder_parameter_names(self) -> set[str]:
        return {n for n, _ in _unwrap(self.network).named_parameters() if n.startswith("omnia.encoder.")}

    def set_deep_supervision_enabled(self, enabled: bool):
        _unwrap(self.network).decoder.deep_supervision = False


class _Tiny(NoMirroring, TrainingBudget):
    """CPU-sized variant: 2 epochs of 4 iterations, 2 validation iterations, no mirroring."""

    budget = (2, 4, 2)


class EncoderUNet2DTrainer_2epochs(_Tiny, EncoderUNet2DTrainer):
    cpu_batch_size = 8


class EncoderUNet3DTrainer_2epochs(_Tiny, EncoderUNet3DTrainer):
    cpu_batch_size = 2
    cpu_patch_size = (24, 32, 24)  # inflated depthwise 3x3x3 convs are slow on CPU


class DepthStackUNetTrainer_2epochs(_Tiny, DepthStackUNetTrainer):
    cpu_batch_size = 2


class EncoderUNet2DTrainer_5epochs(TrainingBudget, EncoderUNet2DTrainer):
    """CPU-sized comparison budget (benchmarks/imagenet_init_accuracy.py): 5 epochs x 10 iterations, batch 16."""

    cpu_batch_size = 16
    budget = (5, 10, 2)


class EncoderUNet2DTrainer_20epochs(NoMirroring, TrainingBudget, EncoderUNet2DTrainer):
    """CPU study size (benchmarks/imagenet_init_accuracy.py): 20 epochs x 25 iterations of batch 16, no mirroring."""

    cpu_batch_size = 16
    budget = (20, 25, 5)


class EncoderUNet3DTrainer_10epochs(NoMirroring, TrainingBudget, EncoderUNet3DTrainer):
    """CPU study size for DX-Net: 10 epochs x 15 iterations of batch 2 at 24x32x24, no mirroring."""

    cpu_batch_size = 2
    cpu_patch_size = (24, 32, 24)
    budget = (10, 15, 3)
