"""What a careless or hostile user can do to the stages, one class per test, on small generated files: files left
out of a folder walk (counted, warned), the decode budget, paths that leave their root, hostile model configs,
a second copy of a stage on one folder, a full disk, and numeric flags out of range. Each ends in a status with
a count, or one line naming the file or flag and a non-zero exit; never a traceback, never a silent loss."""
import errno
import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import ROOT, load_script

import model as model_py  # noqa: E402
import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402

mine = load_script("mine_regions_failures", "01_mine_regions.py")
ocr = load_script("extract_ocr_failures", "02_extract_ocr.py")
cluster = load_script("cluster_failures", "03_cluster.py")
train = load_script("train_failures", "04_train.py")
ev = load_script("eval_failures", "05_eval.py")
export = load_script("export_failures", "06_export_hf.py")
demo = load_script("demo_failures", "00_make_demo_data.py")
PIXELS = ["--features", "pixels", "--min-box-side", "4", "--min-image-side", "16", "--workers", "0"]


def png(path, w=48, h=40, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)


def boxes_for(root):
    """A COCO box file with one box on every image under root (01 takes it instead of running SAM)."""
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    coco = {"images": [{"id": k, "file_name": f} for k, f in enumerate(files)],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [2, 2, 20, 20]}
                            for k in range(len(files))],
            "categories": [{"id": 1, "name": "thing"}]}
    path = os.path.join(os.path.dirname(root), "boxes.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return ["--boxes", path, *PIXELS]


def status_counts(work):
    return workdir.read_manifest(os.path.join(work, "images"))["status_counts"]


# ----------------------------------------------------------------------------------------------------------
# the inputs


def test_files_left_out_of_a_walk_are_counted_and_warned(tmp_path, monkeypatch, capsys):
    root = tmp_path / "imgs"
    for name in ("a.png", "sub/b.png", "sub/deeper/c.png", ".hidden.png", ".cache/d.png", "locked/e.png",
                 "linked/f.png"):
        png(str(root / name))
    os.symlink(root / "linked", root / "via_link")          # a symlinked folder: taken in
    os.symlink(root, root / "sub" / "loop")                 # back into a folder being walked: left out, counted
    os.symlink(root / "gone.png", root / "broken.png")      # a broken link: not a file
    real_scandir = os.scandir

    def scandir(path="."):                                  # as a folder without read permission (root ignores
        if isinstance(path, str) and os.path.basename(path) == "locked":   # the mode bits: simulated)
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(workdir.os, "scandir", scandir)
    work = str(tmp_path / "w")
    table = image_io.ensure_image_table(work, str(root))
    names = sorted(table.name(i) for i in range(len(table)))
    assert names == ["a.png", "linked/f.png", "sub/b.png", "sub/deeper/c.png", "via_link/f.png"]
    m = workdir.read_manifest(os.path.join(work, "images"))
    assert m["left_out"] == {"hidden": 2, "not_files": 1, "unreadable_folders": 1, "link_loops": 1}
    err = capsys.readouterr().err
    assert "warning: left out of" in err and "2 hidden files or folders" in err and "1 folders that cannot" in err


def test_decode_budget_is_a_status_before_any_decode(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    png(str(root / "small.png"), 40, 30)
    png(str(root / "big.png"), 400, 300)                    # 120,000 pixels
    work = str(tmp_path / "w")
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    mine.main(["--images", str(root), "--work", work, *boxes_for(str(root)), "--max-pixels", "100000"])
    table = image_io.read_image_table(work)
    status = {table.name(i): image_io.IMAGE_STATUS[table.status[i]] for i in range(len(table))}
    assert status == {"big.png": "too_large", "small.png": "ok"}
    assert (40, 30) in decoded and (400, 300) not in decoded and table.max_pixels == 100000
    assert table.open(int(np.flatnonzero(table.status)[0])) == (None, "too_large")
    # the budget is fixed with the table: another value is refused, leaving it out takes the table's
    with pytest.raises(SystemExit, match="built with --max-pixels 100000, not 5000"):
        ocr.main(["--work", work, "--max-pixels", "5000"])
    with pytest.raises(SystemExit, match="--max-pixels 0: must be >= 1"):
        mine.main(["--images", str(root), "--work", str(tmp_path / "w2"), *boxes_for(str(root)), "--max-pixels", "0"])


def test_list_paths_that_leave_the_lists_folder_get_a_status(tmp_path):
    png(str(tmp_path / "lists" / "in.png"))
    png(str(tmp_path / "outside.png"))
    png(str(tmp_path / "other.png"))
    png(str(tmp_path / "elsewhere" / "abs.png"))
    lst = tmp_path / "lists" / "train.txt"
    lst.write_text(f"in.png\n../outside.png\nsub/../../other.png\n{tmp_path / 'elsewhere' / 'abs.png'}\n")
    table = image_io.ensure_image_table(str(tmp_path / "w"), str(lst))
    got = [image_io.IMAGE_STATUS[s] for s in table.status]
    assert got == ["ok", "outside_root", "outside_root", "ok"]          # absolute paths are taken as written
    assert status_counts(str(tmp_path / "w"))["outside_root"] == 2


def test_box_file_names_outside_the_image_root_match_nothing(tmp_path, capsys):
    root = tmp_path / "imgs"
    png(str(root / "a.png"))
    coco = {"images": [{"id": 1, "file_name": "../imgs/a.png"}, {"id": 2, "file_name": "/etc/a.png"}],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [1, 1, 9, 9]} for k in (1, 2)],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "b.json").write_text(json.dumps(coco))
    m = mine.main(["--images", str(root), "--work", str(tmp_path / "w"), "--boxes", str(tmp_path / "b.json"), *PIXELS])
    assert m["box_sources"]["none"] == 1 and m["rows"]["boxes"] == 0
    assert "2 images have a file_name outside the image root" in capsys.readouterr().err
    for bad in ('{"images": [{"id": 1}]}', "[1, 2]", "\xff\xfe"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(SystemExit, match="^error: --boxes .*bad.json: not a COCO detection file"):
            mine.main(["--images", str(root), "--work", str(tmp_path / "w2"), "--boxes", str(tmp_path / "bad.json"),
                       *PIXELS])


def test_coco_file_names_outside_the_image_folder_are_not_read(tmp_path):
    images = tmp_path / "images"
    for i in range(8):
        png(str(images / f"{i}.png"), 64, 64, seed=i)
    png(str(tmp_path / "secret.png"), 64, 64, seed=99)
    files = [f"{i}.png" for i in range(8)] + ["../secret.png", str(tmp_path / "secret.png")]
    coco = {"images": [{"id": k, "file_name": f, "width": 64, "height": 64} for k, f in enumerate(files)],
            "annotations": [{"id": k, "image_id": k, "category_id": 1 + k % 2, "bbox": [4, 4, 30, 30], "area": 900}
                            for k in range(len(files))],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny"))), tmp_path / "t.pt")
    rep = ev.main(["--images", str(images), "--coco", str(tmp_path / "coco.json"), "--encoder", str(tmp_path / "t.pt"),
                   "--out", str(tmp_path / "ev"), "--probes", "image", "--tsne-max", "0", "--c-refine", "0"])
    assert rep["data"]["images"]["status"] == {"ok": 8, "outside_root": 2}


def test_hostile_model_configs_are_refused_before_allocation(tmp_path):
    for field, value in (("num_hidden_layers", 10 ** 9), ("hidden_size", 10 ** 7), ("intermediate_size", -1),
                         ("patch_size", 0), ("num_attention_heads", "16")):
        folder = tmp_path / f"hf_{field}"
        folder.mkdir()
        cfg = {"model_type": "mlcd_vision_model", "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 128, "patch_size": 16, "image_size": 64, field: value}
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="outside|must be"):
            model_py.load_encoder(str(folder))
        with pytest.raises(SystemExit, match=f"^error: cannot load an encoder from {folder}"):
            export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")])
        with pytest.raises(SystemExit, match="^error: "):
            ev.checkpoint_config(str(folder))
    # within every bound, still far beyond memory: refused from the parameter count, nothing allocated
    huge = model_py.ViTConfig(width=16384, heads=128, layers=256, mlp_dim=131072)
    with pytest.raises(ValueError, match="B parameters"):
        model_py.VisionEncoder(huge)
    ckpt = model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny")))
    torch.save({**ckpt, "encoder_config": {**ckpt["encoder_config"], "layers": 10 ** 9}}, tmp_path / "big.pt")
    torch.save({**ckpt, "encoder_config": {**ckpt["encoder_config"], "evil": 1}}, tmp_path / "odd.pt")
    for bad in ("big.pt", "odd.pt"):
        with pytest.raises(ValueError):
            model_py.load_encoder(str(tmp_path / bad))
        with pytest.raises(SystemExit, match="^error: "):
            ev.checkpoint_config(str(tmp_path / bad))
    for cfg in (model_py.preset("tiny"), model_py.preset("clip-tiny"), model_py.preset("clip-B/16", embed_dim=512)):
        assert model_py.param_count(cfg) == model_py.VisionEncoder(cfg).num_params()


# ----------------------------------------------------------------------------------------------------------
# one run per stage folder


def hold_lock(folder):
    """Hold <folder>/.lock as another process's run would (flock on a separate open file)."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"03_cluster.py (pid 12345 on elsewhere, since 2026-12-01T00:00:00)\n", 0)
    return fd


def test_a_second_copy_of_a_stage_is_refused(tmp_path):
    root = tmp_path / "imgs"
    for i in range(4):
        png(str(root / f"{i}.png"), seed=i)
    work = str(tmp_path / "w")
    for folder, run in ((os.path.join(work, "images"), lambda: mine.main(["--images", str(root), "--work", work,
                                                                             *boxes_for(str(root))])),
                        (os.path.join(work, "regions"), lambda: mine.main(["--images", str(root), "--work", work,
                                                                              *boxes_for(str(root))])),
                        (os.path.join(work, "ocr"), lambda: ocr.main(["--images", str(root), "--work", work]))):
        fd = hold_lock(folder)
        with pytest.raises(SystemExit, match=r"is in use by 03_cluster.py \(pid 12345 on elsewhere"):
            run()
        os.close(fd)                                         # the holder ends: the kernel drops its lock
    mine.main(["--images", str(root), "--work", work, *boxes_for(str(root))])
    # the lock of a finished run is gone: another process can run the stage on the same folder at once
    res = subprocess.run([sys.executable, os.path.join(ROOT, "01_mine_regions.py"), "--work", work,
                          *boxes_for(str(root)),
                          "--force"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-1500:]
    fd = hold_lock(os.path.join(work, "clusters"))
    with pytest.raises(SystemExit, match="is in use by"):
        cluster.main(["--work", work, "--k", "2", "--image-topl", "1"])
    os.close(fd)
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny"))), tmp_path / "t.pt")
    fd = hold_lock(str(tmp_path / "ev"))
    with pytest.raises(SystemExit, match="is in use by"):
        ev.main(["--image-folder", str(root), "--encoder", f"random:{tmp_path / 't.pt'}",
                 "--out", str(tmp_path / "ev")])
    os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# a full disk


def test_full_disk_is_one_line_and_the_rerun_completes(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(6):
        png(str(root / f"{i}.png"), seed=i)
    plain = str(tmp_path / "plain")
    mine.main(["--images", str(root), "--work", plain, *boxes_for(str(root))])
    work = str(tmp_path / "w")
    real_usage = workdir.shutil.disk_usage
    # the merge finds too little space: refused before any byte, chunks kept
    monkeypatch.setattr(workdir.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=100))
    with pytest.raises(SystemExit, match=r"cannot write .*/w/images/.*: not enough space \(.* free, .* needed\)"):
        mine.main(["--images", str(root), "--work", work, *boxes_for(str(root))])
    monkeypatch.setattr(workdir.shutil, "disk_usage", real_usage)
    # the disk fills while the space of an array is reserved (posix_fallocate): no SIGBUS from the mapping
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(workdir.os, "posix_fallocate", full)
    with pytest.raises(SystemExit, match=r"cannot write .*\.tmp\.npy: no space left on device \(.* free, .* needed\)"):
        mine.main(["--images", str(root), "--work", work, *boxes_for(str(root))])
    monkeypatch.undo()
    # a write anywhere else: the stage's decorator still names the folder
    monkeypatch.setattr(mine, "feature_model", lambda a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(SystemExit, match=f"cannot write {work}/...: no space left"):
        mine.main(["--images", str(root), "--work", work, *boxes_for(str(root))])
    monkeypatch.undo()
    mine.main(["--images", str(root), "--work", work, *boxes_for(str(root))])        # space again: it completes
    for name in ("boxes", "region_features", "image_features", "status"):
        assert np.array_equal(np.load(os.path.join(work, "regions", name + ".npy")),
                              np.load(os.path.join(plain, "regions", name + ".npy")))
    # torch.save's writer fails with a RuntimeError: one line, and the partial file is gone
    target = str(tmp_path / "ckpt.pt")

    def torch_full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790")
    monkeypatch.setattr(train.torch, "save", torch_full)
    with pytest.raises(SystemExit, match=r"cannot write .*ckpt.pt: the write failed \(disk full\?\)"):
        train.save_atomic({"w": torch.zeros(10)}, target)
    assert not os.path.exists(target + ".tmp") and not os.path.exists(target)


# ----------------------------------------------------------------------------------------------------------
# flags


BAD_FLAGS = [
    (mine, ["--chunk-size", "0"]), (mine, ["--dedup-iou", "1.5"]), (mine, ["--workers", "-2"]),
    (mine, ["--pred-iou-thresh", "nan"]), (mine, ["--max-regions", "-1"]), (mine, ["--sam-max-side", "0"]),
    (ocr, ["--max-tokens", "0"]), (ocr, ["--min-score", "1"]), (ocr, ["--threads", "-1"]),
    (ocr, ["--max-engine-pixels", "0"]), (ocr, ["--det-limit-side", "-3"]),
    (cluster, ["--k", "0"]), (cluster, ["--image-topl", "0"]), (cluster, ["--max-points-per-centre", "0"]),
    (train, ["--rho", "0"]), (train, ["--rho", "1.5"]), (train, ["--lr", "-1"]), (train, ["--epochs", "0"]),
    (train, ["--beta2", "1"]), (train, ["--workers", "-1"]), (train, ["--save-every", "0"]),
    (train, ["--log-every", "0"]), (train, ["--scale", "inf"]), (train, ["--min-lr-ratio", "2"]),
    (train, ["--margin", "10"]), (train, ["--embed-dim", "-2"]), (mine, ["--sam-batch", "0"]),
    (ev, ["--tsne-max", "-1"]), (ev, ["--knn-k", "0"]), (ev, ["--test-fraction", "1"]), (ev, ["--batch-size", "0"]),
    (ev, ["--knn-temperature", "0"]), (ev, ["--image-size", "-8"]), (ev, ["--image-size", "100000"]),
    (train, ["--image-size", "100000"]), (export, ["--image-size", "0"]), (export, ["--image-size", "-1"]),
]


@pytest.mark.parametrize("module,flags", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_numeric_flags_out_of_range_are_one_line(module, flags, tmp_path):
    base = {ev: ["--image-folder", str(tmp_path), "--encoder", "random:x"],
            export: ["--checkpoint", str(tmp_path / "x.pt")]}.get(module, ["--work", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        module.parse_args([*base, *flags])
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"error: {flags[0]} "), e.value.code


def test_flags_by_subprocess_exit_non_zero_without_a_traceback(tmp_path):
    for script, flags in (("01_mine_regions.py", ["--work", str(tmp_path), "--chunk-size", "-1"]),
                          ("04_train.py", ["--work", str(tmp_path), "--rho", "-1"]),
                          ("00_make_demo_data.py", ["--out", str(tmp_path / "d"), "--num-images", "0"])):
        res = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: --"), res.stderr


def run_quiet(script, flags, env=None):
    """A stage in a fresh process, offline as CI is (HF_HUB_OFFLINE: the hub fails at once, without retries)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})


