r"""The data layer at scale: the image table and 01 (--features pixels, boxes from the samples' json) over
synthetic tar shards of 10k, 100k and 1M samples, under 1 and 2 processes: peak RSS per rank, samples/s, time
to finish the stage (the parallel merge included; the slowest rank, without interpreter start-up), and files
(left at the end, and at most during the run: a chunk file and a claim file per unit of work).

    python bench/bench_scale.py --sizes 10000,100000,1000000 --procs 1,2 --out runs/bench_scale
    python bench/bench_scale.py --measure table --images 'DIR/{00000..00009}.tar' --work W   # one stage, one run

Shards: img2dataset's layout (key.jpg + key.json, 10,000 samples per shard), the same small JPEG bytes under
new keys; each json carries the image's width/height and SA-1B-style annotations (three boxes), so the table
never opens an image and 01 decodes each once. Every process reports its own peak RSS (getrusage ru_maxrss,
which counts the memmapped pages it touched); the table's peak is measured in a process that builds only the
table. Run on an otherwise idle machine: a second CPU-heavy process skews the rates (not the memory).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PER_SHARD = 10_000
SIDE = 64


def write_shards(folder: str, n: int, per_shard: int = PER_SHARD, side: int = SIDE) -> str:
    """n samples in ceil(n / per_shard) img2dataset-style shards under folder (kept if complete); returns
    the brace pattern naming them."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    shards = (n + per_shard - 1) // per_shard
    pattern = os.path.join(folder, "{%05d..%05d}.tar" % (0, shards - 1))
    done = os.path.join(folder, "done.json")
    if os.path.exists(done) and json.load(open(done)) == {"n": n, "per_shard": per_shard, "side": side}:
        return pattern
    rng = np.random.default_rng(0)
    a = (rng.random((side, side, 3)) * 80 + 80).astype(np.uint8)
    a[side // 8: side // 2, side // 8: side // 2] = (220, 40, 40)
    a[side // 2:, side // 3:] = (40, 60, 220)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    jpg = buf.getvalue()
    q = side // 8
    anns = [{"bbox": [q, q, 3 * q, 3 * q], "area": 9 * q * q, "predicted_iou": 0.9},
            {"bbox": [side // 3, side // 2, side - side // 3, side // 2], "area": 1.0, "predicted_iou": 0.8},
            {"bbox": [0, 0, side, side], "area": side * side, "predicted_iou": 0.7}]

    def member(tf, name, data):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
        tf.addfile(ti, io.BytesIO(data))

    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(s * per_shard, min(n, (s + 1) * per_shard)):
                key = f"{s:05d}{j - s * per_shard:04d}"
                member(tf, key + ".jpg", jpg)
                member(tf, key + ".json", json.dumps({"key": key, "status": "success", "width": side,
                                                      "height": side, "annotations": anns}).encode())
        os.replace(path + ".tmp", path)
    with open(done, "w") as f:
        json.dump({"n": n, "per_shard": per_shard, "side": side}, f)
    return pattern


def measure(stage: str, images: str, work: str) -> dict:
    """Run one stage in this process (a rank when under torchrun); its peak RSS and time."""
    import torch  # noqa: F401  (imported before the clock starts, as torchrun's ranks have it already)
    import webdataset  # noqa: F401
    import workdir
    import image_io
    rank, world = workdir.init_dist()
    mine = load("mine_regions", "01_mine_regions.py") if stage == "regions" else None
    t0 = time.time()
    if stage == "table":
        image_io.ensure_image_table(work, images)
    else:
        mine.main(["--images", images, "--work", work, "--features", "pixels", "--min-box-side", "4",
                   "--min-image-side", "16", "--chunk-size", "1024"])
    out = {"stage": stage, "rank": rank, "world": world, "seconds": round(time.time() - t0, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    with open(os.path.join(work, f"rss_{stage}_rank{rank}.json"), "w") as f:
        json.dump(out, f)
    return out


def load(name, file):
    import stage_scripts
    return stage_scripts.load(file, name)


def count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def run_stage(stage, images, work, procs, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    me = os.path.abspath(__file__)
    if procs == 1:
        cmd = [sys.executable, me, "--measure", stage, "--images", images, "--work", work]
    else:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={port}",
               me, "--measure", stage, "--images", images, "--work", work]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if res.returncode:
        raise SystemExit(f"error: {stage} failed:\n{res.stderr[-3000:]}")
    ranks = [json.load(open(os.path.join(work, f"rss_{stage}_rank{r}.json"))) for r in range(procs)]
    # the stage's own time (the slowest rank), without the interpreter's and torchrun's start-up
    return max(r["seconds"] for r in ranks), wall, max(r["peak_rss_mb"] for r in ranks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--out", default="runs/bench_scale")
    p.add_argument("--per-shard", type=int, default=PER_SHARD)
    p.add_argument("--measure", choices=["table", "regions"], help="(internal) run one stage in this process")
    p.add_argument("--images")
    p.add_argument("--work")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.images, args.work)), flush=True)
        return
    rows = []
    for n in [int(v) for v in args.sizes.split(",")]:
        t0 = time.time()
        images = write_shards(os.path.join(args.out, f"shards_{n}"), n, args.per_shard)
        write_s = time.time() - t0
        shard_bytes = sum(os.path.getsize(os.path.join(os.path.dirname(images), f))
                          for f in os.listdir(os.path.dirname(images)) if f.endswith(".tar"))
        for procs in [int(v) for v in args.procs.split(",")]:
            threads = max(1, (os.cpu_count() or 1) // procs)
            work = os.path.join(args.out, f"work_{n}_{procs}")
            shutil.rmtree(work, ignore_errors=True)
            t_table, wall_table, rss_table = run_stage("table", images, work, procs, threads)
            t_regions, wall_regions, rss_regions = run_stage("regions", images, work, procs, threads)
            shards, chunks = (n + args.per_shard - 1) // args.per_shard, (n + 1023) // 1024
            disk = {sub: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(work, sub))
                             for f in fs) for sub in ("images", "regions")}
            row = {"samples": n, "procs": procs, "table_s": round(t_table, 1),
                   "table_samples_per_s": round(n / t_table), "table_peak_rss_mb": rss_table,
                   "regions_s": round(t_regions, 1), "regions_samples_per_s": round(n / t_regions),
                   "regions_peak_rss_mb": rss_regions, "files": count_files(work),
                   "temporary_files": 2 * (shards + chunks), "wall_s": round(wall_table + wall_regions, 1),
                   "table_bytes_per_sample": round(disk["images"] / n, 1),
                   "regions_bytes_per_sample": round(disk["regions"] / n, 1),
                   "shard_bytes_per_sample": round(shard_bytes / n, 1), "write_shards_s": round(write_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    print("\n| samples | processes | table: s | samples/s | peak RSS / rank | 01: s | samples/s | peak RSS / rank "
          "| files (during) | table B/sample | regions B/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['samples']:,} | {r['procs']} | {r['table_s']} | {r['table_samples_per_s']:,} | "
              f"{r['table_peak_rss_mb']:.0f} MB | {r['regions_s']} | {r['regions_samples_per_s']:,} | "
              f"{r['regions_peak_rss_mb']:.0f} MB | {r['files']} ({r['temporary_files']}) | "
              f"{r['table_bytes_per_sample']} | {r['regions_bytes_per_sample']} |")


if __name__ == "__main__":
    main()
