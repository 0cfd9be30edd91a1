"""00_make_demo_data.py on a small world: files, boxes against masks, classes, words, determinism, resume; the
webdataset and SA-1B shard formats."""
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

demo = load_script("make_demo_data", "00_make_demo_data.py")

N, SIZE = 24, 160


def make(out, seed=0, workers=1, n=N):
    demo.main(["--out", str(out), "--num-images", str(n), "--size", str(SIZE), "--seed", str(seed),
               "--workers", str(workers)])


def files(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for d, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def mtimes(folder):
    return {os.path.relpath(os.path.join(d, n), folder): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    make(out)
    return out


def load(world, name):
    with open(world / name) as f:
        return json.load(f)


def test_files(world):
    names = [f"{i:05d}.png" for i in range(N)]
    assert sorted(os.listdir(world / "images")) == names
    assert sorted(os.listdir(world / "masks")) == names
    assert sorted(p for p in os.listdir(world) if p.endswith(".json")) == ["coco.json", "ground_truth.json",
                                                                           "manifest.json"]
    m = load(world, "manifest.json")
    assert m["stage"] == "demo_data" and m["complete"] and m["config"]["num_images"] == N
    coco = load(world, "coco.json")
    assert m["counts"]["images"] == len(coco["images"]) == N
    n_text = sum(a["category_id"] == demo.TEXT_CATEGORY for a in coco["annotations"])
    assert m["counts"]["text_boxes"] == n_text > 0
    assert m["counts"]["objects"] == len(coco["annotations"]) - n_text > 0
    assert sum(m["counts"]["per_class"].values()) == m["counts"]["objects"]
    with Image.open(world / "images" / names[0]) as im:
        assert im.mode == "RGB" and im.size == (SIZE, SIZE)


def test_boxes_match_masks(world):
    coco = load(world, "coco.json")
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in coco["images"]:
        assert (im["width"], im["height"]) == (SIZE, SIZE)
        mask = np.asarray(Image.open(world / "masks" / im["file_name"]))
        anns = by_image.get(im["id"], [])
        assert anns and mask.shape == (SIZE, SIZE) and int(mask.max()) == len(anns)
        for k, a in enumerate(anns, 1):
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            ys, xs = np.nonzero(mask == k)
            assert a["area"] == len(xs)
            mx, my = xs.min(), ys.min()
            assert np.allclose([mx, my, xs.max() - mx + 1, ys.max() - my + 1], a["bbox"], atol=1)


def test_classes(world):
    coco, gt = load(world, "coco.json"), load(world, "ground_truth.json")
    objects = [c for c in coco["categories"] if c["name"] != "text"]
    assert len(objects) == len(demo.SHAPES) * len(demo.COLOURS) * len(demo.TEXTURES) == 108
    assert len({c["name"] for c in objects}) == 108
    assert [c["id"] for c in coco["categories"]] == list(range(1, 110))
    assert [c for c in coco["categories"] if c["name"] == "text"][0]["id"] == demo.TEXT_CATEGORY
    for c in objects:
        assert c["shape"] in demo.SHAPES and c["colour"] in demo.COLOURS and c["texture"] in demo.TEXTURES
        assert c["name"] == f"{c['colour']}_{c['shape']}_{c['texture']}"
    assert [{k: c[k] for k in ("id", "name", "shape", "colour", "texture")} for c in objects] == gt["classes"]
    cats = {c["id"]: c for c in objects}
    gt_objects = [o for g in gt["images"] for o in g["objects"]]
    coco_objects = [a for a in coco["annotations"] if a["category_id"] != demo.TEXT_CATEGORY]
    assert len(gt_objects) == len(coco_objects)
    for o, a in zip(gt_objects, coco_objects):
        c = cats[a["category_id"]]
        assert o["bbox"] == a["bbox"] and (o["name"], o["shape"], o["colour"], o["texture"]) == (
            c["name"], c["shape"], c["colour"], c["texture"])


def test_words(world):
    coco, gt = load(world, "coco.json"), load(world, "ground_truth.json")
    assert gt["vocabulary"] == demo.VOCAB and len(set(demo.VOCAB)) == 200
    texts = [a for a in coco["annotations"] if a["category_id"] == demo.TEXT_CATEGORY]
    assert texts and all(a["text"].lower() in demo.VOCAB for a in texts)
    assert all("text" not in a for a in coco["annotations"] if a["category_id"] != demo.TEXT_CATEGORY)
    gt_texts = [t for g in gt["images"] for t in g["texts"]]
    assert [(t["text"], t["bbox"]) for t in gt_texts] == [(a["text"], a["bbox"]) for a in texts]
    assert all(t["word"] == t["text"].lower() for t in gt_texts)


def test_deterministic(world, tmp_path):
    reference = files(world)
    make(tmp_path / "same", workers=2)             # the worker count must not change a byte
    assert files(tmp_path / "same") == reference
    make(tmp_path / "other", seed=1)
    other = files(tmp_path / "other")
    assert other["coco.json"] != reference["coco.json"]
    assert sum(other[p] != reference[p] for p in reference if p.startswith("images")) >= N - 1


def test_rerun_and_resume(world, tmp_path, capsys):
    out = tmp_path / "data"
    shutil.copytree(world, out)
    before = mtimes(out)
    make(out)                                       # complete: nothing is rewritten
    assert mtimes(out) == before
    assert "nothing to do" in capsys.readouterr().out
    # an interrupted run: no final manifest, two images missing; the rerun fills them in, keeps the others
    for p in ("manifest.json", "coco.json", "images/00003.png", "masks/00003.png", "images/00017.png"):
        os.remove(out / p)
    make(out)
    assert files(out) == files(world)
    after = mtimes(out)
    assert all(after[p] == before[p] for p in before if p.endswith(".png") and "00003" not in p
               and p != "images/00017.png")
    with pytest.raises(SystemExit):                 # another config never mixes into this folder
        make(out, seed=5)


def test_mix_and_plain_words(world, tmp_path):
    """--mix sets the image kinds; --plain-words prints each word in lower case, the regular face and one size
    (a word's box then depends on the word only); a bad --mix is refused."""
    out = tmp_path / "plain"
    demo.main(["--out", str(out), "--num-images", str(N), "--size", str(SIZE), "--workers", "1",
               "--mix", "0,0.5,0.5", "--plain-words"])
    gt, plain = load(out, "ground_truth.json"), load(out, "coco.json")
    assert all(g["texts"] for g in gt["images"])                         # no objects-only image
    assert load(out, "manifest.json")["config"]["plain_words"] is True
    texts = [a for a in plain["annotations"] if "text" in a]
    assert texts and all(a["text"] == a["text"].lower() for a in texts)
    size = {}                                                            # one font and size: box = f(word)
    for a in texts:
        assert size.setdefault(a["text"], a["bbox"][2:]) == a["bbox"][2:]
    assert len(size) < len(texts)
    for bad in ("0.5,0.5", "0.5,0.6,0.1", "a,b,c"):
        with pytest.raises(SystemExit, match="--mix"):
            demo.main(["--out", str(tmp_path / "bad"), "--num-images", "2", "--mix", bad])


def test_text_box_ink(world, tmp_path):
    """--text-box ink annotates each word by its ink (plus 2 px) instead of its plate: the same pixels, the same
    objects and words, every ink box strictly inside its plate box, the mask following the box."""
    out = tmp_path / "ink"
    demo.main(["--out", str(out), "--num-images", str(N), "--size", str(SIZE), "--workers", "1",
               "--text-box", "ink"])
    assert load(out, "manifest.json")["config"]["text_box"] == "ink"
    assert load(world, "manifest.json")["config"]["text_box"] == "plate"
    assert files(out / "images") == files(world / "images")
    plate, ink = load(world, "coco.json")["annotations"], load(out, "coco.json")["annotations"]
    assert len(plate) == len(ink)
    n_text = 0
    for p, q in zip(plate, ink):
        assert p["category_id"] == q["category_id"] and p.get("text") == q.get("text")
        if "text" not in p:
            assert p["bbox"] == q["bbox"]
            continue
        n_text += 1
        (px, py, pw, ph), (qx, qy, qw, qh) = p["bbox"], q["bbox"]
        assert px < qx and py < qy and qx + qw < px + pw and qy + qh < py + ph
        mask = np.asarray(Image.open(out / "masks" / f"{q['image_id']:05d}.png"))
        k = [a["id"] for a in ink if a["image_id"] == q["image_id"]].index(q["id"]) + 1
        assert (mask[qy: qy + qh, qx: qx + qw] == k).all() and (mask == k).sum() == qw * qh
    assert n_text > 0


# ----------------------------------------------------------------------------------------------------------
# --format webdataset / sa1b: 7 images in shards of 3 (the last one partial), at the module world's size and seed,
# so their images, masks and annotations must be the module world's first 7

NS, SHARD = 7, 3
KEYS = ["000000", "000001", "000002", "000010", "000011", "000012", "000020"]   # img2dataset keys, 1 digit in shard


def make_shards(out, fmt, workers=1):
    demo.main(["--out", str(out), "--num-images", str(NS), "--size", str(SIZE), "--seed", "0",
               "--workers", str(workers), "--format", fmt, "--shard-size", str(SHARD)])


@pytest.fixture(scope="module")
def wds_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("wds") / "data"
    make_shards(out, "webdataset")
    return out


@pytest.fixture(scope="module")
def sa1b_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("sa1b") / "data"
    make_shards(out, "sa1b")
    return out


def check_shared_files(world, out, names, mask_names, fmt):
    """masks/, coco.json, ground_truth.json of a shard world: the module world's first NS images, renamed."""
    assert not os.path.exists(out / "images")
    assert sorted(os.listdir(out / "masks")) == sorted(mask_names)
    for i, m in enumerate(mask_names):
        assert (out / "masks" / m).read_bytes() == (world / "masks" / f"{i:05d}.png").read_bytes()
    coco, ref = load(out, "coco.json"), load(world, "coco.json")
    assert coco["images"] == [{**im, "file_name": n} for im, n in zip(ref["images"][:NS], names)]
    assert coco["annotations"] == [a for a in ref["annotations"] if a["image_id"] < NS]
    assert coco["categories"] == ref["categories"]
    gt = load(out, "ground_truth.json")
    assert gt["images"] == [{**g, "file_name": n} for g, n in zip(load(world, "ground_truth.json")["images"], names)]
    m = load(out, "manifest.json")
    assert m["complete"] and m["config"]["format"] == fmt and m["config"]["shard_size"] == SHARD
    assert m["counts"]["shards"] == 3 and m["counts"]["images"] == NS
    assert "format" not in load(world, "manifest.json")["config"]          # files: the config as before
    return coco


def tar_members(path):
    import tarfile
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for ti in members:                                                   # fixed headers: reruns agree
            assert (ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname) == (0, 0o444, 0, 0, "bigdata", "bigdata")
            assert ti.isfile() and not ti.name.startswith(".")
        return [(ti.name, tar.extractfile(ti).read()) for ti in members]


def test_webdataset_shards(world, wds_world):
    import hashlib
    import pyarrow.parquet as pq
    import webdataset as wds
    shards = wds_world / "shards"
    assert sorted(os.listdir(shards)) == sorted(f"{s:05d}{ext}" for s in range(3)
                                                for ext in (".tar", ".parquet", "_stats.json"))
    coco = check_shared_files(world, wds_world, [f"{k}.png" for k in KEYS], [f"{k}.png" for k in KEYS],
                              "webdataset")
    gt = load(wds_world, "ground_truth.json")["images"]
    urls = [str(shards / f"{s:05d}.tar") for s in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))                # webdataset's own reader
    assert [s["__key__"] for s in samples] == KEYS
    fields = ["url", "caption", "key", "status", "error_message", "width", "height", "original_width",
              "original_height", "exif", "sha256"]
    metas = []
    for i, s in enumerate(samples):
        assert sorted(k for k in s if not k.startswith("__")) == ["json", "png", "txt"]
        assert s["png"] == (world / "images" / f"{i:05d}.png").read_bytes()      # --format files' bytes
        meta = json.loads(s["json"])
        assert list(meta) == fields
        assert meta == dict(url=f"https://demo.invalid/{i:05d}.png", caption=s["txt"].decode(), key=KEYS[i],
                            status="success", error_message=None, width=SIZE, height=SIZE, original_width=SIZE,
                            original_height=SIZE, exif=None, sha256=hashlib.sha256(s["png"]).hexdigest())
        assert coco["images"][i]["file_name"] == f"{meta['key']}.png"
        cap = meta["caption"]                                                # names every object and word
        assert cap and all(f"{o['colour']} {o['shape']}" in cap for o in gt[i]["objects"])
        assert all(t["text"] in cap for t in gt[i]["texts"])
        metas.append(meta)
    for s in range(3):
        names = [n for n, _ in tar_members(shards / f"{s:05d}.tar")]
        keys = KEYS[s * SHARD: (s + 1) * SHARD]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("json", "png", "txt")]
        table = pq.read_table(shards / f"{s:05d}.parquet")
        assert table.column_names == fields and table.to_pylist() == metas[s * SHARD: (s + 1) * SHARD]
        stats = load(shards, f"{s:05d}_stats.json")
        assert stats == dict(count=len(keys), successes=len(keys), failed_to_download=0, failed_to_resize=0,
                             duration=0, start_time=0, end_time=0, status_dict={"success": len(keys)})


