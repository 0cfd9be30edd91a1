"""What the region clusters mean, per feature kind: 01 and 03 on the same demo images and boxes with the pixel
stand-in and with EfficientNet-Lite0, side by side, and the normalised mutual information between the region
clusters and each factor of the demo world (shape, colour, texture, and the full class).

    .venv/bin/python bench/bench_demo_features.py --images runs/demo/eval_data/shards \
        --coco runs/demo/eval_data/coco.json                                   # K = 108, as the demo
    .venv/bin/python bench/bench_demo_features.py --images ... --coco ... --sizes 64,96,128 --k 108

Object regions only (the demo's text boxes have no shape, colour or texture). Each region's class is the COCO
annotation whose box it is (01 keeps the box file's boxes as they are). Timing: 01's wall time per feature
kind (decoding, crops and features on this machine's cores), and region crops per second.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FACTORS = ("shape", "colour", "texture", "name")


def region_classes(work: str, coco_file: str) -> dict:
    """{factor: array of the factor's value per region (None for a region that is not an object)}."""
    import image_io
    with open(coco_file) as f:
        coco = json.load(f)
    cats = {c["id"]: c for c in coco["categories"]}
    by_image = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        key = tuple(np.float32([x, y, x + w, y + h]).tolist())
        by_image.setdefault(a["image_id"], {})[key] = cats[a["category_id"]]
    image_id = {os.path.splitext(os.path.basename(im["file_name"]))[0]: im["id"] for im in coco["images"]}
    table = image_io.read_image_table(work)
    boxes = np.load(os.path.join(work, "regions", "boxes.npy"))
    offsets = np.load(os.path.join(work, "regions", "region_offsets.npy"))
    out = {f: [None] * len(boxes) for f in FACTORS}
    for i in range(len(table)):
        known = by_image.get(image_id.get(os.path.splitext(os.path.basename(table.name(i)))[0]), {})
        for r in range(offsets[i], offsets[i + 1]):
            cat = known.get(tuple(boxes[r].tolist()))
            if cat is not None and "shape" in cat:
                for f in FACTORS:
                    out[f][r] = cat[f]
    return {f: np.array(v, dtype=object) for f, v in out.items()}


def measure(mine, cluster, nmi_score, args, name, extra, work):
    """01 (timed) and 03 with one feature kind in `work`: (name, NMI per factor, object regions, 01 s, crops/s)."""
    t0 = time.time()
    m = mine.main(["--images", args.images, "--work", work, "--boxes", args.coco, "--min-box-side", "16",
                   "--min-image-side", "64", "--workers", str(args.workers),
                   "--features", name.split(" ")[0], *extra])
    seconds = time.time() - t0
    cluster.main(["--work", work, "--k", str(args.k), "--fit-on", "regions"])
    labels = np.load(os.path.join(work, "clusters", "region_labels.npy"))
    truth = region_classes(work, args.coco)
    obj = np.array([v is not None for v in truth["shape"]])
    nmi = {f: nmi_score(truth[f][obj].astype(str), labels[obj]) for f in FACTORS}
    crops = m["rows"]["boxes"] + m["rows"]["images"]
    return name, nmi, int(obj.sum()), seconds, crops / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--coco", required=True)
    p.add_argument("--k", type=int, default=108)
    p.add_argument("--sizes", default="64,96,128", help="EfficientNet-Lite0 crop sizes to compare")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    import stage_scripts
    from sklearn.metrics import normalized_mutual_info_score
    mine = stage_scripts.load("01_mine_regions.py", "mine_regions")
    cluster = stage_scripts.load("03_cluster.py", "cluster")
    kinds = [("pixels", [])] + [(f"efficientnet-lite0 at {s} px", ["--feature-size", s])
                                 for s in args.sizes.split(",") if s]
    rows = []
    for name, extra in kinds:
        work = tempfile.mkdtemp(prefix="bench-features-")
        try:
            rows.append(measure(mine, cluster, normalized_mutual_info_score, args, name, extra, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| features | NMI shape | NMI colour | NMI texture | NMI class | object regions | 01 s | crops/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, nmi, n, seconds, rate in rows:
        print(f"| {name} | " + " | ".join(f"{nmi[f]:.3f}" for f in FACTORS) + f" | {n} | {seconds:.0f} | {rate:.0f} |")
    return rows


if __name__ == "__main__":
    main()