def test_clip_weights_fail_once_with_one_line(tmp_path):
    """01 --features clip and 05 --encoder openclip: weights that cannot be fetched, or a local file that is not a
    checkpoint, stop the stage with one line naming the flag and the offline choices, before any image."""
    png(str(tmp_path / "images" / "a.png"))
    for k, cls in enumerate(("cat", "dog")):                      # 05's --image-folder: one folder per class
        png(str(tmp_path / "classes" / cls / f"{k}.png"), seed=k)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(3000))
    for pretrained, says in (("openai", "could not be fetched"), (str(junk), "is not a loadable ViT-B-32 checkpoint")):
        res = run_quiet("01_mine_regions.py", ["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"),
                                               *boxes_for(str(tmp_path / "images"))[:2], "--features", "clip",
                                               "--clip-model", "ViT-B-32", "--clip-pretrained", pretrained])
        lines = [l for l in res.stderr.strip().splitlines() if "%|" not in l]          # less progress bars
        assert res.returncode != 0 and "Traceback" not in res.stderr and len(lines) == 1, res.stderr
        assert lines[-1].startswith(f"error: --clip-model ViT-B-32 --clip-pretrained {pretrained}: ") and says in \
            lines[-1] and "--features pixels" in lines[-1], lines[-1]
        assert not os.path.exists(tmp_path / "w" / "regions" / "manifest.json")
        res = run_quiet("05_eval.py", ["--image-folder", str(tmp_path / "classes"), "--out", str(tmp_path / "e"),
                                       "--encoder", f"openclip:ViT-B-32:{pretrained}"])
        lines = [l for l in res.stderr.strip().splitlines() if "%|" not in l]
        assert res.returncode != 0 and "Traceback" not in res.stderr and len(lines) == 1, res.stderr
        assert lines[-1].startswith(f"error: --encoder openclip:ViT-B-32:{pretrained}: ") and says in lines[-1]


