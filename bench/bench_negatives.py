"""Per-row negative rate of the three negative rules of losses.py at the papers' batch, and the active set
(logit columns) each one costs.

    .venv/bin/python bench/bench_negatives.py                  # batches 32,768 and 512, world 8
    .venv/bin/python bench/bench_negatives.py --batches 32768 --world 64

A row's rate is |its negatives| / (K - |its positives|): RICE's rho ("negative cluster centers are uniformly
sampled from the full category set at rate rho = 0.1"; MLCD |N'| = r |N|). Label sets, one draw each (the
draw runs on the host, as in 04_train.py):
  uniform   MLCD's image term: l = 8 labels per row, uniform over K = 1,000,000
  zipf      the same with Zipf(1.1) class frequencies (a few clusters hold most images)
  ocr       RICE's OCR term: up to 10 token ids per text region of 49,408, Zipf(1.3), 40% of slots padding
Columns: mean, min and max of the per-row rate over the rows, and the active centres summed over the ranks
(the logits' width: compute and memory of the bank step scale with it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402


def label_sets(rng, B):
    def zipf(width, K, a):
        return rng.permutation(K)[np.minimum(rng.zipf(a, (B, width)) - 1, K - 1)]
    ocr = zipf(10, 49408, 1.3)
    ocr[rng.random(ocr.shape) < 0.4] = -1
    ocr[:, 0] = np.abs(ocr[:, 0])
    return {"uniform": (rng.integers(0, 1_000_000, (B, 8)), 1_000_000), "zipf": (zipf(8, 1_000_000, 1.1), 1_000_000),
            "ocr": (ocr, 49408)}


def active_columns(labels, K, rho, rule, world, key):
    labels = losses.clean_labels(labels, K)
    base, extra = divmod(K, world)
    total = 0
    for r in range(world):
        start, n = r * base + min(r, extra), base + (r < extra)
        total += len(losses.draw([labels], [[len(labels)]], K, start, n, rho, rule, key)[0].active)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32768,512")
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--world", type=int, default=8)
    args = ap.parse_args(argv)
    print(f"rho = {args.rho}, {args.world} shards\n")
    print("| batch | labels | rule | rate mean | rate min | rate max | active centres |\n|---|---|---|---|---|---|---|")
    for B in [int(b) for b in args.batches.split(",")]:
        for name, (labels, K) in label_sets(np.random.default_rng(0), B).items():
            for rule in losses.NEGATIVE_RULES:
                rates = losses.negative_rates(labels, K, args.rho, rule, world=args.world, key=(1,))
                cols = active_columns(labels, K, args.rho, rule, args.world, (1,))
                print(f"| {B:,} | {name} (K = {K:,}) | {rule} | {rates.mean():.3f} | {rates.min():.3f} | "
                      f"{rates.max():.3f} | {cols:,} |", flush=True)


if __name__ == "__main__":
    main()
