"""Console scripts: ``nnUNetv2_vf_pretrain``, ``nnUNetv2_vf_adapt_plans``, ``nnUNetv2_vf_convert_misfm``,
``nnUNetv2_vf_convert_nnssl``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnunetv2_vf.architectures.pctnet_sizes import PAPER_FEATURES

__all__ = ["pretrain_main", "adapt_plans_main", "convert_misfm_main", "convert_nnssl_main"]


def _user_errors(main):
    """Bad input (missing files, wrong formats, mismatched checkpoints, a full disk) ends with its message, not a
    traceback."""
    from nnunetv2_vf.checkpoint_io import WriteError

    def wrapped(argv=None):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError, KeyError, WriteError, FloatingPointError) as e:
            raise SystemExit(f"{main.__name__.replace('_main', '')}: error: {e}") from e
    wrapped.__name__ = main.__name__
    return wrapped


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: no '(default: None)' (the help text says what happens instead) and none for
    on/off flags, whose help text says what the flag does."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_pretrain",
        description="Volume Fusion self-supervised pretraining (MIS-FM) on unlabelled 3D images. Multi-GPU: "
                    "torchrun --nproc_per_node N $(which nnUNetv2_vf_pretrain) ... A second run into the same -o "
                    "needs --continue (resume) or --overwrite (start again).",
        formatter_class=_HelpFormatter)
    p.add_argument("inputs", nargs="*",
                   help="nnU-Net raw dataset folders (imagesTr/imagesTs are used, labels ignored) and/or folders of "
                        "images (any SimpleITK format). With --continue: optional; give them only if the data moved "
                        "(the new folders must hold the same files, compared by name and size)")
    p.add_argument("--manifest", default=None, metavar="FILE",
                   help="a file listing input images: one path per line ('#' comments) or a JSON list; relative "
                        "paths resolve against its folder. Alone or next to the input folders. The run records its "
                        "sha256: --continue refuses a changed manifest")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the run's checkpoints, logs and plans "
                                                               "(created if missing)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume the run in -o from checkpoint_latest.pth with its own settings; only --iterations, "
                        "--device, --num-workers, --val-every, --save-every and --cache-dir may change")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in -o (checkpoints, logs, validation set; the preprocessed cache is "
                        "kept) and start a new one")
    p.add_argument("--modality", "--normalization", dest="normalization", choices=["CT", "MR"], default=None,
                   help="CT: clip HU to [-1000, 1000] and map to [-1, 1]; MR: per-image z-score. Required for plain "
                        "image folders; for nnU-Net raw datasets read from dataset.json channel_names ('CT' -> CT, "
                        "any other name -> MR)")
    p.add_argument("--iterations", type=int, default=100_000, help="training iterations in total")
    p.add_argument("--batch-size", type=int, default=4, help="patches per process and iteration ('paper': >= 2)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="patch in voxels; if omitted: 64 128 128 for PCT-Net (rounded up to what the network "
                        "accepts), the plans' patch for --network plans")
    p.add_argument("--variant", choices=["paper", "grid"], default="paper",
                   help="Volume Fusion variant: 'paper' fuses boxes of another sample of the batch, 'grid' fuses two "
                        "augmented crops of the same sample on a block grid")
    # the pretext task's parameters (MIS-FM's ablations); omitted: the paper's values (FusionParameters)
    vf = p.add_argument_group("Volume Fusion task arguments (if omitted: the paper's values)")
    vf.add_argument("--vf-classes", type=int, default=None, metavar="K",
                    help="fusion classes K: alpha in {0, 1/(K-1), ..., 1}, K segmentation classes (paper: 5)")
    vf.add_argument("--vf-boxes", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="'paper' variant: boxes per sample, drawn uniformly from MIN..MAX (paper: 10 40)")
    fraction_options = (  # per-axis sizes as fractions of the patch: (variant, option, side, paper value)
        ("paper", "--vf-box-min", "smallest box", "0.125 0.0625 0.0625, i.e. 8 8 8 voxels of 64x128x128"),
        ("paper", "--vf-box-max", "largest box", "0.625 0.625 0.625"),
        ("grid", "--vf-block-min", "smallest block", "0.078125 0.0625 0.0625, i.e. 5 8 8 voxels of 64x128x128"),
        ("grid", "--vf-block-max", "largest block", "0.3125 0.25 0.25, i.e. 20 32 32 voxels"))
    vf.add_argument("--vf-foreground-ratio", type=float, default=None, metavar="R",
                    help="'grid' variant: fraction of the grid blocks fused with the foreground (class 1..K-1) "
                         "(paper: 0.7)")
    for variant, option, side, paper in fraction_options:
        vf.add_argument(option, type=float, nargs=3, default=None, metavar=("D", "H", "W"),
                        help=f"'{variant}' variant: {side} side per axis as a fraction of the patch (paper: {paper})")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="resample to this spacing (mm, depth first); if omitted: native spacing")
    p.add_argument("--network", choices=["pctnet", "plans"], default="pctnet",
                   help="pctnet: PCT-Net with --features; plans: the network of an nnU-Net plans file (--plans)")
    p.add_argument("--features", type=int, nargs=5, default=list(PAPER_FEATURES),
                   help="PCT-Net channels per level (the paper's)")
    p.add_argument("--resolution-mode", type=int, choices=[0, 1, 2], default=1, help="PCT-Net resolution mode")
    p.add_argument("--plans", dest="plans_file", default=None,
                   help="with --network plans (required there): an nnU-Net plans file whose network is pretrained")
    p.add_argument("--plans-configuration", default="3d_fullres", help="configuration of --plans to use")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay")
    p.add_argument("--lr-step", type=int, default=20_000, help="halve the lr every this many iterations")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="if omitted: cuda if available, else cpu")
    p.add_argument("--num-workers", type=int, default=4, help="augmentation processes; 0 = in-process")
    p.add_argument("--val-every", type=int, default=1000, help="validate, log and plot every this many iterations")
    p.add_argument("--save-every", type=int, default=None,
                   help="write checkpoint_latest.pth every this many iterations; if omitted: at each validation")
    p.add_argument("--val-samples", type=int, default=8, help="fixed fused validation crops")
    p.add_argument("--augmentation", choices=["flip", "nnunet", "none"], default="flip",
                   help="what happens to each crop before fusion: 'flip' random flips on each axis (the authors' "
                        "recipe, the default), 'nnunet' nnU-Net's spatial/intensity training transforms, 'none' "
                        "nothing")
    p.add_argument("--no-augmentation", dest="augmentation", action="store_const", const="none",
                   help="the same as --augmentation none")
    p.add_argument("--grid-source-scale", type=float, default=None, metavar="S",
                   help="'grid' variant: both crops of a pair are cut from a region S times the patch per axis, so "
                        "the crop scale 0.7-1.5 can zoom out (default: 1.5, the authors'; 1 cuts them from the "
                        "patch itself)")
    p.add_argument("--cache-dir", default=None,
                   help="folder for the preprocessed volumes (nnU-Net's compressed .b2nd); if omitted: "
                        "OUTPUT_DIR/cache")
    p.add_argument("--preprocess-only", action="store_true",
                   help="preprocess the inputs into the cache and exit, like nnUNetv2_preprocess (under torchrun "
                        "each rank its share); a later training run with the same inputs and preprocessing "
                        "settings preprocesses nothing")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="preprocessing processes (per rank under torchrun); if omitted: the CPUs available, shared "
                        "among the node's ranks, at most 8")
    p.add_argument("--seed", type=int, default=12345, help="random seed (weights, sampling, validation set)")
    return p


def _given_options(argv) -> set:
    """Destinations the user actually gave: on --continue only those are compared with the run's settings."""
    quiet = _pretrain_parser()
    for action in quiet._actions:  # (set_defaults would put the SUPPRESS marker itself into the namespace)
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


