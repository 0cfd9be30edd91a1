r"""Stage 03: cluster the CLIP features of regions and images into K centres, and label every point.

MLCD Sec. 3.2: one offline clustering of CLIP features into K = 1M centres ("following UNICOM", with faiss);
each image's positives are its l = 8 nearest centres. RICE Eq. 1: each region's label is its nearest centre.
One codebook serves both: by default (`--fit-on both`) the training sample mixes region and image features,
so the centres cover what RICE labels (regions) and what MLCD labels (whole images), and 04 can train the
object loss and the image loss against one bank. `--fit-on regions|images` fits on one kind only.

One process (faiss on the GPU when faiss has one, else torch on the GPU when torch sees one, else faiss on the
CPU; --backend, --device):
    python 03_cluster.py --work runs/demo --k 108                      # offline demo (pixel stand-in features)
    python 03_cluster.py --work runs/big --k 1000000                   # --mode auto: two-level above 65,536
torchrun, one node of 8 GPUs, then several nodes (each rank holds a contiguous shard of the training sample):
    torchrun --nproc_per_node=8 03_cluster.py --work runs/big --k 1000000
    torchrun --nnodes=8 --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \
        03_cluster.py --work runs/big --k 1000000
    sbatch --nodes 8 slurm/03_cluster.sbatch --work runs/big --k 1000000                     # Slurm

Reads <work>/regions/ (01_mine_regions.py). Writes <work>/clusters/ (--out):
    centres.npy        float32 (K, C)        L2-normalised centres
    region_labels.npy  int32 (R,)            nearest centre of each region (RICE Eq. 1), by cosine
    region_sims.npy    float32 (R,)          its cosine
    image_labels.npy   int32 (n_images, l)   the l most similar centres of each image, most similar first
    image_sims.npy     float32 (n_images, l) their cosines (MLCD Sec. 3.2); -1 / 0 for images without a feature
    cluster_sizes.npy  int64 (K,)            regions whose label is c + labelled images whose top-1 is c
    manifest.json      config, K, C, rows, objective and re-seeded clusters per iteration, the inputs' fingerprint

Which images are labelled: those whose regions status is in `--image-statuses` (default ok, too_small,
no_regions: 01 computes the whole-image feature before the size test, so these have one; skipped and error
images have an all-zero feature) and whose feature is non-zero. Every region is labelled.

The algorithm. Spherical k-means: points and centres on the unit sphere, assignment by inner product (faiss
IndexFlatIP, or GpuIndexFlatIP on this rank's GPU; or TorchIndex, an exact fp32 torch matmul, on a GPU when
faiss has none), each centre the re-normalised mean of its points; sums and counts in float64, all-reduced
over ranks (gloo; NCCL for the torch GPU path), so every rank holds the same centres. A row is searched only
when its bound (Bounds: its centre and a bound on its second-best cosine, grown by how far the centres moved)
cannot rule out a change of centre, so later iterations search a few percent of the rows with the labels of a
full search; the sums are a sparse one-hot product per chunk (scipy), off the search's threads. The training sample is
at most `--max-points-per-centre` x K points (faiss's 256), drawn from the seed. Initial centres (`--init
auto`): greedy k-means++ on 8 x K sampled points up to K = 4096 (so every phase of two-level mode at K = 1M),
else K distinct random points as faiss does; random init leaves some natural clusters without a centre and
gives others two, which Lloyd iterations rarely undo. An empty cluster is re-seeded as faiss does: a cluster
drawn with probability proportional to (size - 1) is split, its centre copied with a +-1/1024 perturbation.
`--mode two-level` (auto above K = 65,536) is faiss.contrib.clustering.two_level_clustering's route to 1M
centres: a coarse k-means with K1 = round(sqrt(K)) cells, then inside each cell a k-means with a number of
centres proportional to the cell's share of the sample (at least 1, at most the cell's points, summing to
OVERCLUSTER x K = 2K); a k-means of those 2K centres into K merges the fragments of clusters that the cells cut
apart; the result is refined by `--refine-iters` (default: --iters) flat iterations, which the bounds
make cheap once the rows settle. `--mode shard-merge` is the authors' recipe (unicom issue 20): every rank clusters
its shard of the sample into K on its own (flat, or two-level above 65,536), then the union of the shards'
centres (world x K points, or --merge-shards x K) is clustered into K over all ranks.

Cost model (FLOP per iteration; n training points, C dims): flat 2·n·K·C; two-level 2·n·C·(K1 + K/K1).
    n = 256M (256 x 1M), C = 768, K = 1M:  flat 3.9e17, two-level 7.9e14 (K1 = 1000); x 20 iterations 7.9e18, 1.6e16
    n = 10M, C = 768, K = 1M:             flat 1.5e16, two-level 3.1e13;              x 20 iterations 3.1e17, 6.1e14
At an assumed 50 TFLOP/s of fp32 GEMM per GPU (not measured here), 1.6e16 is about 5 GPU-minutes and 7.9e18
about 44 GPU-hours. k-means++ is k small products over its pool of 8 x k points: a 1000-centre cell in 768-d
took 23 s on the 2-core development CPU, and K = 1M in two-level mode has 1000 such cells, so on a GPU they
run there. Labelling is one more flat pass, 2·(R + n_images)·K·C: 3.7e18 for 2B regions and 400M images.
Memory: the sample takes n x C x 4 bytes (786 GB at n = 256M: shard it over ranks; 31 GB at 10M), the
centres K x C x 4 (3.1 GB at 1M), flat iterations about 2 x K x C x 8 per rank for the float64 sums and the
update (12 GB at 1M; two-level needs that only per cell and in refine iterations), and 16 bytes per row
for the bounds. A refine iteration costs a flat iteration for the rows it searches (all of them in the first,
a few percent once they settle). shard-merge, per rank: the shard's own k-means (n / world points into K,
two-level above 65,536: 2·(n / world)·C·(K1 + K/K1) per iteration, no communication), then the merge over
world x K points (at 64 ranks and K = 1M: 64M points, two-level, 2·64M·C·2000 = 2e14 per iteration over all
ranks). The authors' numbers (20M points per GPU into 1M) fit that shape.

Resumable: after each iteration rank 0 checkpoints the centres into clusters/ckpt/ (two-level: the coarse
phase per iteration, the cells one file per finished cell, the refine phase per iteration; shard-merge: one
file per finished shard, each rank checkpointing its own shard's k-means, then the merge); re-seeding draws
from a generator seeded by (seed, phase, cell, iteration), so a resumed run ends byte-identical to an
uninterrupted one. Labelling runs in resumable chunks (`--assign-chunk` rows; chunk_engine.run_chunks). Rerun the
same command after any interruption; a complete stage is skipped unless `--force`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workdir  # noqa: E402
import stage_folders  # noqa: E402
import chunk_engine  # noqa: E402
import losses  # noqa: E402

# defaults -------------------------------------------------------------------------------------------------
WORK = "runs/demo"
K = 1_000_000                # MLCD Sec. 4.1 and RICE: 1M classes
IMAGE_TOPL = losses.IMAGE_TOPL   # MLCD Sec. 4.1: l = 8 positives per image
ITERS = 20
SEED = 0
MAX_POINTS_PER_CENTRE = 256  # faiss's default: the training sample is at most 256 x K points
OVERCLUSTER = 2              # two-level: the cells make 2 x K centres, merged into K (two_level)
FLAT_MAX_K = 65_536          # --mode auto: flat k-means up to this K, two-level above
KMEANSPP_MAX_K = 4096        # --init auto: k-means++ up to this K (every phase of two-level up to K ~ 16M)
INIT_POOL = 8                # k-means++ runs on INIT_POOL x K training points drawn from the seed
REFINE_ITERS = None          # two-level: flat iterations over the union; default --iters (settled rows are skipped)
ASSIGN_CHUNK = 65_536        # rows per search call and per resumable labelling chunk
IMAGE_STATUSES = "ok,too_small,no_regions"   # 01 computed a whole-image feature for these
SPLIT_EPS = 1.0 / 1024       # faiss's perturbation when an empty cluster takes half of a large one
PHASES = ["flat", "coarse", "cell", "refine", "shard", "merge"]   # the first number of a k-means's seed tag
# the settings the outputs depend on (the backend, device and chunking give the same labels)
RESULT_SETTINGS = ("k", "fit_on", "mode", "init", "iters", "refine_iters", "seed", "max_points_per_centre",
                   "image_statuses", "merge_shards", "image_topl")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    p.add_argument("--work", default=WORK)
    p.add_argument("--out", default=None, help="output folder (default <work>/clusters; another one keeps a "
                   "second codebook beside it, e.g. MLCD's --fit-on images, for 04 --clusters)")
    p.add_argument("--k", type=int, default=K, help="number of centres")
    p.add_argument("--image-topl", type=int, help=f"centres per image (MLCD's l; default {IMAGE_TOPL}, or K when "
                   "K is smaller)")
    p.add_argument("--fit-on", default="both", choices=["regions", "images", "both"])
    p.add_argument("--mode", default="auto", choices=["auto", "flat", "two-level", "shard-merge"],
                   help="auto: flat up to K = 65,536, two-level above; shard-merge: the authors' recipe "
                   "(each shard into K, then the shards' centres into K)")
    p.add_argument("--merge-shards", type=int, default=0, help="shard-merge: shards of the training sample "
                   "(default: one per process; a multiple of the number of processes)")
    p.add_argument("--iters", type=int, default=ITERS, help="k-means iterations (per phase in two-level mode)")
    p.add_argument("--refine-iters", type=int, default=REFINE_ITERS,
                   help="two-level: flat iterations over the union at the end (default: --iters; 0: none)")
    p.add_argument("--init", default="auto", choices=["auto", "random", "kmeans++"])
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--max-points-per-centre", type=int, default=MAX_POINTS_PER_CENTRE)
    p.add_argument("--image-statuses", default=IMAGE_STATUSES, help="regions statuses whose images get labels")
    p.add_argument("--assign-chunk", type=int, default=ASSIGN_CHUNK)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"],
                   help="search and update: faiss (its GPU index when it has GPUs), torch (fp32 matmul; the GPU "
                   "path when faiss has none); auto picks faiss GPU, then torch GPU, then faiss CPU")
    p.add_argument("--force", action="store_true", help=workdir.FORCE_HELP)
    args = p.parse_args(argv)
    workdir.check_flags(args, {"k": ">= 1", "image_topl": ">= 1", "merge_shards": ">= 0", "iters": ">= 0",
                               "refine_iters": ">= 0", "seed": ">= 0", "max_points_per_centre": ">= 1",
                               "assign_chunk": ">= 1"})
    args.refine_iters = args.iters if args.refine_iters is None else args.refine_iters
    if args.k < 1 or args.iters < 0 or args.refine_iters < 0 or args.seed < 0 or args.assign_chunk < 1:
        p.error("--k and --assign-chunk must be >= 1; --iters, --refine-iters and --seed >= 0")
    if args.image_topl is None:                    # a default the user never saw must not refuse a small K
        args.image_topl = min(IMAGE_TOPL, args.k)
    if not 1 <= args.image_topl <= args.k or args.max_points_per_centre < 1:
        p.error("--image-topl must be in [1, K] and --max-points-per-centre >= 1")
    if args.mode == "auto":
        args.mode = "flat" if args.k <= FLAT_MAX_K else "two-level"
    args.out = args.out or os.path.join(args.work, "clusters")
    return args


# processes and faiss ---------------------------------------------------------------------------------------


_ALONE = [False]     # shard-merge's first phase: each rank clusters its own shard, no collective


@contextlib.contextmanager
def alone():
    """Inside: k-means on this rank's rows only (no all-reduce; this rank writes its own checkpoints)."""
    _ALONE[0] = True
    try:
        yield
    finally:
        _ALONE[0] = False


