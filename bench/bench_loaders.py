"""01 and 02 with their DataLoader workers against the loop they replaced, side by side in one run on the same
images: throughput, and whether the outputs are the same bytes.

    python bench/bench_loaders.py                      # 400 demo images of 448 px, tiny random open_clip, CPU
    python bench/bench_loaders.py --images 2000 --device cuda --clip-model ViT-L-14 --feature-batch 512

"Before" is 01_mine_regions.py / 02_extract_ocr.py (with their workdir.py) as of --before (git rev), written to a
temporary folder and run unchanged: decoding on the main thread, the whole image as a batch of 1 and the crops
batched per image (01), the engine fed by the main thread (02). "After" is this tree's, at --workers 0 (in one
process, crops batched across images), 1 and 2. Every run is a fresh subprocess on a copy of one prebuilt image
table (the table is not timed); the time is the stage's own (its manifest's finish time minus the process
start after imports, measured around main()). 01 uses COCO boxes (no SAM) so the figure is the decode,
preprocessing and CLIP path; 02 uses RapidOCR with 02's defaults and --det-limit-side 64, as `make demo`.
Identity: 01's boxes, statuses, counts and areas must be the same bytes; CLIP features the same bytes for any
--workers of the new path, and within a float16 step of the old per-image batches (float sums depend on the
batch's shape). 02's every output the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "c185f7a"             # the last commit with the in-process loops of 01 and 02
OUTPUTS_01 = ["status", "box_source", "region_offsets", "boxes", "scores", "areas", "image_features",
              "region_features"]
OUTPUTS_02 = ["status", "lines_found", "line_offsets", "boxes", "scores", "text_offsets", "text_bytes",
              "token_offsets", "tokens"]
TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

RUNNER = r"""
import sys, time, importlib.util, json
t0 = time.time()
spec = importlib.util.spec_from_file_location("stage", sys.argv[1])
mod = importlib.util.module_from_spec(spec); sys.modules["stage"] = mod; sys.path.insert(0, sys.argv[2])
spec.loader.exec_module(mod)
import torch  # noqa
t1 = time.time()
mod.main(sys.argv[3:])
print(json.dumps({"stage_s": time.time() - t1, "import_s": t1 - t0}))
"""


def git_show(rev, path, out):
    data = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True).stdout
    with open(out, "wb") as f:
        f.write(data)


def run(script, lib, args, threads):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-c", RUNNER, script, lib, *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"error: {os.path.basename(script)} {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def load(work, stage, names):
    return {n: np.load(os.path.join(work, stage, n + ".npy")) for n in names}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip-model", default="bench-tiny-clip", help="open_clip name (default: a tiny random ViT)")
    p.add_argument("--feature-batch", type=int, default=512)
    p.add_argument("--before", default=BEFORE, help="git rev of the loop to compare with; none: leave it out")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--skip-ocr", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_loaders_")
    old = os.path.join(tmp, "before")
    os.makedirs(old)
    if args.before != "none":
        for f in ("01_mine_regions.py", "02_extract_ocr.py", "workdir.py"):
            git_show(args.before, f, os.path.join(old, f))
    data = os.path.join(tmp, "data")
    subprocess.run([sys.executable, os.path.join(ROOT, "00_make_demo_data.py"), "--out", data, "--num-images",
                    str(args.images), "--size", str(args.size), "--seed", "3", "--format", "webdataset",
                    "--shard-size", "200", "--mix", "0.2,0.2,0.6"], check=True, capture_output=True)
    table = os.path.join(tmp, "table")
    sys.path.insert(0, ROOT)
    import workdir
    import image_io
    image_io.ensure_image_table(table, os.path.join(data, "shards"))
    # one random-weights file for every run: the same network before and after
    import open_clip
    import torch
    clip_flags = ["--features", "clip", "--clip-model", args.clip_model, "--device", args.device]
    if args.clip_model == "bench-tiny-clip":
        cfg = os.path.join(tmp, "bench-tiny-clip.json")
        with open(cfg, "w") as f:
            json.dump(TINY_CLIP, f)
        open_clip.add_model_config(cfg)
        clip_flags += ["--clip-config", cfg]
    torch.manual_seed(0)
    weights = os.path.join(tmp, "clip_random.pt")
    torch.save(open_clip.create_model_and_transforms(args.clip_model, pretrained=None)[0].state_dict(), weights)
    clip_flags += ["--clip-pretrained", weights]
    regions_flags = ["--boxes", os.path.join(data, "coco.json"), "--min-box-side", "16", "--min-image-side", "64",
                     *clip_flags]
    ocr_flags = ["--det-limit-side", "64", "--engine", "rapidocr"]
    workers = [int(w) for w in args.workers.split(",")]

    def fresh(name):
        work = os.path.join(tmp, name)
        shutil.copytree(os.path.join(table, "images"), os.path.join(work, "images"))
        return work

    rows, results = [], {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                         "images": args.images, "size": args.size, "clip_model": args.clip_model,
                         "device": args.device, "before": args.before, "runs": []}
    before = [] if args.before == "none" else [None]           # none: this tree's loop only (no git needed)
    runs = [("01", "before", w) for w in before] + [("01", "after", w) for w in workers]
    if not args.skip_ocr:
        runs += [("02", "before", w) for w in before] + [("02", "after", w) for w in workers]
    ref = {}
    for stage, which, w in runs:
        work = fresh(f"{stage}_{which}_{w}")
        lib = old if which == "before" else ROOT
        script = os.path.join(lib, "01_mine_regions.py" if stage == "01" else "02_extract_ocr.py")
        flags = ["--work", work] + (regions_flags if stage == "01" else ocr_flags)
        if which == "after":
            flags += ["--workers", str(w)] + (["--feature-batch", str(args.feature_batch)] if stage == "01" else [])
        elif stage == "01":
            flags += ["--feature-batch", "64"]                        # the old default
        t = run(script, lib, flags, None)
        folder, names = ("regions", OUTPUTS_01) if stage == "01" else ("ocr", OUTPUTS_02)
        out = load(work, folder, names)
        m = workdir.read_manifest(os.path.join(work, folder))
        n_img = args.images
        n_crops = int(m["rows"]["boxes"]) + n_img if stage == "01" else 0
        row = {"stage": stage, "loop": which, "workers": w, "seconds": round(t["stage_s"], 2),
               "images_per_s": round(n_img / t["stage_s"], 1),
               "crops_per_s": round(n_crops / t["stage_s"], 1) if stage == "01" else None}
        key = (stage,)
        if key not in ref:
            ref[key] = out
            row["same_bytes_as_before"] = "reference"
        else:
            exact = [n for n in names if out[n].tobytes() == ref[key][n].tobytes()]
            row["same_bytes_as_before"] = len(exact) == len(names)
            row["differ"] = [n for n in names if n not in exact]
            for n in row["differ"]:
                if n.endswith("features") and out[n].shape == ref[key][n].shape:
                    d = np.abs(out[n].astype(np.float32) - ref[key][n].astype(np.float32))
                    row[f"{n}_max_abs_diff"] = float(d.max())
                    row[f"{n}_share_differing"] = float((d > 0).mean())
        if which == "after" and (stage, "after") in ref:
            row["same_bytes_as_workers_0"] = all(out[n].tobytes() == ref[(stage, "after")][n].tobytes() for n in names)
        ref.setdefault((stage, "after"), out) if which == "after" else None
        results["runs"].append(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| stage | loop | workers | s | images/s | crops/s | same bytes as before |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        same = r["same_bytes_as_before"]
        if same is False:
            same = "features within " + ", ".join(f"{r[k]:.1e}" for k in r if k.endswith("max_abs_diff"))
        print(f"| {r['stage']} | {r['loop']} | {'' if r['workers'] is None else r['workers']} | {r['seconds']} | "
              f"{r['images_per_s']} | {r['crops_per_s'] or ''} | {same} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
