"""Benchmark one training step of the centre bank against dense cross-entropy over all K centres, on CPU.

    .venv/bin/python bench/bench_bank.py                                  # K=1M, D=1024, B=512, rho=0.1
    .venv/bin/python bench/bench_bank.py --num-classes 100000 --steps 2   # quick check
    .venv/bin/python bench/bench_bank.py --json-out bank.json             # also write the summary

One step = forward + backward of the loss (into the (K, D) weight and the (B, D) embeddings, a leaf tensor)
+ zeroing the grads (set to None, as optimizer.zero_grad() does); no optimizer step. One process, one
positive label per sample, fp32. Variants, each in its own fresh subprocess so peak memory is clean:
  bank         CentreBank(K, D, rho), dense weight gradient (zero rows outside the active set)
  bank_sparse  CentreBank(..., sparse_grad=True), sparse weight gradient of the active rows only
  dense_ce     F.cross_entropy over all K cosine logits, s * cos with the positive column s * phi(cos),
               the same ArcFace margin (losses.margin_positive) and scale, weight an nn.Parameter (K, D)
Measured: median wall time per timed step (time.perf_counter, after 1 warm-up step); peak RSS of the
subprocess (ru_maxrss) and that peak minus the RSS right after the weight was allocated and filled;
logits per step (B x active rows for the bank, B x K dense). A variant whose subprocess fails (e.g. killed
for memory) shows its status in the table. dense_ce divides the logit columns by |w| instead of normalising
the (K, D) weight (same loss and gradients, one (K, D) copy less): it peaks at about 16 GiB at K=1M. It is not
started when the machine's MemAvailable is below its estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import CentreBank, margin_positive  # noqa: E402

NUM_CLASSES, DIM, BATCH, RHO, STEPS, THREADS = 1_000_000, 1024, 512, 0.1, 5, os.cpu_count() or 1
SCALE, MARGIN = 64.0, 0.3
VARIANTS = ("bank", "bank_sparse", "dense_ce")
GIB = 1024 ** 3


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dense_ce_bytes(args) -> int:
    """Peak estimate for dense_ce: weight, its gradient and one (K, D) backward temporary, plus three (B, K)
    logit-sized tensors (above the measured 15.8 GiB at K=1M, D=1024, B=512)."""
    return 4 * (3 * args.num_classes * args.dim + 3 * args.batch * args.num_classes)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable"))


def run_variant(name: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if name == "dense_ce":
        weight = nn.Parameter(torch.normal(0, 0.01, (args.num_classes, args.dim)))

        def loss_fn(emb, labels):
            # dividing the logit columns by |w| equals normalising w but holds no normalised (K, D) copy
            cos = (F.normalize(emb, dim=1) @ weight.t()) / weight.norm(dim=1)          # (B, K)
            phi = margin_positive(cos.gather(1, labels[:, None]), MARGIN, "arcface")
            logits = (SCALE * cos).scatter(1, labels[:, None], SCALE * phi)
            return F.cross_entropy(logits, labels), args.num_classes
    else:
        bank = CentreBank(args.num_classes, args.dim, args.rho, SCALE, MARGIN, "arcface",
                          sparse_grad=name == "bank_sparse")
        weight = bank.weight

        def loss_fn(emb, labels):
            out = bank(emb, labels)
            return out.loss, out.num_active
    base_rss = rss_now()
    emb = torch.randn(args.batch, args.dim, requires_grad=True)
    labels = torch.randint(args.num_classes, (args.batch,))
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        loss, rows = loss_fn(emb, labels)
        loss.backward()
        weight.grad = emb.grad = None
        times.append(time.perf_counter() - t0)
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": "ok", "ms_per_step": 1e3 * statistics.median(times[1:]), "peak_rss_gib": peak / GIB,
            "weights_rss_gib": base_rss / GIB, "extra_gib": (peak - base_rss) / GIB, "logits": args.batch * rows}


def spawn(name: str, argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *argv, "--variant", name], capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
    if p.returncode == -9:
        why += " (likely out of memory)"
    tail = p.stderr.strip().splitlines()[-1:] or [""]
    return {"status": why, "error": tail[0]}


def table(results: dict) -> str:
    ref = results.get("dense_ce", {})
    rows = ["| variant | ms/step | peak RSS GiB | extra over weights GiB | logits/step | time vs dense_ce | extra mem vs dense_ce |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r["status"] != "ok":
            rows.append(f"| {name} | {r['status']} | | | | | |")
            continue
        ok = ref.get("status") == "ok"
        t = f"{r['ms_per_step'] / ref['ms_per_step']:.3f}x" if ok else "n/a"
        m = f"{r['extra_gib'] / ref['extra_gib']:.3f}x" if ok else "n/a"
        rows.append(f"| {name} | {r['ms_per_step']:.0f} | {r['peak_rss_gib']:.2f} | {r['extra_gib']:.2f} | "
                    f"{r['logits']:,} | {t} | {m} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--rho", type=float, default=RHO)
    ap.add_argument("--steps", type=int, default=STEPS, help="timed steps, after 1 warm-up step")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)), flush=True)
        return
    child = [f"--num-classes={args.num_classes}", f"--dim={args.dim}", f"--batch={args.batch}",
             f"--rho={args.rho}", f"--steps={args.steps}", f"--threads={args.threads}"]
    results = {}
    for name in VARIANTS:
        need = dense_ce_bytes(args) if name == "dense_ce" else 0
        if need > available_bytes():
            results[name] = {"status": f"not run: needs about {need / GIB:.0f} GiB, "
                                       f"{available_bytes() / GIB:.0f} GiB available"}
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = spawn(name, child)
    config = {k: getattr(args, k) for k in ("num_classes", "dim", "batch", "rho", "steps", "threads")}
    print(f"K={args.num_classes:,} D={args.dim} B={args.batch} rho={args.rho} threads={args.threads} "
          f"torch {torch.__version__}\n")
    print(table(results) + "\n")
    summary = {"config": config, "results": results}
    print(json.dumps(summary))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
