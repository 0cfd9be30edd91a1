"""The prepared GPU run: every GPU figure of the kit in one command, each part under its own time cap, so the
run always ends with a table (runs/bench/gpu.json and runs/bench/gpu.md, with the device, torch and CUDA
versions; --out moves them).

    python bench/gpu.py                        # on one H100 / H200: under 10 minutes (the caps sum to 570 s)
    python bench/gpu.py --smoke                # CPU, tiny sizes, under a minute: what `make test` runs
    python bench/gpu.py --parts encoder,bank   # a subset; --out DIR for the two files

Parts (each a subprocess of this interpreter, killed at its cap; the row then says "timeout" or the error):
    world      a generated work folder for the 04 step: 00 (1,024 images of 448 px, webdataset shards), 01 with
               the world's COCO boxes and the pixel stand-in, an ocr/ folder of the world's words (token ids
               from their letters: no OCR engine needed; without the DejaVu fonts an objects-only world whose
               first object per image stands in as a text line), so the step runs the real DataLoader on tar
               shards
    encoder    bench/bench_encoder.py: the training step (fwd + bwd + AdamW) of the kit encoder vs transformers'
               MLCDVisionModel, L/14 at 336 px, batch 32, bf16, SDPA, N = 10 regions through 2 region blocks:
               images/s, MFU (989 TFLOP/s bf16 dense peak), peak memory; then the same with torch.compile
    step       bench/bench_train.py: the whole 04 step (its DataLoader on the world's shards, L/14 at 336 px,
               10 regions per image, the object bank at K = 1M and the OCR bank of 49,408, rho = 0.1):
               samples/s, MFU, data wait, peak GPU memory, against the bare HF backbone step
    bank       one CentreBank step (losses.py) at K = 1M, D = 1024, batch 32,768, rho = 0.1 against dense
               F.cross_entropy over all K logits (at the largest batch that fits, scaled): time and peak memory
    kmeans     bench/bench_kmeans.py --device cuda --backend torch: 03 on 1M x 768 -> 65,536 (and 10M x 768 -> 1M
               with --big-kmeans): time per iteration
    data       bench/bench_data.py --device cuda: SAM ViT-H automatic mask generation (random weights), CLIP
               ViT-L/14 on crops; RapidOCR when it is importable
    sam        bench/bench_sam.py --device cuda: the stock automatic mask generator against 01's box-only
               generator (sam_boxes.py) for SAM ViT-H and SAM 2.1 Hiera-L, 32^2 points, 2 images of 512 px, fp32
               and bf16, masks that vary with the prompt at the default and at open thresholds: s per image, the
               speed-up, peak GPU memory, the points per decoder call, whether the boxes are the same
    loaders    bench/bench_loaders.py --before none: 01's real path (DataLoader workers, --feature-batch 512)
               with CLIP ViT-L/14 (random weights) on 2,000 demo images: images/s and crops/s
--smoke runs every part with tiny sizes on the CPU (torch.compile and the big k-means left out: minutes of
inductor on a CPU), so the script is exercised by the test suite and never rots.

A bare GPU machine (Python 3.12, torch, torchvision, transformers, timm, onnxruntime (CPU), pyarrow, no
registry) needs these wheels carried with the tree (pip download on a machine with the registry, Python 3.12,
manylinux x86_64, into wheels/; 64 MiB in all):
    pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels \
        open_clip_torch==3.3.0 ftfy regex segment-anything==1.0 webdataset==1.0.2 braceexpand==0.1.7 \
        pycocotools==2.0.11 tqdm hydra-core==1.3.8 omegaconf==2.3.1 portalocker
    pip wheel --no-deps -w wheels antlr4-python3-runtime==4.9.3 iopath==0.1.10     # source only: pure-Python wheels
    SAM2_BUILD_CUDA=0 .venv/bin/pip wheel --no-deps --no-build-isolation -w wheels sam2==1.1.0  # no CUDA op
then on the machine: pip install --no-index --find-links wheels open_clip_torch segment-anything webdataset \
braceexpand pycocotools ftfy regex tqdm sam2 && python bench/gpu.py. faiss-gpu (03's torch backend is used instead),
onnxruntime-gpu and RapidOCR's opencv do not fit in 64 MiB: the OCR figure is then the CPU one or missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
PARTS = ["world", "encoder", "step", "bank", "kmeans", "data", "sam", "loaders"]
# seconds per part (full run): they sum to 570 s without --big-kmeans, so the run ends within one 10-minute call
CAPS = {"world": 45, "encoder": 60, "encoder_compile": 110, "step": 75, "bank": 30, "kmeans": 45,
        "kmeans_big": 120, "data": 60, "sam": 100, "loaders": 45}
SMOKE_CAP = 120
SMOKE_PARALLEL = 2             # --smoke: parts at a time after the world (CPU, one thread each)


def python(script, *args):
    return [sys.executable, os.path.join(BENCH, script), *map(str, args)]


def plan(args, tmp):
    """(name, command, cap, json file) per part, for the full run or --smoke."""
    s = args.smoke
    dev = "cpu" if s else "cuda"
    world = os.path.join(tmp, "world")
    j = lambda name: os.path.join(tmp, f"{name}.json")            # noqa: E731
    out = []
    if "world" in args.parts:
        out.append(("world", [sys.executable, __file__, "--make-world", world, "--world-images",
                              "24" if s else "1024", "--world-size", "128" if s else "448"], CAPS["world"], None))
    if "encoder" in args.parts:
        enc = (["--preset", "tiny", "--res", "64", "--batch", "2", "--dtype", "fp32", "--regions", "2", "--steps",
                "2", "--warmup", "1"] if s else
               ["--preset", "L/14", "--res", "336", "--batch", "32", "--dtype", "bf16", "--regions", "10",
                "--region-blocks", "2", "--steps", "10", "--warmup", "3"])
        out.append(("encoder", python("bench_encoder.py", *enc, "--device", dev, "--json-out", j("encoder")),
                     CAPS["encoder"], j("encoder")))
        if not s:
            out.append(("encoder_compile", python("bench_encoder.py", *enc, "--device", dev, "--compile",
                                                  "--json-out", j("encoder_compile")),
                        CAPS["encoder_compile"], j("encoder_compile")))
    if "step" in args.parts:
        step = (["--preset", "tiny", "--res", "64", "--batch", "4", "--k", "1000", "--steps", "4", "--log-every",
                 "2", "--workers", "0", "--skip-hf"] if s else
                ["--preset", "L/14", "--res", "336", "--batch", "32", "--k", "1000000", "--steps", "30",
                 "--log-every", "10", "--workers", "8"])
        out.append(("step", python("bench_train.py", "--work", world, "--out", os.path.join(tmp, "step"), *step,
                                   "--device", dev, "--json-out", j("step")), CAPS["step"], j("step")))
    if "bank" in args.parts:
        bank = ["--bank-k", "20000", "--bank-dim", "64", "--bank-batch", "512"] if s else []
        out.append(("bank", [sys.executable, __file__, "--bank-part", j("bank"), "--device", dev, *bank],
                    CAPS["bank"], j("bank")))
    if "kmeans" in args.parts:
        km = (["--n", "3000", "--dim", "16", "--k", "8", "--iters", "2", "--skip-sklearn"] if s else
              ["--n", "1000000", "--dim", "768", "--k", "65536", "--iters", "5", "--mode", "flat", "--backend",
               "torch", "--skip-sklearn"])
        out.append(("kmeans", python("bench_kmeans.py", "--device", dev, *km, "--json-out", j("kmeans")),
                    CAPS["kmeans"], j("kmeans")))
        if args.big_kmeans and not s:
            out.append(("kmeans_big", python("bench_kmeans.py", "--device", dev, "--n", "10000000", "--dim", "768",
                                             "--k", "1000000", "--iters", "2", "--mode", "two-level", "--backend",
                                             "torch", "--skip-sklearn", "--json-out", j("kmeans_big")),
                        CAPS["kmeans_big"], j("kmeans_big")))
    if "data" in args.parts:
        data = (["--sam-model", "tiny", "--images", "1", "--size", "128", "--points-per-side", "4", "--clip-model",
                 "ViT-B-32", "--crops", "4", "--skip-ocr"] if s else
                ["--sam-model", "vit_h", "--clip-model", "ViT-L-14", "--clip-batch", "512", "--crops", "512"])
        if not s and not _importable("rapidocr"):
            data.append("--skip-ocr")
        out.append(("data", python("bench_data.py", "--device", dev, *data, "--json-out", j("data")),
                    CAPS["data"], j("data")))
    if "sam" in args.parts:
        sam = (["--sam-model", "tiny,tiny-sam2", "--points", "4", "--size", "128", "--cases", "varied:default"] if s
               else ["--sam-model", "vit_h,sam2.1_hiera_l", "--points", "32", "--images", "2", "--dtypes",
                     "fp32,bf16", "--cases", "varied:default,varied:open"])
        out.append(("sam", python("bench_sam.py", "--device", dev, *sam, "--json-out", j("sam")), CAPS["sam"],
                    j("sam")))
    if "loaders" in args.parts:
        ld = (["--images", "16", "--size", "128", "--workers", "0"] if s else
              ["--images", "2000", "--size", "448", "--workers", "8", "--clip-model", "ViT-L-14"])
        out.append(("loaders", python("bench_loaders.py", "--before", "none", "--skip-ocr", "--device", dev, *ld,
                                      "--json-out", j("loaders")), CAPS["loaders"], j("loaders")))
    return out


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def summary(name, res):
    """The figures of one part's JSON, as one table cell."""
    if res is None:
        return ""
    try:
        if name.startswith("encoder"):
            r = {x["variant"]: x for x in res["results"]}
            kit = r.get("kit+regions", r["kit"])
            return (f"kit+regions {kit['img_per_s']:.1f} img/s, MFU {100 * kit['mfu']:.1f}%; kit {r['kit']['img_per_s']:.1f}"
                    f" img/s, MFU {100 * r['kit']['mfu']:.1f}%; HF {r['hf']['img_per_s']:.1f} img/s, MFU "
                    f"{100 * r['hf']['mfu']:.1f}%; kit / HF {r['kit']['speed_vs_hf']:.2f}x")
        if name == "step":
            o = res["ours"]
            mfu = "n/a" if o["mfu"] is None else f"{100 * o['mfu']:.1f}%"
            mem = "n/a" if o.get("max_mem_gib") is None else f"{o['max_mem_gib']:.1f} GiB"
            ref = res.get("hf_backbone_only")
            return (f"{o['samples_per_s_per_device']:.1f} samples/s, MFU {mfu}, data wait "
                    f"{100 * o['data_wait_frac']:.1f}%, peak {mem}"
                    + (f"; HF backbone-only {ref['samples_per_s_per_device']:.1f} samples/s" if ref else ""))
        if name == "bank":
            b, d = res["bank"], res["dense"]
            gib = lambda v: "n/a" if v is None else f"{v:.2f} GiB"          # noqa: E731
            dense = (f"dense CE {d['ms_per_sample'] * res['batch']:.0f} ms per {res['batch']:,} rows (measured at "
                     f"{d['batch']:,}), peak {gib(d['peak_gib'])}" if "ms_per_sample" in d else d.get("status", ""))
            return (f"K {res['k']:,}, D {res['dim']}, batch {res['batch']:,}: bank {b['ms']:.0f} ms, peak "
                    f"{gib(b['peak_gib'])}; {dense}")
        if name.startswith("kmeans"):
            rows = res["rows"]
            return "; ".join(f"{r['method']}: {r['wall_s'] / max(r['iters'], 1):.2f} s/iter, objective "
                             f"{r['objective']:.4f}" for r in rows)
        if name == "data":
            return "; ".join(f"{r['stage']} {r['rate']:.3g} {r['unit']}" for r in res["results"])
        if name == "sam":
            return "; ".join(
                f"{r['model']} {r['masks']} {r['settings']} {r['points']}^2: stock {r['stock_s_per_image']:.3g} s/img"
                + "".join(f", {d} {r[d]['s_per_image']:.3g} s/img ({r[d]['speedup']:.2f}x, "
                          + ("same boxes" if r[d]["same"] else f"{100 * r[d]['kept_of_stock']:.0f}% the same boxes, "
                             f"{100 * r[d]['matched_iou90']:.0f}% at IoU >= 0.9")
                          + (f", {r[d]['peak_gib']:.1f} GiB, {r[d]['points_per_batch']} pts/call" if r[d]["peak_gib"]
                             is not None else "") + ")" for d in ("fp32", "bf16") if d in r)
                for r in res["results"])
        if name == "loaders":
            r = res["runs"][-1]
            return f"{r['images_per_s']} images/s, {r['crops_per_s']} crops/s (workers {r['workers']})"
    except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
        return f"(unread: {type(e).__name__} {e})"
    return ""


