"""04_train.py on a tiny generated world (00 -> 01 -> 03, OCR lines from the world's text boxes): the loss falls
(RICE and MLCD), two gloo processes equal one (and resume one's checkpoint), a run killed with SIGKILL and
rerun follows the uninterrupted loss curve exactly, a NaN stops the run and leaves the last checkpoint intact,
boxes move with the pixels, the dataset keeps the region-sampling rules, a corrupt image is logged and
skipped, checkpoints load with weights_only=True, and bad stage outputs are refused at start-up."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT, free_port, load_script

import workdir  # noqa: E402
import image_io  # noqa: E402
import model as model_py  # noqa: E402

SCRIPT = os.path.join(ROOT, "04_train.py")
tr = load_script("train", "04_train.py")
K = 16
TINY = ["--model", "tiny", "--image-size", "64", "--workers", "0", "--warmup", "2", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_world")
    data, work = str(base / "data"), str(base / "work")
    load_script("make_demo_data", "00_make_demo_data.py").main(["--out", data, "--num-images", "48", "--size", "128"])
    load_script("mine_regions", "01_mine_regions.py").main(
        ["--images", os.path.join(data, "images"), "--work", work, "--boxes", os.path.join(data, "coco.json"),
         "--features", "pixels", "--min-box-side", "12", "--min-image-side", "64"])
    load_script("make_demo_data", "00_make_demo_data.py").write_ocr_stand_in(work, os.path.join(data, "coco.json"))
    load_script("cluster", "03_cluster.py").main(["--work", work, "--k", str(K)])
    return data, work


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def copy_work(work, dest):
    """The stage outputs without any run folder, so tests can break them."""
    shutil.copytree(work, dest, ignore=shutil.ignore_patterns("train*"))
    return str(dest)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rice", "mlcd"])
def test_loss_falls(world, tmp_path, method):
    data, work = world
    run = str(tmp_path / "run")
    # K = 16: rho = 0.1 would leave two negatives per row, too few to learn from in 30 steps
    m = tr.main(["--work", work, "--run-dir", run, "--method", method, *TINY, "--batch-size", "16", "--steps", "30", "--rho", "0.5",
                 "--log-every", "1", "--save-every", "30"])
    log = read_log(run)
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-5:]])
    print(f"{method}: loss {first:.3f} -> {last:.3f} over 30 steps")
    assert m["complete"] and m["steps"] == 30 and len(log) == 30
    assert last < 0.85 * first
    keys = ["object_loss", "ocr_loss"] if method == "rice" else ["image_loss"]
    for k in keys + ["lr", "grad_norm", "samples_per_s", "samples_per_s_per_device", "data_wait_frac", "eta_s",
                     "tflops_per_device"]:
        assert all(np.isfinite(r[k]) for r in log), k
    if method == "rice":        # both region terms train: each falls on its own
        assert np.mean([r["object_loss"] for r in log[-5:]]) < log[0]["object_loss"]
        assert np.mean([r["ocr_loss"] for r in log[-5:]]) < log[0]["ocr_loss"]
    assert log[0]["mfu"] is None                       # no known peak on a CPU
    assert log[-1]["lr"] < log[2]["lr"]                # cosine decay after warm-up

    ckpt = torch.load(os.path.join(run, "ckpt", "latest.pt"), map_location="cpu", weights_only=True)
    latest = os.path.join(run, "ckpt", "latest.pt")
    assert ckpt["step"] == 30 and tr.read_bank(latest, "object")["weight"].shape == (K, 64)
    if method == "rice":
        assert tr.read_bank(latest, "ocr")["weight"].shape == (49408, 64)
    enc = model_py.load_encoder(os.path.join(run, "ckpt", "latest.pt"))
    assert torch.equal(enc.state_dict()["conv1.weight"], ckpt["encoder"]["conv1.weight"])


def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           SCRIPT, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def test_two_processes_equal_one(world, tmp_path):
    # rho = 1: every centre takes part, so the negative sample does not depend on the sharding
    data, work = world
    flags = ["--work", work, *TINY, "--batch-size", "8", "--steps", "4", "--log-every", "1", "--rho", "1",
             "--save-every", "4", "--keep-every", "2"]
    one, two, mixed = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "mixed")
    tr.main(flags + ["--run-dir", one])
    torchrun(flags + ["--run-dir", two])
    # a two-process run resuming the one-process checkpoint of step 2 (banks saved whole, re-sharded)
    os.makedirs(os.path.join(mixed, "ckpt"))
    shutil.copyfile(os.path.join(one, "ckpt", "step_00000002.pt"), os.path.join(mixed, "ckpt", "latest.pt"))
    shutil.copytree(os.path.join(one, "ckpt", "banks_00000002"), os.path.join(mixed, "ckpt", "banks_00000002"))
    torchrun(flags + ["--run-dir", mixed])
    a, b, c = read_log(one), read_log(two), read_log(mixed)
    la, lb = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b])
    print(f"two processes vs one: losses {la.round(4)} vs {lb.round(4)}")
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    np.testing.assert_allclose([r["loss"] for r in c], la[2:], rtol=1e-4)
    for k in ("object_loss", "ocr_loss", "grad_norm"):
        np.testing.assert_allclose([r[k] for r in b], [r[k] for r in a], rtol=1e-3)
    wa = torch.load(os.path.join(one, "ckpt", "latest.pt"), weights_only=True)
    wb = torch.load(os.path.join(two, "ckpt", "latest.pt"), weights_only=True)
    assert wb["config"]["world"] == 2
    for k, v in wa["encoder"].items():
        torch.testing.assert_close(wb["encoder"][k], v, atol=2e-4, rtol=1e-3)
    for name in ("object", "ocr"):
        ba, bb = (tr.read_bank(os.path.join(r, "ckpt", "latest.pt"), name) for r in (one, two))
        torch.testing.assert_close(bb["weight"], ba["weight"], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(bb["exp_avg_sq"], ba["exp_avg_sq"], atol=1e-6, rtol=1e-2)


def test_kill_and_resume_equals_uninterrupted(world, tmp_path):
    # default rho = 0.1: negatives are sampled, so this also checks that the random streams are restored;
    # two DataLoader workers, so it checks that the data position does not depend on prefetching
    data, work = world
    flags = ["--work", work, *TINY[:-4], "--workers", "2", "--warmup", "2", "--batch-size", "16", "--steps", "14",
             "--log-every", "1", "--save-every", "3"]
    ref = str(tmp_path / "ref")
    tr.main(flags + ["--run-dir", ref])
    run = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, SCRIPT, *flags, "--run-dir", run], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log_path = os.path.join(run, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(log_path) and len(read_log(run)) >= 5:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                 # the trainer and its loader workers
    proc.wait()
    killed_at = len(read_log(run))
    assert not os.path.exists(os.path.join(run, "manifest.json")) and killed_at < 14, "the run ended before the kill"
    ckpt_step = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)["step"]
    res = subprocess.run([sys.executable, SCRIPT, *flags, "--run-dir", run], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and f"at step {ckpt_step}" in res.stdout
    a, b = read_log(ref), read_log(run)
    print(f"killed after {killed_at} logged steps, resumed from the checkpoint of step {ckpt_step}")
    assert [r["step"] for r in b] == list(range(1, 15))
    for k in ("loss", "object_loss", "ocr_loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[k] for r in b], [r[k] for r in a], rtol=1e-6, atol=1e-7, err_msg=k)
    wa = torch.load(os.path.join(ref, "ckpt", "latest.pt"), weights_only=True)
    wb = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)
    for k, v in wa["encoder"].items():
        torch.testing.assert_close(wb["encoder"][k], v, atol=1e-6, rtol=1e-5)


def test_nan_stops_and_keeps_last_checkpoint(world, tmp_path, monkeypatch):
    data, work = world
    run = str(tmp_path / "run")
    real, calls = tr.compute_losses, {"n": 0}

    def poisoned(*a, **kw):
        loss, terms = real(*a, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 5 else loss), terms

    monkeypatch.setattr(tr, "compute_losses", poisoned)
    latest = os.path.join(run, "ckpt", "latest.pt")
    with pytest.raises(SystemExit) as e:
        tr.main(["--work", work, "--run-dir", run, *TINY, "--batch-size", "8", "--steps", "10", "--save-every", "2",
                 "--log-every", "1"])
    msg = str(e.value)
    print(msg)
    assert "loss is nan at step 5" in msg and latest in msg
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["encoder"].values())
    assert not os.path.exists(os.path.join(run, "manifest.json"))


def test_boxes_move_with_the_pixels():
    """resize_crop on a non-square image with a painted rectangle: the painted pixels of the output lie
    exactly in the moved box, for every crop policy and many random crops."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        w, h = int(rng.integers(80, 300)), int(rng.integers(80, 300))
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = int(rng.integers(x0 + 30, min(w, x0 + 120) + 1)), int(rng.integers(y0 + 30, min(h, y0 + 120) + 1))
        im = Image.new("RGB", (w, h), (0, 0, 0))
        ImageDraw.Draw(im).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
        for crop, min_scale in (("center", 1), ("random", 1), ("random", 0.3), ("squash", 1)):
            S = 64
            pixels, boxes, visible = image_io.resize_crop(im, S, [[x0, y0, x1, y1]], crop, np.random.default_rng(trial),
                                                         min_scale)
            assert pixels.shape == (S, S, 3)
            bx0, by0, bx1, by1 = boxes[0]
            ys, xs = np.nonzero(pixels[..., 0] > 127)
            if visible[0] == 0:
                assert len(xs) == 0 or min(bx1 - bx0, by1 - by0) == 0
                continue
            if min(bx1 - bx0, by1 - by0) < 2:           # a sliver at the edge: blurred below the threshold
                continue
            # bicubic blurs edges by about one pixel
            assert abs(xs.min() - bx0) <= 1.01 and abs(xs.max() + 1 - bx1) <= 1.01, (crop, min_scale, trial)
            assert abs(ys.min() - by0) <= 1.01 and abs(ys.max() + 1 - by1) <= 1.01, (crop, min_scale, trial)
            if crop == "squash":
                assert visible[0] == pytest.approx(1.0)


