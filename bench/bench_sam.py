"""SAM's stock automatic mask generator against 01's box-only generator (sam_boxes.BoxGenerator), side by side in
one run on the same images, weights and settings: seconds per image, images/s, the ratio, and whether the boxes,
scores and areas are the same.

    CPU:  python bench/bench_sam.py                           # vit_b, 16^2 and 32^2 points, 1 image of 512 px
    GPU:  python bench/bench_sam.py --device cuda --sam-model vit_h,sam2.1_hiera_l --images 8 --points 32 \
              --dtypes fp32,bf16                              # adds peak GPU memory and the batches used
    also: --json-out F, --size, --images, --settings default,relaxed,open

Random weights (no download). Two kinds of models, because plain random weights give nearly the same mask for
every point (NMS keeps one or two boxes per image), which is nothing like real weights:
    random   the plain random model: the stock generator's masks are speckle noise (its RLE work is at its worst)
    varied   sam_boxes.vary_with_prompt: the same model with its decoder's output replaced by smooth masks that
             follow the prompt and the image (the decoder still runs, so the cost is the real one): at the
             default thresholds about 100 (16^2) to 170 (32^2) boxes per 512 px image survive NMS
Settings: default = SAM's thresholds (pred IoU 0.88, stability 0.95); relaxed = 0.5 / 0.5; open = 0 / 0 (every
mask is post-processed). The stock generator runs with points_per_batch 64 (its default) and batch 1 (it has no
other); the box-only generator with 01's device defaults (CPU: 64 points per call, 1 image per encoder forward;
GPU: 1024 and --sam-batch 8) unless --points-per-batch / --sam-batch say otherwise. "same" compares boxes, scores
and areas exactly (fp32; for bf16: the share of the stock generator's fp32 boxes it has exactly, and with a box
at IoU >= 0.9). h per 1M images = 1e6 / (images/s) / 3600
on this device, one process.
"""
from __future__ import annotations

import argparse, datetime, json, os, sys, time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sam_boxes  # noqa: E402
import stage_scripts  # noqa: E402
from bench_data import device_name  # noqa: E402