def run_plan(args, tmp, env) -> list:
    """Each part of plan() as a subprocess under its time cap: one row per part (status, seconds, its figures).
    On a GPU one part at a time (they are timings); --smoke runs the world first, then the other parts two at a
    time (one thread each: the test's time on two cores)."""
    def run_part(name, cmd, cap, json_file):
        cap = SMOKE_CAP if args.smoke else cap
        t0 = time.time()
        print(f"[gpu.py] {name} (cap {cap} s): {' '.join(cmd[1:3])} ...", flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env, cwd=ROOT)
            status = "ok" if r.returncode == 0 else "failed: " + ((r.stderr or r.stdout).strip().splitlines() or ["?"])[-1][:200]
            log = (r.stdout or "") + (r.stderr or "")
        except subprocess.TimeoutExpired as e:
            status, log = f"timeout after {cap} s", str(e.stdout or "")[-2000:]
        res = None
        if json_file and os.path.exists(json_file):
            with open(json_file) as f:
                res = json.load(f)
        row = {"part": name, "status": status, "seconds": round(time.time() - t0, 1), "result": res,
               "summary": summary(name, res) if status == "ok" else "", "log_tail": log[-1500:]}
        print(f"[gpu.py] {name}: {status}, {row['seconds']} s; {row['summary']}", flush=True)
        return row

    parts = plan(args, tmp)
    if not args.smoke:
        return [run_part(*p) for p in parts]
    from concurrent.futures import ThreadPoolExecutor
    first = [run_part(*p) for p in parts if p[0] == "world"]      # the others read the world
    with ThreadPoolExecutor(SMOKE_PARALLEL) as pool:
        return first + list(pool.map(lambda p: run_part(*p), [p for p in parts if p[0] != "world"]))


