"""``nnUNetv2_vf_inflate_checkpoint``: a trained 2D EncoderUNet2D (Omnia-Net) checkpoint -> 3D DX-Net weights.

    nnUNetv2_vf_plan_network -d D -c 3d_fullres --network EncoderUNet3D --encoder E -p nnUNetPlans_E3d
    nnUNetv2_vf_inflate_checkpoint 2D/fold_0/checkpoint_final.pth -d D -p nnUNetPlans_E3d -c 3d_fullres -o inflated.pth
    nnUNetv2_train D 3d_fullres 0 -tr EncoderUNet3DTrainer -p nnUNetPlans_E3d -pretrained_weights inflated.pth

The 3D network is built exactly as ``EncoderUNet3DTrainer`` (or the ``-tr`` subclass) will build it for training:
the dataset's preprocessed plans ``-p`` (written by ``nnUNetv2_vf_plan_network --network EncoderUNet3D`` with the 2D
run's encoder and norm; nnU-Net's own plans give the trainer's defaults, efficientnet_lite0 / batch / i3d) +
dataset.json, nnU-Net's ``get_network_from_plans``.  Every 2D weight (encoder, decoder, classifiers) is inflated into
it (the plans' ``inflation``) and the result is written as an nnU-Net style checkpoint ``{"network_weights": ...}``.  Checks happen here, with messages that name the problem and the fix: wrong
dataset, not an EncoderUNet2D, other encoder/norm, other class count; the written file is verified with the rule of
nnU-Net's own ``-pretrained_weights`` loader (every key except ``.seg_layers.`` present with the same shape).

nnU-Net's stock loader does NOT load the final classifiers (``.seg_layers.``): the 3D run starts from the inflated
encoder and decoder, with freshly initialised 1x1x1 classifiers.  ``EncoderUNet3DTrainer.load_2d_checkpoint`` (Python,
after ``initialize()``) loads the classifiers too.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import torch

__all__ = ["build_3d_network", "inflate_checkpoint", "main"]


def _trainer_class(name: str):
    from nnunetv2_vf.trainers import cross_dimensional as cd

    cls = getattr(cd, name, None)
    if cls is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        try:
            cls = recursive_find_trainer_class_by_name(name)
        except Exception:  # noqa: BLE001 - nnU-Net raises RuntimeError/AssertionError depending on version
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, cd.EncoderUNet3DTrainer)):
        raise ValueError(f"-tr {name}: not an EncoderUNet3DTrainer (sub)class; give the trainer you will train the "
                         f"3D configuration with, e.g. EncoderUNet3DTrainer (found: {cls!r}).")
    return cls


def build_3d_network(plans: dict, dataset_json: dict, configuration: str = "3d_fullres",
                     trainer: str | type = "EncoderUNet3DTrainer") -> torch.nn.Module:
    """The network ``trainer`` builds for ``configuration`` of these plans (deep supervision on, as in training),
    randomly initialised: the trainer's own plans rewrite (``encoder_unet_plans``) and nnU-Net's network builder,
    without creating a trainer (no output folder, no log file)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cls = _trainer_class(trainer) if isinstance(trainer, str) else trainer
    if configuration not in plans.get("configurations", {}):
        raise ValueError(f"the plans {plans.get('plans_name', '')} have no configuration {configuration!r} "
                         f"(available: {sorted(plans.get('configurations', {}))}).")
    plans, _ = cls.encoder_unet_plans(plans, configuration)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    channels = determine_num_input_channels(pm, cm, dataset_json)
    if "plans_manager" in inspect.signature(cls.build_network_architecture).parameters:  # as nnUNetTrainer.initialize
        return cls.build_network_architecture(pm, cm, channels, heads, True)
    return cls.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                          cm.network_arch_init_kwargs_req_import, channels, heads, True)


