"""03_cluster.py over 1 and 2 torchrun processes on the same synthetic regions: fit time and objective.

    .venv/bin/python bench/bench_kmeans_ranks.py                       # 200k x 256 -> 2,048, 10 iterations
    .venv/bin/python bench/bench_kmeans_ranks.py --n 400000 --k 4096 --nproc 1,2,4

A regions/ folder of --n float16 features (bench_kmeans.make_data: --k unit centres plus noise) goes to a
temporary work directory; 03 then fits `--mode flat --fit-on regions` with one thread per process
(OMP_NUM_THREADS=1), once per process count, each a fresh torchrun, from K random points (--init random: 03's
k-means++ is the same serial work on every rank, so it does not scale with ranks). Reported: the manifest's fit time
(sampling, k-means, broadcast; labelling excluded), the speed-up over one process and the final objective.
On a machine with fewer cores than processes the speed-up is capped by the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import workdir  # noqa: E402
from bench_kmeans import make_data  # noqa: E402


def write_regions(work, x):
    """A regions/ folder as 01 writes it (what 03 reads): x as region features of one image each."""
    folder = os.path.join(work, "regions")
    os.makedirs(folder, exist_ok=True)
    n = len(x)
    workdir.write_npy(os.path.join(folder, "region_features.npy"), x.astype(np.float16))
    workdir.write_npy(os.path.join(folder, "image_features.npy"), x.astype(np.float16))
    workdir.write_npy(os.path.join(folder, "status.npy"), np.zeros(n, np.uint8))
    workdir.write_npy(os.path.join(folder, "region_offsets.npy"), np.arange(n + 1, dtype=np.int64))
    workdir.write_json(os.path.join(folder, "manifest.json"), {
        "stage": "regions", "complete": True, "finished": "2026-01-01T00:00:00+00:00", "image_table": "bench",
        "rows": {"images": n, "boxes": n, "region_features": n},
        "status_names": ["ok", "skipped", "too_small", "no_regions", "error"],
        "features": {"kind": "bench", "dim": int(x.shape[1])}})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nproc", default="1,2")
    p.add_argument("--init", default="random", help="03's --init (k-means++ runs the same on every rank)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        write_regions(work, make_data(args.n, args.dim, args.k, 0.05, 0))
        rows = []
        for nproc in [int(v) for v in args.nproc.split(",")]:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", os.path.join(ROOT, "03_cluster.py"), "--work", work, "--k",
                   str(args.k), "--iters", str(args.iters), "--mode", "flat", "--fit-on", "regions", "--init", args.init, "--force"]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            with open(os.path.join(work, "clusters", "manifest.json")) as f:
                m = json.load(f)
            rows.append((nproc, m["elapsed_s"]["fit"], m["final_objective"]))
            print(f"{nproc} process(es): fit {m['elapsed_s']['fit']:.1f} s, objective {m['final_objective']:.4f}",
                  flush=True)
    print(f"\n{args.n:,} x {args.dim} -> K = {args.k:,}, {args.iters} iterations, flat, one thread per process; "
          f"--init {args.init}; {os.cpu_count()} cores\n\n| processes | fit s | speed-up | objective |\n|---:|---:|---:|---:|")
    for nproc, fit, obj in rows:
        print(f"| {nproc} | {fit:.1f} | {rows[0][1] / fit:.2f}x | {obj:.4f} |")


if __name__ == "__main__":
    main()