def test_dataset_samples_regions_by_the_rules(world, tmp_path):
    data, work = world
    args = tr.parse_args(["--work", work, *TINY, "--num-regions", "3"])
    rows_path = str(tmp_path / "rows.npy")
    info = tr.load_stage_outputs(args, rows_path)
    assert len(np.load(rows_path)) == info["n_train"] == info["counts"]["train_images"]
    ds = tr.RegionDataset(work=work, clusters=os.path.join(work, "clusters"), train_rows_path=rows_path, size=64,
                          num_regions=3, max_tokens=10, image_topl=8, crop="random", min_visible=0.5, seed=0,
                          use_objects=True, use_ocr=True, use_image=False)
    reg_off = np.load(os.path.join(work, "regions", "region_offsets.npy"))
    labels = np.load(os.path.join(work, "clusters", "region_labels.npy"))
    line_off = np.load(os.path.join(work, "ocr", "line_offsets.npy"))
    tok_off, toks = np.load(os.path.join(work, "ocr", "token_offsets.npy")), np.load(os.path.join(work, "ocr", "tokens.npy"))
    seen_padding, seen_subset = False, False
    for pos in range(info["n_train"]):
        item = ds[(0, pos)]
        again = ds[(0, pos)]
        assert all(np.array_equal(item[k], again[k]) for k in item if k != "status")   # seeded per sample
        row = item["row"]
        assert item["ok"] and item["pixels"].shape == (64, 64, 3)
        kind, n_obj = item["kind"], reg_off[row + 1] - reg_off[row]
        n_text = line_off[row + 1] - line_off[row]
        valid = kind > 0
        assert (item["boxes"][valid] >= 0).all() and (item["boxes"][valid] <= 64).all()
        if valid.any():
            assert valid.all()                                  # fewer than N: padded by resampling to N
        obj_labels = set(labels[reg_off[row]: reg_off[row + 1]].tolist())
        assert set(item["object_label"][kind == 1].tolist()) <= obj_labels
        assert (item["object_label"][kind != 1] == -1).all() and (item["ocr_tokens"][kind != 2] == -1).all()
        line_tokens = [set(toks[tok_off[k]: tok_off[k + 1]].tolist()) for k in range(line_off[row], line_off[row + 1])]
        for t in item["ocr_tokens"][kind == 2]:
            assert set(t[t >= 0].tolist()) in line_tokens
        if n_obj + n_text > 3 and valid.all():
            seen_subset = pos
            rows_of = [tuple(b) for b in item["boxes"]]
            assert len(set(rows_of)) == 3                       # more than N: N distinct regions
        if 0 < n_obj + n_text < 3 and valid.all():
            seen_padding = True
    assert seen_padding and seen_subset is not False
    # a new draw of N out of the image's regions every epoch
    assert len({tuple(ds[(e, seen_subset)]["boxes"].ravel()) for e in range(6)}) > 1