def run_parts(args):
    import torch
    tmp = tempfile.mkdtemp(prefix="gpu_bench_")
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    rows, t_all = [], time.time()
    try:
        rows = run_plan(args, tmp, env)
    finally:                                   # the generated world and the parts' files: hundreds of MB at full size
        shutil.rmtree(tmp, ignore_errors=True)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else platform.processor() or "cpu"
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": dev,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "smoke": args.smoke, "total_s": round(time.time() - t_all, 1), "parts": rows}
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = [f"GPU run of {report['date'][:10]} on {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"Python {report['python']}{' (--smoke: tiny sizes on the CPU)' if args.smoke else ''}; "
          f"{report['total_s']} s in all.", "", "| part | status | s | figures |", "|---|---|---:|---|"]
    md += [f"| {r['part']} | {r['status']} | {r['seconds']} | {r['summary']} |" for r in rows]
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return report


# ----------------------------------------------------------------------------------------------------------
# parts that live here: the generated work folder and the bank step


def make_world(folder, images, size):
    """00 -> 01 (COCO boxes, pixel stand-in) -> an ocr/ folder of the world's words, for bench_train."""
    import stage_scripts
    data = os.path.join(folder, "data")
    fonts = all(os.path.exists(f) for f in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                                            "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"))
    subprocess.run([sys.executable, os.path.join(ROOT, "00_make_demo_data.py"), "--out", data, "--num-images",
                    str(images), "--size", str(size), "--format", "webdataset", "--shard-size", "256",
                    "--mix", "0.2,0.2,0.6" if fonts else "1,0,0"], check=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "01_mine_regions.py"), "--images",
                    os.path.join(data, "shards"), "--work", folder, "--boxes", os.path.join(data, "coco.json"),
                    "--features", "pixels", "--min-box-side", "16", "--min-image-side", "64"], check=True)
    stage_scripts.load("00_make_demo_data.py").write_ocr_stand_in(folder, os.path.join(data, "coco.json"),
                                                                   objects_as_text=not fonts)