def inflate_checkpoint(checkpoint_2d: str | os.PathLike, plans: dict, dataset_json: dict, output: str | os.PathLike,
                       configuration: str = "3d_fullres", trainer: str | type = "EncoderUNet3DTrainer",
                       overwrite: bool = False) -> dict:
    """Inflate ``checkpoint_2d`` into the 3D network of ``plans``/``configuration`` and write ``output``.

    Returns a summary dict (loaded tensors, network class, encoder, inflation).  Raises ValueError (readable, with
    the fix) when the 2D checkpoint does not fit.
    """
    from nnunetv2_vf.checkpoint_io import refuse_overwrite, save_torch
    from nnunetv2_vf.trainers.cross_dimensional import inflate_2d_checkpoint, load_2d_checkpoint_file
    from nnunetv2_vf.trainers.vf_pretrained_trainer import check_pretrained_compatibility

    cls = _trainer_class(trainer) if isinstance(trainer, str) else trainer
    checkpoint_2d, output = os.fspath(checkpoint_2d), os.fspath(output)
    if os.path.abspath(checkpoint_2d) == os.path.abspath(output):
        raise ValueError(f"-o {output} is the 2D checkpoint itself: write the 3D weights to another file.")
    refuse_overwrite([output], overwrite, "nnUNetv2_vf_inflate_checkpoint", "give another -o")
    ckpt = load_2d_checkpoint_file(checkpoint_2d)
    net3d = build_3d_network(plans, dataset_json, configuration, cls)
    loaded = inflate_2d_checkpoint(net3d, ckpt, checkpoint_2d, plans.get("dataset_name"), configuration)
    own = net3d.state_dict()
    missing = [k for k in own if k not in loaded]
    if missing:  # load_inflated refuses missing keys; this guards the "whole network" promise
        raise ValueError(f"the 2D checkpoint {checkpoint_2d} left {len(missing)} tensors of the 3D network "
                         f"uninitialised (e.g. {missing[:3]})")
    arch = net3d.__class__.__module__ + "." + net3d.__class__.__name__
    summary = {"source_checkpoint": os.path.abspath(checkpoint_2d), "source_trainer": ckpt.get("trainer_name"),
               "dataset_name": plans.get("dataset_name"), "plans_name": plans.get("plans_name"),
               "configuration": configuration, "trainer_name": cls.__name__, "network_class_name": arch,
               "encoder_name": net3d.encoder_name, "norm": net3d.norm, "inflation": net3d.inflation,
               "loaded_tensors": len(loaded)}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_torch({"network_weights": {k: v.detach().cpu().clone() for k, v in own.items()},
                "inflated_from_2d": summary}, output, "inflated 3D checkpoint")
    summary["loadable_by_nnunet"] = check_pretrained_compatibility(net3d, output)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_vf_inflate_checkpoint",
        description="Inflate a trained EncoderUNet2DTrainer checkpoint (2d) into the EncoderUNet3DTrainer network of "
                    "a 3D configuration (encoder AND decoder), written as an nnU-Net checkpoint for "
                    "'nnUNetv2_train D 3d_fullres F -tr EncoderUNet3DTrainer -p PLANS -pretrained_weights OUT'. The "
                    "3D network (encoder, norm, inflation) comes from the plans -p: write them with "
                    "nnUNetv2_vf_plan_network --network EncoderUNet3D (same --encoder/--norm as the 2D run) and "
                    "train with the same -p. nnU-Net's loader skips the final classifiers (.seg_layers.): they start fresh in the 3D run.")
    p.add_argument("checkpoint", help="the 2D run's fold_X/checkpoint_final.pth")
    p.add_argument("-d", required=True, help="dataset name or ID (the one the 2D network was trained on)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of the 3D training (default: %(default)s)")
    p.add_argument("-c", default="3d_fullres", help="3D configuration (default: %(default)s)")
    p.add_argument("-o", required=True, help="output file, e.g. inflated.pth")
    p.add_argument("-tr", default="EncoderUNet3DTrainer",
                   help="trainer of the 3D training (an EncoderUNet3DTrainer class; default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    args = p.parse_args(argv)
    try:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        if not nnUNet_preprocessed:
            raise ValueError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train.")
        name = maybe_convert_to_dataset_name(args.d)
        folder = Path(nnUNet_preprocessed) / name
        plans_file = folder / f"{args.p}.json"
        if not plans_file.is_file():
            raise ValueError(f"plans {plans_file} not found: run nnUNetv2_plan_and_preprocess -d {args.d}, and for "
                             f"another encoder than efficientnet_lite0 write 3D plans with nnUNetv2_vf_plan_network "
                             f"-d {args.d} -c {args.c} --network EncoderUNet3D --encoder E -p {args.p} (give the -p "
                             f"you will train with).")
        summary = inflate_checkpoint(args.checkpoint, load_json(str(plans_file)),
                                     load_json(str(folder / "dataset.json")), args.o, args.c, args.tr,
                                     args.overwrite)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nnUNetv2_vf_inflate_checkpoint: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {os.path.abspath(args.o)}: {summary['loaded_tensors']} tensors of {summary['network_class_name'].rsplit('.', 1)[-1]} "
          f"({summary['configuration']}, encoder {summary['encoder_name']}, norm {summary['norm']}) initialised by "
          f"{summary['inflation']} inflation of {args.checkpoint}; nnU-Net's -pretrained_weights loader takes "
          f"{summary['loadable_by_nnunet']} of them (all but the final classifiers .seg_layers.).\n"
          f"Next: nnUNetv2_train {args.d} {args.c} FOLD -tr {args.tr} -p {args.p} -pretrained_weights {args.o}")


if __name__ == "__main__":
    main()
