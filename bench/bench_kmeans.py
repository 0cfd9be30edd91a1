"""Benchmark 03_cluster.py's spherical k-means against faiss.Kmeans and scikit-learn's MiniBatchKMeans, same data,
same run.

    .venv/bin/python bench/bench_kmeans.py                                # 1M x 256 -> K = 16,384, 20 iterations
    .venv/bin/python bench/bench_kmeans.py --n 100000 --k 2048 --modes flat,two-level,shard-merge
    .venv/bin/python bench/bench_kmeans.py --json-out kmeans.json         # also write the summary
    python bench/bench_kmeans.py --device cuda                            # 10M x 768 -> 1M, two-level, one GPU
                                                                          # (faiss GPU, else 03's torch backend)

Data: --mix random unit centres (default K) in --dim, each point one of them (uniformly) plus Gaussian noise of
--noise per coordinate, L2-normalised, float32, from --seed. Every method gets the same array and --iters full
passes over the n points (03: Lloyd iterations; faiss.Kmeans: niter; MiniBatchKMeans: max_iter epochs of
n / --batch mini-batch steps, tol = 0 and max_no_improvement = None so none stops early).
Initialisation: 03's `--init auto` (greedy k-means++ on 8 x K points up to K = 4096, else K random points) is
computed once and given to 03's flat mode and to faiss.Kmeans (init_centroids), so those two differ only in
their iterations, and its time is left out of both; 03's two-level and shard-merge modes initialise as 03 does
(their times include it); sklearn gets "k-means++" or "random" to match (its own k-means++ runs on
init_size = max(3 x batch, 3 x K) points, inside its time). MiniBatchKMeans is Euclidean; on unit vectors
Euclidean nearest = cosine nearest, so the objective is comparable: for every method each point's centre is
its Euclidean-nearest centre (faiss IndexFlatL2), and the score is the mean cosine between the point and that
centre (the centre normalised), over --eval-points points. Wall time is the fit alone, on all cores of this
machine (faiss, torch and sklearn use OpenMP). --shards is shard-merge's number of shards in this one process
(03 uses one per rank).

--device cuda: 03 on a GPU with the defaults 10M x 768 -> 1M, two-level (faiss's GPU index when faiss has
GPUs, else `--backend torch`); reports wall time and the peak GPU memory in use (device-wide, sampled every
50 ms; faiss allocates outside torch's allocator). No faiss.Kmeans or sklearn run at that size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import stage_scripts  # noqa: E402

cl = stage_scripts.load("03_cluster.py", "cluster")

CPU = dict(n=1_000_000, dim=256, k=16_384)
GPU = dict(n=10_000_000, dim=768, k=1_000_000)
ITERS, NOISE, BATCH, SEED, EVAL_POINTS = 20, 0.05, 4096, 0, 1_000_000


def make_data(n, dim, mix, noise, seed, chunk=1 << 18):
    rng = np.random.default_rng(seed)
    centres = cl.unit(rng.standard_normal((mix, dim), dtype=np.float32))
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x[s: s + m] = cl.unit(centres[rng.integers(0, mix, m)] + noise * rng.standard_normal((m, dim), np.float32))
    return x


def mean_cosine_torch(x, centres, chunk=1 << 14):
    import torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(centres, np.float32)).to(dev), dim=1)
    total = 0.0
    for s in range(0, len(x), chunk):
        xb = torch.from_numpy(np.ascontiguousarray(x[s: s + chunk])).to(dev)
        total += float((xb @ c.t()).max(1).values.double().sum())
    return total / len(x)


def mean_cosine(x, centres, gpu=False, chunk=1 << 16):
    """Each point to its Euclidean-nearest centre; the mean cosine between the two."""
    try:
        import faiss
    except ImportError:                       # a GPU machine without faiss: 03's centres are unit, so the
        return mean_cosine_torch(x, centres, chunk)     # Euclidean-nearest one has the largest cosine
    c = np.ascontiguousarray(centres, np.float32)
    index = faiss.IndexFlatL2(c.shape[1])
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(c)
    cu = cl.unit(c)
    total = 0.0
    for s in range(0, len(x), chunk):
        _, lab = index.search(x[s: s + chunk], 1)
        total += float(np.einsum("ij,ij->i", x[s: s + chunk], cu[lab[:, 0]]).sum(dtype=np.float64))
    return total / len(x)


class GpuMemoryPeak:
    """Device-wide GPU memory in use (total - free), sampled in a thread: faiss allocates outside torch."""

    def __enter__(self):
        import torch
        self.torch, self.peak, self.stop = torch, 0, False
        free, total = torch.cuda.mem_get_info()
        self.base = total - free

        def poll():
            while not self.stop:
                free, total = self.torch.cuda.mem_get_info()
                self.peak = max(self.peak, total - free)
                time.sleep(0.05)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def log(phase, it, iters, obj, reseeded, dt):
    print(f"  {phase} iteration {it + 1}/{iters}: objective {obj:.4f}, {reseeded} re-seeded, {dt:.1f} s", flush=True)


def initial_centres(x, args):
    """03's initial centres (--init auto: greedy k-means++ on 8 x K points up to K = 4096, else K random points),
    given to every method that takes them, so the runs differ only in their iterations."""
    t0 = time.perf_counter()
    centres, _ = cl.spherical_kmeans(x, args.k, 0, args.seed, init=args.init)
    return centres, time.perf_counter() - t0


def run_ours(x, args, init, backend=cl.CPU, mode="flat"):
    t0 = time.perf_counter()
    if mode == "flat":
        centres, stats = cl.spherical_kmeans(x, args.k, args.iters, args.seed, init=init, backend=backend, log=log)
        reseeded = sum(stats["reseeded"])
    elif mode == "shard-merge":
        centres, stats, _ = cl.shard_merge(x, args.k, args.iters, args.seed, init=args.init, backend=backend,
                                           log=log, shards=args.shards)
        reseeded = sum(sum(st["reseeded"]) for st in stats.values())
    else:
        centres, stats, _ = cl.two_level(x, args.k, args.iters, args.seed, refine_iters=args.refine_iters,
                                         init=args.init, backend=backend, log=log)
        reseeded = sum(sum(st["reseeded"]) for st in stats.values())
    return centres, time.perf_counter() - t0, reseeded


def run_faiss_kmeans(x, args, init):
    """faiss.Kmeans(spherical=True), the library 03 builds on, from the same initial centres."""
    import faiss
    km = faiss.Kmeans(x.shape[1], args.k, niter=args.iters, spherical=True, seed=args.seed, verbose=False,
                      max_points_per_centroid=1 << 30)
    t0 = time.perf_counter()
    km.train(x, init_centroids=np.ascontiguousarray(init))
    return km.centroids, time.perf_counter() - t0


def run_sklearn(x, args, pp):
    from sklearn.cluster import MiniBatchKMeans
    km = MiniBatchKMeans(n_clusters=args.k, init="k-means++" if pp else "random", batch_size=args.batch,
                         n_init=1, max_iter=args.iters, tol=0.0, max_no_improvement=None, compute_labels=False,
                         random_state=args.seed)
    t0 = time.perf_counter()
    km.fit(x)
    return km.cluster_centers_, time.perf_counter() - t0, int(km.n_steps_)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, help=f"points (cpu {CPU['n']:,}, cuda {GPU['n']:,})")
    p.add_argument("--dim", type=int, help=f"dimension (cpu {CPU['dim']}, cuda {GPU['dim']})")
    p.add_argument("--k", type=int, help=f"centres (cpu {CPU['k']:,}, cuda {GPU['k']:,})")
    p.add_argument("--mix", type=int, help="mixture components of the data (default: K)")
    p.add_argument("--iters", type=int, default=ITERS)
    p.add_argument("--mode", choices=["flat", "two-level"], help="ours: flat on cpu, two-level on cuda")
    p.add_argument("--init", default="auto", choices=["auto", "random", "kmeans++"])
    p.add_argument("--noise", type=float, default=NOISE)
    p.add_argument("--batch", type=int, default=BATCH, help="MiniBatchKMeans batch size")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval-points", type=int, default=EVAL_POINTS, help="points scored for the objective")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--modes", default="flat", help="cpu: 03's modes to run, comma-separated (flat, two-level, "
                   "shard-merge); flat starts from the shared initial centres")
    p.add_argument("--refine-iters", type=int, default=None, help="two-level: 03's default unless given")
    p.add_argument("--shards", type=int, default=4, help="shard-merge: shards of the points (03: one per rank)")
    p.add_argument("--torch-cpu", action="store_true", help="also run 03 with --backend torch on the CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"], help="cuda: 03's backend")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    defaults = GPU if args.device == "cuda" else CPU
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mix = args.mix or args.k
    args.mode = args.mode or ("two-level" if args.device == "cuda" else "flat")
    try:
        import faiss
    except ImportError:
        if args.device != "cuda":
            raise SystemExit("error: faiss is needed on the CPU (pip install faiss-cpu)")
        faiss = None
    args.refine_iters = args.iters if args.refine_iters is None else args.refine_iters   # 03's default
    pp = args.init == "kmeans++" or (args.init == "auto" and args.k <= cl.KMEANSPP_MAX_K)
    print(f"data: {args.n:,} x {args.dim} float32 from {args.mix:,} unit centres + noise {args.noise}; "
          f"K = {args.k:,}, {args.iters} iterations, init {'k-means++' if pp else 'random'}; "
          f"{os.cpu_count()} cores, " + (f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)" if faiss
                                          else "no faiss: 03's torch backend"), flush=True)
    t0 = time.perf_counter()
    x = make_data(args.n, args.dim, args.mix, args.noise, args.seed)
    print(f"generated in {time.perf_counter() - t0:.1f} s", flush=True)
    ev = x[np.random.default_rng(args.seed + 1).choice(args.n, args.eval_points, replace=False)] \
        if args.eval_points < args.n else x
    flop = 2 * args.n * args.k * args.dim if args.mode == "flat" else \
        2 * args.n * args.dim * (round(args.k ** 0.5) + args.k / round(args.k ** 0.5))
    rows = []
    if args.device == "cuda":
        backend = cl.choose_backend(args.backend, "cuda")
        with GpuMemoryPeak() as mem:
            init, t_init = initial_centres(x, args) if args.mode == "flat" else (args.init, 0.0)
            centres, wall, reseeded = run_ours(x, args, init, backend, args.mode)
        rows.append(dict(method=f"03 spherical k-means, {args.mode}, {backend.kind} on {backend.device}",
                         wall_s=wall + t_init, iters=args.iters, reseeded=reseeded,
                         gpu_peak_gib=(mem.peak - mem.base) / 2 ** 30,
                         objective=mean_cosine(ev, centres, gpu=backend.kind == "faiss")))
    else:
        init, t_init = initial_centres(x, args)
        print(f"initial centres (03's --init {args.init}): {t_init:.1f} s, given to 03 and faiss.Kmeans", flush=True)
        for mode in args.modes.split(","):
            centres, wall, reseeded = run_ours(x, args, init if mode == "flat" else None, cl.CPU, mode)
            rows.append(dict(method=f"03 spherical k-means, {mode}" + (f", --refine-iters {args.refine_iters}"
                                                                      if mode == "two-level" else ""),
                             wall_s=wall, iters=args.iters, reseeded=reseeded, objective=mean_cosine(ev, centres)))
            print(f"{rows[-1]['method']}: {wall:.1f} s, objective {rows[-1]['objective']:.4f}", flush=True)
        centres, wall = run_faiss_kmeans(x, args, init)
        rows.append(dict(method="faiss.Kmeans(spherical=True), same initial centres", wall_s=wall, iters=args.iters,
                         objective=mean_cosine(ev, centres)))
        print(f"faiss.Kmeans: {wall:.1f} s, objective {rows[-1]['objective']:.4f}", flush=True)
        if args.torch_cpu:
            centres, wall, reseeded = run_ours(x, args, init, cl.Backend("torch", "cpu"))
            rows.append(dict(method="03 spherical k-means, flat, --backend torch (CPU)", wall_s=wall,
                             iters=args.iters, reseeded=reseeded, objective=mean_cosine(ev, centres)))
            print(f"torch backend: {wall:.1f} s, objective {rows[-1]['objective']:.4f}", flush=True)
        if not args.skip_sklearn:
            centres, wall, steps = run_sklearn(x, args, pp)
            rows.append(dict(method=f"sklearn MiniBatchKMeans, batch {args.batch}", wall_s=wall, iters=args.iters,
                             steps=steps, objective=mean_cosine(ev, centres)))
            print(f"sklearn: {wall:.1f} s, objective {rows[-1]['objective']:.4f}", flush=True)
    base = rows[0]
    print(f"\n{args.n:,} x {args.dim} -> K = {args.k:,}, {args.iters} iterations / epochs; objective = mean cosine "
          f"of the points to their nearest centre ({len(ev):,} points)\n")
    print("| method | wall s | s / iteration | objective | time vs 03 | objective - 03 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_s']:.1f} | {r['wall_s'] / max(r['iters'], 1):.2f} | {r['objective']:.4f} | "
              f"{r['wall_s'] / base['wall_s']:.2f}x | {r['objective'] - base['objective']:+.4f} |")
    if "gpu_peak_gib" in base:
        print(f"\nGPU memory in use, peak above the start: {base['gpu_peak_gib']:.2f} GiB")
    print(f"\n03 {args.mode}: {flop:.2e} FLOP per iteration, {flop * args.iters / base['wall_s'] / 1e9:.1f} "
          "GFLOP/s over the fit; the initial centres are not in the flat rows' times")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
