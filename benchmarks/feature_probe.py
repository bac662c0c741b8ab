"""Feature probe: do Volume Fusion pretrained weights hold features that transfer, independently of fine-tuning?

The network is frozen. Its feature maps at every scale (each encoder and decoder stage), upsampled to the image
grid, feed a per-voxel multinomial logistic regression fitted on N labelled cases of a dataset; the validation
cases are predicted voxel by voxel and scored with Dice. The same is done with K randomly initialised copies of the
same architecture, and with the image intensity alone (plus three blurred versions of it). The probe's answer is
the paired difference pretrained - random (per validation case and random initialisation) with a 95 % bootstrap
interval (``nnunetv2_vf.paired_stats``); "pretrained features beat random" is said only where the interval lies
above zero.

    python benchmarks/feature_probe.py --weights vf_run/checkpoint_final.pth \\
        --dataset $nnUNet_raw/Dataset004_Hippocampus --labelled 8 --validation 20 --out probe_out

Everything is deterministic for a given command (same numbers in ``feature_probe.json``; only the timings vary).
See docs/vf_pretraining.md ("Feature probe") for the design and the measured time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import validation_split  # noqa: E402

FORMAT = "nnunetv2_vf.feature_probe/1"
BLUR_SIGMAS = (1.0, 2.0, 4.0)  # voxels: the intensity arm's smoothed copies (local context at three sizes)
PCTNET_FEATURE_MODULES = ("stem.conv0", "stem.conv1", "stem.down2", "encoder.pct2", "encoder.pct3", "encoder.pct4",
                          "decoder.pct3", "decoder.pct2", "decoder.conv1", "decoder.conv0")
WEIGHTS_FIX = ("give OUTPUT_DIR/checkpoint_final.pth of an nnUNetv2_vf_pretrain run (or of "
               "nnUNetv2_vf_convert_misfm)")


@dataclass(frozen=True)
class ProbeSettings:
    labelled: int
    validation: int
    random_inits: int = 3
    seed: int = 0
    voxels_per_case: int = 20_000
    max_channels_per_scale: int = 64
    l2: float = 1e-3
    max_iter: int = 100
    class_prior: str = "data"
    device: str = "cpu"
    threads: int = 1


# ------------------------------------------------------------------------------------------------ the weights
def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(network weights, nnU-Net ``architecture`` record) of a pretraining's final checkpoint, loaded
    weights-only; a file of any other kind raises ValueError saying what it is not."""
    from nnunetv2_vf.checkpoint_io import read_weights_file
    saved = read_weights_file(path, "pretrained weights", WEIGHTS_FIX, WEIGHTS_FIX, allow_numpy=True)
    if not isinstance(saved, dict) or not isinstance(saved.get("network_weights"), dict):
        raise ValueError(f"{path} is not a pretraining checkpoint: it holds no 'network_weights' dict; {WEIGHTS_FIX}")
    arch = saved.get("architecture")
    if not (isinstance(arch, dict) and isinstance(arch.get("network_class_name"), str)
            and isinstance(arch.get("arch_kwargs"), dict)):
        raise ValueError(f"{path} holds network weights but no 'architecture' record (network_class_name + "
                         f"arch_kwargs), so the network cannot be rebuilt as it was pretrained; nnUNetv2_vf_pretrain "
                         f"writes one into checkpoint_final.pth: {WEIGHTS_FIX}")
    # PCT-Net weights mean something only with the table layout they were saved in (refused otherwise, with the fix)
    from nnunetv2_vf.architectures.pctnet import check_table_layout
    check_table_layout(saved, f"pretrained weights {path}", WEIGHTS_FIX)
    return saved["network_weights"], arch