def test_corrupt_image_is_logged_and_skipped(world, tmp_path):
    data, work = world
    work2 = copy_work(work, tmp_path / "work")
    table = image_io.read_image_table(work2)
    victim = table.path(3)
    backup = victim + ".bak"
    shutil.copyfile(victim, backup)
    try:
        with open(victim, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n broken")
        run = str(tmp_path / "run")
        m = tr.main(["--work", work2, "--run-dir", run, *TINY, "--batch-size", "16", "--steps", "6", "--log-every", "3"])
    finally:
        shutil.move(backup, victim)
    assert m["complete"]
    with open(os.path.join(run, "skipped_images.jsonl")) as f:
        skipped = [json.loads(line) for line in f]
    assert skipped and all(s["path"] == victim and s["status"] in ("truncated", "unreadable", "not_image") for s in skipped)
    assert read_log(run)[-1]["skipped_images"] == 2                # 6 steps x 16 of 48 images: two epochs


def test_init_from_hugging_face_dir(world, tmp_path):
    data, work = world
    torch.manual_seed(5)
    src = model_py.VisionEncoder(model_py.preset("tiny", image_size=64))
    hf = str(tmp_path / "hf")
    model_py.save_hf(src, hf)
    run = str(tmp_path / "run")
    tr.main(["--work", work, "--run-dir", run, "--init-from", hf, "--image-size", "64", "--workers", "0",
             "--batch-size", "8", "--steps", "1", "--lr", "0", "--warmup", "1"])
    got = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)["encoder"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(got[k], v)                   # lr 0: the released weights, unchanged


def test_mlcd_from_a_clip_folder_on_its_own_codebook(world, tmp_path):
    # MLCD as the paper trains it: image clusters in their own folder (03 --fit-on images --out, 04 --clusters),
    # the CLIP ViT continued from a Hugging Face CLIPVisionModel folder at another size (its position table
    # resampled), and the result exported back to a CLIPVisionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel
    data, work = world
    clusters = str(tmp_path / "clusters_mlcd")
    load_script("cluster", "03_cluster.py").main(["--work", work, "--k", "8", "--fit-on", "images", "--out", clusters])
    assert workdir.read_manifest(os.path.join(work, "clusters"))["config"]["fit_on"] == "both"   # kept beside
    torch.manual_seed(6)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, patch_size=8, image_size=48)).eval()
    hf.save_pretrained(tmp_path / "hf")
    run = str(tmp_path / "run")
    m = tr.main(["--work", work, "--run-dir", run, "--method", "mlcd", "--clusters", clusters, "--init-from",
                 str(tmp_path / "hf"), "--image-size", "64", "--workers", "0", "--batch-size", "8", "--steps", "2",
                 "--lr", "0", "--warmup", "1", "--log-every", "1"])
    assert m["complete"] and all(np.isfinite(r["image_loss"]) for r in read_log(run))
    assert tr.read_bank(os.path.join(run, "ckpt", "latest.pt"), "object")["weight"].shape == (8, 64)
    ckpt = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)
    assert ckpt["encoder_config"]["arch"] == "clip" and ckpt["encoder_config"]["image_size"] == 64
    table = hf.state_dict()["embeddings.position_embedding.weight"]
    torch.testing.assert_close(ckpt["encoder"]["position_embedding"], model_py.resample_positions(table, 8, 8))
    out = load_script("export_hf", "06_export_hf.py").main(["--checkpoint", os.path.join(run, "ckpt", "latest.pt"),
                                                           "--out", str(tmp_path / "export")])
    assert out["hf_class"] == "CLIPVisionModel" and out["max_abs_diff_last_hidden_state"] <= 1e-4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():                  # lr 0: the export at 64 px is the HF model run at 64 px
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        got = CLIPVisionModel.from_pretrained(str(tmp_path / "export"))(pixel_values=x).last_hidden_state
    assert (got - ref).abs().max() < 1e-4
    with pytest.raises(SystemExit, match="clusters_none.*03_cluster.py"):
        tr.main(["--work", work, "--run-dir", str(tmp_path / "r2"), "--method", "mlcd", "--clusters",
                 str(tmp_path / "clusters_none"), *TINY, "--batch-size", "8", "--steps", "1"])