def test_quiet_hub_keeps_retry_noise_off_the_terminal(caplog):
    import logging
    import warnings
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with workdir.quiet_hub():
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
            logging.error("Failed to download weights for tag 'openai'")
            warnings.warn("a hub warning")
        assert not seen
    assert not caplog.records
    logging.getLogger("kit-test").warning("after")                  # logging is back afterwards
    assert [r.getMessage() for r in caplog.records] == ["after"]


def test_no_region_on_any_image_is_a_warning(tmp_path, capsys):
    for i in range(3):
        png(str(tmp_path / "images" / f"{i}.png"), seed=i)
    mine.main(["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"), "--sam-model", "tiny",
               "--points-per-side", "2", *PIXELS])              # a random SAM at SAM's thresholds finds nothing
    err = capsys.readouterr().err
    assert "warning: no region on any of the 3 images searched" in err and "--sam-checkpoint" in err, err


# ----------------------------------------------------------------------------------------------------------
# broken hand-offs


def test_damaged_chunks_arrays_and_manifests_name_the_file(tmp_path, capsys):
    def process(s, e):
        return {"x": np.arange(s, e, dtype=np.float32), "n": np.ones(e - s, np.int64)}
    folder = str(tmp_path / "stage")
    chunks, _ = chunk_engine.run_chunks(folder, 10, 3, process, "t", {})
    bad = chunk_engine.chunk_path(folder, 1)
    open(bad, "wb").write(b"PK\x03\x04 not a zip any more")
    with pytest.raises(SystemExit, match=r"chunk file .*00000001\.npz is damaged .* it is removed: rerun"):
        chunk_engine.merge_chunks(folder, chunks, ["x", "n"], {})
    assert not os.path.exists(bad)
    chunk_engine.run_chunks(folder, 10, 3, process, "t", {})                  # redoes chunk 1 only
    chunk_engine.merge_chunks(folder, chunks, ["x", "n"], {})
    assert np.array_equal(np.load(os.path.join(folder, "x.npy")), np.arange(10, dtype=np.float32))
    # a cut-off array and a manifest that is not JSON
    regions = tmp_path / "w" / "regions"
    regions.mkdir(parents=True)
    workdir.write_npy(str(regions / "boxes.npy"), np.zeros((50, 4), np.float32))
    data = open(regions / "boxes.npy", "rb").read()
    open(regions / "boxes.npy", "wb").write(data[:300])
    with pytest.raises(SystemExit, match=r"boxes\.npy is damaged .*: rerun 01_mine_regions\.py with --force"):
        workdir.load(str(regions), "boxes")
    (regions / "manifest.json").write_bytes(b'{"stage": "regions", "compl')
    assert workdir.read_manifest(str(regions)) is None
    assert "manifest.json is damaged" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run 01_mine_regions.py"):
        cluster.main(["--work", str(tmp_path / "w"), "--k", "2", "--image-topl", "1"])
    # weights of other shapes than their config says
    ckpt = model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny")))
    ckpt["encoder"]["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="the weights do not fit its config"):
        model_py.load_encoder(str(tmp_path / "odd.pt"))
    with pytest.raises(SystemExit, match="^error: cannot load an encoder from"):
        export.main(["--checkpoint", str(tmp_path / "odd.pt"), "--out", str(tmp_path / "out")])


def test_ctrl_c_is_one_line(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    png(str(root / "a.png"))
    monkeypatch.setattr(mine, "feature_model", lambda a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit, match="^interrupted: finished work is kept; rerun the same command"):
        mine.main(["--images", str(root), "--work", str(tmp_path / "w"), *boxes_for(str(root))])


def test_demo_world_flags_are_one_line(tmp_path):
    for flags, what in ((["--seed", "-5"], "--seed"), (["--size", "100000"], "--size"), (["--size", "64"], "--size"),
                        (["--num-images", "0"], "--num-images"), (["--shard-size", "0"], "--shard-size"),
                        (["--vocab-size", "0"], "--vocab-size"), (["--mix", "1,1"], "--mix")):
        with pytest.raises(SystemExit, match=f"^error: {what} "):
            demo.main(["--out", str(tmp_path / "d"), *flags])
        assert not (tmp_path / "d" / "manifest.json").exists()           # refused before anything is written


def test_box_file_annotations_without_a_bbox_are_counted_or_refused(tmp_path, capsys):
    png(str(tmp_path / "images" / "a.png"))
    png(str(tmp_path / "images" / "b.png"), seed=1)
    coco = {"images": [{"id": 0, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]},
                            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, "wide", 9]}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(SystemExit, match=r"^error: --boxes .*boxes.json: none of its 2 annotations has a bbox"):
        mine.main(["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"), "--boxes", str(path), *PIXELS])
    coco["annotations"][1]["bbox"] = [2, 2, 20, 20]
    path.write_text(json.dumps(coco))
    m = mine.main(["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w2"), "--boxes", str(path),
                   *PIXELS])
    assert "1 annotations without a bbox [x, y, w, h] are left out" in capsys.readouterr().err
    assert m["rows"]["boxes"] == 1