def shared() -> bool:
    return workdir.dist_info()[1] > 1 and not _ALONE[0]


def writes_ckpt() -> bool:
    return _ALONE[0] or workdir.dist_info()[0] == 0


def all_reduce(*arrays):
    """Sum numpy arrays in place over ranks (gloo, CPU); nothing in a one-process run or alone()."""
    if shared():
        import torch
        import torch.distributed as dist
        for a in arrays:
            dist.all_reduce(torch.from_numpy(a))


class Backend(NamedTuple):
    """Where the k-means search and update run: faiss (CPU, or its GPU index when faiss has GPUs) or torch
    (fp32 matmul on this rank's GPU when faiss has none; on the CPU only when asked, --backend torch)."""
    kind: str                     # "faiss" or "torch"
    device: str                   # "cpu" or "cuda:<local rank>"
    nccl: object = None           # torch on GPUs with several ranks: the NCCL group of the sums' all-reduce

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"


def choose_backend(backend: str, device: str) -> Backend:
    """--backend auto: faiss's GPU index if faiss has GPUs, else torch on the GPU if torch sees one, else faiss
    on the CPU. --device cpu keeps everything on the CPU; --device cuda insists on a GPU."""
    import faiss
    import torch
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    torch_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda" and not (torch_gpus or faiss_gpus):
        raise SystemExit("error: --device cuda, but neither faiss nor torch sees a GPU")
    if backend == "faiss" and device == "cuda" and not faiss_gpus:
        raise SystemExit("error: --backend faiss --device cuda, but this faiss has no GPU: use --backend torch "
                         "(or auto), or install a faiss built with CUDA")
    if device != "cpu" and faiss_gpus and backend in ("auto", "faiss"):
        return Backend("faiss", f"cuda:{local % faiss_gpus}")
    if device != "cpu" and torch_gpus and backend in ("auto", "torch"):
        nccl = None
        if workdir.dist_info()[1] > 1:
            import torch.distributed as dist
            nccl = dist.new_group(backend="nccl")
        return Backend("torch", f"cuda:{local % torch_gpus}", nccl)
    return Backend("torch" if backend == "torch" else "faiss", "cpu")