@_user_errors
def pretrain_main(argv=None) -> None:
    parser = _pretrain_parser()
    args = vars(parser.parse_args(argv))
    from nnunetv2_vf.pretrain.pretrainer import PretrainConfig, VFPretrainer  # after -h: torch takes seconds
    resume, overwrite, preprocess_only = args.pop("resume"), args.pop("overwrite"), args.pop("preprocess_only")
    if not args["inputs"] and not args["manifest"] and not resume:
        parser.error("give the input folders (nnU-Net raw datasets and/or image folders) or --manifest FILE, or "
                     "--continue to resume the run in -o")
    if preprocess_only and overwrite:
        parser.error("--preprocess-only writes only the cache, which --overwrite keeps anyway: drop --overwrite")
    for knob in [k for k, v in args.items() if (k.startswith("vf_") or k == "grid_source_scale") and v is None]:
        del args[knob]  # omitted: PretrainConfig's defaults, the paper's / authors' values
    explicit = _given_options(argv) - {"resume", "overwrite", "preprocess_only"}
    if not args["inputs"]:
        explicit.discard("inputs")
    if args["device"] is None:
        import torch
        args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = VFPretrainer(PretrainConfig(**args), resume=resume, overwrite=overwrite, explicit=explicit,
                           preprocess_only=preprocess_only)
    if preprocess_only:
        trainer.preprocess()
    else:
        trainer.run()