def test_small_probe_splits_and_a_large_knn_k_are_warned(capsys):
    report = {"encoders": {"a": {"probes": {
        "image": {"counts": {"train": 30, "val": 5, "test": 4}, "knn": {"k": 35}},
        "objects_region": {"counts": {"train": 900, "val": 100, "test": 400}, "knn": {"k": 10}}}},
        "b": {"probes": {"image": {"counts": {"train": 30, "val": 5, "test": 4}, "knn": {"k": 35}}}}}}
    ev.say_small_probes(report, knn_k=100000)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: probe image: 4 probe-test items (fewer than 50): its scores are noise at this size; "
                   "evaluate on more images",
                   "warning: probe image: --knn-k 100000 is more than its 35 probe-train items; k-NN voted over all "
                   "35",
                   "warning: probe objects_region: --knn-k 100000 is more than its 10 probe-train items; k-NN voted "
                   "over all 10"]
    ev.say_small_probes(report, knn_k=10)
    assert capsys.readouterr().err.count("warning") == 1          # the image probe's size alone: k fits both
    # the dense probe counts patches: its rule counts probe-test images
    dense = {"data": {"split": {"test": 120}}, "encoders": {"a": {"probes": {
        "dense": {"counts": {"train_patches": 9000, "test_patches": 4000}}}}}}
    ev.say_small_probes(dense, knn_k=10)
    assert capsys.readouterr().err == ""
    dense["data"]["split"]["test"] = 12
    ev.say_small_probes(dense, knn_k=10)
    assert "probe dense: 12 probe-test images (fewer than 50)" in capsys.readouterr().err


