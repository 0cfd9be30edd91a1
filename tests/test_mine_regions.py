"""01_mine_regions.py and the image table: odd and broken inputs, box files, the real SAM automatic mask
generator on a tiny random SAM, open_clip features from a tiny random CLIP, resume after kill -9 and a
two-process torchrun run, both byte-identical to a plain run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script, tiny_open_clip

import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402

SCRIPT = os.path.join(ROOT, "01_mine_regions.py")
mine = load_script("mine_regions", "01_mine_regions.py")

OUTPUTS = ["region_offsets", "boxes", "scores", "areas", "region_features", "image_features", "status"]


def scene(w, h, rects, seed):
    """A noisy background with solid rectangles (x0, y0, x1, y1, rgb)."""
    a = (np.random.default_rng(seed).random((h, w, 3)) * 60 + 100).astype(np.uint8)
    for x0, y0, x1, y1, rgb in rects:
        a[y0:y1, x0:x1] = rgb
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Good images with known boxes, plus every kind of odd or broken file, and a COCO file of the boxes."""
    d = tmp_path_factory.mktemp("odd")
    img = d / "images"
    (img / "sub").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "text"}]}

    def add(name, im, rects, save=None):
        (save or im.save)(img / name)
        iid = len(coco["images"]) + 1
        coco["images"].append({"id": iid, "file_name": name, "width": im.width, "height": im.height})
        for x0, y0, x1, y1, _ in rects:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": iid, "category_id": 1,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})

    r1 = [(10, 10, 90, 70, (255, 0, 0)), (100, 40, 190, 150, (0, 0, 255)), (11, 11, 89, 69, (255, 0, 0)),
          (150, 5, 158, 13, (0, 255, 0))]         # the 3rd is a near-duplicate, the 4th too small
    add("a.png", scene(200, 160, r1, 0), r1)
    r2 = [(0, 0, 64, 64, (255, 255, 0))]
    add("sub/b.jpg", scene(128, 96, r2, 1), r2)
    coco["annotations"].append({"id": 99, "image_id": 2, "category_id": 2, "bbox": [70, 10, 40, 30]})  # text: skipped
    add("gray.png", scene(96, 96, [], 2).convert("L"), [])
    add("cmyk.jpg", scene(96, 96, [], 3).convert("CMYK"), [])
    pal = scene(96, 96, [], 4).convert("P")
    pal.info["transparency"] = 0
    add("palette.png", pal, [])
    rgba = scene(96, 96, [], 5).convert("RGBA")
    rgba.putalpha(128)
    add("alpha.png", rgba, [])
    deep = Image.fromarray((np.arange(96 * 96).reshape(96, 96) * 7 % 65536).astype(np.uint16))
    add("deep16.png", deep, [])
    # EXIF orientation 6: stored 120 wide x 80 high, shown upright as 80 x 120
    rot = scene(120, 80, [], 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", rot, [], save=lambda p: rot.save(p, exif=exif.tobytes()))
    add("tiny.png", scene(1, 1, [], 7), [])
    (img / "broken.jpg").write_bytes(np.random.default_rng(8).bytes(500))
    (img / "empty.png").write_bytes(b"")
    (img / "notes.txt").write_text("not an image")
    full = img / "full.png"
    scene(64, 64, [], 9).save(full)
    (img / "truncated.png").write_bytes(full.read_bytes()[:300])
    with open(d / "coco.json", "w") as f:
        json.dump(coco, f)
    return d


def run(folder, work, *extra):
    return mine.main(["--images", str(folder / "images"), "--work", str(work), "--boxes", str(folder / "coco.json"),
                      "--features", "pixels", "--min-box-side", "16", "--min-image-side", "32", *extra])


def test_image_table_accounts_for_every_file(odd_folder, tmp_path):
    run(odd_folder, tmp_path / "w", "--chunk-size", "3")
    table = image_io.read_image_table(str(tmp_path / "w"))
    names = [os.path.relpath(table.path(i), table.root) for i in range(len(table))]
    assert names == sorted(["a.png", "sub/b.jpg", "gray.png", "cmyk.jpg", "palette.png", "alpha.png", "deep16.png",
                            "rotated.jpg", "tiny.png", "broken.jpg", "empty.png", "notes.txt", "full.png",
                            "truncated.png"])
    status = {n: image_io.IMAGE_STATUS[s] for n, s in zip(names, table.status)}
    expect = {"a.png": "ok", "sub/b.jpg": "ok", "gray.png": "ok", "cmyk.jpg": "ok", "palette.png": "ok",
              "alpha.png": "ok", "deep16.png": "ok", "rotated.jpg": "ok", "tiny.png": "ok", "full.png": "ok",
              "broken.jpg": "not_image", "empty.png": "empty_file", "notes.txt": "not_image",
              "truncated.png": "truncated"}
    assert {k: status[k] for k in expect} == expect
    sizes = dict(zip(names, map(tuple, table.size)))
    assert sizes["rotated.jpg"] == (80, 120) and sizes["a.png"] == (200, 160) and sizes["broken.jpg"] == (0, 0)
    m = workdir.read_manifest(str(tmp_path / "w" / "images"))
    assert sum(m["status_counts"].values()) == 14 and m["status_counts"]["ok"] == 10

    # odd modes decode to 8-bit RGB with sensible content
    deep, _ = image_io.open_image(str(odd_folder / "images" / "deep16.png"))
    assert deep.mode == "RGB" and np.asarray(deep).max() > 200     # 16-bit scaled down, not clipped
    alpha, _ = image_io.open_image(str(odd_folder / "images" / "alpha.png"))
    assert alpha.mode == "RGB" and np.asarray(alpha).min() > 100   # half-transparent over white


def test_boxes_and_statuses(odd_folder, tmp_path):
    manifest = run(odd_folder, tmp_path / "w")
    out = {k: workdir.load(str(tmp_path / "w" / "regions"), k) for k in OUTPUTS}
    table = image_io.read_image_table(str(tmp_path / "w"))
    names = [os.path.relpath(table.path(i), table.root) for i in range(len(table))]
    a, b = names.index("a.png"), names.index("sub/b.jpg")
    off = out["region_offsets"]
    assert off[0] == 0 and off[-1] == len(out["boxes"]) and np.all(np.diff(off) >= 0)
    # a.png: the near-duplicate and the too-small box are gone, the text box of b.jpg is excluded
    np.testing.assert_array_equal(out["boxes"][off[a]:off[a + 1]], [[100, 40, 190, 150], [10, 10, 90, 70]])
    np.testing.assert_array_equal(out["boxes"][off[b]:off[b + 1]], [[0, 0, 64, 64]])
    status = [mine.REGION_STATUS[s] for s in out["status"]]
    assert status[a] == status[b] == "ok"
    assert status[names.index("broken.jpg")] == "skipped" and status[names.index("tiny.png")] == "too_small"
    assert status[names.index("gray.png")] == "no_regions"
    norms = np.linalg.norm(out["region_features"].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1, atol=2e-3)
    assert np.all(out["image_features"][names.index("broken.jpg")] == 0)
    assert np.linalg.norm(out["image_features"][a].astype(np.float32)) == pytest.approx(1, abs=2e-3)
    # the red box's stand-in feature is red: its R grid values are above G and B
    red = out["region_features"][off[a] + 1].astype(np.float32).reshape(8, 8, 3)
    assert (red[..., 0] > red[..., 1]).all()
    assert manifest["status_counts"]["ok"] == 2 and manifest["rows"]["boxes"] == 3
    # the stand-in feature of an image with regions is the normalised mean of its regions' (choice 26); one
    # without regions keeps its own thumbnail
    f = out["region_features"][off[a]:off[a + 1]].astype(np.float32).mean(0)
    np.testing.assert_allclose(out["image_features"][a].astype(np.float32), f / np.linalg.norm(f), atol=2e-3)
    g = names.index("gray.png")
    thumb = mine.PixelFeatures()(image_io.open_image(str(odd_folder / "images" / "gray.png"))[0],
                                 np.array([[0, 0, *table.size[g]]], np.float32))[0]
    np.testing.assert_array_equal(out["image_features"][g], thumb)
    # complete: a rerun does nothing
    again = run(odd_folder, tmp_path / "w")
    assert again["finished"] == manifest["finished"]
    # ... unless the folder was made by another feature definition: refused, never silently reused
    m = json.loads((tmp_path / "w" / "regions" / "manifest.json").read_text())
    m["features"]["model"] = "pixels8x8"
    (tmp_path / "w" / "regions" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="made with 'pixels8x8'.*--force"):
        run(odd_folder, tmp_path / "w")


def test_clear_errors(odd_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no files"):
        mine.main(["--images", str(empty), "--work", str(tmp_path / "w0"), "--boxes", str(odd_folder / "coco.json")])
    with pytest.raises(SystemExit):
        mine.main(["--images", str(odd_folder / "images"), "--work", str(tmp_path / "w1")])   # SAM without checkpoint
    with pytest.raises(SystemExit):
        mine.main(["--images", str(odd_folder / "images"), "--sam-checkpoint", str(tmp_path / "missing.pth")])
    run(odd_folder, tmp_path / "w2")
    other = tmp_path / "other"
    other.mkdir()
    scene(64, 64, [], 0).save(other / "x.png")
    with pytest.raises(SystemExit, match="other images"):
        mine.main(["--images", str(other), "--work", str(tmp_path / "w2"), "--features", "pixels",
                   "--boxes", str(odd_folder / "coco.json"), "--force"])


def test_tiny_sam_automatic_mask_generator(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    scene(96, 80, [(10, 10, 60, 50, (255, 0, 0))], 0).save(img / "a.png")
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(mine.build_sam("tiny", None).state_dict(), ckpt)
    manifest = mine.main(["--images", str(img), "--work", str(tmp_path / "w"), "--sam-model", "tiny",
                          "--sam-checkpoint", str(ckpt), "--features", "pixels", "--points-per-side", "3",
                          "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "1",
                          "--dedup-iou", "1", "--min-box-side", "1", "--min-image-side", "1"])
    boxes = workdir.load(str(tmp_path / "w" / "regions"), "boxes")
    assert manifest["source"] == "sam:tiny" and len(boxes) > 0
    assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 2] <= 96) and np.all(boxes[:, 3] <= 80)

    # the same generator called directly: its mask boxes, filtered, are what the stage stored
    from segment_anything import SamAutomaticMaskGenerator
    sam = mine.build_sam("tiny", str(ckpt))
    gen = SamAutomaticMaskGenerator(sam, points_per_side=3, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1)
    image, _ = image_io.open_image(str(img / "a.png"))
    b, s, a = mine.sam_regions(gen, image, 1500)
    b, s, a = mine.filter_boxes(b, s, a, 96, 80, 1, 1, 0)
    np.testing.assert_allclose(b, boxes)


def test_open_clip_features_from_a_local_file(odd_folder, tmp_path):
    cfg_file, weights, model, preprocess = tiny_open_clip(tmp_path)
    work = tmp_path / "w"
    mine.main(["--images", str(odd_folder / "images"), "--work", str(work), "--boxes", str(odd_folder / "coco.json"),
               "--features", "clip", "--clip-model", "kit-tiny-clip", "--clip-config", str(cfg_file),
               "--clip-pretrained", str(weights), "--min-box-side", "16", "--min-image-side", "32", "--device", "cpu"])
    feats = workdir.load(str(work / "regions"), "region_features")
    boxes = workdir.load(str(work / "regions"), "boxes")
    assert feats.shape == (3, 32) and feats.dtype == np.float16
    image, _ = image_io.open_image(str(odd_folder / "images" / "a.png"))
    with torch.no_grad():
        ref = model.eval().encode_image(preprocess(image.crop(tuple(int(v) for v in boxes[0])))[None])
    ref = torch.nn.functional.normalize(ref, dim=-1)[0].numpy()
    np.testing.assert_allclose(feats[0].astype(np.float32), ref, atol=2e-3)


def load_outputs(work):
    return {k: np.load(os.path.join(work, "regions", k + ".npy")).tobytes() for k in OUTPUTS}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    (d / "images").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    rng = np.random.default_rng(0)
    for i in range(120):
        rects = [(int(x), int(y), int(x) + 40, int(y) + 30, tuple(int(c) for c in rng.integers(0, 255, 3)))
                 for x, y in rng.integers(0, 50, (3, 2))]
        scene(100, 90, rects, i).save(d / "images" / f"{i:03d}.png")
        coco["images"].append({"id": i, "file_name": f"{i:03d}.png", "width": 100, "height": 90})
        coco["annotations"] += [{"id": 3 * i + k, "image_id": i, "category_id": 1, "bbox": [r[0], r[1], 40, 30],
                                 "score": float(rng.random())} for k, r in enumerate(rects)]
    (d / "images" / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "coco.json").write_text(json.dumps(coco))
    return d


def cli(folder, work, chunk="3"):
    return [sys.executable, SCRIPT, "--images", str(folder / "images"), "--work", str(work), "--boxes",
            str(folder / "coco.json"), "--features", "pixels", "--min-box-side", "8", "--min-image-side", "32",
            "--chunk-size", chunk]


def test_kill_and_resume_equals_plain_run(many_images, tmp_path):
    plain = tmp_path / "plain"
    subprocess.run(cli(many_images, plain), check=True, capture_output=True)
    # kill -9 as soon as some chunks are on disk, then rerun
    work = tmp_path / "killed"
    proc = subprocess.Popen(cli(many_images, work, chunk="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    regions = str(work / "regions")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(regions, "chunks")) and len(chunk_engine.done_chunks(regions)) >= 5:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(chunk_engine.done_chunks(regions))
    assert 5 <= done < 121 and not (work / "regions" / "manifest.json").exists()
    with open(chunk_engine.chunk_path(regions, 100, ".x.tmp.npz"), "wb") as f:
        f.write(b"half-written")                                # never taken as done
    subprocess.run(cli(many_images, work, chunk="1"), check=True, capture_output=True)
    assert load_outputs(work) == load_outputs(plain)
    assert not (work / "regions" / "chunks").exists()


def test_loader_workers_and_cross_image_batches(many_images, tmp_path):
    # decoding and preprocessing in DataLoader workers, CLIP on batches gathered across images: the same bytes
    # as the in-process loop for any number of workers; the pixel stand-in's bytes also for any --feature-batch,
    # CLIP's within a float16 step of one crop per forward (float sums depend on the batch's shape, not on the
    # images around a crop)
    cfg_file, weights, _, _ = tiny_open_clip(tmp_path, "clip.pt")
    clip = ["--features", "clip", "--clip-model", "kit-tiny-clip", "--clip-config", str(cfg_file),
            "--clip-pretrained", str(weights), "--device", "cpu"]

    def outputs(name, *flags):
        base = ["--images", str(many_images / "images"), "--work", str(tmp_path / name), "--boxes",
                str(many_images / "coco.json"), "--min-box-side", "8", "--min-image-side", "32", "--chunk-size", "50"]
        mine.main(base + list(flags))
        return {k: np.load(tmp_path / name / "regions" / f"{k}.npy") for k in OUTPUTS}

    pix = [outputs(f"pix{w}{b}", "--features", "pixels", "--workers", w, "--feature-batch", b)
           for w, b in (("0", "1"), ("2", "512"), ("1", "7"))]
    for other in pix[1:]:
        assert all(other[k].tobytes() == pix[0][k].tobytes() for k in OUTPUTS)
    one = outputs("clip_one", *clip, "--workers", "0", "--feature-batch", "1")
    two = outputs("clip_w2", *clip, "--workers", "2", "--feature-batch", "64")
    again = outputs("clip_w0", *clip, "--workers", "0", "--feature-batch", "64")
    assert all(two[k].tobytes() == again[k].tobytes() for k in OUTPUTS)            # workers change no byte
    for k in OUTPUTS:
        if k.endswith("features"):
            d = np.abs(two[k].astype(np.float32) - one[k].astype(np.float32))
            assert d.max() <= 2 ** -10 and (d > 0).mean() < 0.01, (k, d.max(), (d > 0).mean())
        else:
            assert two[k].tobytes() == one[k].tobytes(), k
    assert len(two["boxes"]) == 360 and (two["status"] == mine.REGION_STATUS.index("skipped")).sum() == 1


def test_two_process_torchrun_equals_plain_run(many_images, tmp_path):
    plain = tmp_path / "plain"
    subprocess.run(cli(many_images, plain, chunk="7"), check=True, capture_output=True)
    work = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *cli(many_images, work, chunk="4")[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    # different chunk sizes and process counts, same bytes
    assert load_outputs(work) == load_outputs(plain)
    for name in image_io.TABLE_ARRAYS + ["name_offsets", "name_bytes"]:
        assert np.array_equal(np.load(work / "images" / f"{name}.npy"), np.load(plain / "images" / f"{name}.npy"))


def test_float_and_16_bit_images_keep_their_content(tmp_path):
    # a float TIFF in 0..1 is scaled by 255 (it used to come out nearly black); 16-bit is rint(v / 257) as
    # before, converted in blocks of rows in integers instead of one float64 copy of the whole image
    a = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(a).save(tmp_path / "f.tif")
    img, st = image_io.open_image(str(tmp_path / "f.tif"))
    x = np.asarray(img)[..., 0]
    assert st == "ok" and img.mode == "RGB" and x.min() == 0 and x.max() == 255 and abs(x.mean() - 127.5) < 1
    b = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21
    Image.fromarray(b).save(tmp_path / "d.png")
    img, st = image_io.open_image(str(tmp_path / "d.png"))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.clip(np.rint(b / 257.0), 0, 255).astype(np.uint8))


def test_bad_device_and_counts_are_one_line(tmp_path):
    for bad in ("bogus", "cuda:x", "gpu"):
        with pytest.raises(SystemExit, match="--device .*auto, cpu, cuda or cuda:N"):
            workdir.stage_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here"):
            workdir.stage_device("cuda")
    assert workdir.stage_device("cpu").type == "cpu"
    mod = load_script("make_demo_data", "00_make_demo_data.py")
    for n in ("0", "-5"):
        with pytest.raises(SystemExit, match="--num-images"):
            mod.main(["--out", str(tmp_path / "d"), "--num-images", n])