@_user_errors
def adapt_plans_main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_adapt_plans",
        description="Write an nnU-Net plans file for DATASET whose preprocessing (spacing, normalisation), patch "
                    "and network match a Volume Fusion pretraining run. Then: nnUNetv2_preprocess -d D -plans_name "
                    "NEW -c 3d_fullres; nnUNetv2_train D 3d_fullres FOLD -tr VFPretrainedTrainer -p NEW "
                    "-pretrained_weights OUTPUT_DIR/checkpoint_final.pth",
        formatter_class=_HelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id (must be planned already)")
    p.add_argument("-a", "--adaptation-plan", required=True, help="OUTPUT_DIR/adaptation_plan.json of pretraining")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration of the plans to adapt (3D)")
    p.add_argument("-sp", "--source-plans", default="nnUNetPlans", help="plans identifier to start from")
    p.add_argument("-p", "--plans-name", default="nnUNetPlans_VF", help="name of the new plans")
    p.add_argument("--keep-patch-size", action="store_true",
                   help="keep the dataset's planned patch (rounded to what the network accepts) instead of the "
                        "pretraining patch")
    p.add_argument("-w", "--pretrained-weights", default=None,
                   help="for a dataset with several input channels: the pretrained weights whose single-channel "
                        "stem is repeated over the channels (written as NAME_<C>ch.pth next to them); if omitted: "
                        "the weights the adaptation plan names (its weights_file, next to it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing plans file of this -p (and a NAME_<C>ch.pth holding other weights); "
                        "-p nnUNetPlans, nnU-Net's own plans, is refused even then")
    a = p.parse_args(argv)
    from nnunetv2_vf.pretrain.adapt_plans import adapt_plans  # after -h: imports nnU-Net and torch
    out, weights = adapt_plans(a.dataset, a.adaptation_plan, a.configuration, a.source_plans, a.plans_name,
                               a.keep_patch_size, a.pretrained_weights, a.overwrite)
    print(f"wrote {Path(out).resolve()}")
    if weights is not None:
        print(f"wrote {Path(weights).resolve()} (the pretrained weights with the stem repeated over the dataset's input channels "
              f"and scaled by 1/C): train with -pretrained_weights {weights}")
    print(f"next: nnUNetv2_preprocess -d {a.dataset} -plans_name {a.plans_name} -c {a.configuration}")