def read_plan(weights: Path, plan_path: Optional[Path]):
    """The adaptation plan (preprocessing) of the pretraining: ``plan_path`` or the one beside the weights."""
    from nnunetv2_vf.pretrain.adaptation_plan import PLAN_FILE_NAME, AdaptationPlan
    path = plan_path or weights.parent / PLAN_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adaptation plan {path} not found: the probe preprocesses images as the pretraining "
                                f"did, which its adaptation_plan.json records; give it with --plan")
    return AdaptationPlan.load(path)


def classifier_classes(weights: dict, default: int = 5) -> int:
    """Output classes of the pretraining's classifier (its shape decides nothing else; it is never used)."""
    for key, value in sorted(weights.items()):
        if key.endswith("seg_layers.0.weight"):
            return int(value.shape[0])
    return default


def build_network(arch: dict, num_classes: int) -> nn.Module:
    """The network as ``nnUNetv2_vf_pretrain`` builds it: nnU-Net's constructor (with its initialisation),
    1 input channel, deep supervision on."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    try:
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                      arch.get("_kw_requires_import", []), 1, num_classes, allow_init=True,
                                      deep_supervision=True)
    except (ImportError, TypeError, ValueError) as e:
        raise ValueError(f"cannot build the checkpoint's network {arch['network_class_name']} from its recorded "
                         f"arch_kwargs ({type(e).__name__}: {e}); {WEIGHTS_FIX}") from e


def load_weights(net: nn.Module, weights: dict, source: str) -> None:
    """Every tensor but the pretext classifiers (``seg_layers``) must exist with the network's shape."""
    own = {k: v for k, v in net.state_dict().items() if "seg_layers" not in k}
    given = {k: v for k, v in weights.items() if "seg_layers" not in k}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if tuple(own[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: file {list(given[wrong[0]].shape)}, network "
                 f"{list(own[wrong[0]].shape)})" if wrong else ""]
        raise ValueError(f"the weights in {source} do not fit the architecture recorded with them: "
                         f"{', '.join(p for p in parts if p)}; {WEIGHTS_FIX}")
    net.load_state_dict(given, strict=False)


def network_divisor(arch: dict) -> tuple[int, ...]:
    """Image sides must be multiples of the product of the stage strides."""
    strides = np.asarray(arch["arch_kwargs"]["strides"], dtype=int)
    return tuple(int(s) for s in strides.prod(axis=0))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ the cases
def parse_case_ids(value: Optional[str]) -> list[str]:
    """Case ids from a file (one or more per line) or a comma-separated list; file endings are dropped."""
    if not value:
        return []
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    ids = [t for t in text.replace(",", " ").split() if t]
    return [i.split(".")[0].removesuffix("_0000") for i in ids]


def select_cases(source: Path, n_labelled: int, n_validation: int, exclude: Sequence[str]) -> tuple[list, list]:
    """(labelled, validation) case ids, disjoint. Validation: the first ``n_validation`` of ``_study``'s fixed
    shuffled order that are not excluded -- the cases the studies' pretraining leaves out of its images; labelled:
    the next ``n_labelled``."""
    order = validation_split(source, 0)[1]  # the whole fixed order
    unknown = sorted(set(exclude) - set(order))
    if unknown:
        raise ValueError(f"--exclude-cases names {len(unknown)} case(s) not in {source}/labelsTr (e.g. "
                         f"{unknown[0]}); give case ids such as {order[0]}")
    validation = [c for c in order if c not in set(exclude)][:n_validation]
    labelled = [c for c in order if c not in set(validation)][:n_labelled]
    if len(validation) < n_validation or len(labelled) < n_labelled:
        raise ValueError(f"{source} has {len(order)} labelled cases ({len(exclude)} excluded from validation): "
                         f"too few for --labelled {n_labelled} and --validation {n_validation}")
    return labelled, validation


def seen_in_pretraining(weights: Path, source: Path, cases: Sequence[str], ending: str) -> Optional[list]:
    """The ``cases`` whose image (name and size) is in the pretraining's input list (config.json beside the
    weights), or None when that list is not there."""
    config = weights.parent / "config.json"
    if not config.is_file():
        return None
    manifest = json.loads(config.read_text()).get("input_files")
    if manifest is None:
        return None
    files = {(str(name), int(size)) for name, size in manifest}
    seen = []
    for case in cases:
        image = source / "imagesTr" / f"{case}_0000{ending}"
        if (image.name, image.stat().st_size) in files:
            seen.append(case)
    return seen


@dataclass
class Case:
    name: str
    image: np.ndarray  # float32 [1, D, H, W], preprocessed as in pretraining
    label: np.ndarray  # int64 [D, H, W] on the same grid


def load_case(source: Path, case: str, ending: str, preprocessing) -> Case:
    """Image through the pretraining's ``Preprocessing``; label read with SimpleITK and, where the image was
    resampled, resampled to the same grid as nnU-Net resamples segmentations."""
    import SimpleITK as sitk
    image_path = source / "imagesTr" / f"{case}_0000{ending}"
    image = preprocessing(image_path)
    ref = sitk.ReadImage(str(source / "labelsTr" / f"{case}{ending}"))
    label = sitk.GetArrayFromImage(ref).astype(np.int64)
    if label.shape != image.shape[1:]:
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
        spacing = list(ref.GetSpacing())[::-1]
        label = resample_data_or_seg_to_shape(label[None], image.shape[1:], spacing, preprocessing.spacing,
                                              is_seg=True, order=1, order_z=0,
                                              force_separate_z=None)[0].astype(np.int64)
    if label.shape != image.shape[1:]:
        raise ValueError(f"{case}: label shape {label.shape} does not match the image's {image.shape[1:]}")
    return Case(case, image, label)


def pad_to_multiple(image: np.ndarray, divisor: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Centre ``image`` [C, D, H, W] in zeros (the normalised intensity mean, as the pretraining pads) up to the
    next multiples of ``divisor``; returns the padded array and the original region in it."""
    shape = [-(-s // d) * d for s, d in zip(image.shape[1:], divisor)]
    out = np.zeros((image.shape[0], *shape), dtype=image.dtype)
    region = tuple(slice((p - s) // 2, (p - s) // 2 + s) for s, p in zip(image.shape[1:], shape))
    out[(slice(None), *region)] = image
    return out, region


# ------------------------------------------------------------------------------------------------ features
def feature_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the stage feature maps: PCT-Net's stem, encoder and decoder levels; nnU-Net's
    UNets' ``encoder.stages`` and ``decoder.stages``."""
    named = dict(net.named_modules())
    if all(name in named for name in PCTNET_FEATURE_MODULES):
        return [(name, named[name]) for name in PCTNET_FEATURE_MODULES]
    stages = [(f"encoder.stages.{i}", m) for i, m in enumerate(getattr(getattr(net, "encoder", None), "stages", []))]
    stages += [(f"decoder.stages.{i}", m) for i, m in enumerate(getattr(getattr(net, "decoder", None), "stages", []))]
    if not stages:
        raise ValueError(f"the probe knows the feature stages of PCTNet and nnU-Net's UNets (encoder.stages, "
                         f"decoder.stages), not those of {type(net).__name__}")
    return stages


def reestimate_batchnorm(net: nn.Module, images: Sequence[np.ndarray], divisor, device: torch.device) -> int:
    """BatchNorm running statistics recomputed on ``images`` (a cumulative average over one pass, each image a
    batch), with every other module in eval mode (no dropout: the statistics are those seen at extraction).
    Returns the number of BatchNorm layers (0: e.g. InstanceNorm networks, nothing to do)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.eval()
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every image counts the same, the order does not
        m.train()
    with torch.no_grad():
        for image in images:
            net(torch.from_numpy(pad_to_multiple(image, divisor)[0][None]).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()
    return len(norms)


def channel_projection(channels: int, cap: int, seed: int, scale: int) -> Optional[torch.Tensor]:
    """A fixed Gaussian random projection [channels, cap] for a scale with more than ``cap`` channels (keeps the
    linear information of a wide map better than dropping channels), None otherwise; the same for every arm."""
    if channels <= cap:
        return None
    generator = torch.Generator().manual_seed(seed * 1009 + scale)
    return torch.randn(channels, cap, generator=generator, dtype=torch.float32) / cap ** 0.5


def network_features(net: nn.Module, modules: Sequence[tuple[str, nn.Module]], image: np.ndarray, divisor,
                     cap: int, seed: int, device: torch.device) -> torch.Tensor:
    """[F, D, H, W] on the image's grid: every stage's output (projected to at most ``cap`` channels) trilinearly
    upsampled to the padded input and cropped back to the image."""
    padded, region = pad_to_multiple(image, divisor)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
             for i, (_, module) in enumerate(modules)]
    try:
        with torch.no_grad():
            net(torch.from_numpy(padded[None]).to(device))
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for i in range(len(modules)):
        out = outputs[i].float()
        projection = channel_projection(out.shape[1], cap, seed, i)
        if projection is not None:
            out = torch.einsum("bcdhw,ck->bkdhw", out, projection.to(out.device))
        up = F.interpolate(out, size=padded.shape[1:], mode="trilinear", align_corners=False)
        maps.append(up[0][(slice(None), *region)].cpu())
    return torch.cat(maps)


def intensity_features(image: np.ndarray) -> torch.Tensor:
    """[4, D, H, W]: the intensity and its Gaussian blurs (``BLUR_SIGMAS`` voxels): what a probe without a network
    can use (intensity and local context), the floor the network features must clear."""
    from scipy.ndimage import gaussian_filter
    volume = image[0].astype(np.float64)
    maps = [volume] + [gaussian_filter(volume, sigma, mode="nearest") for sigma in BLUR_SIGMAS]
    return torch.from_numpy(np.stack(maps).astype(np.float32))


# ------------------------------------------------------------------------------------------------ classifier
def sample_voxels(label: np.ndarray, n_classes: int, budget: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(flat voxel indices, weights) of a class-stratified sample: up to ``budget // n_classes`` voxels of each
    class (all of a rarer class). Weight = voxels of that class / voxels sampled of it, so the weighted sample stands
    for the whole case (the class frequencies of the data, not of the sample)."""
    flat = label.reshape(-1)
    per_class = max(1, budget // n_classes)
    indices, weights = [], []
    for c in range(n_classes):
        where = np.flatnonzero(flat == c)
        if where.size == 0:
            continue
        take = where if where.size <= per_class else np.sort(rng.choice(where, per_class, replace=False))
        indices.append(take)
        weights.append(np.full(take.size, where.size / take.size))
    return np.concatenate(indices), np.concatenate(weights)


def class_weights(labels: np.ndarray, weights: np.ndarray, n_classes: int, prior: str) -> np.ndarray:
    """Sample weights summing to 1. 'data': the classes as frequent as in the labelled cases (the classifier
    estimates the posterior of the data); 'balanced': each present class the same total weight."""
    w = weights.astype(np.float64)
    if prior == "balanced":
        present = [c for c in range(n_classes) if (labels == c).any()]
        for c in present:
            w[labels == c] = w[labels == c] / w[labels == c].sum() / len(present)
    return w / w.sum()


@dataclass
class LinearProbe:
    mean: torch.Tensor   # [F] feature standardisation, from the training sample
    std: torch.Tensor
    weight: torch.Tensor  # [F, C]
    bias: torch.Tensor   # [C]
    loss: float
    iterations: int

    def predict(self, features: torch.Tensor) -> np.ndarray:
        """Class per voxel of [F, D, H, W] -> [D, H, W]."""
        x = features.reshape(features.shape[0], -1).T.double()
        logits = ((x - self.mean) / self.std) @ self.weight + self.bias
        return logits.argmax(1).reshape(features.shape[1:]).numpy()


def fit_probe(x: torch.Tensor, y: torch.Tensor, w: np.ndarray, n_classes: int, l2: float,
              max_iter: int) -> LinearProbe:
    """Weighted multinomial logistic regression, L2 on the weights (not the biases), on standardised features:
    full-batch L-BFGS in float64 from zero, a fixed iteration budget (deterministic)."""
    x = x.double()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)  # a constant feature (e.g. a dead channel) stays 0 after standardising
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    sample_weight = torch.from_numpy(w)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-8,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def penalised_loss():
        loss = (F.cross_entropy(x @ weight + bias, y, reduction="none") * sample_weight).sum()
        return loss + 0.5 * l2 * (weight * weight).sum()

    def objective():
        optimiser.zero_grad()
        loss = penalised_loss()
        loss.backward()
        return loss

    optimiser.step(objective)
    with torch.no_grad():
        loss = float(penalised_loss())
    state = optimiser.state[weight]
    return LinearProbe(mean, std, weight.detach(), bias.detach(), loss, int(state.get("n_iter", 0)))


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: Sequence[int]) -> list[float]:
    """Dice of each class; nan where the class is absent from both."""
    scores = []
    for c in classes:
        p, r = prediction == c, reference == c
        total = int(p.sum() + r.sum())
        scores.append(float("nan") if total == 0 else 2.0 * int((p & r).sum()) / total)
    return scores


def case_dice(per_class: Sequence[float]) -> float:
    """Mean over the foreground classes present in the prediction or the reference (nan: none)."""
    finite = [s for s in per_class if np.isfinite(s)]
    return float(np.mean(finite)) if finite else float("nan")


# ------------------------------------------------------------------------------------------------ one arm
Extractor = Callable[[np.ndarray], torch.Tensor]


def evaluate_arm(extract: Extractor, labelled: Sequence[Case], validation: Sequence[Case],
                 samples: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int,
                 s: ProbeSettings) -> dict:
    """Fit the probe on the labelled cases' sampled voxels, score every voxel of the validation cases."""
    rows, targets, weights = [], [], []
    for case, (idx, w) in zip(labelled, samples):
        features = extract(case.image)
        rows.append(features.reshape(features.shape[0], -1)[:, torch.from_numpy(idx)].T.contiguous())
        targets.append(case.label.reshape(-1)[idx])
        weights.append(w)
    y = np.concatenate(targets)
    w = class_weights(y, np.concatenate(weights), n_classes, s.class_prior)
    probe = fit_probe(torch.cat(rows), torch.from_numpy(y), w, n_classes, s.l2, s.max_iter)
    del rows
    per_class = [dice_per_class(probe.predict(extract(case.image)), case.label, range(1, n_classes))
                 for case in validation]
    per_case = [case_dice(d) for d in per_class]
    return {"mean_dice": float(np.nanmean(per_case)),
            "dice_per_case": per_case,
            "dice_per_class_per_case": per_class,
            "feature_dims": int(probe.mean.numel()),
            "training_voxels": int(y.size),
            "classifier": {"final_loss": probe.loss, "lbfgs_iterations": probe.iterations}}


def network_arm(net: nn.Module, labelled, validation, samples, n_classes, divisor, s: ProbeSettings,
                device: torch.device) -> dict:
    net.to(device)
    n_norms = reestimate_batchnorm(net, [c.image for c in labelled + validation], divisor, device)
    modules = feature_modules(net)
    result = evaluate_arm(lambda image: network_features(net, modules, image, divisor, s.max_channels_per_scale,
                                                         s.seed, device),
                          labelled, validation, samples, n_classes, s)
    result["batchnorm_layers_reestimated"] = n_norms
    result["feature_modules"] = [name for name, _ in modules]
    return result


# ------------------------------------------------------------------------------------------------ statistics
def compare(treatment: np.ndarray, control: np.ndarray, what: tuple[str, str]) -> dict:
    """Paired effect of ``treatment`` over ``control`` ([seeds, cases]) with its verdict; ``what``: their names."""
    from nnunetv2_vf.paired_stats import MIN_SEEDS, describe_effect, paired_bootstrap
    effect = paired_bootstrap(treatment, control)
    if effect.low > 0:
        verdict = f"{what[0]} features beat {what[1]}"
    elif effect.high < 0:
        verdict = f"{what[1]} features beat {what[0]}"
    else:
        verdict = f"no difference detected between {what[0]} and {what[1]} features"
    return {**effect.to_dict(), "verdict": verdict, "sentence": describe_effect(effect), "min_seeds": MIN_SEEDS}


def pretrained_vs_random(pretrained: Sequence[float], random: Sequence[Sequence[float]]) -> dict:
    """[K, M] pairs: row k = (pretrained, random_k) on the M validation cases. A claim needs the interval above
    (or below) zero and at least ``MIN_SEEDS`` random initialisations (paired_stats' rule)."""
    control = np.asarray(random, dtype=float)
    treatment = np.tile(np.asarray(pretrained, dtype=float), (control.shape[0], 1))
    result = compare(treatment, control, ("pretrained", "random"))
    if result["n_seeds"] < result["min_seeds"]:
        result["verdict"] = (f"no claim: {result['n_seeds']} random initialisation(s) < {result['min_seeds']} "
                             f"(interval {result['low']:+.3f}, {result['high']:+.3f})")
    return result


def pretrained_vs_intensity(pretrained: Sequence[float], intensity: Sequence[float]) -> dict:
    """Both arms are deterministic (one row): the interval resamples cases only."""
    result = compare(np.asarray([pretrained], float), np.asarray([intensity], float), ("pretrained", "intensity"))
    result["sentence"] = (f"Dice difference {result['mean']:+.3f} [95 % CI {result['low']:+.3f}, "
                          f"{result['high']:+.3f}] (cases resampled)")
    return result


# ------------------------------------------------------------------------------------------------ report
def markdown_report(result: dict) -> str:
    s, cases, effect = result["settings"], result["cases"], result["pretrained_vs_random"]
    labels = result["dataset"]["foreground_labels"]
    lines = ["# Feature probe", "",
             f"Weights `{s['weights']}` on `{s['dataset']}`: frozen features, per-voxel logistic regression fitted "
             f"on {len(cases['labelled'])} labelled cases, Dice on {len(cases['validation'])} validation cases.", "",
             f"**Verdict: {effect['verdict']}** (pretrained - random {effect['mean']:+.3f}, 95 % CI "
             f"[{effect['low']:+.3f}, {effect['high']:+.3f}], {effect['n_seeds']} random initialisations x "
             f"{effect['n_cases']} cases; mean Dice pretrained {effect['treatment_mean']:.3f}, random "
             f"{effect['control_mean']:.3f}; smallest effect detectable with 80 % power "
             f"{effect['min_detectable']:.3f}).", "",
             f"pretrained - intensity: {result['pretrained_vs_intensity']['sentence']}.", "",
             "| arm | mean Dice | " + " | ".join(labels) + " | features | seconds |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    for name, arm in result["arms"].items():
        per_class = np.asarray(arm["dice_per_class_per_case"], dtype=float)
        means = [f"{np.nanmean(col):.3f}" if np.isfinite(col).any() else "n/a" for col in per_class.T]
        lines.append(f"| {name} | {arm['mean_dice']:.3f} | " + " | ".join(means) +
                     f" | {arm['feature_dims']} | {result['timings']['arms_s'][name]:.0f} |")
    seen = cases["validation_seen_in_pretraining"]
    lines += ["", "Validation cases seen by the pretraining: " +
              ("unknown (no config.json beside the weights)" if seen is None else
               f"{len(seen)}" + (f" ({', '.join(seen)})" if seen else "")), "",
              "## Settings", ""]
    lines += [f"- {key}: {value}" for key, value in s.items()]
    lines += [f"- labelled cases: {', '.join(cases['labelled'])}",
              f"- validation cases: {', '.join(cases['validation'])}",
              f"- total time: {result['timings']['total_s']:.0f} s", "", "## Command", "", "```bash",
              result["command"], "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="checkpoint_final.pth of nnUNetv2_vf_pretrain")
    p.add_argument("--dataset", type=Path, required=True, help="nnU-Net raw dataset folder (imagesTr, labelsTr)")
    p.add_argument("--labelled", type=int, required=True, help="labelled cases the probe is fitted on (N)")
    p.add_argument("--validation", type=int, required=True,
                   help="validation cases (M); the first M of benchmarks/_study.py validation_split, the cases the "
                        "studies leave out of pretraining")
    p.add_argument("--out", type=Path, required=True, help="folder for feature_probe.md and feature_probe.json")
    p.add_argument("--random-inits", type=int, default=3, help="randomly initialised networks (K)")
    p.add_argument("--seed", type=int, default=0, help="random inits use seed + k; also the voxel sample")
    p.add_argument("--plan", type=Path, help="adaptation_plan.json (default: the one beside --weights)")
    p.add_argument("--exclude-cases", help="case ids never used for validation (they were pretrained on): a file "
                                           "or a comma-separated list")
    p.add_argument("--voxels-per-case", type=int, default=ProbeSettings.voxels_per_case,
                   help="training voxels sampled per labelled case, split evenly over the classes")
    p.add_argument("--max-channels-per-scale", type=int, default=ProbeSettings.max_channels_per_scale,
                   help="wider stage outputs are reduced to this by a fixed random projection")
    p.add_argument("--l2", type=float, default=ProbeSettings.l2, help="L2 penalty of the logistic regression")
    p.add_argument("--max-iter", type=int, default=ProbeSettings.max_iter, help="L-BFGS iterations at most")
    p.add_argument("--class-prior", choices=["data", "balanced"], default=ProbeSettings.class_prior,
                   help="class weights of the fit: as frequent as in the data, or balanced")
    p.add_argument("--device", default="cpu", help="torch device of the network")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the numbers depend on it)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    start = time.perf_counter()
    s = ProbeSettings(args.labelled, args.validation, args.random_inits, args.seed, args.voxels_per_case,
                      args.max_channels_per_scale, args.l2, args.max_iter, args.class_prior, args.device,
                      args.threads)
    if min(s.labelled, s.validation, s.random_inits, s.voxels_per_case, s.max_channels_per_scale) < 1:
        raise ValueError("--labelled, --validation, --random-inits, --voxels-per-case and --max-channels-per-scale "
                         "must be at least 1")
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(s.device)

    def say(msg: str) -> None:
        print(f"[feature_probe {time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    weights, arch = read_checkpoint(args.weights)
    plan = read_plan(args.weights, args.plan)
    if plan.architecture_plans["arch_class_name"] != arch["network_class_name"]:
        raise ValueError(f"the adaptation plan describes {plan.architecture_plans['arch_class_name']} but "
                         f"{args.weights} holds {arch['network_class_name']}: give the plan of that run (--plan)")
    num_classes = classifier_classes(weights)
    pretrained = build_network(arch, num_classes)
    load_weights(pretrained, weights, str(args.weights))
    divisor = network_divisor(arch)

    from nnunetv2_vf.pretrain.dataset import Preprocessing
    pre = plan.preprocessing
    preprocessing = Preprocessing(pre["normalization"], pre.get("spacing"),
                                  *([pre["ct_window"]] if pre.get("ct_window") else []))
    dataset = json.loads((args.dataset / "dataset.json").read_text())
    ending = dataset["file_ending"]
    label_values = sorted(int(v) for v in dataset["labels"].values())
    if label_values != list(range(len(label_values))):
        raise ValueError(f"labels of {args.dataset}/dataset.json must be 0..C-1, got {label_values}")
    n_classes = len(label_values)
    names = {int(v): k for k, v in dataset["labels"].items()}
    labelled_ids, validation_ids = select_cases(args.dataset, s.labelled, s.validation,
                                                parse_case_ids(args.exclude_cases))
    say(f"{len(labelled_ids)} labelled + {len(validation_ids)} validation cases of {args.dataset.name}, "
        f"{arch['network_class_name'].split('.')[-1]} {arch['arch_kwargs'].get('features_per_stage', '')}")
    labelled = [load_case(args.dataset, c, ending, preprocessing) for c in labelled_ids]
    validation = [load_case(args.dataset, c, ending, preprocessing) for c in validation_ids]
    for case in labelled + validation:
        if case.label.min() < 0 or case.label.max() >= n_classes:
            raise ValueError(f"{case.name}: label values outside 0..{n_classes - 1} of dataset.json")
    # the same voxels for every arm: the arms are paired down to the training sample
    samples = [sample_voxels(c.label, n_classes, s.voxels_per_case, np.random.default_rng([s.seed, i]))
               for i, c in enumerate(labelled)]
    timings = {"preprocessing_s": time.perf_counter() - start, "arms_s": {}}
    say("cases preprocessed")

    arms = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        arms[name] = fn()
        timings["arms_s"][name] = time.perf_counter() - t0
        say(f"arm {name}: mean Dice {arms[name]['mean_dice']:.3f} ({timings['arms_s'][name]:.0f} s)")

    timed("pretrained", lambda: network_arm(pretrained, labelled, validation, samples, n_classes, divisor, s, device))
    del pretrained
    for k in range(s.random_inits):
        torch.manual_seed(s.seed + k)
        net = build_network(arch, num_classes)
        timed(f"random_{k}", lambda: network_arm(net, labelled, validation, samples, n_classes, divisor, s, device))
        del net
    timed("intensity", lambda: evaluate_arm(intensity_features, labelled, validation, samples, n_classes, s))

    random_rows = [arms[f"random_{k}"]["dice_per_case"] for k in range(s.random_inits)]
    timings["total_s"] = time.perf_counter() - start
    return {
        "format": FORMAT,
        "pretrained_vs_random": pretrained_vs_random(arms["pretrained"]["dice_per_case"], random_rows),
        "pretrained_vs_intensity": pretrained_vs_intensity(arms["pretrained"]["dice_per_case"],
                                                           arms["intensity"]["dice_per_case"]),
        "arms": arms,
        "cases": {"labelled": labelled_ids, "validation": validation_ids,
                  "validation_seen_in_pretraining": seen_in_pretraining(args.weights, args.dataset, validation_ids,
                                                                        ending)},
        "dataset": {"name": args.dataset.name, "foreground_labels": [names[c] for c in range(1, n_classes)]},
        "settings": {"weights": str(args.weights.resolve()), "weights_sha256": file_sha256(args.weights),
                     "dataset": str(args.dataset.resolve()), **asdict(s),
                     "architecture": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
                     "preprocessing": {k: pre.get(k) for k in ("normalization", "spacing", "ct_window")},
                     "batchnorm_statistics": "re-estimated per network arm on the labelled + validation images "
                                             "(intensities only)",
                     "intensity_arm_blur_sigmas_voxels": list(BLUR_SIGMAS), "torch": torch.__version__},
        "timings": timings,
        "command": shlex.join(["python", "benchmarks/feature_probe.py", *argv]),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        result = run(args, argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"feature_probe: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feature_probe.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    (args.out / "feature_probe.md").write_text(markdown_report(result))
    print(f"{result['pretrained_vs_random']['verdict']}: pretrained - random "
          f"{result['pretrained_vs_random']['mean']:+.3f} [{result['pretrained_vs_random']['low']:+.3f}, "
          f"{result['pretrained_vs_random']['high']:+.3f}]; report {args.out / 'feature_probe.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