CPU = Backend("faiss", "cpu")
_GPU_RES = {}
TORCH_BLOCK_BYTES = 256 << 20    # torch search: rows per block so that the (rows, K) scores stay this small


class TorchIndex:
    """Exact inner-product search over the centres with torch: fp32 matmul (TF32 off), then max / topk, in
    blocks of rows. The same labels as faiss's IndexFlatIP up to fp32 rounding of near-ties (tested)."""

    def __init__(self, centres: np.ndarray, device: str):
        import torch
        self.torch, self.device = torch, torch.device(device)
        self.c = torch.from_numpy(np.ascontiguousarray(centres, np.float32)).to(self.device)
        self.block = max(1, min(65536, TORCH_BLOCK_BYTES // (4 * max(1, len(centres)))))

    def search_tensor(self, xt, topl: int):
        """(sims, labels) of device rows xt, most similar first."""
        torch = self.torch
        sims, labels = [], []
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False          # exact fp32 products
        try:
            for s in range(0, len(xt), self.block):
                scores = xt[s: s + self.block] @ self.c.T
                v, i = scores.max(1, keepdim=True) if topl == 1 else scores.topk(topl, dim=1)
                sims.append(v)
                labels.append(i)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        if not sims:
            return xt.new_zeros((0, topl)), torch.zeros((0, topl), dtype=torch.long, device=xt.device)
        return torch.cat(sims), torch.cat(labels)

    def search(self, x: np.ndarray, topl: int):
        sims, labels = self.search_tensor(self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device), topl)
        return sims.cpu().numpy(), labels.cpu().numpy()


def make_index(centres: np.ndarray, backend: Backend = CPU):
    """Exact inner-product index over the centres (.search(x, l) -> (sims, labels)): faiss IndexFlatIP or
    GpuIndexFlatIP, or a TorchIndex."""
    if backend.kind == "torch":
        return TorchIndex(centres, backend.device)
    import faiss
    if backend.gpu:
        dev = int(backend.device.split(":")[1])
        if dev not in _GPU_RES:
            _GPU_RES[dev] = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = dev
        index = faiss.GpuIndexFlatIP(_GPU_RES[dev], centres.shape[1], cfg)
    else:
        index = faiss.IndexFlatIP(centres.shape[1])
    index.add(np.ascontiguousarray(centres, np.float32))
    return index


BOUND_EPS = 1e-5      # margin of the kept rows over their bound: far above fp32 rounding of a cosine
BOUND_WATCH = 64      # centres at least checked exactly every iteration (the largest moves), outside the bound


class Bounds:
    """Per row of this rank: its centre and an upper bound on its second-best cosine, kept across the Lloyd
    iterations of one k-means (Hamerly's bound, on the sphere). When centre j moves by delta_j, the cosine of
    a unit row to it grows by at most delta_j; a row whose cosine to its own moved centre still beats its
    bound (grown by the largest move of any other centre) by BOUND_EPS cannot change centre, so it is not
    searched. The labels are those of a full search (fp32 rounding is far below BOUND_EPS); once most rows
    have settled an iteration searches a small share of them. 16 bytes per row."""

    def __init__(self, n):
        self.label = np.full(n, -1, np.int64)
        self.upper = np.full(n, np.inf, np.float32)
        self.centres = None                     # the centres the bounds refer to

    def stale(self, x, centres, chunk, watch=BOUND_WATCH):
        """Rows that must be searched again now that the centres are `centres`; the others' bounds grow.
        The centres that moved most (at least `watch`, and every one that moved more than 4x the median move,
        up to k / 16: re-seeded ones jump) are checked exactly for every row (a rows x watched product), so a
        few large moves do not void every bound; the bound grows by the largest move of the other centres (not
        counting the row's own)."""
        k = len(centres)
        moved = np.linalg.norm(centres.astype(np.float64) - self.centres, axis=1)
        order = np.argsort(-moved, kind="stable")
        # watch the outliers too (re-seeded centres jump): up to k / 16 centres, a sixteenth of a search
        outliers = int((moved > 4 * np.median(moved)).sum())
        m = min(max(watch, min(outliers, k // 16)), max(0, k - 3))
        watched, rest = order[:m], order[m:]
        first, second = moved[rest[0]], moved[rest[1]] if len(rest) > 1 else 0.0
        grown = self.upper + np.where(self.label == rest[0], second, first).astype(np.float32)
        todo = []
        for s in range(0, len(x), chunk):
            rows, lab = x[s: s + chunk], self.label[s: s + chunk]
            bound = grown[s: s + chunk]
            if m:
                cos = rows @ centres[watched].T
                cos[watched[None, :] == lab[:, None]] = -np.inf
                bound = np.maximum(bound, cos.max(1))
            own = np.einsum("ij,ij->i", rows, centres[lab])
            keep = own >= bound + BOUND_EPS
            self.upper[s: s + chunk] = np.where(keep, bound, self.upper[s: s + chunk])
            todo.append(s + np.flatnonzero(~keep))
        return np.concatenate(todo) if todo else np.zeros(0, np.int64)




def own_cosines(x, centres, label, chunk):
    """x_i . c_label[i] in fixed chunks of rows (the same values whichever rows were searched)."""
    out = np.empty(len(x), np.float32)
    for s in range(0, len(x), chunk):
        out[s: s + chunk] = np.einsum("ij,ij->i", x[s: s + chunk], centres[label[s: s + chunk]])
    return out


def lloyd_pass(x, centres, backend: Backend, chunk: int, desc: str | None = None, bounds: Bounds | None = None):
    """One assignment pass over this rank's rows: (sums float64 (k, C), counts and the sum of cosines float64
    (k + 1,), reduced, rows searched). On the host (faiss search, or torch on the CPU): only the rows that
    `bounds` cannot keep are searched (top-2), then each chunk's sums are one sparse one-hot (k x rows) times
    rows product (scipy CSR, float32, in row order) added into float64, single-threaded, so the update does
    not fight the search's OpenMP threads for the cores. With torch on a GPU everything stays on the device
    (index_add_ in float64, the deterministic sort-based kernel; no bounds) and sums, counts and objective are
    all-reduced over NCCL here (reduced = True); otherwise the caller all-reduces them over gloo."""
    from tqdm import tqdm
    k, dim = len(centres), x.shape[1]
    index = make_index(centres, backend)
    if not backend.gpu or backend.kind == "faiss":
        import scipy.sparse
        bounds = bounds or Bounds(len(x))
        if bounds.centres is None or not len(x):
            todo = np.arange(len(x))
        else:
            todo = bounds.stale(x, centres, chunk)
        topl = min(2, k)
        for s in tqdm(range(0, len(todo), chunk), desc=desc, leave=False, disable=desc is None):
            rows = todo[s: s + chunk]
            sims, labels = index.search(x[rows], topl)
            bounds.label[rows] = labels[:, 0]
            bounds.upper[rows] = sims[:, 1] if topl == 2 else -np.inf
        bounds.centres = centres.astype(np.float64)
        own = own_cosines(x, centres, bounds.label, chunk)
        sums, counts = np.zeros((k, dim), np.float64), np.zeros(k + 1, np.float64)
        for s in range(0, len(x), chunk):
            lab = bounds.label[s: s + chunk]
            one_hot = scipy.sparse.csr_matrix((np.ones(len(lab), np.float32), (lab, np.arange(len(lab)))),
                                              shape=(k, len(lab)))
            sums += one_hot @ x[s: s + chunk]
        counts[:k] = np.bincount(bounds.label, minlength=k)
        counts[k] = own.sum(dtype=np.float64)
        return sums, counts, False, len(todo)
    chunks = tqdm(range(0, len(x), chunk), desc=desc, leave=False, disable=desc is None)
    import torch
    dev = torch.device(backend.device)
    sums = torch.zeros((k, dim), dtype=torch.float64, device=dev)
    counts = torch.zeros(k + 1, dtype=torch.float64, device=dev)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for s in chunks:
            rows = torch.from_numpy(np.ascontiguousarray(x[s: s + chunk])).to(dev)
            sims, labels = index.search_tensor(rows, 1)
            sums.index_add_(0, labels[:, 0], rows.double())
            counts[:k] += torch.bincount(labels[:, 0], minlength=k).double()
            counts[k] += sims.double().sum()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    if backend.nccl is not None and shared():
        import torch.distributed as dist
        for t in (sums, counts):
            dist.all_reduce(t, group=backend.nccl)
    return sums.cpu().numpy(), counts.cpu().numpy(), backend.nccl is not None and shared(), len(x)


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# spherical k-means ------------------------------------------------------------------------------------------


def spherical_kmeans(x, k, iters, seed, tag=(0,), n_total=None, offset=0, init="auto", chunk=ASSIGN_CHUNK,
                     backend=CPU, ckpt=None, log=None):
    """k centres of unit rows. x: this rank's rows offset .. offset + len(x) of the n_total training points
    (float32, L2-normalised). tag: (phase, cell) for the seeds. init: "random" (k distinct training points),
    "kmeans++" (greedy k-means++ on a sample of INIT_POOL x k points), "auto" (k-means++ up to KMEANSPP_MAX_K)
    or an array of centres. ckpt: (folder, name) to checkpoint after each iteration and resume from.
    Returns (centres float32 (k, C), {"objective_sum": per iteration, "reseeded": per iteration, "points"})."""
    n_total = len(x) if n_total is None else int(n_total)
    stats = {"objective_sum": [], "reseeded": [], "points": n_total}
    start, state = 0, read_ckpt(ckpt)
    if state is not None:
        centres, start, stats = state
        if log:
            workdir.say(f"{PHASES[tag[0]]} k-means: resumed from the checkpoint of iteration {start}")
    elif not isinstance(init, str):
        centres = np.array(init, np.float32)
    else:                                       # training points drawn from the seed, whatever the ranks
        pp = init == "kmeans++" or (init == "auto" and k <= KMEANSPP_MAX_K)
        rng = np.random.default_rng([seed, *tag, 0])
        pick = rng.choice(n_total, min(n_total, INIT_POOL * k) if pp else k, replace=False)
        centres = np.zeros((len(pick), x.shape[1]), np.float32)
        mine = (pick >= offset) & (pick < offset + len(x))
        centres[mine] = x[pick[mine] - offset]
        all_reduce(centres)                     # each row comes from exactly one rank
        if pp:
            centres = kmeanspp(centres, k, rng, backend)
    bounds = Bounds(len(x))                     # rows that cannot change centre are not searched again
    for it in range(start, iters):
        t0 = time.time()
        sums, counts_obj, reduced, searched = lloyd_pass(
            x, centres, backend, chunk, f"k-means {it + 1}/{iters}" if log and len(x) > 8 * chunk else None, bounds)
        if not reduced:
            all_reduce(sums, counts_obj)
        centres, reseeded = update(centres, sums, counts_obj[:k], np.random.default_rng([seed, *tag, 1, it]))
        stats["objective_sum"].append(float(counts_obj[k]))
        stats["reseeded"].append(reseeded)
        if ckpt is not None and writes_ckpt():
            write_ckpt(ckpt, it + 1, centres, stats)
        if log:
            log(PHASES[tag[0]], it, iters, counts_obj[k] / max(n_total, 1), reseeded, time.time() - t0)
    return centres, stats


def kmeanspp(pool, k, rng, backend=CPU):
    """Greedy k-means++ (sklearn's: 2 + ln k candidates drawn by squared distance, keep the one that lowers
    the potential most). Plain random init leaves some natural clusters without a centre and gives others
    two, which Lloyd iterations rarely undo. Each of the k steps reads the whole pool once (memory-bound), so
    the pool's products run on the GPU when there is one (the sampling stays in numpy)."""
    if backend.gpu:
        import torch
        dev = torch.device(backend.device)
        on_dev = torch.from_numpy(pool).to(dev)
        dots = lambda idx: (on_dev @ on_dev[torch.as_tensor(idx, device=dev)].T).cpu().numpy()  # noqa: E731
    else:
        dots = lambda idx: pool @ pool[idx].T  # noqa: E731
    trials = 2 + int(math.log(k))
    idx = [int(rng.integers(len(pool)))]
    d2 = np.maximum(2 - 2 * dots([idx[0]])[:, 0], 0).astype(np.float64)     # |a - b|^2 = 2 - 2 cos
    for _ in range(1, k):
        cum = np.cumsum(d2)
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1]), len(pool) - 1)
        d2c = np.minimum(d2[:, None], np.maximum(2 - 2 * dots(cand), 0))
        best = int(d2c.sum(0).argmin())
        idx.append(int(cand[best]))
        d2 = d2c[:, best]
    return pool[idx]


def update(centres, sums, counts, rng):
    """New centres: normalised sums; empty clusters re-seeded by splitting a large one (faiss's rule:
    cluster j with probability (size_j - 1) / (n - k); the two halves move apart by +-SPLIT_EPS on alternate
    coordinates and the next assignment splits its points). Returns (centres float32, number re-seeded)."""
    c = centres.astype(np.float64)
    norm = np.linalg.norm(sums, axis=1)
    ok = norm > 0
    c[ok] = sums[ok] / norm[ok, None]
    empty = np.flatnonzero(counts == 0)
    counts = counts.copy()
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0) * SPLIT_EPS
    todo = empty
    while len(todo):
        big = np.flatnonzero(counts >= 2)
        if not len(big):
            break
        take = min(len(todo), len(big))
        src = rng.choice(big, take, replace=False, p=(counts[big] - 1) / (counts[big] - 1).sum())
        dst, todo = todo[:take], todo[take:]
        c[dst] = c[src] * (1 + sign)
        c[src] = c[src] * (1 - sign)
        counts[dst] = counts[src] // 2
        counts[src] -= counts[dst]
        for rows in (dst, src):
            c[rows] /= np.linalg.norm(c[rows], axis=1, keepdims=True)
    return c.astype(np.float32), int(len(empty))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_ckpt(ckpt):
    """(centres, iterations done, stats) of a checkpoint, or None."""
    if ckpt is None or not os.path.exists(os.path.join(ckpt[0], ckpt[1] + ".json")):
        return None
    state = read_json(os.path.join(ckpt[0], ckpt[1] + ".json"))
    return np.load(os.path.join(ckpt[0], state["centres"])), state["iteration"], state["stats"]


