"""Several nodes, as on a cluster: two torchrun launchers on this machine, one worker each (`--nnodes 2
--node_rank 0/1 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT`), so RANK 1 has
LOCAL_RANK 0 and each node has its own local rank 0. Every stage equals one process on the same input: 01 on
tar shards, 02 and the image tables byte for byte, 03's labels byte for byte and its centres within float
rounding of the all-reduce order, 04 (RICE, a few steps, rho = 1) within the two-process tolerances of
tests/test_train.py, 05's features within float tolerance. The pipeline runs once in one process first."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import load_script, run_nodes

demo = load_script("make_demo_data", "00_make_demo_data.py")
mine = load_script("mine_regions", "01_mine_regions.py")
ocr = load_script("extract_ocr", "02_extract_ocr.py")
cl = load_script("cluster", "03_cluster.py")
tr = load_script("train", "04_train.py")
ev = load_script("eval", "05_eval.py")

TINY = ["--model", "tiny", "--image-size", "64", "--workers", "0", "--warmup", "2", "--lr", "2e-3"]


def stage_flags(d, work):
    shards = str(d / "data" / "shards" / "{00000..00004}.tar")
    return {
        "01": ["--images", shards, "--work", work, "--boxes", str(d / "data" / "coco.json"), "--features", "pixels",
               "--min-box-side", "8", "--min-image-side", "32", "--chunk-size", "3", "--workers", "0"],
        "02": ["--images", shards, "--work", work, "--max-side", "256", "--chunk-size", "3", "--engine", "rapidocr",
               "--workers", "0"],
        "03": ["--work", work, "--k", "6", "--iters", "6", "--assign-chunk", "40"],
        "04": ["--work", work, "--method", "rice", *TINY, "--batch-size", "8", "--steps", "3", "--rho", "1",
               "--log-every", "1", "--save-every", "3"],
        "05": ["--images", shards, "--coco", str(d / "data" / "coco.json"), "--chunk-size", "5", "--tsne-max", "0",
               "--probes", "image,objects,ocr", "--c-refine", "0", "--workers", "0"],
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """24 demo images with plain words in five webdataset shards, and 01 -> 05 in one process."""
    d = tmp_path_factory.mktemp("multinode")
    demo.main(["--out", str(d / "data"), "--num-images", "24", "--size", "128", "--workers", "1", "--format",
               "webdataset", "--shard-size", "5", "--plain-words", "--vocab-size", "12"])
    work = str(d / "one")
    f = stage_flags(d, work)
    mine.main(f["01"])
    ocr.main(f["02"])
    cl.main(f["03"])
    tr.main(f["04"] + ["--run-dir", str(d / "one_run")])
    ev.main(f["05"] + ["--encoder", f"kit={d / 'one_run' / 'ckpt' / 'latest.pt'}", "--out", str(d / "one_eval")])
    return d


def npy_bytes(folder):
    """{name: bytes} of every .npy in a stage folder."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".npy")}


def copy_stages(src, dest, stages):
    os.makedirs(dest)
    for s in stages:
        shutil.copytree(os.path.join(src, s), os.path.join(dest, s))
    return str(dest)


def test_01_and_02_on_two_nodes_are_byte_identical(one_process, tmp_path):
    d, work = one_process, str(tmp_path / "two")
    f = stage_flags(d, work)
    out = run_nodes("01_mine_regions.py", f["01"])
    assert "regions [rank 0/2]" in "".join(out) and "regions [rank 1/2]" in "".join(out)   # two ranks did chunks
    run_nodes("02_extract_ocr.py", f["02"])
    for stage in ("images", "regions", "ocr"):
        a, b = npy_bytes(os.path.join(d, "one", stage)), npy_bytes(os.path.join(work, stage))
        assert a.keys() == b.keys() and a, stage
        for k in a:
            assert a[k] == b[k], f"{stage}/{k}"


def test_03_on_two_nodes_equals_one_process(one_process, tmp_path):
    d = one_process
    work = copy_stages(os.path.join(d, "one"), tmp_path / "two", ["images", "regions", "ocr"])
    run_nodes("03_cluster.py", stage_flags(d, work)["03"])
    a, b = npy_bytes(os.path.join(d, "one", "clusters")), npy_bytes(os.path.join(work, "clusters"))
    assert a.keys() == b.keys()
    for k in a:
        if "label" in k or "size" in k:
            assert a[k] == b[k], k
    ca, cb = (np.load(os.path.join(w, "clusters", "centres.npy")) for w in (os.path.join(d, "one"), work))
    np.testing.assert_allclose(cb, ca, atol=1e-5)


def test_04_and_05_on_two_nodes_equal_one_process(one_process, tmp_path):
    d = one_process
    work = copy_stages(os.path.join(d, "one"), tmp_path / "two", ["images", "regions", "ocr", "clusters"])
    run = str(tmp_path / "run")
    run_nodes("04_train.py", stage_flags(d, work)["04"] + ["--run-dir", run])
    wa = torch.load(os.path.join(d, "one_run", "ckpt", "latest.pt"), weights_only=True)
    wb = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)
    assert wb["config"]["world"] == 2 and wb["step"] == wa["step"] == 3
    for k, v in wa["encoder"].items():
        torch.testing.assert_close(wb["encoder"][k], v, atol=2e-4, rtol=1e-3)
    for name in ("object", "ocr"):
        ba, bb = (tr.read_bank(os.path.join(r, "ckpt", "latest.pt"), name) for r in (os.path.join(d, "one_run"), run))
        torch.testing.assert_close(bb["weight"], ba["weight"], atol=2e-4, rtol=1e-3)
    # 05 with the one-process checkpoint on two nodes: the same features
    out = str(tmp_path / "eval")
    run_nodes("05_eval.py", stage_flags(d, work)["05"] + ["--encoder", f"kit={d / 'one_run' / 'ckpt' / 'latest.pt'}",
                                                          "--out", out])
    fa, fb = (os.path.join(o, "features", "kit") for o in (os.path.join(d, "one_eval"), out))
    names = [n for n in sorted(os.listdir(fa)) if n.endswith(".npy")]
    assert names and names == sorted(n for n in os.listdir(fb) if n.endswith(".npy"))
    for n in names:
        a, b = np.load(os.path.join(fa, n)), np.load(os.path.join(fb, n))
        assert a.dtype == b.dtype and a.shape == b.shape, n
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-5, err_msg=n)
    assert json.load(open(os.path.join(out, "report.json")))["settings"]["world"] == 2