SETTINGS = {"default": (0.88, 0.95), "relaxed": (0.5, 0.5), "open": (0.0, 0.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sam-model", default="vit_b", help="comma-separated: vit_b, vit_h, sam2.1_hiera_l, tiny, ...")
    p.add_argument("--points", default="16,32", help="points per side, comma-separated")
    p.add_argument("--cases", default="random:default,varied:default,varied:open",
                   help="model:settings pairs; models random / varied, settings default / relaxed / open")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="side of the demo-world images")
    p.add_argument("--dtypes", default="fp32", help="box-only generator dtypes: fp32,bf16")
    p.add_argument("--points-per-batch", type=int, help="box-only generator (default 64 on CPU, 1024 on CUDA)")
    p.add_argument("--sam-batch", type=int, help="box-only generator (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--json-out")
    return p.parse_args(argv)


def timed(fn, dev):
    """(seconds, fn(), peak GPU GiB) with the GPU queue drained before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev), torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    return time.perf_counter() - t, out, peak


def same(a, b):
    return all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def kept_share(ours, ref):
    """Share of the reference's boxes that `ours` has exactly."""
    have = {tuple(b) for b in ours[0]}
    if len(ref[0]) == 0:
        return float(len(ours[0]) == 0)
    return sum(tuple(b) in have for b in ref[0]) / len(ref[0])


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    demo = stage_scripts.load("00_make_demo_data.py")
    images = [np.ascontiguousarray(demo.make_image(i, 0, args.size)[0]) for i in range(args.images)]
    ppb = args.points_per_batch or {"cpu": 64, "cuda": 1024}[dev.type]
    sam_batch = args.sam_batch or {"cpu": 1, "cuda": 8}[dev.type]
    load_avg, rows = os.getloadavg()[0], []
    for name in args.sam_model.split(","):
        models = {}
        for case in args.cases.split(","):
            kind, setting = case.split(":")
            if kind not in models:                     # the same random weights for both kinds (seed 0)
                torch.manual_seed(0)
                models[kind] = sam_boxes.build_sam(name, None, dev)
                if kind == "varied":
                    sam_boxes.vary_with_prompt(models[kind])
            sam = models[kind]
            iou, stab = SETTINGS[setting]
            for pps in map(int, args.points.split(",")):
                st = dict(points_per_side=pps, pred_iou_thresh=iou, stability_score_thresh=stab)
                stock = sam_boxes.stock_generator(sam, **st)
                stock.generate(images[0][:64, :64])                                     # warm-up
                t_s, ref, peak_s = timed(lambda: [sam_boxes.stock_boxes(stock.generate(im)) for im in images], dev)
                row = dict(model=name, masks=kind, settings=setting, thresholds=[iou, stab], points=pps,
                           images=len(images), size=args.size, stock_s_per_image=t_s / len(images),
                           stock_peak_gib=peak_s, kept_per_image=float(np.mean([len(r[0]) for r in ref])))
                fp32 = None
                for dt in args.dtypes.split(","):
                    gen = sam_boxes.BoxGenerator(sam, **st, points_per_batch=ppb, image_batch=sam_batch,
                                                 dtype=torch.bfloat16 if dt == "bf16" else torch.float32)
                    gen.generate(images[0][:64, :64])
                    t, ours, peak = timed(lambda: gen.generate_batch(images), dev)
                    fp32 = ours if dt == "fp32" else fp32
                    row[dt] = dict(s_per_image=t / len(images), speedup=t_s / t, peak_gib=peak,
                                   points_per_batch=gen.points_per_batch, image_batch=gen.image_batch,
                                   same=all(same(a, b) for a, b in zip(ours, ref)),
                                   kept_of_stock=float(np.mean([kept_share(a, b) for a, b in zip(ours, ref)])),
                                   matched_iou90=float(np.mean([sam_boxes.matched_share(a[0], b[0], 0.9)
                                                                for a, b in zip(ours, ref)])),
                                   kept_per_image=float(np.mean([len(r[0]) for r in ours])))
                rows.append(row)
                print(json.dumps(row), flush=True)
    config = dict(vars(args), device_name=device_name(dev), torch=torch.__version__, load_avg_1m_at_start=load_avg,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"\nSAM stock generator vs 01's box-only generator on {config['device_name']}, torch {torch.__version__}, "
          f"{config['date']}; random weights; {len(images)} demo image(s) of {args.size} px; load average "
          f"{load_avg:.2f}")
    dts = args.dtypes.split(",")
    print("\n| model | masks | thresholds | points | kept / image | stock s / image | "
          + " | ".join(f"box-only {d} s / image | speed-up | same boxes" for d in dts) + " | h per 1M (best) |")
    print("|---|---|---|---|---:|---:|" + "---:|---:|---|" * len(dts) + "---:|")
    for r in rows:
        cells = []
        for d in dts:
            o = r[d]
            sm = ("yes" if o["same"] else "NO") if d == "fp32" else \
                f"{100 * o['kept_of_stock']:.0f}% the same, {100 * o['matched_iou90']:.0f}% at IoU >= 0.9"
            mem = f", {o['peak_gib']:.1f} GiB" if o["peak_gib"] is not None else ""
            cells.append(f"{o['s_per_image']:.3g}{mem} | {o['speedup']:.2f}x | {sm}")
        best = min(r[d]["s_per_image"] for d in dts)
        smem = f", {r['stock_peak_gib']:.1f} GiB" if r["stock_peak_gib"] is not None else ""
        print(f"| {r['model']} | {r['masks']} | {r['settings']} {r['thresholds'][0]}/{r['thresholds'][1]} | "
              f"{r['points']}^2 | {r['kept_per_image']:.0f} | {r['stock_s_per_image']:.3g}{smem} | "
              + " | ".join(cells) + f" | {1e6 * best / 3600:,.0f} |")
    line = json.dumps(dict(config=config, results=rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return rows


if __name__ == "__main__":
    main()
