"""Throughput of the data stages (01 SAM regions + CLIP features, 02 OCR) and their cost per million images.

    CPU:  python bench/bench_data.py       # vit_b, 16 x 16 points, 2 images, ViT-B-16: 8 min on 2 busy cores
    GPU:  python bench/bench_data.py --device cuda --sam-model vit_h --clip-model ViT-L-14    # 32 x 32, 8 images
    also: --points-per-side 32 (SAM's default), --real-photos (pip install scikit-image), --json-out data.json

Random weights (no download): SAM from segment_anything's registry with checkpoint=None (01's build_sam), CLIP from
open_clip with pretrained "none" (01's ClipFeatures). Speed does not depend on the weights except in SAM's mask
post-processing: random masks are speckle noise, far costlier to RLE-encode than real smooth masks, and NMS merges
them into a few image-sized masks, so "post" is an upper bound and masks/regions are not real counts. The vit_h
GPU run is the figure that matters (vit_h's encoder has 7x vit_b's parameters; on CPU it is not worth the wait).
Inputs: demo-world images (00_make_demo_data.make_image, --size px square) feed SAM, CLIP and PixelFeatures (box
crops 32 px to full side, fixed seed, grouped per image as 01 calls them). OCR: 02's rapidocr_engine + read_lines,
02's defaults, on 20 demo-world 224 px images with words and 10 synthetic 640 x 480 pages (3-6 lines of vocabulary
words on 00's backgrounds); "exact": words / lines read back verbatim as one line.
SAM: encoder = one sam.image_encoder forward on 1x3x1024x1024 after a warm-up; generate() = 01's sam_regions with
pred_iou_thresh = stability_score_thresh = 0 (every mask is post-processed), split into encoder
(predictor.set_image), decoder (predictor.predict_torch) and post (the rest), then 01's filter_boxes -> regions.
Cost: h per 1e6 images = 1e6 / (images/s) / 3600 on this device, one process; a crops row costs 1 image + R
crops per image, R = --regions-per-image (default: the SAM row's regions).
"""
from __future__ import annotations

import argparse, datetime, itertools, json, os, platform, statistics, sys, time

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SAM_MODEL, CLIP_MODEL, CLIP_BATCH, SIZE, SEED = "vit_b", "ViT-B-16", 64, 512, 0
IMAGES = {"cpu": 2, "cuda": 8}                 # SAM / CLIP input images
POINTS_PER_SIDE = {"cpu": 16, "cuda": 32}     # 32 is SamAutomaticMaskGenerator's default
CROPS, OCR_SMALL, OCR_LARGE = 64, 20, 10
PHOTOS = ("text", "page", "astronaut", "coffee", "rocket", "chelsea")    # bundled in scikit-image's wheel


def load_stage(file):
    import stage_scripts
    return stage_scripts.load(file)


