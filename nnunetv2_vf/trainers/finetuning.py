"""Fine-tuning options as trainer mixins: encoder-only loading, a frozen encoder for the first epochs or for the whole
run, a lower learning rate for the encoder, and a lower peak learning rate.  Each is one idea, selected by trainer
name (``-tr VFPretrainedTrainer_encoderOnly``), so it is recorded in the model folder's name and, with its setting,
in ``debug.json``.

nnU-Net's ``-pretrained_weights`` loader always loads every tensor except ``.seg_layers.`` (it asserts that each key
is present) right after ``initialize()`` and before ``run_training()``; the trainer never sees the file.  The mixins
therefore act on what that loader left in the network, in ``on_train_start`` / ``on_train_epoch_start`` /
``configure_optimizers``, without touching nnU-Net's code.

Place them before the trainer class, like :mod:`nnunetv2_vf.trainers.variants`::

    class MyTrainer(FreezeEncoder, EncoderLearningRate, VFPretrainedTrainer):
        freeze_encoder_epochs = 20
        encoder_lr_factor = 0.1

Which tensors are "the encoder" is decided in one place, :func:`encoder_modules`.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_vf.trainers.lr_schedule import WarmupPolyLRScheduler

__all__ = ["EncoderOnlyLoading", "FreezeEncoder", "FrozenEncoderWholeRun", "EncoderLearningRate", "PeakLearningRate",
           "encoder_modules", "encoder_parameters", "encoder_tensor_names", "unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def encoder_modules(network: nn.Module) -> list[nn.Module]:
    """The modules that a pretraining run transfers as "the encoder" (everything else is decoder or classifier).

    The network declares them (:func:`nnunetv2_vf.pretrain.adaptation_plan.network_keys`: its ``key_to_stem`` and
    ``key_to_encoder``): PCT-Net's multi-scale stem and PCT encoder (``stem.``, ``encoder.``), nnU-Net's
    ``encoder.stages`` (PlainConvUNet's stem is its stage 0) and ResidualEncoderUNet's ``encoder.stem``.
    """
    from nnunetv2_vf.pretrain.adaptation_plan import network_keys

    net = unwrap_network(network)
    cls = type(net)
    try:
        keys = network_keys(net)
        return [net.get_submodule(k) for k in dict.fromkeys((keys.key_to_stem, keys.key_to_encoder))]
    except (ValueError, AttributeError) as e:
        raise TypeError(f"the fine-tuning options (_encoderOnly, _freezeEncoder, _encoderLr) need to know which "
                        f"part of {cls.__name__} is the encoder: {e}") from e


def encoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters, each once (a declared stem may lie inside the declared encoder)."""
    return list({id(p): p for m in encoder_modules(network) for p in m.parameters()}.values())


def encoder_tensor_names(network: nn.Module) -> set[str]:
    """``state_dict`` keys of the encoder's parameters and buffers.

    Decided by tensor identity, not by prefix: dynamic_network_architectures' decoder keeps a reference to the
    encoder, so the same tensors also appear as ``decoder.encoder.*`` keys and must count as encoder there too.
    """
    owned = {id(t) for m in encoder_modules(network) for t in (*m.parameters(), *m.buffers())}
    return {k for k, t in unwrap_network(network).state_dict(keep_vars=True).items() if id(t) in owned}


def _prefixes(names) -> str:
    """``decoder.up0, decoder.seg_layers, ...``: a short summary of many keys for the log."""
    heads = sorted({".".join(n.split(".")[:2]) for n in names})
    return ", ".join(heads[:12]) + (f", ... ({len(heads)} groups)" if len(heads) > 12 else "")


class EncoderOnlyLoading:
    """Load only the pretrained encoder: decoder and classifiers start from their fresh initialisation.

    ``initialize()`` keeps a CPU copy of the freshly initialised network; nnU-Net's loader then overwrites all of
    it; ``on_train_start()`` puts the non-encoder tensors back.  This happens only when pretrained weights were
    loaded (some encoder tensor differs from its fresh value) and the run is not a ``--c`` continuation, whose
    checkpoint holds the already fine-tuned decoder.  Restoring draws no random numbers, so the ``_seedN`` twins
    see the same data as the other arms.
    """

    def initialize(self):
        first = not self.was_initialized
        super().initialize()
        if first:
            state = unwrap_network(self.network).state_dict()
            self._fresh_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._fresh_state = None  # continuing: the checkpoint's decoder is the one to keep

    def on_train_start(self):
        fresh = getattr(self, "_fresh_state", None)
        self._fresh_state = None  # also keeps nnU-Net's debug.json (str of every attribute) small
        if fresh is not None:
            self.reset_non_encoder(fresh)
        super().on_train_start()

    def reset_non_encoder(self, fresh: dict) -> list[str]:
        """Restore every non-encoder tensor from ``fresh`` if the encoder differs from it; returns the reset keys."""
        net = unwrap_network(self.network)
        encoder = encoder_tensor_names(net)
        current = net.state_dict()
        loaded = any(not torch.equal(current[k].cpu(), fresh[k]) for k in encoder)
        if not loaded:
            self.print_to_log_file("EncoderOnlyLoading: the encoder holds its fresh initialisation (no "
                                   "-pretrained_weights?), nothing to reset", also_print_to_console=True)
            return []
        reset = sorted(k for k in current if k not in encoder)
        with torch.no_grad():
            for k in reset:
                current[k].copy_(fresh[k])
        self.print_to_log_file(f"EncoderOnlyLoading: kept {len(encoder)} pretrained encoder tensors "
                               f"({_prefixes(encoder)}); reset {len(reset)} non-encoder tensors to their fresh "
                               f"initialisation ({_prefixes(reset)})", also_print_to_console=True)
        return reset


class FreezeEncoder:
    """Decoder-first fine-tuning: the encoder is frozen for the first ``freeze_encoder_epochs`` epochs, then trained.

    Frozen means ``requires_grad=False`` (no gradient, so neither the optimiser step nor weight decay touches it)
    and its BatchNorm layers in eval mode (their running statistics stay the pretrained ones; nnU-Net's
    InstanceNorm keeps none).  The optimiser is built with all parameters beforehand, so unfreezing needs no new
    optimiser.  The state is derived from the epoch number each epoch, so ``--c`` continues on schedule.
    """

    freeze_encoder_epochs: int = 0

    def on_train_start(self):
        n = self.freeze_encoder_epochs
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{type(self).__name__}.freeze_encoder_epochs must be an integer >= 0, got {n!r}")
        if n >= self.num_epochs:
            raise ValueError(f"{type(self).__name__} freezes the encoder for {n} epochs but trains only "
                             f"{self.num_epochs}: the encoder would never be trained. Choose a variant with fewer "
                             f"frozen epochs (or more epochs).")
        if n and self.is_ddp:
            # DDP's reducer is built in initialize() with every parameter; parameters that stop receiving
            # gradients afterwards make it fail in the next iteration
            raise RuntimeError(f"{type(self).__name__} cannot freeze parameters under multi-GPU (DDP) training; "
                               f"train on one GPU, or use the _encoderLr variant (a lower encoder lr) instead")
        self._encoder_frozen = None
        super().on_train_start()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # sets network.train()
        self.set_encoder_frozen(self.current_epoch < self.freeze_encoder_epochs)

    def set_encoder_frozen(self, frozen: bool) -> None:
        params = encoder_parameters(self.network)
        for p in params:
            p.requires_grad_(not frozen)
        if frozen:
            for m in encoder_modules(self.network):
                for sub in m.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()
        if frozen != getattr(self, "_encoder_frozen", None):
            count = sum(p.numel() for p in params)
            if frozen:
                self.print_to_log_file(f"FreezeEncoder: encoder frozen ({count} parameters) for epochs 0-"
                                       f"{self.freeze_encoder_epochs - 1}, decoder training only",
                                       also_print_to_console=True)
            elif getattr(self, "_encoder_frozen", None) is not None or self.freeze_encoder_epochs:
                self.print_to_log_file(f"FreezeEncoder: encoder unfrozen at epoch {self.current_epoch} ({count} "
                                       f"parameters train from now on)", also_print_to_console=True)
        self._encoder_frozen = frozen


class EncoderLearningRate:
    """Layer-wise learning rate: encoder lr = ``encoder_lr_factor`` x the trainer's lr for everything else.

    Every parameter group of the trainer's optimiser is split into its non-encoder part (first: nnU-Net logs and
    plots ``param_groups[0]``'s lr) and its encoder part with the scaled lr; other group settings (weight decay)
    are kept.  The scheduler must keep per-group ratios (:class:`WarmupPolyLRScheduler`, used by every plugin
    trainer); nnU-Net's PolyLRScheduler would set one lr for all groups.
    """

    encoder_lr_factor: float = 1.0

    def configure_optimizers(self):
        factor = self.encoder_lr_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1e3:
            raise ValueError(f"{type(self).__name__}.encoder_lr_factor must be a number in (0, 1000], got "
                             f"{factor!r}")
        optimizer, scheduler = super().configure_optimizers()
        if not isinstance(scheduler, WarmupPolyLRScheduler):
            raise TypeError(f"{type(self).__name__}: EncoderLearningRate needs a scheduler that keeps per-group lrs "
                            f"(WarmupPolyLRScheduler), but the trainer uses {type(scheduler).__name__}; return "
                            f"WarmupPolyLRScheduler(optimizer, self.num_epochs) from configure_optimizers")
        encoder = {id(p) for p in encoder_parameters(self.network)}
        old = list(optimizer.param_groups)
        new, enc = [], []
        for group in old:
            settings = {k: v for k, v in group.items() if k != "params"}
            new.append({**settings, "params": [p for p in group["params"] if id(p) not in encoder]})
            enc.append({**settings, "params": [p for p in group["params"] if id(p) in encoder],
                        "lr": group["lr"] * factor, "initial_lr": group.get("initial_lr", group["lr"]) * factor})
        optimizer.param_groups.clear()  # no step taken yet, so there is no per-parameter state to move
        for group in new + enc:
            if group["params"]:
                optimizer.add_param_group(group)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        n_enc = sum(p.numel() for g in enc for p in g["params"])
        self.print_to_log_file(f"EncoderLearningRate: encoder lr = {factor:g} x lr ({n_enc} parameters in "
                               f"{sum(1 for g in enc if g['params'])} group(s) after the "
                               f"{sum(1 for g in new if g['params'])} non-encoder group(s))",
                               also_print_to_console=True)
        return optimizer, scheduler


class FrozenEncoderWholeRun:
    """The encoder is frozen for the whole run: only decoder and classifiers train, on top of fixed encoder features.

    For comparing encoders as feature extractors, e.g. a VF-pretrained against a random one: without
    ``-pretrained_weights`` the frozen encoder is the random initialisation, so the same trainer is the control arm.

    Frozen means ``requires_grad=False`` for every encoder parameter from ``on_train_start`` (after nnU-Net's
    ``-pretrained_weights`` loader, and again on a ``--c`` continuation): no gradient, so neither the optimiser step
    nor weight decay moves them.  Its BatchNorm layers stay in train mode, as nnU-Net sets the whole network each
    epoch: they normalise with the statistics of the training batch and their running statistics follow the target
    data, which validation and prediction then use.  Why not eval mode with the stored statistics (what
    :class:`FreezeEncoder` does for its first epochs): a random encoder's stored statistics are the initial mean 0 /
    variance 1, which do not describe its activations at all, and a pretrained encoder's describe the pretraining
    images, not the target data; either would handicap one arm for a reason other than its weights.  The BatchNorm
    affine weights are parameters and stay frozen.  Refused under DDP (its reducer expects gradients for every
    parameter).
    """

    def on_train_start(self):
        if self.is_ddp:
            raise RuntimeError(f"{type(self).__name__} cannot freeze parameters under multi-GPU (DDP) training; "
                               f"train on one GPU")
        params = encoder_parameters(self.network)
        for p in params:
            p.requires_grad_(False)
        frozen = sum(p.numel() for p in params)
        total = sum(p.numel() for p in self.network.parameters())
        self.print_to_log_file(f"FrozenEncoderWholeRun: encoder frozen for the whole run ({frozen} of {total} "
                               f"parameters); its BatchNorm layers use batch statistics and update their running "
                               f"statistics on the training data", also_print_to_console=True)
        super().on_train_start()


class PeakLearningRate:
    """Another peak lr and warm-up for the trainer's own warm-up + poly schedule: ``peak_lr`` (nnU-Net's
    ``initial_lr``) and ``peak_warmup_fraction`` (of all epochs, or of all iterations under a training budget).

    A pretrained network starts near a good solution; the full fine-tuning peak (1e-3 for AdamW and for the
    plugin's SGD) moves it far from there within tens of iterations.  A tenth of it without warm-up trains the
    classifier from the first step and keeps the pretrained weights close.  The explicit ``__init__`` signature is
    nnU-Net's (see :class:`~nnunetv2_vf.trainers.variants.TrainingBudget`); nnU-Net's ``debug.json`` records both
    values.
    """

    peak_lr: float = 1e-3
    peak_warmup_fraction: float = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        lr, warmup = self.peak_lr, self.peak_warmup_fraction
        for name, value, ok in (("peak_lr", lr, lambda v: 0 < v <= 1),
                                ("peak_warmup_fraction", warmup, lambda v: 0 <= v < 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{type(self).__name__}.{name} must be a number in "
                                 f"{'(0, 1]' if name == 'peak_lr' else '[0, 1)'}, got {value!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = float(lr)  # set after the trainer's own __init__, which sets its defaults
        self.warmup_fraction = float(warmup)