def test_bad_input_is_refused_at_start(world, tmp_path):
    data, work = world

    def refused(work_dir, *extra):
        with pytest.raises(SystemExit) as e:
            tr.main(["--work", work_dir, "--run-dir", str(tmp_path / "r"), *TINY, "--batch-size", "8", "--steps", "2", *extra])
        return str(e.value)

    assert "images/ is missing or unfinished: run 01_mine_regions.py" in refused(str(tmp_path / "nowhere"))
    w = copy_work(work, tmp_path / "w1")
    shutil.rmtree(os.path.join(w, "clusters"))
    assert "run 03_cluster.py" in refused(w)
    w = copy_work(work, tmp_path / "w0")           # a hand-off file deleted after its stage finished: one line
    os.remove(os.path.join(w, "images", "status.npy"))
    assert refused(w).startswith(f"error: {os.path.join(w, 'images', 'status.npy')} is missing, so ") and \
        "remove the folder and rerun 01_mine_regions.py" in refused(w)
    w = copy_work(work, tmp_path / "w2")           # 01 rerun after 03: the clusters belong to other features
    m = workdir.read_manifest(os.path.join(w, "regions"))
    workdir.write_json(os.path.join(w, "regions", "manifest.json"), {**m, "finished": "2030-01-01T00:00:00+00:00"})
    assert "rerun 03_cluster.py --force" in refused(w)
    w = copy_work(work, tmp_path / "w3")           # a label beyond K
    labels = np.load(os.path.join(w, "clusters", "region_labels.npy"))
    labels[7] = K
    workdir.write_npy(os.path.join(w, "clusters", "region_labels.npy"), labels)
    assert "region labels must be in [0, 16)" in refused(w)
    w = copy_work(work, tmp_path / "w4")           # an array of the wrong length
    boxes = np.load(os.path.join(w, "regions", "boxes.npy"))
    workdir.write_npy(os.path.join(w, "regions", "boxes.npy"), boxes[:-1])
    assert "do not belong together" in refused(w)
    w = copy_work(work, tmp_path / "w5")
    shutil.rmtree(os.path.join(w, "ocr"))
    assert "run 02_extract_ocr.py (or pass --ocr-weight 0)" in refused(w)
    assert "larger than the" in refused(work, "--batch-size", "4096")
    assert "not divisible" in refused(work, "--batch-size", "9", "--accum", "2")
    # a resume with other settings
    run = str(tmp_path / "resume")
    tr.main(["--work", work, "--run-dir", run, *TINY, "--batch-size", "8", "--steps", "1"])
    with pytest.raises(SystemExit, match="other settings"):
        tr.main(["--work", work, "--run-dir", run, *TINY, "--batch-size", "16", "--steps", "2"])