demo, mine, ocr = (load_stage(f) for f in ("00_make_demo_data.py", "01_mine_regions.py", "02_extract_ocr.py"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sam-model", default=SAM_MODEL, choices=["vit_b", "vit_l", "vit_h", "tiny"])
    p.add_argument("--points-per-side", type=int, help="default 16 on CPU, 32 (SAM's) on CUDA")
    p.add_argument("--images", type=int, help="demo images for SAM and CLIP (default 2 on CPU, 8 on CUDA)")
    p.add_argument("--size", type=int, default=SIZE, help="side of the demo images for SAM and CLIP")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="open_clip name, e.g. ViT-L-14 (the paper's)")
    p.add_argument("--clip-batch", type=int, default=CLIP_BATCH)
    p.add_argument("--crops", type=int, default=CROPS)
    p.add_argument("--regions-per-image", type=float, help="R for the crops cost (default: SAM's measured)")
    p.add_argument("--det-limit-side", type=int, help="passed to 02's rapidocr engine (its default: 736)")
    p.add_argument("--skip-ocr", action="store_true", help="leave the RapidOCR rows out (e.g. no rapidocr)")
    p.add_argument("--real-photos", action="store_true", help="also scikit-image's bundled photos (OCR, SAM)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    args.points_per_side = args.points_per_side or POINTS_PER_SIDE[args.device]
    args.images = args.images or IMAGES[args.device]
    return args


def timed(fn, dev):
    """(wall seconds, fn()), with the GPU queue drained before and after."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda _: None)
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    with open("/proc/cpuinfo") as f:
        name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    return f"{name} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def row(stage, setting, inp, detail, rate, unit, img_per_s=None):
    """One table row; img_per_s (images/s of the whole per-image stage) gives the cost column."""
    return dict(stage=stage, setting=setting, input=inp, detail=detail, rate=rate, unit=unit,
                h_per_1M=1e6 / img_per_s / 3600 if img_per_s else None)


def bench_sam(args, dev, images, results):
    """Appends the two SAM rows; returns (per-image means, run(image) -> that image's figures and kept boxes)."""
    from segment_anything import SamAutomaticMaskGenerator
    sam = mine.build_sam(args.sam_model, None).to(dev).eval()
    x = torch.randn(1, 3, 1024, 1024, device=dev)
    with torch.no_grad():
        timed(lambda: sam.image_encoder(x), dev)                       # warm-up
        enc, _ = timed(lambda: sam.image_encoder(x), dev)
    gen = SamAutomaticMaskGenerator(sam, points_per_side=args.points_per_side, pred_iou_thresh=0,
                                    stability_score_thresh=0)
    acc = {}

    def wrap(key, fn):                                                  # adds fn's time to acc[key]
        def run(*a, **k):
            t, out = timed(lambda: fn(*a, **k), dev)
            acc[key] = acc.get(key, 0.0) + t
            return out
        return run
    for key, name in (("enc", "set_image"), ("dec", "predict_torch")):
        setattr(gen.predictor, name, wrap(key, getattr(gen.predictor, name)))

    def run(image):
        acc.clear()
        t, (b, s, a) = timed(lambda: mine.sam_regions(gen, image, mine.SAM_MAX_SIDE), dev)
        kept = mine.filter_boxes(b, s, a, *image.size, mine.MIN_BOX_SIDE, mine.DEDUP_IOU, mine.MAX_REGIONS)[0]
        return dict(s=t, enc=acc["enc"], dec=acc["dec"], post=t - acc["enc"] - acc["dec"], masks=len(b),
                    regions=len(kept), boxes=kept)
    per = [run(im) for im in images]
    m = {k: statistics.mean(p[k] for p in per) for k in ("s", "enc", "dec", "post", "masks", "regions")}
    results.append(row("SAM image encoder", args.sam_model, "1x3x1024x1024", f"{enc:.3f} s", 1 / enc, "img/s"))
    results.append(row("SAM generate()", f"{args.sam_model}, {args.points_per_side}^2 pts",
                       f"{len(images)} demo {args.size} px", f"{m['s']:.2f} s = enc {m['enc']:.2f} + dec "
                       f"{m['dec']:.2f} + post {m['post']:.2f}; {m['masks']:.1f} masks, {m['regions']:.1f} regions",
                       1 / m["s"], "img/s", 1 / m["s"]))
    return m, run


def bench_features(args, dev, images, sam, results):
    """CLIP and PixelFeatures on crops of varied sizes (grouped per image, as 01 calls them) and whole images."""
    rng, n, side, reps = np.random.default_rng(SEED), len(images), args.size, max(8, len(images))
    wh = rng.uniform(32, side, (args.crops, 2))                    # box sides 32 px to the full image side
    xy = rng.uniform(0, 1, (args.crops, 2)) * (side - wh)
    crops = np.array_split(np.concatenate([xy, xy + wh], 1).astype(np.float32), n)
    whole = [np.array([[0, 0, *im.size]], np.float32) for im in images]
    R = sam["regions"] if args.regions_per_image is None else args.regions_per_image
    cost = f"cost: 1 image + R = {R:.1f} crops ({'SAM row' if args.regions_per_image is None else 'given'})"
    clip = mine.ClipFeatures(args.clip_model, "none", None, args.clip_batch, dev)
    for name, f, k in (("CLIP", clip, 1), ("PixelFeatures", mine.PixelFeatures(), 10)):  # k: repeats, fast one
        f(images[0], crops[0][:4]), f(images[0], whole[0])                                  # warm-up
        t_crop, _ = timed(lambda: [f(im, c) for _ in range(k) for im, c in zip(images, crops)], dev)
        t_img, _ = timed(lambda: [f(images[i % n], whole[i % n]) for i in range(k * reps)], dev)
        t_crop, t_img = t_crop / (k * args.crops), t_img / (k * reps)
        setting = f"{args.clip_model}, batch {args.clip_batch}" if f is clip else f"{mine.PIXEL_GRID}^2 stand-in"
        results.append(row(f"{name} crops", setting, f"{args.crops} crops 32-{side} px",
                           f"{t_crop * 1e3:.1f} ms/crop; {cost}", 1 / t_crop, "crops/s", 1 / (t_img + R * t_crop)))
        results.append(row(f"{name} whole image", setting, f"{reps} x demo {side} px, 1 per call as 01",
                           f"{t_img * 1e3:.1f} ms", 1 / t_img, "img/s", 1 / t_img))


def text_page(i):
    """640 x 480: 3-6 lines (one per 80 px band) of 2-3 vocabulary words, 18-36 px DejaVu, dark or light ink."""
    rng = np.random.default_rng(SEED * 7919 + i)
    img = Image.fromarray(np.clip(demo.background(rng, 640)[:480], 0, 255).astype(np.uint8))
    ink = (20, 20, 20) if np.asarray(img).mean() > 128 else (240, 240, 240)
    draw, lines = ImageDraw.Draw(img), []
    for k in range(int(rng.integers(3, 7))):
        font = demo.font(demo.FONTS[int(rng.integers(2))], int(rng.integers(18, 37)))
        words = [demo.VOCAB[j] for j in rng.choice(len(demo.VOCAB), int(rng.integers(2, 4)), replace=False)]
        while font.getlength(" ".join(words)) > 600:
            words.pop()
        lines.append(" ".join(words))
        x = int(rng.integers(10, 630 - font.getlength(lines[-1]) + 1))
        draw.text((x, 80 * k + int(rng.integers(5, 35))), lines[-1], font=font, fill=ink)
    return img, lines


def bench_ocr(args, results):
    """02's rapidocr engine on demo-world images with words (224 px) and on 640 x 480 pages of text lines."""
    flags = ["--engine", "rapidocr"] + (["--det-limit-side", str(args.det_limit_side)] if args.det_limit_side else [])
    engine, info = ocr.rapidocr_engine(ocr.parse_args(flags))
    worlds = (demo.make_image(i, SEED, 224) for i in itertools.count())
    small = zip(*itertools.islice(((Image.fromarray(im), [a["text"] for a in anns if "text" in a])
                                   for im, _, anns in worlds if any("text" in a for a in anns)), OCR_SMALL))
    pages = zip(*map(text_page, range(OCR_LARGE)))
    for label, ims, truth, unit in (("RapidOCR 224", *small, ("words", "demo images")),
                                    ("RapidOCR 640x480", *pages, ("lines", "pages"))):
        ocr.read_lines(engine, ims[0], ocr.MAX_SIDE)                                            # warm-up
        t, reads = timed(lambda: [ocr.read_lines(engine, im, ocr.MAX_SIDE) for im in ims], torch.device("cpu"))
        exact = sum(sum(g in {txt for _, txt, _ in r} for g in gt) for r, gt in zip(reads, truth))
        kept = sum(sc > ocr.MIN_SCORE for r in reads for _, _, sc in r)
        results.append(row(label, f"02 rapidocr, det limit {info['det_limit']}, CPU", f"{len(ims)} {unit[1]}",
                           f"{exact}/{sum(map(len, truth))} {unit[0]} exact, {kept} lines > {ocr.MIN_SCORE}",
                           len(ims) / t, "img/s", len(ims) / t))
    return engine, info


def real_photos(args, dev, engine, sam_run, results):
    """OCR on scikit-image's bundled photos (text: handwriting on paper; page: a photographed book page), printing
    what is read; SAM + PixelFeatures on astronaut and coffee. Returns {photo: [(text, score)]}."""
    import skimage.data
    photos = {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS}
    read = {}
    for name, im in photos.items():
        t, lines = timed(lambda: ocr.read_lines(engine, im, ocr.MAX_SIDE), torch.device("cpu"))
        read[name] = [(txt, round(sc, 3)) for _, txt, sc in lines]
        print(f"OCR skimage.data.{name}() {im.size[0]}x{im.size[1]} ({t:.2f} s): "
              + ("; ".join(f"{txt!r} {sc:.2f}" for txt, sc in read[name]) or "nothing read"))
    for name in ("astronaut", "coffee"):
        r, im = sam_run(photos[name]), photos[name]
        tf, _ = timed(lambda: mine.PixelFeatures()(im, r["boxes"]), dev)
        rate = 1 / (r["s"] + tf)
        results.append(row("SAM + PixelFeatures, real photo", f"{args.sam_model}, {args.points_per_side}^2 pts",
                           f"skimage {name} {im.size[0]}x{im.size[1]}", f"{r['s']:.2f} s + {tf * 1e3:.1f} ms; "
                           f"{r['masks']} masks, {r['regions']} regions", rate, "img/s", rate))
    return read


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    load_avg = os.getloadavg()[0]                 # other processes on the machine slow every row down
    results, images = [], [Image.fromarray(demo.make_image(i, SEED, args.size)[0]) for i in range(args.images)]
    sam, sam_run = bench_sam(args, dev, images, results)
    bench_features(args, dev, images, sam, results)
    engine, info = (None, {"version": None, "det": None, "rec": None}) if args.skip_ocr else bench_ocr(args, results)
    extra = {"real_photos_ocr": real_photos(args, dev, engine, sam_run, results)} if args.real_photos else {}

    config = dict(vars(args), device_name=device_name(dev), torch=torch.__version__, rapidocr=info["version"],
                  ocr_det=info["det"], ocr_rec=info["rec"], load_avg_1m_at_start=load_avg,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"\nData stages on {config['device_name']}, torch {torch.__version__}, rapidocr {info['version']}, "
          f"{config['date']}; random weights; load average at start {load_avg:.2f}")
    print("\n| stage | setting | input | per image / detail | rate | h per 1M images |")
    print("|---|---|---|---|---:|---:|")
    for r in results:
        h = "-" if r["h_per_1M"] is None else f"{r['h_per_1M']:,.1f}"
        print(f"| {r['stage']} | {r['setting']} | {r['input']} | {r['detail']} | {r['rate']:.3g} {r['unit']} | {h} |")
    est = sam["enc"] + (sam["dec"] + sam["post"]) * (32 / args.points_per_side) ** 2
    if args.points_per_side != 32:
        print(f"\nSAM at 32^2 points (SAM's default), decoder + post scaled by the point count: {est:.1f} s/img, "
              f"{1e6 * est / 3600:,.0f} h per 1M images")
    hours = {r["stage"]: r["h_per_1M"] for r in results if r["stage"] in ("SAM generate()", "CLIP crops",
                                                                             "RapidOCR 640x480")}
    share = ", ".join(f"{k} {sam[k] / sam['s']:.0%}" for k in ("enc", "dec", "post"))
    print(f"dominant: {max(hours, key=hours.get)} (h per 1M images: " + ", ".join(f"{k} {v:,.0f}" for k, v in
          hours.items()) + f"; CLIP crops = 1 image + R crops); SAM generate() is {share}")
    line = json.dumps(dict(config=config, results=results, sam_32_points_s_est=est, **extra))
    print("\n" + line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return results


if __name__ == "__main__":
    main()