def test_a_finished_01_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    """One rule with 03: a finished stage rerun with settings that change its outputs is refused with one line
    naming the changed flags and --force; settings that change no byte (workers, batches, chunks) are kept."""
    png(str(tmp_path / "images" / "a.png"))
    flags = ["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"),
             *boxes_for(str(tmp_path / "images"))]
    first = mine.main(flags)
    with pytest.raises(SystemExit, match=r"^error: .*regions holds regions made with other settings "
                                         r"\(--min-box-side 4.0 -> 30.0, --min-image-side 16 -> 20\): rerun with "
                                         r"--force"):
        mine.main(flags + ["--min-box-side", "30", "--min-image-side", "20"])
    assert mine.main(flags + ["--workers", "1", "--chunk-size", "7", "--feature-batch", "3"]) == first
    png(str(tmp_path / "other" / "b.png"))
    with pytest.raises(SystemExit, match=r"was built from other images .*the same --images"):
        mine.main(["--images", str(tmp_path / "other"), "--work", str(tmp_path / "w"),
                   *boxes_for(str(tmp_path / "other"))])
    assert mine.main(flags + ["--min-box-side", "30", "--force"])["config"]["min_box_side"] == 30


def test_ocr_model_files_fail_once_with_one_line(tmp_path):
    """02 --det-model / --rec-model: a file that is not an ONNX model, or the two PP-OCR models swapped, stop the
    stage with one line naming the flag before any image (RapidOCR loads its models lazily: without the check,
    every image became an engine error and the stage exit 0)."""
    png(str(tmp_path / "images" / "a.png"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(3000))
    from rapidocr import RapidOCR
    cfg = RapidOCR().cfg
    det, rec = str(cfg.Det.model_path or ""), str(cfg.Rec.model_path or "")
    if not det:                                        # the wheel's defaults, by their file names
        models = os.path.join(os.path.dirname(sys.modules["rapidocr"].__file__), "models")
        det = next(os.path.join(models, f) for f in sorted(os.listdir(models)) if "_det_" in f)
        rec = next(os.path.join(models, f) for f in sorted(os.listdir(models)) if "_rec_" in f)
    for flags, says in ((["--det-model", str(junk)], f"--det-model {junk}: not a loadable ONNX model"),
                        (["--rec-model", str(junk)], f"--rec-model {junk}: not a loadable ONNX model"),
                        (["--det-model", rec, "--rec-model", det], "fails on a printed word")):
        res = run_quiet("02_extract_ocr.py", ["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"),
                                              "--workers", "0", *flags])
        lines = [ln for ln in res.stderr.strip().splitlines() if "%|" not in ln and "[RapidOCR]" not in ln]
        assert res.returncode != 0 and "Traceback" not in res.stderr and len(lines) == 1, res.stderr
        assert lines[0].startswith("error: ") and says in lines[0], lines[0]
        assert not os.path.exists(tmp_path / "w" / "ocr")