@_user_errors
def convert_misfm_main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_convert_misfm",
        description="Convert the MIS-FM authors' PCT-Net weights (pctnet_ct10k_volf.pt) into an nnU-Net "
                    "'-pretrained_weights' file (network_weights in this plugin's PCTNet layout) plus an "
                    "adaptation_plan.json next to it (for nnUNetv2_vf_adapt_plans).",
        formatter_class=_HelpFormatter)
    p.add_argument("input", help="the authors' checkpoint file (e.g. pctnet_ct10k_volf.pt)")
    p.add_argument("output", help="the converted weights FILE to write (e.g. misfm/checkpoint_final.pth; its folder "
                                  "is created and receives adaptation_plan.json)")
    p.add_argument("--features", type=int, nargs=5, default=list(PAPER_FEATURES),
                   help="PCT-Net channels per level of the checkpoint (the paper's)")
    p.add_argument("--resolution-mode", type=int, choices=[0, 1, 2], default=1,
                   help="PCT-Net resolution mode of the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file and the adaptation_plan.json beside it")
    a = p.parse_args(argv)
    from nnunetv2_vf.pretrain.adapt_plans import convert_misfm_checkpoint
    plan = convert_misfm_checkpoint(a.input, a.output, a.features, a.resolution_mode, a.overwrite)
    print(f"wrote {os.path.abspath(a.output)} (the converted weights: -pretrained_weights)")
    print(f"wrote {plan['written_to']} (its adaptation plan: nnUNetv2_vf_adapt_plans -a)")


@_user_errors
def convert_nnssl_main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_convert_nnssl",
        description="Convert an nnssl pretraining checkpoint (MIC-DKFZ/nnssl: network_weights + the embedded "
                    "nnssl_adaptation_plan; ResEnc-L and dynamic-network-architectures U-Nets) into "
                    "OUTPUT_DIR/checkpoint_final.pth (an nnU-Net -pretrained_weights file holding the whole U-Net) "
                    "and OUTPUT_DIR/adaptation_plan.json (for nnUNetv2_vf_adapt_plans). An encoder-only checkpoint "
                    "(nnssl's contrastive methods) gets a seeded fresh decoder; the plan records which tensors are "
                    "pretrained.",
        formatter_class=_HelpFormatter)
    p.add_argument("input", help="the nnssl checkpoint file (e.g. checkpoint_final.pth of an nnssl run)")
    p.add_argument("output_dir", help="folder for checkpoint_final.pth and adaptation_plan.json (created)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fresh initialisation of what the checkpoint lacks (its decoder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint_final.pth / adaptation_plan.json in OUTPUT_DIR")
    a = p.parse_args(argv)
    from nnunetv2_vf.pretrain.nnssl_format import convert_nnssl_checkpoint
    report = convert_nnssl_checkpoint(a.input, a.output_dir, a.seed, a.overwrite)
    print(f"{report['network']}: {report['pretrained']} tensors from the checkpoint, {report['fresh']} initialised "
          f"fresh (seed {a.seed}; the segmentation heads always are)" +
          (", the decoder among them: the checkpoint holds an encoder only" if report["encoder_only"] else "") +
          (f"; {len(report['unused'])} checkpoint tensors not part of the U-Net left out (e.g. "
           f"{report['unused'][0]})" if report["unused"] else ""))
    print(f"wrote {report['weights']} (the converted weights: -pretrained_weights)")
    print(f"wrote {report['adaptation_plan']} (its adaptation plan: nnUNetv2_vf_adapt_plans -a)")
    print(f"next: nnUNetv2_vf_adapt_plans -d DATASET -a {report['adaptation_plan']} -p nnUNetPlans_nnssl; "
          f"nnUNetv2_preprocess -d DATASET -plans_name nnUNetPlans_nnssl -c 3d_fullres; nnUNetv2_train DATASET "
          f"3d_fullres FOLD -tr VFPlansNetworkTrainer -p nnUNetPlans_nnssl -pretrained_weights {report['weights']}")


if __name__ == "__main__":
    pretrain_main(sys.argv[1:])
