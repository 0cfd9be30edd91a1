"""Host memory of saving (and restoring) the class-centre banks with 2 gloo processes, at the papers' K.

    .venv/bin/python bench/bench_save.py                                 # K = 1M, D = 1024; whole-gather at K/8, K/4
    .venv/bin/python bench/bench_save.py --num-classes 100000 --dim 256  # quick check
    .venv/bin/python bench/bench_save.py --json-out save.json

Each measurement is a fresh pair of processes (torch.multiprocessing, gloo, one thread each) holding a bank
of K x D fp32 centres sharded over the two ranks, with both AdamW moments filled (3 x K/2 x D floats per
rank, resident). Then one of:
  shards        04_train.save_checkpoint: every rank writes its own shards; rank 0 writes latest.pt with a
                tiny encoder and the list of shards
  whole_gather  every rank all-gathers the whole bank and both moments (losses.all_gather_rows, the simple
                way to save a sharded bank whole) and rank 0 writes them in one torch.save
  restore       04_train.restore_bank of the `shards` files into a fresh bank (mmap, only this rank's rows)
Measured per rank: RSS before, peak RSS during (ru_maxrss; the setup's own peak is the live shards), the
difference, the anonymous RSS after (RssAnon: the restore's peak also counts the mapped shard file's pages,
which are page cache, not memory the process keeps), and wall time. The whole gather needs about 2 x 3 x K x D x 4 B per rank (the gathered tensors
and the all-gather's buffers), so at K = 1M, D = 1024 it does not fit a 24 GB machine: it is measured at
smaller K and its bytes per centre row scale linearly (the table says which rows are measured).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024 ** 3


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_anon() -> int:
    """Anonymous resident memory now (RssAnon): without the file pages a mapped checkpoint brings in."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def load_train():
    import stage_scripts
    return stage_scripts.load("04_train.py", "train04")


def worker(rank, world, init, variant, K, D, folder, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import losses
    import model as model_py
    tr = load_train()
    bank = losses.CentreBank(K, D, rho=0.1)
    banks = torch.nn.ModuleDict({"object": bank})
    bank_opt = torch.optim.AdamW(banks.parameters())
    env = SimpleNamespace(rank=rank, world=world)
    if variant == "restore":
        meta = torch.load(os.path.join(folder, "ckpt", "latest.pt"), weights_only=True)["banks"]["object"]
        dist.barrier()
        before, t0 = rss(), time.perf_counter()
        tr.restore_bank(bank, bank_opt, meta, os.path.join(folder, "ckpt"))
    else:
        bank_opt.state[bank.weight] = {"step": torch.tensor(10.0), "exp_avg": torch.full_like(bank.weight, 1e-3),
                                       "exp_avg_sq": torch.full_like(bank.weight, 1e-6)}
        encoder = model_py.VisionEncoder(model_py.preset("tiny"))
        opt = torch.optim.AdamW(encoder.parameters())
        dist.barrier()
        before, t0 = rss(), time.perf_counter()
        if variant == "shards":
            args = SimpleNamespace(run_dir=folder, batch_size=1, keep_every=0)
            tr.save_checkpoint(args, 10, {}, encoder, opt, banks, bank_opt, env)
        else:
            st = bank_opt.state[bank.weight]
            whole = {"weight": bank.full_weight().cpu(),
                     **{k: losses.all_gather_rows(st[k], bank.group)[0].cpu() for k in ("exp_avg", "exp_avg_sq")}}
            if rank == 0:
                os.makedirs(os.path.join(folder, "ckpt"), exist_ok=True)
                torch.save({"encoder": encoder.state_dict(), "banks": {"object": whole}},
                           os.path.join(folder, "ckpt", "whole.pt"))
            del whole
            dist.barrier()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"before": before, "peak": peak, "wall": wall, "anon_after": rss_anon()},
               os.path.join(out, f"{variant}.{rank}.pt"))
    dist.destroy_process_group()


def measure(variant, K, D, folder, world=2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), variant, K, D, folder, tmp), nprocs=world, join=True)
        res = [torch.load(os.path.join(tmp, f"{variant}.{r}.pt"), weights_only=True) for r in range(world)]
    return [{"rank": r, "before_gib": x["before"] / GIB, "peak_gib": x["peak"] / GIB,
             "added_gib": (x["peak"] - x["before"]) / GIB, "anon_after_gib": x["anon_after"] / GIB,
             "wall_s": x["wall"]} for r, x in enumerate(res)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--whole-fractions", default="0.125,0.25", help="K fractions for the whole gather")
    ap.add_argument("--folder", default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    K, D = args.num_classes, args.dim
    base = args.folder or tempfile.mkdtemp(prefix="bench_save_")
    rows = []
    try:
        for frac in [float(f) for f in args.whole_fractions.split(",") if f] + [1.0]:
            k = int(K * frac)
            variants = ["whole_gather", "shards", "restore"] if frac < 1 else ["shards", "restore"]
            for v in variants:
                folder = os.path.join(base, f"k{k}")
                res = measure(v, k, D, folder)
                for r in res:
                    rows.append({"variant": v, "K": k, "D": D, **r})
                    print(f"{v:13s} K={k:>9,} D={D} rank {r['rank']}: RSS {r['before_gib']:.2f} -> peak "
                          f"{r['peak_gib']:.2f} GiB (+{r['added_gib']:.2f}), {r['wall_s']:.1f} s", flush=True)
                if v == "restore":
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.folder is None:
            shutil.rmtree(base, ignore_errors=True)
    print("\n| variant | K | D | RSS before / rank | peak / rank | added / rank | anonymous after / rank | wall |\n"
          "|---|---|---|---|---|---|---|---|")
    for v in ("whole_gather", "shards", "restore"):
        for k in sorted({r["K"] for r in rows if r["variant"] == v}):
            sel = [r for r in rows if r["variant"] == v and r["K"] == k]
            print(f"| {v} | {k:,} | {D} | {max(r['before_gib'] for r in sel):.2f} GiB | "
                  f"{max(r['peak_gib'] for r in sel):.2f} GiB | {max(r['added_gib'] for r in sel):.2f} GiB | "
                  f"{max(r['anon_after_gib'] for r in sel):.2f} GiB | "
                  f"{max(r['wall_s'] for r in sel):.1f} s |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
