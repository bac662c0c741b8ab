"""``nnUNetv2_vf_check_inputs``: check a folder of images against a trained model before ``nnUNetv2_predict``.

nnU-Net's prediction gives a plugin trainer no hook on the input images: the predictor only asks the trainer class
to build the network. A wrong channel count then ends in "workers died ... RAM full" from the export workers, and a
2D image given to a 3D model is resampled and predicted slice by slice for minutes before anything looks wrong.
This command reads only the image headers, in seconds, and names every case that cannot be right:

    nnUNetv2_vf_check_inputs -i INPUT_FOLDER -d DATASET -tr TRAINER -p PLANS -c 3d_fullres
    nnUNetv2_vf_check_inputs -i INPUT_FOLDER -m MODEL_FOLDER      # the TRAINER__PLANS__CONFIGURATION folder

Checked per case, against the model's ``dataset.json`` and ``plans.json``: one file per input channel
(``CASE_0000`` ... ``CASE_<C-1>``, the model's file ending), each readable and non-empty, one component per voxel,
and the dimensionality the configuration needs (a 3D configuration needs 3D images with more than one slice).
Exit code 0 when every case fits, 1 otherwise (every problem listed, then the fix).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    if not nnUNet_results:
        raise ValueError("nnUNet_results is not set: export it as for nnUNetv2_predict, or give -m MODEL_FOLDER")
    return Path(get_output_folder(dataset, trainer, plans, configuration))


def expected_inputs(model: Path) -> dict:
    """{"channels": [names], "file_ending": str, "dimensions": 2 or 3, "configuration": str} of a model folder."""
    model = Path(model)
    missing = [n for n in ("dataset.json", "plans.json") if not (model / n).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {model.resolve()} has no {' or '.join(missing)}: give the "
                                f"TRAINER__PLANS__CONFIGURATION folder of a trained model (-m), or -d/-tr/-p/-c")
    dataset_json = json.loads((model / "dataset.json").read_text())
    plans = json.loads((model / "plans.json").read_text())
    configuration = model.name.rsplit("__", 1)[-1]
    conf = plans.get("configurations", {}).get(configuration)
    if conf is None:
        raise ValueError(f"{model / 'plans.json'} has no configuration {configuration!r} (the folder name's last "
                         f"part); give -m the TRAINER__PLANS__CONFIGURATION folder")
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    names = [channels[k] for k in sorted(channels, key=int)]
    return {"channels": names, "file_ending": dataset_json["file_ending"], "configuration": configuration,
            "dimensions": len(conf["patch_size"])}


def check_folder(folder: Path, expected: dict) -> tuple[int, list[str]]:
    """(number of cases, problems) of the images in ``folder`` against ``expected`` (:func:`expected_inputs`)."""
    from nnunetv2_vf.pretrain.dataset import read_image_header

    folder, ending = Path(folder), expected["file_ending"]
    n_channels, dims = len(expected["channels"]), expected["dimensions"]
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder.resolve()} does not exist")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(ending))
    problems, cases = [], {}
    for path in files:
        m = re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), path.name)
        if not m:
            problems.append(f"{path.resolve()}: not named CASE_XXXX{ending} (XXXX = the 4-digit channel index)")
            continue
        cases.setdefault(m.group(1), {})[int(m.group(2))] = path
    if not files:
        others = sorted({''.join(p.suffixes) for p in folder.iterdir() if p.is_file()})
        problems.append(f"{folder.resolve()}: no image ends with the model's file ending {ending}"
                        + (f" (found endings: {', '.join(others)})" if others else " (the folder is empty)"))
    for case, by_channel in sorted(cases.items()):
        missing = [c for c in range(n_channels) if c not in by_channel]
        extra = sorted(c for c in by_channel if c >= n_channels)
        if missing or extra:
            problems.append(
                f"case {case}: {len(by_channel)} channel file(s), the model takes {n_channels} "
                f"({', '.join(f'{i:04d} {n}' for i, n in enumerate(expected['channels']))})"
                + (f"; missing {', '.join(f'{case}_{c:04d}{ending}' for c in missing)}" if missing else "")
                + (f"; not an input of this model: {', '.join(f'{case}_{c:04d}{ending}' for c in extra)}"
                   if extra else ""))
        for channel, path in sorted(by_channel.items()):
            if path.stat().st_size == 0:
                problems.append(f"{path.resolve()}: empty file")
                continue
            try:
                reader = read_image_header(path)
            except RuntimeError as e:
                problems.append(f"{path.resolve()}: unreadable ({str(e).strip().splitlines()[-1][:160]})")
                continue
            size, components = reader.GetSize(), reader.GetNumberOfComponents()
            if components != 1:
                problems.append(f"{path.resolve()}: {components} components per voxel; nnU-Net takes one file per "
                                f"channel (split it into {case}_0000{ending} ... )")
            if dims == 3 and (len(size) < 3 or min(size[:3]) < 2):
                problems.append(f"{path.resolve()}: a {len(size)}D image of size {'x'.join(map(str, size))}; this "
                                f"3D model ({expected['configuration']}) needs 3D volumes with more than one slice")
    return len(cases), problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnUNetv2_vf_check_inputs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="the folder you will give nnUNetv2_predict -i")
    p.add_argument("-m", help="the trained model's TRAINER__PLANS__CONFIGURATION folder (instead of -d/-tr/-p/-c)")
    p.add_argument("-d", help="dataset name or id, as for nnUNetv2_predict")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer, as for nnUNetv2_predict (default: %(default)s)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier, as for nnUNetv2_predict "
                                                     "(default: %(default)s)")
    p.add_argument("-c", default="3d_fullres", help="configuration, as for nnUNetv2_predict (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.m and not args.d:
        p.error("give -m MODEL_FOLDER or -d DATASET (with -tr/-p/-c as for nnUNetv2_predict)")
    try:
        model = Path(args.m) if args.m else model_folder(args.d, args.tr, args.p, args.c)
        expected = expected_inputs(model)
        n, problems = check_folder(Path(args.i), expected)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"nnUNetv2_vf_check_inputs: error: {e}", file=sys.stderr)
        return 1
    want = (f"{len(expected['channels'])} channel(s) ({', '.join(expected['channels'])}), "
            f"{expected['dimensions']}D, files CASE_XXXX{expected['file_ending']}")
    if problems:
        print(f"nnUNetv2_vf_check_inputs: {len(problems)} problem(s) in {os.path.abspath(args.i)} for the model "
              f"{model.resolve()} ({want}):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("Fix: give every case one file per channel, named CASE_0000 ... in the model's channel order, as "
              "3D volumes; then run nnUNetv2_predict.", file=sys.stderr)
        return 1
    print(f"{n} case(s) in {os.path.abspath(args.i)} fit the model ({want}): ready for nnUNetv2_predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