def test_names_that_match_nothing_are_one_line(tmp_path, capsys):
    """--exclude-categories (01), --text-category and --tsne-color-by (05) naming nothing in the data: a warning
    or one line, never a silent no-op."""
    png(str(tmp_path / "images" / "a.png"))
    m = mine.main(["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"), *boxes_for(str(tmp_path / "images")),
                   "--exclude-categories", "text,nosuch"])
    assert "has no category named nosuch" in capsys.readouterr().err and m["rows"]["boxes"] >= 1
    coco = tmp_path / "boxes.json"
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny"))), tmp_path / "t.pt")
    for flags, says in ((["--text-category", "words"], "--text-category words: no category of that name"),
                        (["--tsne-color-by", "size"], "--tsne-color-by size: not a category field")):
        with pytest.raises(SystemExit, match=f"^error: {says}"):
            ev.main(["--images", str(tmp_path / "images"), "--coco", str(coco), "--encoder", f"random:{tmp_path / 't.pt'}",
                     "--out", str(tmp_path / "e"), *flags])


def test_host_memory_exhausted_is_one_line(tmp_path, monkeypatch):
    """An allocation the host cannot make (a huge --num-regions or --batch-size) ends in one line, not a
    traceback (the GPU's memory is each stage's: they halve their batches or name the flag)."""
    def huge(*a, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 80051200000 bytes. Error code 12")
    monkeypatch.setattr(mine, "feature_model", huge)
    png(str(tmp_path / "images" / "a.png"))
    with pytest.raises(SystemExit, match=r"^error: out of host memory allocating 80.1 GB: lower the batch"):
        mine.main(["--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"),
                   *boxes_for(str(tmp_path / "images"))])
