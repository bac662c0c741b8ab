"""Console scripts: ``nnUNetv2_vf_pretrain``, ``nnUNetv2_vf_adapt_plans``, ``nnUNetv2_vf_convert_misfm``."""
from __future__ import annotations

import argparse
import sys

__all__ = ["pretrain_main", "adapt_plans_main", "convert_misfm_main"]


def _user_errors(main):
    """Bad input (missing files, wrong formats, mismatched checkpoints) ends with its message, not a traceback."""
    def wrapped(argv=None):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise SystemExit(f"{main.__name__.replace('_main', '')}: error: {e}") from e
    wrapped.__name__ = main.__name__
    return wrapped


def _pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_pretrain",
        description="Volume Fusion self-supervised pretraining (MIS-FM) on unlabelled 3D images. Multi-GPU: "
                    "torchrun --nproc_per_node N $(which nnUNetv2_vf_pretrain) ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="nnU-Net raw dataset folders (imagesTr/imagesTs are used, labels "
                                             "ignored) and/or folders of images (any SimpleITK format)")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--iterations", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="default 64 128 128 (PCT-Net; rounded up to what the network accepts) or the plans' patch")
    p.add_argument("--variant", choices=["paper", "grid"], default="paper")
    p.add_argument("--modality", "--normalization", dest="normalization", choices=["CT", "MR"], default="CT",
                   help="CT: clip HU to [-1000, 1000] and map to [-1, 1]; MR: per-image z-score")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="resample to this spacing (mm, depth first); default: native spacing")
    p.add_argument("--network", choices=["pctnet", "plans"], default="pctnet")
    p.add_argument("--features", type=int, nargs=5, default=[24, 48, 128, 256, 512],
                   help="PCT-Net channels per level (paper: 24 48 128 256 512)")
    p.add_argument("--resolution-mode", type=int, choices=[0, 1, 2], default=1)
    p.add_argument("--plans", dest="plans_file", default=None,
                   help="with --network plans: an nnU-Net plans file whose network is pretrained")
    p.add_argument("--plans-configuration", default="3d_fullres")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--lr-step", type=int, default=20_000, help="halve the lr every this many iterations")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--num-workers", type=int, default=4, help="augmentation processes; 0 = in-process")
    p.add_argument("--continue", dest="resume", action="store_true", help="resume from checkpoint_latest.pth")
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint interval (default: --val-every)")
    p.add_argument("--val-samples", type=int, default=8, help="fixed fused validation crops")
    p.add_argument("--no-augmentation", dest="augment", action="store_false",
                   help="skip nnU-Net's spatial/intensity augmentation before fusion")
    p.add_argument("--cache-dir", default=None, help="preprocessed volumes (default OUTPUT_DIR/cache)")
    p.add_argument("--seed", type=int, default=12345)
    return p


@_user_errors
def pretrain_main(argv=None) -> None:
    from nnunetv2_vf.pretrain.pretrainer import PretrainConfig, VFPretrainer
    args = vars(_pretrain_parser().parse_args(argv))
    resume = args.pop("resume")
    if args["device"] is None:
        import torch
        args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PretrainConfig(**args)
    VFPretrainer(cfg, resume=resume).run()


@_user_errors
def adapt_plans_main(argv=None) -> None:
    from nnunetv2_vf.pretrain.adapt_plans import adapt_plans
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_adapt_plans",
        description="Write an nnU-Net plans file for DATASET whose preprocessing (spacing, normalisation), patch "
                    "and network match a Volume Fusion pretraining run. Then: nnUNetv2_preprocess -d D -plans_name "
                    "NEW -c 3d_fullres; nnUNetv2_train D 3d_fullres FOLD -tr VFPretrainedTrainer -p NEW "
                    "-pretrained_weights OUTPUT_DIR/checkpoint_final.pth")
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id (must be planned already)")
    p.add_argument("-a", "--adaptation-plan", required=True, help="OUTPUT_DIR/adaptation_plan.json of pretraining")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-sp", "--source-plans", default="nnUNetPlans", help="plans identifier to start from")
    p.add_argument("-p", "--plans-name", default="nnUNetPlans_VF", help="name of the new plans")
    p.add_argument("--keep-patch-size", action="store_true",
                   help="keep the dataset's planned patch (rounded to what the network accepts) instead of the "
                        "pretraining patch")
    a = p.parse_args(argv)
    out = adapt_plans(a.dataset, a.adaptation_plan, a.configuration, a.source_plans, a.plans_name,
                      a.keep_patch_size)
    print(f"wrote {out}\nnext: nnUNetv2_preprocess -d {a.dataset} -plans_name {a.plans_name} -c {a.configuration}")


@_user_errors
def convert_misfm_main(argv=None) -> None:
    from nnunetv2_vf.pretrain.adapt_plans import convert_misfm_checkpoint
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_convert_misfm",
        description="Convert the MIS-FM authors' PCT-Net weights (pctnet_ct10k_volf.pt) into an nnU-Net "
                    "'-pretrained_weights' file (network_weights in this plugin's PCTNet layout) plus an "
                    "adaptation_plan.json next to it (for nnUNetv2_vf_adapt_plans).")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--features", type=int, nargs=5, default=[24, 48, 128, 256, 512])
    p.add_argument("--resolution-mode", type=int, choices=[0, 1, 2], default=1)
    a = p.parse_args(argv)
    convert_misfm_checkpoint(a.input, a.output, a.features, a.resolution_mode)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    pretrain_main(sys.argv[1:])
