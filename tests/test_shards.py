"""Tar-shard inputs (webdataset / img2dataset, SA-1B): shards written here with the plain tarfile module, as
other tools write them (json with and without sizes, a corrupt member, a non-image sample, a truncated tar, an
empty shard, a file that is no tar), through 01 -> 02 -> 03 -> 04 -> 05 against the same images as loose
files; SA-1B boxes from the samples' json, mixed with SAM in one run; kill -9 and two processes on shards,
byte-identical; and the image table's peak memory flat in the number of samples."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, free_port, load_script

import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402

demo = load_script("make_demo_data", "00_make_demo_data.py")
mine = load_script("mine_regions", "01_mine_regions.py")
ocr = load_script("extract_ocr", "02_extract_ocr.py")
cl = load_script("cluster", "03_cluster.py")
tr = load_script("train", "04_train.py")
ev = load_script("eval_probes", "05_eval.py")
scale = load_script("bench_scale", os.path.join("bench", "bench_scale.py"))
MINE = os.path.join(ROOT, "01_mine_regions.py")


def add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 0
    tf.addfile(ti, io.BytesIO(data))


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16-image demo world as loose files, and the same images in tar shards written as other tools do,
    with every kind of bad shard and sample around them."""
    d = tmp_path_factory.mktemp("shards")
    demo.main(["--out", str(d / "data"), "--num-images", "16", "--size", "128", "--workers", "1",
               "--mix", "0.4,0.3,0.3", "--vocab-size", "12", "--plain-words"])
    names = sorted(os.listdir(d / "data" / "images"))
    blob = {n: (d / "data" / "images" / n).read_bytes() for n in names}
    sh = d / "shards"
    sh.mkdir()
    with tarfile.open(sh / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:     # img2dataset-like
        for n in names[:8]:
            key = n[:-4]
            add(tf, f"{key}.png", blob[n])
            add(tf, f"{key}.json", json.dumps({"key": key, "status": "success", "width": 128, "height": 128,
                                               "original_width": 128, "original_height": 128,
                                               "caption": "x"}).encode())
            add(tf, f"{key}.txt", b"a caption")
        add(tf, "bad0.jpg", b"\xff\xd8\xff not really a jpeg")             # corrupt, its json has a size
        add(tf, "bad0.json", json.dumps({"key": "bad0", "width": 200, "height": 100}).encode())
        add(tf, "bad1.webp", b"RIFF garbage")                               # corrupt, no json
        add(tf, "meta.json", b"{}")                                         # a sample without an image
        add(tf, "meta.txt", b"caption only")
    with tarfile.open(sh / "00001.tar", "w") as tf:                         # images without json (GNU format)
        for n in names[8:]:
            add(tf, f"./{n}", blob[n])
    (sh / "00002.tar").write_bytes(b"")                                     # an empty shard
    grey = np.full((128, 128, 3), 128, np.uint8)
    with tarfile.open(sh / "00003.tar", "w") as tf:
        add(tf, "blank0.png", png(grey))
        add(tf, "blank1.png", png(grey))
    raw = (sh / "00003.tar").read_bytes()
    (sh / "00003.tar").write_bytes(raw[: 512 * 3 + len(png(grey)) // 2])  # cut inside blank1's data
    (sh / "00004.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # not a tar
    return d


def arrays(work, stage, names):
    return {n: np.load(os.path.join(work, stage, n + ".npy")) for n in names}


@pytest.fixture(scope="module")
def pipeline(world, tmp_path_factory):
    """01 -> 02 -> 03 -> 04 on the loose images and on the shards."""
    out = {}
    for kind, images in (("loose", world / "data" / "images"), ("tar", world / "shards")):
        work = str(tmp_path_factory.mktemp(kind))
        mine.main(["--images", str(images), "--work", work, "--boxes", str(world / "data" / "coco.json"),
                   "--features", "pixels", "--min-box-side", "8", "--min-image-side", "32", "--chunk-size", "5"])
        ocr.main(["--work", work, "--det-limit-side", "64", "--chunk-size", "6", "--threads", "1"])
        cl.main(["--work", work, "--k", "8", "--iters", "5", "--fit-on", "regions"])   # blank0 is an extra image
        tr.main(["--work", work, "--method", "rice", "--model", "tiny", "--region-blocks", "1", "--image-size", "64",
                 "--batch-size", "4", "--steps", "3", "--warmup", "1", "--workers", "0", "--log-every", "1",
                 "--save-every", "3", "--crop", "random"])
        out[kind] = work
    return out


def test_table_accounts_for_every_sample(pipeline):
    table = image_io.read_image_table(pipeline["tar"])
    m = workdir.read_manifest(os.path.join(pipeline["tar"], "images"))
    status = {table.name(i): image_io.IMAGE_STATUS[s] for i, s in enumerate(table.status)}
    assert len(table) == 16 + 3 + 2 and m["rows"] == 21
    assert status["bad0.jpg"] == "ok" and tuple(table.size[list(status).index("bad0.jpg")]) == (200, 100)
    assert status["bad1.webp"] == "not_image" and status["meta"] == "no_image"
    assert status["blank0.png"] == "ok" and status["blank1.png"] == "truncated"
    assert sum(v == "ok" for v in status.values()) == 18
    assert m["shard_status_counts"] == {"ok": 2, "empty": 1, "truncated": 1, "not_tar": 1, "missing": 0}
    assert sum(m["status_counts"].values()) == 21
    # the json travels with the sample; a GNU-style "./" prefix is not part of the name
    i = list(status).index("00003.png")
    assert table.read_json(i)["key"] == "00003" and "00010.png" in status
    regions = workdir.read_manifest(os.path.join(pipeline["tar"], "regions"))
    assert regions["status_counts"]["decode_error"] == 1 and regions["status_counts"]["skipped"] == 3
    assert sum(regions["status_counts"].values()) == 21
    ocr_m = workdir.read_manifest(os.path.join(pipeline["tar"], "ocr"))
    assert sum(ocr_m["status_counts"].values()) == 21 and ocr_m["status_counts"]["read_error"] == 1


def test_same_arrays_as_loose_files(pipeline):
    loose, tar = pipeline["loose"], pipeline["tar"]
    t_tar, t_loose = image_io.read_image_table(tar), image_io.read_image_table(loose)
    names = [t_tar.name(i) for i in range(len(t_tar))]
    rows = np.array([names.index(t_loose.name(i).split("/")[-1]) for i in range(len(t_loose))])
    assert np.array_equal(t_tar.size[rows], t_loose.size)
    # regions: the extra samples add no region, so the region arrays are the same bytes
    for n in ("boxes", "scores", "areas", "region_features"):
        assert np.load(os.path.join(tar, "regions", n + ".npy")).tobytes() == \
            np.load(os.path.join(loose, "regions", n + ".npy")).tobytes(), n
    for n in ("image_features", "status", "box_source"):
        a, b = arrays(tar, "regions", [n])[n], arrays(loose, "regions", [n])[n]
        assert np.array_equal(a[rows], b), n
    assert np.array_equal(np.diff(arrays(tar, "regions", ["region_offsets"])["region_offsets"])[rows],
                          np.diff(arrays(loose, "regions", ["region_offsets"])["region_offsets"]))
    for n in ("boxes", "scores", "tokens", "text_bytes"):
        assert np.load(os.path.join(tar, "ocr", n + ".npy")).tobytes() == \
            np.load(os.path.join(loose, "ocr", n + ".npy")).tobytes(), n
    assert len(np.load(os.path.join(tar, "ocr", "boxes.npy"))) > 0
    for n in ("centres", "region_labels"):
        assert np.load(os.path.join(tar, "clusters", n + ".npy")).tobytes() == \
            np.load(os.path.join(loose, "clusters", n + ".npy")).tobytes(), n
    # 04: the same training images in the same order, the same losses
    assert np.array_equal(np.load(os.path.join(tar, "train", "train_images.npy")),
                          rows[np.load(os.path.join(loose, "train", "train_images.npy"))])
    logs = [[json.loads(line) for line in open(os.path.join(w, "train", "log.jsonl"))] for w in (tar, loose)]
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-6)
    assert len(logs[0]) == 3


def test_eval_reads_shards(world, pipeline, tmp_path):
    """05 with --images as shards: the same features as the loose images, a missing one counted."""
    ckpt = os.path.join(pipeline["tar"], "train", "ckpt", "latest.pt")
    flags = ["--coco", str(world / "data" / "coco.json"), "--masks", str(world / "data" / "masks"),
             "--encoder", f"kit={ckpt}", "--tsne-max", "0", "--c-refine", "0", "--dense-max-patches", "500"]
    ev.main(["--images", str(world / "data" / "images"), "--out", str(tmp_path / "loose"), *flags])
    ev.main(["--images", str(world / "shards"), "--out", str(tmp_path / "tar"), *flags])
    for n in ("status", "size", "image_features", "pooled", "region", "dense_tokens"):
        a = np.load(tmp_path / "loose" / "features" / "kit" / f"{n}.npy")
        b = np.load(tmp_path / "tar" / "features" / "kit" / f"{n}.npy")
        assert a.tobytes() == b.tobytes(), n
    rep = json.loads((tmp_path / "tar" / "report.json").read_text())
    assert rep["data"]["images"]["ok"] == 16


def test_sa1b_boxes_from_the_json_and_mixed_with_sam(tmp_path):
    """SA-1B tars: boxes from each sample's json (no --boxes, no SAM checkpoint needed); a run over SA-1B tars
    and img2dataset tars together: SA-1B samples keep their boxes, the others go through SAM."""
    demo.main(["--out", str(tmp_path / "sa"), "--num-images", "5", "--size", "128", "--workers", "1",
               "--format", "sa1b", "--shard-size", "3"])
    m = mine.main(["--images", str(tmp_path / "sa" / "sa1b"), "--work", str(tmp_path / "w"), "--features",
                   "pixels", "--min-box-side", "1", "--min-image-side", "32", "--dedup-iou", "1"])
    assert m["box_sources"]["sample_json"] == 5 and m["box_sources"]["sam"] == 0
    coco = json.loads((tmp_path / "sa" / "coco.json").read_text())
    text = {c["id"] for c in coco["categories"] if c["name"] == "text"}
    table = image_io.read_image_table(str(tmp_path / "w"))
    off = np.load(tmp_path / "w" / "regions" / "region_offsets.npy")
    boxes = np.load(tmp_path / "w" / "regions" / "boxes.npy")
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    for i in range(len(table)):
        want = sorted(tuple(float(v) for v in (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                a["bbox"][1] + a["bbox"][3]))
                      for a in coco["annotations"] if a["image_id"] == by_name[table.name(i)]
                      and a["category_id"] not in text)
        got = sorted(tuple(float(v) for v in b) for b in boxes[off[i]: off[i + 1]])
        assert np.allclose(got, want), table.name(i)
    # mixed: a list file naming the SA-1B tars and a webdataset tar
    demo.main(["--out", str(tmp_path / "wds"), "--num-images", "2", "--size", "128", "--workers", "1",
               "--format", "webdataset", "--seed", "3"])
    lst = tmp_path / "mixed.txt"
    lst.write_text("\n".join(sorted(str(p) for p in (tmp_path / "sa" / "sa1b").glob("*.tar")) +
                             [str(tmp_path / "wds" / "shards" / "00000.tar")]) + "\n")
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(mine.build_sam("tiny", None).state_dict(), ckpt)
    m = mine.main(["--images", str(lst), "--work", str(tmp_path / "mixed"), "--features", "pixels",
                   "--sam-model", "tiny", "--sam-checkpoint", str(ckpt), "--points-per-side", "2",
                   "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--min-box-side", "1",
                   "--min-image-side", "32", "--dedup-iou", "1"])
    assert m["box_sources"] == {"none": 0, "box_file": 0, "sample_json": 5, "sam": 2}
    src = np.load(tmp_path / "mixed" / "regions" / "box_source.npy")
    assert src.tolist() == [mine.BOX_SOURCE.index("sample_json")] * 5 + [mine.BOX_SOURCE.index("sam")] * 2
    assert np.load(tmp_path / "mixed" / "regions" / "boxes.npy")[: len(boxes)].tobytes() == boxes.tobytes()


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """60 images in 12 webdataset shards, with the boxes in a COCO file."""
    d = tmp_path_factory.mktemp("many_shards")
    demo.main(["--out", str(d / "data"), "--num-images", "60", "--size", "128", "--workers", "1",
               "--format", "webdataset", "--shard-size", "5"])
    return d


def cli(d, work, chunk):
    return [sys.executable, MINE, "--images", str(d / "data" / "shards" / "{00000..00011}.tar"), "--work", str(work),
            "--boxes", str(d / "data" / "coco.json"), "--features", "pixels", "--min-box-side", "8",
            "--min-image-side", "32", "--chunk-size", str(chunk)]


OUTPUTS = ["region_offsets", "boxes", "scores", "areas", "region_features", "image_features", "status", "box_source"]


def outputs(work):
    out = {k: np.load(os.path.join(work, "regions", k + ".npy")).tobytes() for k in OUTPUTS}
    out.update({f"images/{k}": np.load(os.path.join(work, "images", k + ".npy")).tobytes()
                for k in image_io.TABLE_ARRAYS + ["name_offsets", "name_bytes", "shard_rows"]})
    return out


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_kill_and_resume_on_shards(many_shards, tmp_path):
    plain = tmp_path / "plain"
    subprocess.run(cli(many_shards, plain, 7), check=True, capture_output=True, env=ENV)
    work = tmp_path / "killed"
    proc = subprocess.Popen(cli(many_shards, work, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    regions = str(work / "regions")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(regions, "chunks")) and len(chunk_engine.done_chunks(regions)) >= 4:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= len(chunk_engine.done_chunks(regions)) < 60
    res = subprocess.run(cli(many_shards, work, 1), capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    assert outputs(work) == outputs(plain)
    assert not os.path.exists(os.path.join(regions, "chunks"))


def test_two_processes_on_shards(many_shards, tmp_path):
    plain = tmp_path / "plain"
    subprocess.run(cli(many_shards, plain, 7), check=True, capture_output=True, env=ENV)
    work = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *cli(many_shards, work, 4)[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    assert outputs(work) == outputs(plain)


def test_image_table_memory_is_flat(tmp_path):
    """Peak RSS of building the image table over 2,000 and 20,000 samples: within 15% (tens of MB of base)."""
    rss = {}
    for n in (2_000, 20_000):
        shards = scale.write_shards(str(tmp_path / f"s{n}"), n, per_shard=1000, side=32)
        res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_scale.py"), "--measure", "table",
                              "--images", shards, "--work", str(tmp_path / f"w{n}")], capture_output=True,
                             text=True, env=ENV)
        assert res.returncode == 0, res.stderr[-2000:]
        rss[n] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        assert workdir.read_manifest(str(tmp_path / f"w{n}" / "images"))["rows"] == n
    assert rss[20_000] < 1.15 * rss[2_000], rss


def test_transient_io_errors_retry_then_stop(world, tmp_path, monkeypatch):
    """EIO from the filesystem: retried; still failing: the rank stops with one line and its chunk is not
    recorded as done (no per-image status for a failure that is not the image's)."""
    import errno
    monkeypatch.setattr(image_io, "IO_TRIES", 3)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    work = str(tmp_path / "w")
    table = image_io.ensure_image_table(work, str(world / "shards"))
    real, calls = os.pread, []

    def flaky(fd, n, off):
        calls.append(off)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, off)
    monkeypatch.setattr(os, "pread", flaky)
    img, st = table.open(0)
    assert st == "ok" and img.size == (128, 128) and len(calls) == 3
    monkeypatch.setattr(os, "pread", lambda fd, n, off: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(SystemExit, match="I/O error reading .*00000.tar.*3 tries"):
        mine.main(["--work", work, "--boxes", str(world / "data" / "coco.json"), "--features", "pixels",
                   "--min-box-side", "8", "--min-image-side", "32", "--chunk-size", "5"])
    assert not chunk_engine.done_chunks(os.path.join(work, "regions"))
    monkeypatch.setattr(os, "pread", real)               # the filesystem is back: the rerun does everything
    m = mine.main(["--work", work, "--boxes", str(world / "data" / "coco.json"), "--features", "pixels",
                   "--min-box-side", "8", "--min-image-side", "32", "--chunk-size", "5"])
    assert m["status_counts"]["ok"] > 0 and m["status_counts"]["error"] == 0
    # a missing file is bad data, not a transient failure: no retry, a status
    e = OSError(errno.ENOENT, "No such file")
    assert not image_io.transient(e) and image_io.transient(OSError(errno.ESTALE, "Stale file handle"))


def test_disk_full_is_one_line(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(SystemExit, match=r"cannot write .*00000000\.npz: no space left on device \(.* free, "
                                         r"16 bytes needed\): free space"):
        chunk_engine.run_chunks(str(tmp_path / "stage"), 4, 2, lambda s, e: {"x": np.zeros(e - s)}, "t", {})


def test_warns_when_most_images_are_below_min_image_side(world, tmp_path, capsys):
    """An img2dataset download at 256 px under RICE's 336 px rule: a warning with the counts, before the work
    (from the table's sizes) and after it (from the statuses)."""
    mine.main(["--images", str(world / "shards"), "--work", str(tmp_path / "w"), "--boxes",
               str(world / "data" / "coco.json"), "--features", "pixels", "--min-image-side", "200"])
    err = capsys.readouterr().err
    assert "warning: 18 of 18 readable images (100%) have a short side below --min-image-side 200 px" in err
    assert "(median 128 px)" in err and "img2dataset" in err
    assert "warning: 17 of 17 readable images (100%) are below --min-image-side 200 px" in err
    capsys.readouterr()
    mine.main(["--images", str(world / "shards"), "--work", str(tmp_path / "w2"), "--boxes",
               str(world / "data" / "coco.json"), "--features", "pixels", "--min-image-side", "100"])
    err = capsys.readouterr().err
    assert "--min-image-side" not in err
    # every object of these 128 px images is under RICE's 128 px box side: said once, with the flag to lower
    assert "warning: no region on any of the 17 images searched: every box was below --min-box-side 128 px" in err


def test_members_of_a_key_anywhere_in_the_tar(tmp_path):
    """Members sharing a key form one sample wherever they sit; a member name seen twice is a duplicate row;
    the sizes come from the json when it has them, else from the image header (EXIF rotation applied)."""
    a, b = png(np.zeros((20, 30, 3), np.uint8)), png(np.zeros((40, 10, 3), np.uint8))
    rot = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(rot, format="JPEG", exif=exif.tobytes())
    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        add(tf, "dir/a.png", a)
        add(tf, "dir/b.png", b)
        add(tf, "c.jpg", rot.getvalue())
        add(tf, "dir/a.json", json.dumps({"width": 30, "height": 20}).encode())
        add(tf, "dir/b.seg.png", b"ignored second image")
        add(tf, "dir/a.png", a)
    scan = image_io.scan_shard(str(tmp_path / "x.tar"), image_io.MAX_PIXELS, image_io.ShardFiles())
    rows = [(r["name"], r["status"], tuple(r["size"]), r["json_length"] > 0) for r in scan["rows"]]
    assert rows == [("dir/a.png", "ok", (30, 20), True), ("dir/b.png", "ok", (10, 40), False),
                    ("c.jpg", "ok", (8, 16), False), ("dir/a.png", "duplicate", (0, 0), False)]
    assert scan["status"] == "ok" and scan["members"] == 6 and scan["other_members"] == 1


def test_a_device_failure_stops_the_rank_instead_of_marking_images(world, tmp_path, monkeypatch):
    """A CUDA error is the GPU's, not the image's: 01 stops with one line and records nothing as done; an
    ordinary exception on one image (in a loader worker) stays that image's `error` status."""
    flags = ["--images", str(world / "shards"), "--work", str(tmp_path / "w"), "--boxes",
             str(world / "data" / "coco.json"), "--features", "pixels", "--min-box-side", "8",
             "--min-image-side", "32", "--chunk-size", "5"]
    calls = []

    def failing(self, rows):                            # the device work: the main process's batches
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return encode(self, rows)
    encode, real = mine.PixelFeatures.encode, mine.PixelFeatures.__call__
    monkeypatch.setattr(mine.PixelFeatures, "encode", failing)
    with pytest.raises(SystemExit, match="RuntimeError on cpu: CUDA error.*redone by the next run"):
        mine.main([*flags, "--feature-batch", "4"])
    assert not chunk_engine.done_chunks(str(tmp_path / "w" / "regions"))
    monkeypatch.setattr(mine.PixelFeatures, "encode", encode)

    def odd(self, image, boxes):
        if image.size == (128, 128) and len(boxes) == 1 and np.asarray(image)[0, 0].tolist() == [128] * 3:
            raise ValueError("a decoder bug")           # blank0.png only
        return real(self, image, boxes)
    monkeypatch.setattr(mine.PixelFeatures, "__call__", odd)
    m = mine.main(flags)
    assert m["status_counts"]["error"] == 1


def test_input_forms_and_list_files(world, tmp_path):
    """--images as a glob, one .tar, a list of .tar paths; a list of loose paths (relative and leading out of the
    list's folder: outside_root; absolute; a repeat: duplicate; a missing file: unreadable); clear refusals for a
    pattern that matches nothing and a mixed list."""
    sh = world / "shards"
    for source in (str(sh / "0000[01].tar"), str(sh / "00001.tar")):
        src = image_io.resolve_source(source)
        assert src.kind == "tar" and src.shards[-1].endswith("00001.tar")
    lst = tmp_path / "tars.txt"
    lst.write_text(f"{sh / '00001.tar'}\n# a comment\n{sh / '00000.tar'}\n")
    assert [os.path.basename(p) for p in image_io.resolve_source(str(lst)).shards] == ["00001.tar", "00000.tar"]
    images = world / "data" / "images"
    loose = tmp_path / "images.txt"
    loose.write_text(f"{os.path.relpath(images / '00001.png', tmp_path)}\n{images / '00000.png'}\n"
                     f"{images / '00001.png'}\nnowhere.png\n{images / '00000.png'}\n")
    table = image_io.ensure_image_table(str(tmp_path / "w"), str(loose))
    assert [image_io.IMAGE_STATUS[s] for s in table.status] == ["outside_root", "ok", "ok", "unreadable", "duplicate"]
    assert table.open(1)[0].size == (128, 128)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{sh / '00000.tar'}\n" * 1000 + f"{images / '00000.png'}\n")
    with pytest.raises(SystemExit, match="mixes .tar shards and other paths"):
        image_io.resolve_source(str(mixed))
    with pytest.raises(SystemExit, match="matches no file"):
        image_io.resolve_source(str(tmp_path / "none" / "*.tar"))
    with pytest.raises(SystemExit, match="none of its 2 shards exists"):
        image_io.resolve_source(str(tmp_path / "{0..1}.tar"))
    # duplicates by hash partition equal a plain set-based reference
    h = np.random.default_rng(0).integers(0, 40, 500).astype(np.uint64)
    seen, ref = set(), []
    for v in h.tolist():
        ref.append(v in seen)
        seen.add(v)
    assert image_io.repeated(h, 500, part_rows=7).tolist() == ref == image_io.repeated(h, 500).tolist()