def write_ckpt(ckpt, iteration, centres, stats):
    """Centres to a new file, then the json that names it (atomic), then the previous file goes."""
    folder, name = ckpt
    fname = f"{name}_{iteration:04d}.npy"
    workdir.write_npy(os.path.join(folder, fname), centres)
    workdir.write_json(os.path.join(folder, name + ".json"), {"iteration": iteration, "centres": fname,
                                                              "stats": stats})
    old = os.path.join(folder, f"{name}_{iteration - 1:04d}.npy")
    if os.path.exists(old):
        os.remove(old)


def allocate(points, k):
    """Centres per cell: proportional to its points, at least 1 for a non-empty cell, at most its points,
    summing to k (largest remainders first; needs non-empty cells <= k <= points.sum())."""
    points = np.asarray(points, np.int64)
    ideal = k * points / points.sum()
    alloc = np.minimum(np.maximum(np.floor(ideal).astype(np.int64), points > 0), points)
    while alloc.sum() != k:
        short = int(k - alloc.sum())
        if short > 0:
            cand = np.flatnonzero(alloc < points)
            alloc[cand[np.argsort(alloc[cand] - ideal[cand], kind="stable")[:short]]] += 1
        else:
            cand = np.flatnonzero(alloc > 1)
            alloc[cand[np.argsort(ideal[cand] - alloc[cand], kind="stable")[:-short]]] -= 1
    return alloc


