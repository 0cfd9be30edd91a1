"""The whole 04_train.py step (data loader, encoder with region path, object and OCR banks, AdamW) against a bare
transformers MLCDVisionModel step (forward, backward, AdamW; no regions, no banks) on the same device and size.

    CPU:  python bench/bench_train.py --work runs/demo --preset tiny --res 96 --batch 32 --k 1000 --device cpu
    GPU:  python bench/bench_train.py --work runs/demo --preset L/14 --res 336 --batch 32 --k 1000000 --compile

--work is a work directory with images/, regions/ (and ocr/) from 00-02 (`make demo` leaves one in
runs/demo). The benchmark builds its own work directory next to the run folder (--out): links to those
stages and a clusters/ folder with uniform random labels in [0, K), so the object bank has the paper's K
(1,000,000) whatever the demo's clustering found. 04 then trains --steps steps with its real DataLoader
(--workers) and the figures come from its own log.jsonl, over the steps after the first --log-every window
(compilation and warm-up excluded): samples/s, step time, data-wait share, model TFLOP/s and MFU, peak memory.
The reference step is MLCDVisionModel (sdpa) at the same batch, resolution and dtype on random pixels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as kit  # noqa: E402
import workdir  # noqa: E402
import stage_scripts  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/demo")
    p.add_argument("--out", default="runs/bench_train")
    p.add_argument("--preset", default="tiny", choices=sorted(kit.PRESETS))
    p.add_argument("--res", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="images per device per step")
    p.add_argument("--regions", type=int, default=10)
    p.add_argument("--k", type=int, default=1_000_000, help="object bank size")
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-ocr", action="store_true", help="train without the OCR bank")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--json-out")
    return p.parse_args(argv)


def bench_work(args):
    """<out>/work: links to the demo's stages, clusters/ with random labels in [0, K)."""
    src, dst = os.path.abspath(args.work), os.path.join(args.out, "work")
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(os.path.join(dst, "clusters"))
    for stage in ("images", "regions", "ocr"):
        if os.path.isdir(os.path.join(src, stage)):
            os.symlink(os.path.join(src, stage), os.path.join(dst, stage))
    reg_m = workdir.read_manifest(os.path.join(dst, "regions"))
    if reg_m is None:
        raise SystemExit(f"error: {src}/regions is missing: run `make demo` (or 00 and 01) first")
    n, R = reg_m["rows"]["images"], reg_m["rows"]["boxes"]
    rng = np.random.default_rng(0)
    folder = os.path.join(dst, "clusters")
    workdir.write_npy(os.path.join(folder, "region_labels.npy"), rng.integers(0, args.k, R).astype(np.int32))
    workdir.write_npy(os.path.join(folder, "image_labels.npy"), rng.integers(0, args.k, (n, 8)).astype(np.int32))
    fp = workdir.regions_fingerprint(reg_m)
    workdir.finish_stage(folder, {"stage": "clusters", "k": args.k, "inputs": {"regions": fp},
                                  "note": "random labels for bench/bench_train.py"})
    return dst


def run_ours(args, work, world=1):
    train = stage_scripts.load("04_train.py", "train")
    run = os.path.join(args.out, "run")
    argv = ["--work", work, "--run-dir", run, "--force", "--method", "rice", "--model", args.preset,
            "--batch-size", str(args.batch * world), "--steps", str(args.steps), "--warmup", "5",
            "--log-every", str(args.log_every), "--save-every", str(10 ** 9), "--num-regions", str(args.regions),
            "--rho", str(args.rho), "--workers", str(args.workers), "--device", args.device]
    argv += ["--image-size", str(args.res)] if args.res else []
    argv += ["--compile"] if args.compile else []
    argv += ["--grad-checkpointing"] if args.grad_checkpointing else []
    argv += ["--ocr-weight", "0"] if args.no_ocr else []
    train.main(argv)
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()][1:]      # drop the first window (warm-up)
    if not log:
        raise SystemExit("error: --steps must cover at least two --log-every windows")
    keys = ["samples_per_s_per_device", "step_s", "data_wait_frac", "tflops_per_device", "mfu", "max_mem_gib"]
    return {k: (statistics.median([r[k] for r in log]) if log[0].get(k) is not None else None) for k in keys}


def run_hf(args, device, dtype):
    from transformers import MLCDVisionConfig, MLCDVisionModel
    cfg = kit.preset(args.preset, **({"image_size": args.res} if args.res else {}))
    hf_cfg = {k: v for k, v in kit.kit_config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = MLCDVisionModel(MLCDVisionConfig(**hf_cfg)).to(device)
    hf.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    S = cfg.image_size
    x = torch.randn(args.batch, 3, S, S, device=device)
    times = []
    for i in range(max(args.steps // 2, 6)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = hf(pixel_values=x)
            loss = out.pooler_output.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[3:])
    flops = args.batch * kit.flops_per_image(cfg, S, S, 0)
    return {"samples_per_s_per_device": args.batch / step, "step_s": step, "tflops_per_device": flops / step / 1e12}


def main(argv=None):
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    os.makedirs(args.out, exist_ok=True)
    work = bench_work(args)
    ours = run_ours(args, work)
    ref = None if args.skip_hf else run_hf(args, device, dtype)
    name = torch.cuda.get_device_name(device) if use_cuda else f"CPU ({torch.get_num_threads()} threads)"
    res = {"date": datetime.date.today().isoformat(), "device": name, "dtype": str(dtype).replace("torch.", ""),
           "preset": args.preset, "res": args.res or kit.PRESETS[args.preset]["image_size"], "batch": args.batch,
           "regions": args.regions, "k": args.k, "rho": args.rho, "ocr_bank": not args.no_ocr,
           "compile": args.compile, "workers": args.workers, "ours": ours, "hf_backbone_only": ref,
           "ratio_samples_per_s": (ours["samples_per_s_per_device"] / ref["samples_per_s_per_device"]) if ref else None}
    print(json.dumps(res, indent=2))
    print("\n| step | samples/s/device | step s | data wait | TFLOP/s | MFU | mem GiB |\n|---|---|---|---|---|---|---|")
    mfu = f"{ours['mfu']:.1%}" if ours["mfu"] is not None else "n/a"
    mem = f"{ours['max_mem_gib']:.1f}" if ours.get("max_mem_gib") is not None else "n/a"
    print(f"| 04 whole step (regions N={args.regions}, K={args.k:,}) | {ours['samples_per_s_per_device']:.1f} | "
          f"{ours['step_s']:.3f} | {ours['data_wait_frac']:.1%} | {ours['tflops_per_device']:.2f} | {mfu} | {mem} |")
    if ref:
        print(f"| HF MLCDVisionModel fwd+bwd+AdamW only | {ref['samples_per_s_per_device']:.1f} | {ref['step_s']:.3f} "
              f"| - | {ref['tflops_per_device']:.2f} | | |")
        print(f"ratio (ours / HF backbone-only samples/s): {res['ratio_samples_per_s']:.2f}")
    if args.json_out:
        workdir.write_json(args.json_out, res)
    return res


if __name__ == "__main__":
    main()