def test_webdataset_deterministic_and_resume(wds_world, tmp_path, capsys):
    """Two workers write the same bytes as one; a run killed mid-shard (a tmp file, a missing tar, no manifest)
    is completed by a rerun that keeps the complete shards and leaves no tmp file."""
    reference = files(wds_world)
    make_shards(tmp_path / "two", "webdataset", workers=2)
    assert files(tmp_path / "two") == reference
    out = tmp_path / "resume"
    shutil.copytree(wds_world, out)
    before = mtimes(out)
    make_shards(out, "webdataset")
    assert mtimes(out) == before and "nothing to do" in capsys.readouterr().out
    for p in ("manifest.json", "shards/00001.tar", "masks/000011.png"):
        os.remove(out / p)
    (out / "shards" / ".00001.tar.tmp").write_bytes(b"half a tar")          # what a kill mid-write leaves
    make_shards(out, "webdataset")
    assert files(out) == reference
    after = mtimes(out)
    assert all(after[p] == before[p] for p in before if p.startswith("shards/0000") and "00001" not in p)


# pycocotools' decode under numpy 2 warns about its own __array__; nothing of this test's
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_sa1b_shards(world, sa1b_world, tmp_path):
    from pycocotools import mask as mask_util
    names = [f"sa_{i + 1}.jpg" for i in range(NS)]
    coco = check_shared_files(world, sa1b_world, names, [f"sa_{i + 1}.png" for i in range(NS)], "sa1b")
    assert sorted(os.listdir(sa1b_world / "sa1b")) == [f"sa_{s:06d}.tar" for s in range(3)]
    members = [m for s in range(3) for m in tar_members(sa1b_world / "sa1b" / f"sa_{s:06d}.tar")]
    assert [n for n, _ in members] == [f"sa_{i + 1}.{ext}" for i in range(NS) for ext in ("jpg", "json")]
    n_objects = 0
    for i in range(NS):
        (_, jpg), (_, rec) = members[2 * i], members[2 * i + 1]
        with Image.open(io.BytesIO(jpg)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
            ref = np.asarray(Image.open(world / "images" / f"{i:05d}.png"), np.float32)
            assert np.abs(np.asarray(im, np.float32) - ref).mean() < 6              # quality 95: the image
        rec = json.loads(rec)
        assert rec["image"] == dict(image_id=i + 1, width=SIZE, height=SIZE, file_name=f"sa_{i + 1}.jpg")
        mask = np.asarray(Image.open(sa1b_world / "masks" / f"sa_{i + 1}.png"))
        anns = [a for a in coco["annotations"] if a["image_id"] == i]      # mask id k = k-th of them
        objects = [(k, a) for k, a in enumerate(anns, 1) if a["category_id"] != demo.TEXT_CATEGORY]
        assert [a["id"] for a in rec["annotations"]] == [a["id"] for _, a in objects]
        for (k, a), r in zip(objects, rec["annotations"]):
            assert r["bbox"] == a["bbox"] and r["area"] == a["area"] == int((mask == k).sum())
            assert r["segmentation"]["size"] == [SIZE, SIZE] and isinstance(r["segmentation"]["counts"], str)
            assert (mask_util.decode(r["segmentation"]) == (mask == k)).all()
            (x, y), = r["point_coords"]
            assert mask[y, x] == k
            assert (r["predicted_iou"], r["stability_score"], r["crop_box"]) == (1.0, 1.0, [0, 0, SIZE, SIZE])
            n_objects += 1
    assert n_objects == load(sa1b_world, "manifest.json")["counts"]["objects"] > 0
    make_shards(tmp_path / "two", "sa1b", workers=2)
    assert files(tmp_path / "two") == files(sa1b_world)


def test_format_flags_refused(tmp_path):
    for flag, value in (("--format", "tfrecord"), ("--shard-size", "0"), ("--shard-size", "-3")):
        with pytest.raises(SystemExit, match=flag):
            demo.main(["--out", str(tmp_path / "bad"), "--num-images", "2", flag, value])
    assert not os.path.exists(tmp_path / "bad")