def test_step_sampler_blocks_windows_and_world():
    """The epoch order: every position once per epoch (drop-last), windows of `window` blocks of `block`
    consecutive positions, each step sorted; the same global batches for any world size and accumulation;
    seeded by (seed, epoch) only; block x window >= n is a full shuffle."""
    n, G, block, window = 103, 8, 5, 3
    one = tr.StepSampler(n, G, 1, 0, 1, 7, 0, 2 * (n // G), block, window)
    steps = [b for b in one]
    assert all(b == sorted(b) and len(b) == G for b in steps)
    first = [p for b in steps[: n // G] for _, p in b]
    assert len(set(first)) == len(first) == (n // G) * G and set(first) <= set(range(n))
    order = one.positions(0, 0, n)
    assert sorted(order.tolist()) == list(range(n))
    # the first window holds exactly the positions of its 3 blocks
    blocks = {p // block for p in order[: block * window]}
    assert len(blocks) == window and set(order[: block * window].tolist()) == \
        {p for b in blocks for p in range(b * block, min((b + 1) * block, n))}
    assert [e for b in steps[n // G:] for e, _ in b] == [1] * ((n // G) * G)
    assert one.positions(1, 0, n).tolist() != order.tolist()
    for world, accum in ((2, 1), (4, 2)):
        parts = [list(tr.StepSampler(n, G, accum, r, world, 7, 0, 2 * (n // G), block, window)) for r in range(world)]
        for t in range(len(steps)):
            merged = sorted(p for r in range(world) for a in range(accum) for p in parts[r][t * accum + a])
            assert merged == steps[t]
    again = tr.StepSampler(n, G, 1, 0, 1, 7, 5, 2 * (n // G), block, window)
    assert list(again) == steps[5:]                        # a resume at step 5 continues the same order
    full = tr.StepSampler(n, G, 1, 0, 1, 7, 0, 1, 64, 64).positions(0, 0, n)
    assert sorted(full.tolist()) == list(range(n)) and full.tolist() != list(range(n))


@pytest.mark.parametrize("rho", ["1", "0.1"])
def test_accumulation_equals_the_whole_batch(world, tmp_path, monkeypatch, rho):
    """--accum 2 gives the gradient of the global-batch mean (one negative draw per step): the same losses,
    gradients and weights as --accum 1, with every centre (rho = 1) and with sampled negatives."""
    data, work = world
    grads, real = {}, tr.scale_and_clip_gradients

    def spy(encoder, banks, max_norm, env):
        norm = real(encoder, banks, max_norm, env)
        grads.setdefault(current[0], []).append(
            {**{n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None},
             **{f"bank.{n}": p.grad.clone() for n, p in banks.named_parameters() if p.grad is not None}})
        return norm

    monkeypatch.setattr(tr, "scale_and_clip_gradients", spy)
    flags = ["--work", work, *TINY, "--batch-size", "16", "--steps", "3", "--log-every", "1", "--rho", rho]
    current = [None]
    for accum in (1, 2, 4):
        current[0] = accum
        tr.main(flags + ["--accum", str(accum), "--run-dir", str(tmp_path / f"accum{accum}")])
    ref = read_log(str(tmp_path / "accum1"))
    for accum in (2, 4):
        got = read_log(str(tmp_path / f"accum{accum}"))
        for k in ("loss", "object_loss", "ocr_loss", "object_neg", "grad_norm"):
            np.testing.assert_allclose([r[k] for r in got], [r[k] for r in ref], rtol=1e-5, err_msg=f"{accum} {k}")
        for step, (a, b) in enumerate(zip(grads[1], grads[accum])):
            assert a.keys() == b.keys()
            for name in a:
                scale = a[name].abs().max().item() + 1e-12
                diff = (a[name] - b[name]).abs().max().item()
                assert diff <= 1e-5 * scale + 1e-9, (accum, step, name, diff, scale)
    print(f"rho {rho}: --accum 2 and 4 equal --accum 1 over {len(ref)} steps, losses {[r['loss'] for r in ref]}")


def test_two_processes_with_accumulation_equal_one(world, tmp_path):
    # rho = 0.1: the draw is keyed by (seed, step, term) and class-id blocks, the same for any world size
    data, work = world
    flags = ["--work", work, *TINY, "--batch-size", "16", "--steps", "3", "--log-every", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    tr.main(flags + ["--run-dir", one])
    torchrun(flags + ["--run-dir", two, "--accum", "2"])
    a, b = read_log(one), read_log(two)
    for k in ("loss", "object_loss", "ocr_loss", "grad_norm"):
        np.testing.assert_allclose([r[k] for r in b], [r[k] for r in a], rtol=1e-5, err_msg=k)
    for name in ("object", "ocr"):
        ba, bb = (tr.read_bank(os.path.join(r, "ckpt", "latest.pt"), name) for r in (one, two))
        torch.testing.assert_close(bb["weight"], ba["weight"], atol=2e-4, rtol=1e-3)


def test_a_refusal_on_rank_0_stops_every_rank(world, tmp_path):
    data, work = world
    w = copy_work(work, tmp_path / "w")
    labels = np.load(os.path.join(w, "clusters", "region_labels.npy"))
    labels[3] = K + 5
    workdir.write_npy(os.path.join(w, "clusters", "region_labels.npy"), labels)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, "--work", w, "--run-dir", str(tmp_path / "r"), *TINY, "--batch-size", "8", "--steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert "region labels must be in [0, 16)" in res.stderr + res.stdout


def test_a_second_run_on_the_same_folder_is_refused(world, tmp_path):
    data, work = world
    run = str(tmp_path / "run")
    flags = ["--work", work, *TINY, "--batch-size", "8", "--steps", "400", "--log-every", "1", "--save-every", "2"]
    first = subprocess.Popen([sys.executable, SCRIPT, *flags, "--run-dir", run], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(os.path.join(run, "log.jsonl")) and
                                              os.path.exists(os.path.join(run, "ckpt", "latest.pt"))):
            time.sleep(0.05)
        with pytest.raises(SystemExit) as e:
            tr.main(flags + ["--run-dir", run, "--steps", "2"])
        msg = str(e.value)
        print(msg)
        assert f"{run} is in use by 04_train.py (pid {first.pid}" in msg and "another --run-dir" in msg
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the dead run leaves no lock behind: the same command resumes
    n_before = len(read_log(run))
    m = tr.main(flags + ["--run-dir", run, "--steps", str(n_before + 2)])
    assert m["complete"] and [r["step"] for r in read_log(run)] == list(range(1, n_before + 3))


@pytest.mark.parametrize("rule", ["shared", "partial-fc"])
def test_other_negative_rules_train(world, tmp_path, rule):
    data, work = world
    run = str(tmp_path / "run")
    m = tr.main(["--work", work, "--run-dir", run, *TINY, "--batch-size", "8", "--steps", "2", "--log-every", "1",
                 "--negatives", rule])
    log = read_log(run)
    assert m["complete"] and len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
    assert json.load(open(os.path.join(run, "config.json")))["negatives"] == rule


def test_resume_drops_log_records_past_the_checkpoint(world, tmp_path):
    """A log that ran past the checkpoint (and ends in a line cut off by a kill) is cut back to the
    checkpoint's step on resume, so the replayed steps appear once."""
    data, work = world
    run = str(tmp_path / "run")
    flags = ["--work", work, "--run-dir", run, *TINY, "--batch-size", "8", "--log-every", "1", "--save-every", "2"]
    tr.main(flags + ["--steps", "4"])
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')     # steps after the checkpoint
    tr.main(flags + ["--steps", "6"])
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
    assert read_log(run)[4]["loss"] != 1.0


def test_resume_refuses_damaged_checkpoints_and_rerun_ocr(world, tmp_path):
    """A damaged latest.pt or bank shard is one line naming the file and what to do (the newest kept step file
    when there is one); a resume after 02 was rerun with other settings is refused (its labels changed)."""
    data, work = world
    work = copy_work(work, tmp_path / "work")
    run = str(tmp_path / "run")
    flags = ["--work", work, "--run-dir", run, *TINY, "--batch-size", "8", "--save-every", "2", "--keep-every", "2"]
    tr.main(flags + ["--steps", "2"])
    latest = os.path.join(run, "ckpt", "latest.pt")
    good = open(latest, "rb").read()
    for damage in (b"", good[: len(good) // 2], os.urandom(4096)):
        open(latest, "wb").write(damage)
        with pytest.raises(SystemExit, match=rf"^error: cannot resume: {latest} is not a readable torch checkpoint .*"
                                             r"cp .*step_00000002\.pt .*--force to start over$"):
            tr.main(flags + ["--steps", "4"])
    torch.save(torch.zeros(3), latest)                                   # a checkpoint, but a plain tensor
    with pytest.raises(SystemExit, match="is not a checkpoint of 04_train.py"):
        tr.main(flags + ["--steps", "4"])
    open(latest, "wb").write(good)
    shard = os.path.join(run, "ckpt", "banks_00000002", "object.00000-of-00001.pt")
    saved = open(shard, "rb").read()
    open(shard, "wb").write(saved[:100])
    with pytest.raises(SystemExit, match=r"^error: cannot resume: a bank shard is damaged: .*object\.00000-of-00001"):
        tr.main(flags + ["--steps", "4"])
    open(shard, "wb").write(saved)
    # 02 rerun with other settings (here its manifest's settings, as --max-tokens 1 writes them)
    ocr_manifest = os.path.join(work, "ocr", "manifest.json")
    m = json.load(open(ocr_manifest))
    workdir.write_json(ocr_manifest, {**m, "settings": {"max_tokens": 1}})
    with pytest.raises(SystemExit, match="trained with other settings: .*stage outputs"):
        tr.main(flags + ["--steps", "4"])
    workdir.write_json(ocr_manifest, m)
    assert tr.main(flags + ["--steps", "4"])["complete"]


def test_small_codebook_derives_l_and_warns_of_no_negatives(world, tmp_path, capsys):
    # 03 --k 4 without --image-topl takes l = K (the default 8 is never an error the user did not cause); an l
    # the user passes above K is one line; MLCD on K <= l has no negatives, and 04 says so
    data, work = world
    cluster = load_script("cluster", "03_cluster.py")
    clusters = str(tmp_path / "clusters_k4")
    m = cluster.main(["--work", work, "--k", "4", "--fit-on", "images", "--out", clusters])
    assert m["k"] == 4 and m["image_topl"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cluster.main(["--work", work, "--k", "4", "--image-topl", "8", "--fit-on", "images", "--out", clusters])
    assert e.value.code == 2 and "--image-topl must be in [1, K]" in capsys.readouterr().err
    tr.main(["--work", work, "--run-dir", str(tmp_path / "run"), "--method", "mlcd", "--clusters", clusters, *TINY,
             "--workers", "0", "--batch-size", "8", "--steps", "1", "--warmup", "1"])
    err = capsys.readouterr().err
    assert "warning: the codebook has K = 4 centres and every image has 4 positives" in err, err


def test_log_after_a_stop_at_any_moment_equals_the_uninterrupted_run(world, tmp_path, monkeypatch):
    """A full disk (a checkpoint save that fails, a log append cut mid-line) or an interrupt, before or after the
    first checkpoint, then the same command with space: log.jsonl equals the uninterrupted run's."""
    data, work = world
    flags = ["--work", work, *TINY, "--batch-size", "8", "--steps", "7", "--log-every", "1", "--save-every", "3"]
    ref = str(tmp_path / "ref")
    tr.main(flags + ["--run-dir", ref])
    calls = {"n": 0}

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_fails(at):
        real = tr.save_atomic

        def save(obj, path):
            calls["n"] += path.endswith("latest.pt")
            if calls["n"] == at and path.endswith("latest.pt"):
                workdir.guard_disk(path, full, need=1)
            real(obj, path)
        monkeypatch.setattr(tr, "save_atomic", save)

    def log_cut(at):
        real = tr.write_log

        def write(rec, *a):
            calls["n"] += 1
            if calls["n"] == at:
                with open(os.path.join(a[-2].run_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec)[:17])
                full()
            real(rec, *a)
        monkeypatch.setattr(tr, "write_log", write)

    def interrupted(at):
        real = tr.train_step

        def step(s, *a):
            if s == at:
                raise KeyboardInterrupt
            return real(s, *a)
        monkeypatch.setattr(tr, "train_step", step)

    cases = {"first checkpoint": (save_fails, 1), "second checkpoint": (save_fails, 2),
             "log before the first checkpoint": (log_cut, 2), "log after it": (log_cut, 5),
             "interrupt before the first checkpoint": (interrupted, 2), "interrupt after it": (interrupted, 5)}
    for name, (breaks, at) in cases.items():
        run, calls["n"] = str(tmp_path / name.replace(" ", "_")), 0
        breaks(at)
        with pytest.raises(SystemExit, match="no space left|interrupted"):
            tr.main(flags + ["--run-dir", run])
        monkeypatch.undo()
        tr.main(flags + ["--run-dir", run])
        a, b = read_log(ref), read_log(run)
        assert [r["step"] for r in b] == list(range(1, 8)), name
        for k in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose([r[k] for r in b], [r[k] for r in a], rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_run_that_stops_leaves_no_lock_and_no_empty_folder(world, tmp_path):
    """Every stage refused before its first output file removes its .lock and the folders it created; a finished
    run removes its .lock too (the flock, not the file, is what refuses a second copy)."""
    data, work = world
    empty = str(tmp_path / "empty_work")
    for refused in (lambda: tr.main(["--work", empty, "--run-dir", str(tmp_path / "a" / "run"), *TINY]),
                    lambda: load_script("cluster", "03_cluster.py").main(["--work", empty, "--k", "4"]),
                    lambda: load_script("mine_regions", "01_mine_regions.py").main(
                        ["--images", str(tmp_path / "nowhere"), "--work", empty, "--features", "pixels"])):
        with pytest.raises(SystemExit, match="^error: "):
            refused()
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(empty)
    run = str(tmp_path / "done")
    tr.main(["--work", work, "--run-dir", run, *TINY, "--batch-size", "8", "--steps", "1"])
    assert [p for p, _, files in os.walk(run) if ".lock" in files] == []
    assert [p for p, _, files in os.walk(work) if ".lock" in files] == []
