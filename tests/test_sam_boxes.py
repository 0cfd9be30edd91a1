"""sam_boxes.BoxGenerator against the stock automatic mask generators (segment_anything's and sam2's) on random
weights: the same boxes, scores and areas in the same order, for models whose masks vary with the prompt
(sam_boxes.vary_with_prompt) and for plain random ones, with and without crop layers, at the default thresholds
and where most masks survive; batching changes no box; 01 end to end with either generator, SAM 2 through 01, and
weights files that are not the model's as one line."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sam_boxes
import workdir
import image_io
from conftest import load_script

mine = load_script("mine_regions", "01_mine_regions.py")
demo = load_script("make_demo_data", "00_make_demo_data.py")


def photo(seed, w, h):
    """A demo-world image (objects on a textured background) cut to w x h."""
    return np.ascontiguousarray(demo.make_image(seed, 0, max(w, h))[0][:h, :w])


def model(name, vary=True, seed=0):
    torch.manual_seed(seed)
    sam = sam_boxes.build_sam(name)
    return sam_boxes.vary_with_prompt(sam) if vary else sam


def assert_same(ours, stock):
    for a, b, what in zip(ours, stock, ("boxes", "scores", "areas")):
        assert a.shape == b.shape, (what, a.shape, b.shape)
        np.testing.assert_array_equal(a, b, err_msg=what)


RELAXED = dict(pred_iou_thresh=0.5, stability_score_thresh=0.5)         # most masks survive the filters
CASES = [  # (model, masks vary with the prompt, image w x h, settings)
    ("tiny", True, (200, 150), dict(points_per_side=8, **RELAXED)),
    ("tiny", True, (150, 200), dict(points_per_side=9)),                  # the defaults; an odd grid: a tail batch
    ("tiny", True, (180, 140), dict(points_per_side=5, crop_n_layers=1, points_per_batch=12, **RELAXED)),
    ("tiny", False, (160, 120), dict(points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0)),
    ("tiny", False, (160, 120), dict(points_per_side=4)),
    ("tiny-sam2", True, (200, 150), dict(points_per_side=7, **RELAXED)),
    ("tiny-sam2", True, (170, 130), dict(points_per_side=4, crop_n_layers=1, box_nms_thresh=0.5, **RELAXED)),
]


@pytest.mark.parametrize("name,vary,size,settings", CASES)
def test_same_boxes_as_the_stock_generator(name, vary, size, settings):
    sam = model(name, vary)
    image = photo(len(settings) + size[0], *size)
    stock = sam_boxes.stock_boxes(sam_boxes.stock_generator(sam, **settings).generate(image))
    ours = sam_boxes.BoxGenerator(sam, **settings).generate(image)
    assert_same(ours, stock)
    if vary and settings.get("pred_iou_thresh") == 0.5:
        assert len(np.unique(ours[0], axis=0)) >= 10          # the masks vary: NMS and the filters are exercised


def test_batching_changes_no_box():
    sam = model("tiny")
    images = [photo(s, 190 + 10 * s, 150) for s in range(3)]
    settings = dict(points_per_side=8, **RELAXED)
    ref = [sam_boxes.BoxGenerator(sam, **settings).generate(im) for im in images]
    for extra in (dict(image_batch=3), dict(image_batch=2), dict(chunk_bytes=1)):   # one upsampled mask at a time
        for a, b in zip(sam_boxes.BoxGenerator(sam, **settings, **extra).generate_batch(images), ref):
            assert_same(a, b)
    # another points_per_batch makes other decoder calls (so does the stock generator): the same masks up to
    # float rounding, where a logit at the mask threshold moves an area by a pixel on some CPUs
    for extra in (dict(image_batch=2, points_per_batch=16), dict(points_per_batch=256)):
        for a, b in zip(sam_boxes.BoxGenerator(sam, **settings, **extra).generate_batch(images), ref):
            assert all(x.shape == y.shape for x, y in zip(a, b))
            assert np.abs(a[0] - b[0]).max() <= 1
            np.testing.assert_allclose(a[1], b[1], atol=1e-5)
            assert (np.abs(a[2] - b[2]) <= 2).all()
            assert (a[0] == b[0]).mean() > 0.99 and (a[2] == b[2]).mean() > 0.95
    # SAM 2's own batched encoder (set_image_batch) too
    sam2 = model("tiny-sam2")
    ref = [sam_boxes.BoxGenerator(sam2, **settings).generate(im) for im in images]
    for a, b in zip(sam_boxes.BoxGenerator(sam2, **settings, image_batch=3).generate_batch(images), ref):
        assert_same(a, b)


def test_bf16_moves_few_boxes_far():
    sam = model("tiny")
    image = photo(4, 200, 150)
    settings = dict(points_per_side=8, **RELAXED)
    fp32 = sam_boxes.BoxGenerator(sam, **settings).generate(image)
    bf16 = sam_boxes.BoxGenerator(sam, **settings, dtype=torch.bfloat16).generate(image)
    assert bf16[0].dtype == fp32[0].dtype and bf16[1].dtype == np.float32 and len(fp32[0]) >= 20
    # boundary pixels move (bf16 logits), boxes by a pixel or two: most fp32 boxes have a bf16 box at IoU 0.9
    assert sam_boxes.matched_share(bf16[0], fp32[0], 0.9) >= 0.8
    assert sam_boxes.matched_share(fp32[0][:0], fp32[0]) == 0.0 and sam_boxes.matched_share(fp32[0], fp32[0]) == 1.0


def write_images(folder, n, size=(200, 150)):
    folder.mkdir()
    for s in range(n):
        Image.fromarray(photo(s, *size)).save(folder / f"{s}.png")
    return folder


SAM_FLAGS = ["--features", "pixels", "--points-per-side", "6", "--pred-iou-thresh", "0.5",
             "--stability-score-thresh", "0.5", "--min-box-side", "4", "--min-image-side", "32", "--workers", "0"]
ARRAYS = ("boxes", "scores", "areas", "region_offsets", "status", "box_source", "region_features")


def regions(work):
    return {k: workdir.load(os.path.join(work, "regions"), k) for k in ARRAYS}


def test_01_box_generator_equals_stock_and_sam_batch(tmp_path, monkeypatch):
    images = write_images(tmp_path / "images", 5)
    build = sam_boxes.build_sam
    monkeypatch.setattr(mine, "build_sam", lambda *a: sam_boxes.vary_with_prompt(build(*a)))
    out = {}
    for label, extra in (("stock", ["--sam-generator", "stock"]), ("boxes", []),
                         ("batch", ["--sam-batch", "2", "--points-per-batch", "16"])):
        torch.manual_seed(0)
        mine.main(["--images", str(images), "--work", str(tmp_path / label), "--sam-model", "tiny"] + SAM_FLAGS + extra)
        out[label] = regions(tmp_path / label)
    assert out["stock"]["boxes"].shape[0] >= 20
    for label in ("boxes", "batch"):
        for k in ARRAYS:
            assert out[label][k].tobytes() == out["stock"][k].tobytes(), (label, k)


def test_sam2_through_01(tmp_path):
    images = write_images(tmp_path / "images", 3)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_sam2.pt"
    torch.save({"model": sam_boxes.build_sam("tiny-sam2").state_dict()}, ckpt)   # sam2's checkpoint layout
    manifest = mine.main(["--images", str(images), "--work", str(tmp_path / "w"), "--sam-model", "tiny-sam2",
                          "--sam-checkpoint", str(ckpt), "--sam-batch", "2", "--features", "pixels",
                          "--points-per-side", "6", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                          "--box-nms-thresh", "1", "--dedup-iou", "1", "--min-box-side", "1", "--min-image-side", "32",
                          "--workers", "0"])
    assert manifest["source"] == "sam:tiny-sam2" and manifest["box_sources"]["sam"] == 3
    boxes = workdir.load(str(tmp_path / "w" / "regions"), "boxes")
    assert len(boxes) > 0 and np.all(boxes[:, 2] <= 200) and np.all(boxes[:, 3] <= 150)
    # the same boxes as SAM2AutomaticMaskGenerator on the same weights, through 01's filter
    sam = sam_boxes.build_sam("tiny-sam2", str(ckpt))
    gen = sam_boxes.stock_generator(sam, points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0,
                                    box_nms_thresh=1)
    expect = []
    for s in range(3):
        image, _ = image_io.open_image(str(images / f"{s}.png"))
        b, sc, a = mine.sam_regions(gen, image, mine.SAM_MAX_SIDE)
        expect.append(mine.filter_boxes(b, sc, a, 200, 150, 1, 1, 0)[0])
    np.testing.assert_array_equal(np.concatenate(expect), boxes)


@pytest.mark.parametrize("name", ["tiny", "tiny-sam2", "vit_b"])
def test_weights_that_are_not_the_model_are_one_line(tmp_path, name):
    images = write_images(tmp_path / "images", 2, (64, 64))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(2000))
    other = tmp_path / "other.pth"                            # a real checkpoint of another model
    torch.save(sam_boxes.tiny_sam().state_dict() if name != "tiny" else {"model": {}}, other)
    for ckpt in (junk, other):
        with pytest.raises(SystemExit) as e:
            mine.main(["--images", str(images), "--work", str(tmp_path / f"w{ckpt.stem}"), "--sam-model", name,
                       "--sam-checkpoint", str(ckpt), "--features", "pixels", "--min-image-side", "8"])
        msg = str(e.value)
        assert msg.startswith(f"error: --sam-checkpoint {ckpt}: not a {name} checkpoint") and "\n" not in msg
        assert not os.path.exists(tmp_path / f"w{ckpt.stem}" / "regions" / "manifest.json")


def test_out_of_memory_halves_the_batches_and_a_bad_image_is_one_error(tmp_path, monkeypatch, capsys):
    images = write_images(tmp_path / "images", 4)
    flags = ["--images", str(images), "--sam-model", "tiny", "--sam-batch", "4", "--points-per-batch", "256",
             "--features", "pixels", "--points-per-side", "6", "--min-box-side", "1", "--min-image-side", "32",
             "--workers", "0"]
    torch.manual_seed(0)
    mine.main(flags + ["--work", str(tmp_path / "ref")])
    real = sam_boxes.BoxGenerator.generate_batch
    calls = []

    def flaky(self, batch):
        calls.append((self.points_per_batch, self.image_batch, len(batch)))
        if len(calls) == 1:                                   # the first call runs out of GPU memory
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if any(im.shape[1] == 200 and im[0, 0, 0] == 255 for im in batch):
            raise ValueError("a bad image (simulated)")
        return real(self, batch)
    monkeypatch.setattr(sam_boxes.BoxGenerator, "generate_batch", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    torch.manual_seed(0)
    mine.main(flags + ["--work", str(tmp_path / "oom")])
    assert calls[0][:2] == (256, 4) and calls[1][:2] == (128, 2), calls
    assert "ran out of GPU memory: now 128 points per decoder call and 2 images" in capsys.readouterr().err
    for k in ARRAYS:                                          # smaller batches, the same bytes
        assert regions(tmp_path / "oom")[k].tobytes() == regions(tmp_path / "ref")[k].tobytes(), k

    # an image that fails inside a batch: that image alone is an error, the others keep their boxes
    bad = np.array(Image.open(images / "2.png"))
    bad[0, 0] = 255
    Image.fromarray(bad).save(images / "2.png")
    calls.clear()
    calls.append(None)                                        # no simulated out-of-memory this time
    torch.manual_seed(0)
    m = mine.main(flags + ["--work", str(tmp_path / "bad")])
    assert m["status_counts"]["error"] == 1 and m["status_counts"]["ok"] + m["status_counts"]["no_regions"] == 3
    status = workdir.load(str(tmp_path / "bad" / "regions"), "status")
    assert mine.REGION_STATUS[status[2]] == "error"