def bank_part(out, device, K, D, B, rho, steps=5):
    """One CentreBank step (forward + backward of embeddings and centres) against dense cross-entropy."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, ROOT)
    import losses
    dev = torch.device(device)
    torch.manual_seed(0)

    def timed(fn):
        fn()                                    # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
        return (time.perf_counter() - t) / steps * 1e3, peak

    bank = losses.CentreBank(K, D, rho=rho).to(dev)
    emb = torch.randn(B, D, device=dev, requires_grad=True)
    labels = torch.randint(0, K, (B,), device=dev)

    def bank_step():
        bank.zero_grad(set_to_none=True)
        emb.grad = None
        bank(emb, labels).loss.backward()
    ms, peak = timed(bank_step)
    res = {"k": K, "dim": D, "batch": B, "rho": rho, "device": str(dev), "bank": {"ms": ms, "peak_gib": peak}}
    bank = None                                 # its 1M x D centres and their gradient off the device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    # dense: all K logits per row; the largest batch whose logits, their gradient and softmax fit in half the
    # free memory (fp32), timed there and scaled to the batch
    W = torch.randn(K, D, device=dev, requires_grad=True)
    free = torch.cuda.mem_get_info()[0] if dev.type == "cuda" else 8 * 2 ** 30
    b = int(min(B, max(1, free * 0.5 // (K * 4 * 3))))
    e, lab = emb[:b].detach().requires_grad_(), labels[:b]

    def dense_step():
        W.grad = e.grad = None
        F.cross_entropy(64 * F.normalize(e, dim=1) @ F.normalize(W, dim=1).t(), lab).backward()
    try:
        ms_d, peak_d = timed(dense_step)
        res["dense"] = {"batch": b, "ms": ms_d, "ms_per_sample": ms_d / b, "peak_gib": peak_d}
    except torch.OutOfMemoryError as err:
        res["dense"] = {"status": f"out of memory at batch {b}: {str(err)[:120]}"}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, under a minute")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--big-kmeans", action="store_true", help="also 10M x 768 -> 1M (two-level)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench"), help="folder for gpu.json and gpu.md")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--make-world", help=argparse.SUPPRESS)
    p.add_argument("--world-images", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=448, help=argparse.SUPPRESS)
    p.add_argument("--bank-part", help=argparse.SUPPRESS)
    p.add_argument("--bank-k", type=int, default=1_000_000, help=argparse.SUPPRESS)
    p.add_argument("--bank-dim", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--bank-batch", type=int, default=32768, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_world:
        return make_world(args.make_world, args.world_images, args.world_size)
    if args.bank_part:
        return bank_part(args.bank_part, args.device, args.bank_k, args.bank_dim, args.bank_batch, 0.1)
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"error: --parts {','.join(unknown)}: choose from {','.join(PARTS)}")
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device: bench/gpu.py measures GPU figures (--smoke runs the tiny CPU check)")
    return run_parts(args)


if __name__ == "__main__":
    main()
