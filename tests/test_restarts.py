"""Elastic restarts: two torchrun launchers as two nodes (c10d rendezvous, `--max-restarts 2`); in the middle of
01, 03 and 04 the worker of RANK 1 is killed with SIGKILL. Its node's agent restarts the group, the other
node's agent follows at the next rendezvous, the stage resumes from its chunks / checkpoints, and the final
outputs are byte-identical to an uninterrupted run of the same world size.

To stop a run in its middle on any machine, every atomic write is slowed down in the workers (conftest's
SLOW_WRITES); the stages are not changed for the test."""
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import SLOW_WRITES, first_worker, launch_nodes, load_script, run_nodes, wait_nodes

import chunk_engine  # noqa: E402

pytestmark = pytest.mark.cluster
demo = load_script("make_demo_data", "00_make_demo_data.py")
mine = load_script("mine_regions", "01_mine_regions.py")
cl = load_script("cluster", "03_cluster.py")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """120 demo images in 6 webdataset shards with their COCO boxes; 01 and 02's stand-in and 03 in one process
    (04's inputs); the folder with the slow-writes sitecustomize."""
    d = tmp_path_factory.mktemp("restarts")
    demo.main(["--out", str(d / "data"), "--num-images", "120", "--size", "128", "--workers", "1", "--format",
               "webdataset", "--shard-size", "20"])
    work = str(d / "work")
    mine.main(mine_flags(d, work))
    demo.write_ocr_stand_in(work, str(d / "data" / "coco.json"))
    cl.main(["--work", work, "--k", "8"])
    os.makedirs(d / "slow")
    (d / "slow" / "sitecustomize.py").write_text(SLOW_WRITES)
    return d


def mine_flags(d, work):
    return ["--images", str(d / "data" / "shards" / "{00000..00005}.tar"), "--work", work, "--boxes",
            str(d / "data" / "coco.json"), "--features", "pixels", "--min-box-side", "8", "--min-image-side", "32",
            "--chunk-size", "4", "--workers", "0"]


def slow(d, seconds):
    return {"PYTHONPATH": str(d / "slow"), "KIT_TEST_SLOW_REPLACE_S": str(seconds)}


def kill_when(procs, script, ready, rank=1, timeout=180):
    """SIGKILL the first attempt's RANK `rank` worker as soon as ready() holds; the time of the kill."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p, _ in procs), "a launcher ended before the kill: " + "".join(
            open(log).read()[-2000:] for _, log in procs)
        pid = first_worker(script, rank) if ready() else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            return time.time()
        time.sleep(0.01)
    for p, _ in procs:
        p.kill()
    pytest.fail("the moment to kill never came")


def regions_copy(d, dest) -> str:
    """A work folder with the world's image table and regions only (03's input)."""
    import shutil
    for s in ("images", "regions"):
        shutil.copytree(d / "work" / s, dest / s)
    return str(dest)


def kmeans_reached(work, iteration):
    """A test for 03's k-means having checkpointed `iteration` iterations in `work`."""
    state = os.path.join(work, "clusters", "ckpt", "flat.json")

    def ready():
        try:
            return json.load(open(state))["iteration"] >= iteration
        except (OSError, ValueError):
            return False
    return ready


def npy_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".npy")}


def test_01_survives_a_dead_worker(world, tmp_path):
    d = world
    ref = str(tmp_path / "ref")
    run_nodes("01_mine_regions.py", mine_flags(d, ref))
    work = str(tmp_path / "killed")
    procs = launch_nodes("01_mine_regions.py", mine_flags(d, work), max_restarts=2, log_dir=tmp_path,
                         env=slow(d, 0.15))
    regions = os.path.join(work, "regions")
    kill_when(procs, "01_mine_regions.py", lambda: os.path.isdir(os.path.join(regions, "chunks")) and
              len(chunk_engine.done_chunks(regions)) >= 4)
    got = wait_nodes(procs, timeout=300)
    assert all(rc == 0 for rc, _ in got), got[0][1][-3000:] + got[1][1][-3000:]
    out = [o for _, o in got]
    assert "chunks already done" in "".join(out)          # the restarted group resumed
    for stage in ("images", "regions"):
        a, b = npy_bytes(os.path.join(ref, stage)), npy_bytes(os.path.join(work, stage))
        assert a.keys() == b.keys() and a
        assert all(a[k] == b[k] for k in a), stage