def two_level(x, k, iters, seed, refine_iters=0, n_total=None, offset=0, init="auto", chunk=ASSIGN_CHUNK,
              backend=CPU, ckpt_dir=None, log=None, over=None):
    """faiss.contrib.clustering.two_level_clustering, spherical and distributed: K1 = round(sqrt(k)) coarse
    cells, then a k-means inside each cell with allocate()'s share of over x k centres, then (over > 1) a
    k-means of those over x k centres into k, then refine_iters flat iterations over all points. The coarse
    cells cut natural clusters apart, leaving fragments that flat iterations do not merge again (a local
    optimum up to 1% below flat k-means); over-clustering and merging the fragments bottom-up removes most of
    that loss (docs/benchmarks.md). Returns (centres, {"coarse", "fine", "combine", "refine"} stats, info)."""
    from tqdm import tqdm
    rank, world = workdir.dist_info() if shared() else (0, 1)
    n_total = len(x) if n_total is None else int(n_total)
    k1 = max(1, round(math.sqrt(k)))
    over = OVERCLUSTER if over is None else over
    over = max(1, min(over, n_total // max(k, 1)))      # each fine centre needs a point
    k_fine = over * k
    ck = (lambda name: (ckpt_dir, name)) if ckpt_dir else (lambda name: None)
    coarse, coarse_stats = spherical_kmeans(x, k1, iters, seed, (PHASES.index("coarse"),), n_total, offset, init,
                                            chunk=chunk, backend=backend, ckpt=ck("coarse"), log=log)
    cell = nearest(make_index(coarse, backend), x, 1, chunk)[1][:, 0]
    local = np.bincount(cell, minlength=k1).astype(np.int64)
    per_rank = np.zeros((world, k1), np.int64)
    per_rank[rank] = local
    all_reduce(per_rank)
    n_cell = per_rank.sum(0)
    before = per_rank[:rank].sum(0)             # this rank's points of a cell come after those of lower ranks
    k_cell = allocate(n_cell, k_fine)
    first = workdir.offsets_from_counts(k_cell)
    order, at = np.argsort(cell, kind="stable"), workdir.offsets_from_counts(local)
    if shared():
        workdir.barrier()                       # every rank sees the same finished cells
    done = {c for c in range(k1) if ckpt_dir and os.path.exists(os.path.join(ckpt_dir, f"cell_{c:07d}.npz"))}
    centres = np.zeros((k_fine, x.shape[1]), np.float32)
    fine = {"objective_sum": np.zeros(iters), "reseeded": np.zeros(iters, np.int64), "points": n_total}
    for c in tqdm(np.flatnonzero(k_cell), desc="cells", disable=log is None or rank != 0, dynamic_ncols=True):
        path = os.path.join(ckpt_dir, f"cell_{c:07d}.npz") if ckpt_dir else None
        if c in done:
            with np.load(path) as z:
                cc, st = z["centres"], {"objective_sum": z["objective_sum"], "reseeded": z["reseeded"]}
        else:
            cc, st = spherical_kmeans(x[order[at[c]: at[c + 1]]], int(k_cell[c]), iters, seed,
                                      (PHASES.index("cell"), int(c)), n_cell[c], before[c], init, chunk, backend)
            if path and writes_ckpt():
                workdir.save_npz(path, centres=cc, objective_sum=st["objective_sum"], reseeded=st["reseeded"])
        centres[first[c]: first[c + 1]] = cc
        fine["objective_sum"] += np.asarray(st["objective_sum"], np.float64)
        fine["reseeded"] += np.asarray(st["reseeded"], np.int64)
    stats = {"coarse": coarse_stats, "fine": {"objective_sum": fine["objective_sum"].tolist(),
                                              "reseeded": fine["reseeded"].tolist(), "points": n_total}}
    if over > 1:                # every rank holds the same fine centres: each merges them alike, no collective
        with alone():
            centres, stats["combine"] = spherical_kmeans(centres, k, iters, seed, (PHASES.index("merge"), 1), k_fine,
                                                         0, init, chunk, backend)
    if refine_iters:
        centres, stats["refine"] = spherical_kmeans(x, k, refine_iters, seed, (PHASES.index("refine"),), n_total,
                                                    offset, init=centres, chunk=chunk, backend=backend,
                                                    ckpt=ck("refine"), log=log)
    return centres, stats, {"k1": k1, "cell_points": n_cell.tolist(), "cell_centres": k_cell.tolist()}


def shard_merge(x, k, iters, seed, refine_iters=0, n_total=None, offset=0, init="auto", chunk=ASSIGN_CHUNK,
                backend=CPU, ckpt_dir=None, log=None, shards=None):
    """The authors' recipe (unicom issue 20: each GPU clusters its shard of 20M points into 1M centroids, then
    the pooled centroids are clustered into the final 1M): every contiguous shard of the n_total training
    points is clustered into k on its own (flat, or two-level above FLAT_MAX_K), then the union of the shards'
    centres, shards x k unit points, is clustered into k over all ranks the same way. shards: default one per
    rank; a multiple of the world size, each rank taking its own in turn, so one process with --merge-shards 2
    equals two ranks. Each finished shard is checkpointed (and resumed) as one file; the merge phase like
    flat / two-level. Returns (centres, {"shards", "merge"...} stats, info)."""
    rank, world = workdir.dist_info()
    n_total = len(x) if n_total is None else int(n_total)
    shards = shards or world
    if shards % world:
        raise SystemExit(f"error: --merge-shards {shards} is not a multiple of the {world} processes")
    mine = range(rank * shards // world, (rank + 1) * shards // world)
    pieces, last = [], np.zeros(2)                       # the shards' final objective sum and re-seeded count
    for j in mine:
        lo, hi = n_total * j // shards, n_total * (j + 1) // shards
        if hi - lo < k:
            raise SystemExit(f"error: a shard of {hi - lo} training points cannot hold K = {k} centres: use fewer "
                             f"--merge-shards or a smaller --k")
        sub = os.path.join(ckpt_dir, f"shard_{j:05d}") if ckpt_dir else None
        if sub and os.path.exists(sub + ".npz"):
            with np.load(sub + ".npz") as z:
                c, obj = z["centres"], z["objective"]
        else:
            if sub:
                os.makedirs(sub, exist_ok=True)
            rows = x[lo - offset: hi - offset]
            with alone():
                if k <= FLAT_MAX_K:
                    c, st = spherical_kmeans(rows, k, iters, seed, (PHASES.index("shard"), j), len(rows), 0, init,
                                             chunk, backend, (sub, "flat") if sub else None)
                else:
                    c, st2, _ = two_level(rows, k, iters, seed, refine_iters, len(rows), 0, init, chunk, backend, sub)
                    st = st2.get("refine", st2["fine"])
            obj = np.array([st["objective_sum"][-1] if st["objective_sum"] else 0.0, sum(st["reseeded"])])
            if sub:
                workdir.save_npz(sub + ".npz", centres=c, objective=obj)
                shutil.rmtree(sub, ignore_errors=True)
        pieces.append(c)
        last += obj
        if log:
            print(f"shard {j + 1}/{shards}: {hi - lo} points -> {k} centres", flush=True)
    all_reduce(last)
    union = np.concatenate(pieces)                       # this rank's rows of the shards x k union
    n_union, at = shards * k, mine.start * k
    stats = {"shards": {"objective_sum": [float(last[0])], "reseeded": [int(last[1])], "points": n_total}}
    if k <= FLAT_MAX_K:
        centres, st = spherical_kmeans(union, k, iters, seed, (PHASES.index("merge"),), n_union, at, init, chunk,
                                       backend, (ckpt_dir, "merge") if ckpt_dir else None, log)
        stats["merge"] = st
        info = {}
    else:
        merge_dir = os.path.join(ckpt_dir, "merge") if ckpt_dir else None
        if merge_dir and writes_ckpt():
            os.makedirs(merge_dir, exist_ok=True)
        workdir.barrier()
        centres, st, info = two_level(union, k, iters, seed, refine_iters, n_union, at, init, chunk, backend,
                                      merge_dir, log)
        stats.update({f"merge_{p}": v for p, v in st.items()})
    return centres, stats, {**info, "shards": shards, "union_points": n_union}


def nearest(index, x, topl, chunk=ASSIGN_CHUNK):
    """(sims float32 (n, topl), labels int64 (n, topl)), most similar first, searched in chunks."""
    sims, labels = np.zeros((len(x), topl), np.float32), np.zeros((len(x), topl), np.int64)
    for s in range(0, len(x), chunk):
        sims[s: s + chunk], labels[s: s + chunk] = index.search(x[s: s + chunk], topl)
    return sims, labels


# inputs ------------------------------------------------------------------------------------------------------


def read_regions(work, image_statuses):
    """01's regions (stage_folders.read_regions: checked), the images labelled by --image-statuses, and the
    inputs' fingerprint."""
    reg = stage_folders.read_regions(work, against_table=False)
    names = reg.status_names()
    wanted = [s for s in image_statuses.split(",") if s]
    if any(s not in names for s in wanted):
        raise SystemExit(f"error: --image-statuses {image_statuses}: the regions statuses are {names}")
    labelled = np.isin(np.asarray(reg.status), [names.index(s) for s in wanted])
    return dict(folder=reg.folder, regions=reg.region_features, images=reg.image_features, status=reg.status,
                labelled=labelled, R=reg.R, n=reg.n, C=reg.C, fingerprint=reg.fingerprint)


def sample_indices(total, n, seed):
    """n of range(total) without replacement, sorted, from the seed; memory O(n) however large total is:
    Bernoulli per block at a rate a little above n / total, then a uniform n of those drawn."""
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rate = min(1.0, (n + 6 * math.sqrt(n) + 100) / total)
    block, picked = 1 << 22, []
    for b, s in enumerate(range(0, total, block)):
        u = np.random.default_rng([seed, 7, b]).random(min(block, total - s))
        picked.append(s + np.flatnonzero(u < rate))
    picked = np.concatenate(picked)
    if len(picked) > n:
        drop = np.random.default_rng([seed, 8]).choice(len(picked), len(picked) - n, replace=False)
        picked = np.delete(picked, drop)
    return picked


def load_rows(inp, fit_on, rows):
    """Training rows (sorted sample indices) -> float32, L2-normalised. The sample numbers the regions first
    (when fitted on), then the labelled images."""
    r = inp["R"] if fit_on in ("regions", "both") else 0
    images = np.flatnonzero(inp["labelled"])
    out = np.empty((len(rows), inp["C"]), np.float32)
    for s in range(0, len(rows), 1 << 20):
        idx = rows[s: s + (1 << 20)]
        reg, img = idx[idx < r], images[idx[idx >= r] - r]
        out[s: s + len(idx)] = unit(np.concatenate([inp["regions"][reg], inp["images"][img]]))
    return out


# main ---------------------------------------------------------------------------------------------------------


def label_all(folder, inp, centres, args, backend):
    """RICE Eq. 1: each region's nearest centre; MLCD Sec. 3.2: each image's top-l centres, most similar first.
    Fixed chunks of --assign-chunk rows, rank r takes chunks r, r + world, ... (chunk_engine.run_chunks: resumable,
    and the same bytes whatever the number of processes); every rank copies its chunks into folder/."""
    index = make_index(centres, backend)
    l = args.image_topl

    def regions(start, end):
        sims, labels = nearest(index, unit(inp["regions"][start:end]), 1, args.assign_chunk)
        return {"region_labels": labels[:, 0].astype(np.int32), "region_sims": sims[:, 0]}

    def images(start, end):                     # no feature (all-zero, or a status not asked for): -1, 0
        x = unit(inp["images"][start:end])
        ok = np.flatnonzero(inp["labelled"][start:end] & (np.abs(x).sum(1) > 0))
        labels, sims = np.full((end - start, l), -1, np.int32), np.zeros((end - start, l), np.float32)
        sims[ok], labels[ok] = nearest(index, x[ok], l, args.assign_chunk)
        return {"image_labels": labels, "image_sims": sims}

    key = {"centres": hashlib.sha1(centres.tobytes()).hexdigest(), "inputs": inp["fingerprint"],
           "image_statuses": args.image_statuses, "topl": l}
    for name, rows, process in (("region", inp["R"], regions), ("image", inp["n"], images)):
        sub = os.path.join(folder, f"assign_{name}s")
        chunks = chunk_engine.run_chunks(sub, rows, args.assign_chunk, process, f"{name} labels", key,
                                    unit="img" if name == "image" else "region")[0] if rows else 0
        if rows:                                        # every rank copies its chunks into the final arrays
            chunk_engine.merge_chunks(sub, chunks, [f"{name}_labels", f"{name}_sims"], {})
        if workdir.dist_info()[0] == 0 and rows:
            for k in (f"{name}_labels", f"{name}_sims"):
                os.replace(os.path.join(sub, k + ".npy"), os.path.join(folder, k + ".npy"))
        elif workdir.dist_info()[0] == 0:               # no rows at all: empty arrays of the right shape
            for k, v in process(0, 0).items():
                workdir.write_npy(os.path.join(folder, k + ".npy"), v)


def summarise(folder, inp, k):
    """(cluster sizes: regions labelled c + labelled images whose top-1 is c; labelled images; mean cosine of
    the regions and of the images' top-1), read back in blocks so memory stays flat."""
    rl, rs = workdir.load(folder, "region_labels"), workdir.load(folder, "region_sims")
    il, isim = workdir.load(folder, "image_labels"), workdir.load(folder, "image_sims")
    sizes, n_img, cos_r, cos_i, block = np.zeros(k, np.int64), 0, 0.0, 0.0, 1 << 22
    for s in range(0, max(inp["R"], inp["n"]), block):
        top1 = il[s: s + block, 0]
        sizes += np.bincount(rl[s: s + block], minlength=k) + np.bincount(top1[top1 >= 0], minlength=k)
        n_img += int((top1 >= 0).sum())
        cos_r += float(rs[s: s + block].sum(dtype=np.float64))
        cos_i += float(isim[s: s + block, 0].sum(dtype=np.float64))
    return sizes, n_img, {"regions": cos_r / max(inp["R"], 1), "images_top1": cos_i / max(n_img, 1)}


@workdir.stage_main
def main(argv=None):
    args = parse_args(argv)
    workdir.check_folder_flag(args.work)
    rank, world = workdir.init_dist()
    inp = read_regions(args.work, args.image_statuses)
    folder = args.out
    done = workdir.begin_stage(folder, args, RESULT_SETTINGS, "clusters", "03_cluster.py", " (then 04 with --force)",
                               "write these to another --out", changed=lambda done: (
                                   ["other regions (01 was rerun since)"]
                                   if done["inputs"]["regions"] != inp["fingerprint"] else []))
    if done:
        workdir.say(f"{folder} is complete (K = {done['k']}, {done['rows']['regions']} regions); --force redoes it")
        return done
    population = (inp["R"] if args.fit_on != "images" else 0) + \
        (int(inp["labelled"].sum()) if args.fit_on != "regions" else 0)
    n_train = min(population, args.max_points_per_centre * args.k)
    if n_train < args.k:
        raise SystemExit(f"error: K = {args.k} centres but only {population} training points (--fit-on "
                         f"{args.fit_on}): use a smaller --k")
    backend = choose_backend(args.backend, args.device)
    if not backend.gpu and world > 1:                    # the ranks share the node's cores
        import faiss
        faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    ckpt_dir = open_checkpoints(folder, args, inp)
    t0 = time.time()
    # the training sample, drawn from the seed; each rank loads a contiguous shard of it
    sample = sample_indices(population, n_train, args.seed)
    lo, hi = n_train * rank // world, n_train * (rank + 1) // world
    x = load_rows(inp, args.fit_on, sample[lo:hi])
    del sample
    workdir.say(f"clustering {n_train} points ({args.fit_on}) of dim {inp['C']} into K = {args.k} "
                f"({args.mode}, {backend.kind} on {backend.device}, {world} process{'es' if world > 1 else ''})")
    centres, stats, info = fit(x, n_train, lo, args, backend, ckpt_dir, world)
    del x
    if rank == 0:
        workdir.write_npy(os.path.join(folder, "centres.npy"), centres)
    t_fit = time.time() - t0
    label_all(folder, inp, centres, args, backend)
    manifest = None
    if rank == 0:
        manifest = finish(folder, args, inp, stats, info, backend, n_train, world, t0, t_fit)
    workdir.barrier()
    return manifest


def open_checkpoints(folder, args, inp) -> str:
    """The k-means checkpoints of an interrupted run, kept only if written for the same settings and inputs
    (discarded, never mixed in); returns the folder."""
    ckpt_dir = os.path.join(folder, "ckpt")
    key = {k: getattr(args, k) for k in RESULT_SETTINGS if k != "image_topl"}
    key = json.loads(json.dumps({**key, "inputs": inp["fingerprint"]}))
    if workdir.dist_info()[0] == 0:
        key_file = os.path.join(ckpt_dir, "key.json")
        if not os.path.exists(key_file) or read_json(key_file) != key:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        os.makedirs(ckpt_dir, exist_ok=True)
        workdir.write_json(key_file, key)
    workdir.barrier()
    return ckpt_dir


def log_iteration(phase, it, iters, obj, reseeded, dt):
    workdir.say(f"{phase} k-means {it + 1}/{iters}: objective {obj:.5f}, {reseeded} empty re-seeded, {dt:.1f} s")


def fit(x, n_train, lo, args, backend, ckpt_dir, world):
    """The codebook by --mode (flat, two-level or shard-merge) -> (centres, per-phase stats, info); the centres
    are the same bytes on every rank, whatever the all-reduce did (rank 0's, broadcast)."""
    info = {}
    if args.mode == "flat":
        centres, st = spherical_kmeans(x, args.k, args.iters, args.seed, (PHASES.index("flat"),), n_train, lo,
                                       args.init, args.assign_chunk, backend, (ckpt_dir, "flat"), log_iteration)
        stats = {"flat": st}
    elif args.mode == "two-level":
        centres, stats, info = two_level(x, args.k, args.iters, args.seed, args.refine_iters, n_train, lo,
                                         args.init, args.assign_chunk, backend, ckpt_dir, log_iteration)
    else:
        centres, stats, info = shard_merge(x, args.k, args.iters, args.seed, args.refine_iters, n_train, lo,
                                           args.init, args.assign_chunk, backend, ckpt_dir, log_iteration,
                                           args.merge_shards or world)
    if world > 1:
        import torch
        import torch.distributed as dist
        dist.broadcast(torch.from_numpy(centres), 0)
    return centres, stats, info


def finish(folder, args, inp, stats, info, backend, n_train, world, t0, t_fit) -> dict:
    """(rank 0) Cluster sizes, the manifest (the stage is complete from here on), the summary line."""
    sizes, n_img, cosine = summarise(folder, inp, args.k)
    workdir.write_npy(os.path.join(folder, "cluster_sizes.npy"), sizes)
    # objective[phase][t]: mean cosine of the training points to their nearest centre at iteration t
    objective = {p: [o / max(st["points"], 1) for o in st["objective_sum"]] for p, st in stats.items()}
    final = [v[-1] for v in objective.values() if v]
    manifest = workdir.finish_stage(folder, {
        "stage": "clusters", "config": {k: v for k, v in vars(args).items() if k != "force"},
        "k": args.k, "dim": inp["C"], "image_topl": args.image_topl, "mode": args.mode,
        "device": backend.device, "backend": backend.kind, "world": world,
        "rows": {"regions": inp["R"], "images": inp["n"], "images_labelled": n_img, "train_points": n_train},
        "objective": objective, "reseeded": {p: st["reseeded"] for p, st in stats.items()},
        "final_objective": final[-1] if final else None, "mean_cosine": cosine,
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                          "dead": int((sizes == 0).sum()),
                          "counts": "regions labelled c + labelled images whose top-1 is c"},
        **({"two_level": {"k1": info["k1"], "cell_centres_min": min(info["cell_centres"]),
                          "cell_centres_max": max(info["cell_centres"])}} if "k1" in info else {}),
        **({"shard_merge": {"shards": info["shards"], "union_points": info["union_points"]}}
           if "shards" in info else {}),
        "elapsed_s": {"fit": round(t_fit, 2), "total": round(time.time() - t0, 2)},
        "inputs": {"regions": inp["fingerprint"]}})
    for sub in ("assign_regions", "assign_images", "ckpt"):
        shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
    cs = manifest["cluster_sizes"]
    print(f"clusters: K = {args.k} ({args.mode}) from {n_train} training points: objective "
          f"{manifest['final_objective'] or 0:.4f} (mean cosine to the centre), "
          f"{sum(map(sum, manifest['reseeded'].values()))} empty clusters re-seeded; labelled {inp['R']} "
          f"regions (mean cosine {cosine['regions']:.4f}) and {n_img} of {inp['n']} images (top-"
          f"{args.image_topl}); cluster size min {cs['min']} / median {cs['median']:g} / max {cs['max']}, "
          f"{cs['dead']} dead; {time.time() - t0:.1f} s", flush=True)
    return manifest


if __name__ == "__main__":
    main()
