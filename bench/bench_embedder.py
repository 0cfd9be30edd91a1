"""EfficientNet-Lite0 on box crops, the way 01 runs it (EfficientNetFeatures.encode: channels-last, a
--feature-batch cut into slices of CPU_SLICE crops on a CPU) against the plain way (one forward of the whole
batch in PyTorch's default layout), side by side in one process on the same crops: crops per second, the
ratio, and the largest difference between the two features.

    .venv/bin/python bench/bench_embedder.py                         # 96 px crops (the demo), batch 512
    .venv/bin/python bench/bench_embedder.py --size 224 --batch 256 --slices 16,32,64,128
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=512, help="crops per encode call (01's --feature-batch)")
    p.add_argument("--slices", default="32,64,128", help="slice sizes to try besides CPU_SLICE")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    import stage_scripts
    mine = stage_scripts.load("01_mine_regions.py", "mine_regions")
    torch.manual_seed(0)
    rows = list(torch.randn(args.batch, 3, args.size, args.size) * 0.5)
    feats = mine.EfficientNetFeatures(args.size, torch.device("cpu"))
    plain = mine.load_efficientnet_lite0()              # default (NCHW) layout

    def plain_encode(rows):
        with torch.no_grad():
            f = plain.forward_head(plain.forward_features(torch.stack(rows)), pre_logits=True)
        return torch.nn.functional.normalize(f.float(), dim=-1).numpy().astype(np.float16)

    def timed(fn):
        fn(rows[:8])
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn(rows)
            best = min(best, time.perf_counter() - t)
        return best, out

    t_ref, ref = timed(plain_encode)
    print(f"EfficientNet-Lite0, {args.batch} crops of {args.size} px, {torch.get_num_threads()} torch threads, "
          f"best of {args.repeats}")
    print("| path | crops / s | ratio | max abs difference |\n|---|---:|---:|---:|")
    print(f"| one forward of {args.batch}, default layout | {args.batch / t_ref:.0f} | 1.00 | |")
    default = mine.CPU_SLICE
    for s in sorted({default, *(int(v) for v in args.slices.split(","))}):
        mine.CPU_SLICE = s
        t, out = timed(feats.encode)
        diff = np.abs(out.astype(np.float32) - ref.astype(np.float32)).max()
        name = f"channels-last, slices of {s}" + (" (01)" if s == default else "")
        print(f"| {name} | {args.batch / t:.0f} | {t_ref / t:.2f} | {diff:.1e} |")
    mine.CPU_SLICE = default


if __name__ == "__main__":
    main()