def test_03_survives_a_dead_worker(world, tmp_path):
    d = world
    flags = ["--k", "12", "--iters", "30", "--assign-chunk", "64"]

    ref, work = regions_copy(d, tmp_path / "ref"), regions_copy(d, tmp_path / "killed")
    run_nodes("03_cluster.py", ["--work", ref, *flags])
    procs = launch_nodes("03_cluster.py", ["--work", work, *flags], max_restarts=2, log_dir=tmp_path,
                         env=slow(d, 0.1))
    kill_when(procs, "03_cluster.py", kmeans_reached(work, 4))
    got = wait_nodes(procs, timeout=300)
    assert all(rc == 0 for rc, _ in got), got[0][1][-3000:] + got[1][1][-3000:]
    assert "k-means: resumed from the checkpoint of iteration" in "".join(o for _, o in got)
    a, b = npy_bytes(os.path.join(ref, "clusters")), npy_bytes(os.path.join(work, "clusters"))
    assert a.keys() == b.keys() and "centres.npy" in a
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_04_survives_a_dead_worker(world, tmp_path):
    d = world
    flags = ["--work", str(d / "work"), "--model", "tiny", "--image-size", "64", "--workers", "0", "--warmup", "2",
             "--lr", "2e-3", "--batch-size", "8", "--steps", "12", "--log-every", "1", "--save-every", "3"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    run_nodes("04_train.py", flags + ["--run-dir", ref])
    procs = launch_nodes("04_train.py", flags + ["--run-dir", run], max_restarts=2, log_dir=tmp_path,
                         env=slow(d, 0.1))
    log = os.path.join(run, "log.jsonl")

    def ready():
        return os.path.exists(os.path.join(run, "ckpt", "latest.pt")) and os.path.exists(log) and \
            sum(1 for _ in open(log)) >= 5
    kill_when(procs, "04_train.py", ready)
    got = wait_nodes(procs, timeout=300)
    assert all(rc == 0 for rc, _ in got), got[0][1][-3000:] + got[1][1][-3000:]
    out = "".join(o for _, o in got)
    assert "resumed from" in out
    a = [json.loads(x) for x in open(os.path.join(ref, "log.jsonl"))]
    b = [json.loads(x) for x in open(log)]
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    wa = torch.load(os.path.join(ref, "ckpt", "latest.pt"), weights_only=True)
    wb = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)
    assert all(torch.equal(wb["encoder"][k], v) for k, v in wa["encoder"].items())
    tr = load_script("train", "04_train.py")
    for name in ("object", "ocr"):
        ba, bb = (tr.read_bank(os.path.join(r, "ckpt", "latest.pt"), name) for r in (ref, run))
        assert torch.equal(ba["weight"], bb["weight"]) and torch.equal(ba["exp_avg_sq"], bb["exp_avg_sq"])
    assert np.isfinite(b[-1]["loss"])


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_waiting_on_a_lost_peer_stops_with_one_line(world, tmp_path, how):
    """Without restarts: rank 1 killed (its sockets close: rank 0's collective fails at once) or stopped with
    SIGSTOP (a hung node: nothing closes) in the middle of 03's k-means. Rank 0 stops within the documented
    bound (KIT_PEER_TIMEOUT_S, here 4 s, plus two heartbeats) with one line naming rank 1."""
    d = world
    work = regions_copy(d, tmp_path / "w")
    procs = launch_nodes("03_cluster.py", ["--work", work, "--k", "12", "--iters", "30"], log_dir=tmp_path,
                         env={**slow(d, 0.1), "KIT_PEER_TIMEOUT_S": "4"})
    ready = kmeans_reached(work, 3)
    deadline = time.time() + 120
    while not ready() and time.time() < deadline:
        time.sleep(0.01)
    pid = first_worker("03_cluster.py", 1)
    assert pid and ready()
    os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    t0 = time.time()
    try:
        while procs[0][0].poll() is None and time.time() - t0 < 60:     # node 0's launcher: rank 0 ended
            time.sleep(0.05)
        took = time.time() - t0
    finally:
        if how == "hung":
            os.kill(pid, signal.SIGKILL)
    got = wait_nodes(procs, timeout=60)
    assert got[0][0] != 0 and took < 4 + 2 * 1 + 10, took
    lines = [x for x in got[0][1].splitlines() if x.startswith("error: rank 0:")]
    assert len(lines) == 1, got[0][1][-3000:]
    print(f"{how}: rank 0 stopped {took:.1f} s after the signal: {lines[0]}")
    assert "rank 1 (pid " in lines[0] and ("no heartbeat for 4 s" in lines[0] if how == "hung" else
                                          "during a collective" in lines[0])
    assert "Traceback" not in got[0][1].split(lines[0])[0][-2000:] or how == "hung"
