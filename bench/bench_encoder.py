"""Training-step throughput and MFU of the kit encoder against transformers' MLCDVisionModel.

    CPU:  python bench/bench_encoder.py --preset tiny --device cpu
    GPU:  python bench/bench_encoder.py --preset L/14 --res 336 --batch 32 --dtype bf16 --regions 10 --region-blocks 2 --compile

One step = forward (under torch.autocast for bf16, fp32 master weights), a scalar loss (mean square of the class
embedding, plus mean square of the region embeddings when regions are on; HF: mean square of pooler_output),
backward, AdamW step, zero_grad(set_to_none=True). Times are the median over --steps after --warmup steps.
Variants, all on the same random input: `kit` (no boxes), `kit+regions` (--regions > 0: random valid boxes in
pixels, each at least one patch wide, fixed seed) and `hf` (MLCDVisionModel, same config, sdpa attention).
FLOPs per image come from model.flops_per_image (hf and kit share the no-region count). MFU peak: on CUDA a
dense table by device name (else pass --peak-tflops); on CPU a measured large-matmul rate in the run dtype, so
CPU MFU is relative to what this machine's matmul reaches, not a datasheet number. --compile and --grad-ckpt:
--compile compiles the kit model only (hf stays eager); --grad-ckpt applies to both.
"""
from __future__ import annotations

import argparse, datetime, gc, json, os, platform, statistics, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as kit  # noqa: E402

DEFAULT_PRESET, DEFAULT_BATCH, DEFAULT_DTYPE = "tiny", 8, "fp32"
DEFAULT_REGIONS, DEFAULT_STEPS, DEFAULT_WARMUP, SEED = 0, 10, 3, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(kit.PRESETS))
    p.add_argument("--res", type=int, help="square input side (default: the preset's image_size)")
    p.add_argument("--height", type=int), p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["fp32", "bf16"])
    p.add_argument("--regions", type=int, default=DEFAULT_REGIONS, help="boxes per image; 0 = no region path")
    p.add_argument("--region-blocks", type=int, help="R, region blocks (default: the preset's)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile the kit model")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (kit and hf)")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: auto)")
    p.add_argument("--json-out")
    return p.parse_args(argv)


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"


def peak_tflops(args, dev, dtype):
    """(peak TFLOP/s, where it came from)."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        found = kit.peak_tflops(name, dtype, tf32=False)     # TF32 is off here (main)
        if found is None:
            sys.exit(f"no peak TFLOP/s known for {name!r}: pass --peak-tflops")
        return found
    n, reps = 2048, 5                                   # CPU: measure a large matmul in the run dtype
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(timed(lambda: a @ b, dev) for _ in range(reps))
    return 2 * n ** 3 / best / 1e12, f"measured {n}x{n} {str(dtype)[6:]} matmul on this CPU"


def timed(fn, dev):
    """Wall seconds of fn(), with the GPU's queue drained before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def random_boxes(B, N, H, W, patch, dev):
    """(B, N, 4) x0 y0 x1 y1 pixel boxes inside the image, each side at least one patch, fixed seed."""
    g = torch.Generator().manual_seed(SEED + 1)
    u = torch.rand(B, N, 4, generator=g)
    x0, y0 = u[..., 0] * (W - patch), u[..., 1] * (H - patch)
    x1 = x0 + patch + u[..., 2] * (W - patch - x0)
    y1 = y0 + patch + u[..., 3] * (H - patch - y0)
    return torch.stack([x0, y0, x1, y1], -1).to(dev)


def build(variant, cfg, args, dev):
    """(model, loss(pixels) -> scalar) for one variant."""
    if variant == "hf":
        import transformers
        d = {k: v for k, v in kit.kit_config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
        m = transformers.MLCDVisionModel._from_config(transformers.MLCDVisionConfig(**d), attn_implementation="sdpa")
        m.to(dev).train()
        if args.grad_ckpt:
            m.activation_checkpointing_enable()
        return m, lambda x, boxes: m(pixel_values=x).pooler_output.float().pow(2).mean()
    m = kit.VisionEncoder(cfg).to(dev).train()
    m.grad_checkpointing = args.grad_ckpt
    fwd = torch.compile(m) if args.compile else m

    def loss(x, boxes):
        out = fwd(x, boxes if variant == "kit+regions" else None)
        total = out.class_embedding.float().pow(2).mean()
        if out.region_embeddings is not None:
            total = total + out.region_embeddings.float().pow(2).mean()
        return total
    return m, loss


def bench_variant(variant, cfg, args, dev, dtype, x, boxes):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(SEED)
    m, loss_fn = build(variant, cfg, args, dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(x, boxes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    ms = statistics.median(timed(step, dev) for _ in range(args.steps)) * 1e3
    mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    del m, opt, loss_fn, step
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return ms, mem


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cuda" and args.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False   # kit.PEAK_TFLOPS' fp32 entries are without TF32
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    overrides = {} if args.region_blocks is None else {"region_blocks": args.region_blocks}
    cfg = kit.preset(args.preset, **overrides)
    H = args.height or args.res or cfg.image_size
    W = args.width or args.res or cfg.image_size
    cfg.image_size = max(H, W)
    B, N = args.batch, args.regions if cfg.region_blocks else 0

    peak, peak_src = peak_tflops(args, dev, dtype)
    torch.manual_seed(SEED)
    x = torch.randn(B, 3, H, W, device=dev)
    boxes = random_boxes(B, N, H, W, cfg.patch_size, dev) if N else None

    variants = ["kit"] + (["kit+regions"] if N else []) + ["hf"]
    results = []
    for v in variants:
        ms, mem = bench_variant(v, cfg, args, dev, dtype, x, boxes)
        flops = kit.flops_per_image(cfg, H, W, N if v == "kit+regions" else 0)
        tflops = flops * B / (ms / 1e3) / 1e12
        results.append(dict(variant=v, img_per_s=B / (ms / 1e3), ms_per_step=ms, gflops_per_image=flops / 1e9,
                            tflops=tflops, mfu=tflops / peak, peak_mem_gib=mem))
    for r in results:
        r["speed_vs_hf"] = r["img_per_s"] / results[-1]["img_per_s"]

    config = dict(preset=args.preset, height=H, width=W, batch=B, dtype=args.dtype, regions=N,
                  region_blocks=cfg.region_blocks, compile=args.compile, grad_ckpt=args.grad_ckpt,
                  steps=args.steps, warmup=args.warmup, device=device_name(dev), torch=torch.__version__,
                  peak_tflops=peak, peak_source=peak_src,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"\n{args.preset} {H}x{W} batch {B} {args.dtype} regions {N} R {cfg.region_blocks} "
          f"compile {args.compile} grad-ckpt {args.grad_ckpt} on {config['device']}, torch {torch.__version__}")
    print(f"MFU peak: {peak:.3g} TFLOP/s ({peak_src})"
          + ("; CPU MFU is against this measured matmul rate, not a datasheet peak" if dev.type == "cpu" else ""))
    print("\n| variant | img/s | ms/step | GFLOP/img | TFLOP/s | MFU | peak mem GiB | speed vs hf |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"| {r['variant']} | {r['img_per_s']:.3g} | {r['ms_per_step']:.1f} | {r['gflops_per_image']:.3g} | "
              f"{r['tflops']:.3g} | {100 * r['mfu']:.1f}% | {mem} | {r['speed_vs_hf']:.2f}x |")
    print(f"\nspeed ratio kit/hf: {results[0]['speed_vs_hf']:.3f}\n")
    line = json.dumps(dict(config=config, results=results))
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return results


if __name__ == "__main__":
    main()
