"""What an elastic restart costs: a stage on two torchrun "nodes" of this machine (c10d rendezvous,
--max-restarts 2), uninterrupted and with the worker of RANK 1 killed (SIGKILL) half-way, side by side.

    .venv/bin/python bench/bench_restart.py                   # 01 on 1,200 demo images, 04 for 60 steps
    .venv/bin/python bench/bench_restart.py --images 400 --steps 30

Measured per stage: the uninterrupted wall time, the killed run's wall time, their difference (the restart's
whole cost: the agents noticing, the new rendezvous, the workers starting again and loading their state, the
work of the unfinished chunk or the steps after the last checkpoint done again), and the time from the kill to
the restarted group's first line of resumed work ("chunks already done" / "resumed from"). Both runs produce
the same bytes (01's regions) and the same loss at every step (04), checked.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import first_worker, launch_nodes, wait_nodes  # noqa: E402


def run(script, args, log_dir, kill_when=None, resumed_text=None):
    """(wall seconds, seconds from the kill to the resumed line or None)."""
    t0 = time.time()
    procs = launch_nodes(script, args, nodes=2, nproc=1, max_restarts=2, log_dir=log_dir)
    killed_at = resumed_after = None
    while any(p.poll() is None for p, _ in procs):
        if kill_when is not None and killed_at is None and kill_when():
            pid = first_worker(script, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.time()
        if killed_at and resumed_after is None and any(resumed_text in open(log).read() for _, log in procs):
            resumed_after = time.time() - killed_at
        time.sleep(0.01)
    got = wait_nodes(procs)
    if any(rc for rc, _ in got):
        raise SystemExit(f"{script} failed:\n{got[0][1][-2000:]}\n{got[1][1][-2000:]}")
    return time.time() - t0, resumed_after


def npy_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".npy")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    import stage_scripts
    import chunk_engine
    demo = stage_scripts.load("00_make_demo_data.py", "make_demo_data")
    tmp = tempfile.mkdtemp(prefix="bench-restart-")
    try:
        return measure(args, tmp, demo, chunk_engine, stage_scripts)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp, demo, chunk_engine, stage_scripts):
    demo.main(["--out", f"{tmp}/data", "--num-images", str(args.images), "--size", "128", "--workers", "1",
               "--format", "webdataset", "--shard-size", "100"])
    shards = f"{tmp}/data/shards/{{00000..{(args.images + 99) // 100 - 1:05d}}}.tar"
    mine = ["--images", shards, "--boxes", f"{tmp}/data/coco.json", "--features", "pixels", "--min-box-side", "8",
            "--min-image-side", "32", "--chunk-size", "16", "--workers", "0"]
    rows = []
    t_ref, _ = run("01_mine_regions.py", [*mine, "--work", f"{tmp}/ref"], f"{tmp}/log_ref01")
    half = (args.images + 15) // 16 // 2
    regions = f"{tmp}/killed/regions"
    t_kill, resumed = run("01_mine_regions.py", [*mine, "--work", f"{tmp}/killed"], f"{tmp}/log_kill01",
                          lambda: os.path.isdir(f"{regions}/chunks") and len(chunk_engine.done_chunks(regions)) >= half,
                          "chunks already done")
    same = npy_bytes(f"{tmp}/ref/regions") == npy_bytes(regions)
    rows.append(("01 (tar shards, chunks of 16)", t_ref, t_kill, resumed, same))
    demo.write_ocr_stand_in(f"{tmp}/ref", f"{tmp}/data/coco.json")
    stage_scripts.load("03_cluster.py", "cluster").main(["--work", f"{tmp}/ref", "--k", "16"])
    train = ["--work", f"{tmp}/ref", "--model", "tiny", "--image-size", "64", "--workers", "0", "--batch-size", "16",
             "--steps", str(args.steps), "--log-every", "1", "--save-every", "10"]
    t_ref, _ = run("04_train.py", [*train, "--run-dir", f"{tmp}/run_ref"], f"{tmp}/log_ref04")
    log = f"{tmp}/run_kill/log.jsonl"
    t_kill, resumed = run("04_train.py", [*train, "--run-dir", f"{tmp}/run_kill"], f"{tmp}/log_kill04",
                          lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= args.steps // 2, "resumed from")
    import json

    def losses(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(path))]
    same = losses(f"{tmp}/run_ref/log.jsonl") == losses(log)
    rows.append((f"04 (tiny, {args.steps} steps, checkpoint every 10)", t_ref, t_kill, resumed, same))
    print("| stage | uninterrupted s | killed half-way s | restart cost s | kill -> resumed s | same result |")
    print("|---|---:|---:|---:|---:|---|")
    for name, a, b, r, same in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {b - a:.1f} | {r if r is None else f'{r:.1f}'} | {same} |")
    return rows


if __name__ == "__main__":
    main()
