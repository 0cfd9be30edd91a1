r"""Stage 02: OCR text lines and their token labels, the targets of RICE's OCR-region loss.

RICE Sec. 3.1: PaddleOCR runs on the web images; text lines recognised with confidence > 0.7 are kept, and each
line's label is its tokenised text, labels = tokenizer(text), a set of token ids that the OCR loss (RICE Eq. 4;
losses.CentreBank with K = the tokenizer's vocabulary) treats as multiple positives of the line's region.

One process (CPU; RapidOCR unless paddleocr is installed):
    python 02_extract_ocr.py --images DIR --work runs/demo
    python 02_extract_ocr.py --work runs/demo                    # reuse the image table 01 already built
torchrun, one node of 8 processes, then several nodes (each rank takes a share of the image chunks; the work
directory must be on a filesystem every node sees, rank 0 merges):
    torchrun --nproc_per_node=8 02_extract_ocr.py --images DIR --work runs/big
    torchrun --nnodes 4 --node_rank $R --nproc_per_node=8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        02_extract_ocr.py --images DIR --work runs/big
    sbatch --nodes 4 slurm/02_extract_ocr.sbatch --images DIR --work runs/big                # Slurm

Engines (`--engine`): `rapidocr` runs the PP-OCR detection and recognition models that ship in RapidOCR's wheel
(PP-OCRv6 small, multilingual) through onnxruntime, offline, on CPU, or on the rank's GPU through onnxruntime's
CUDA provider when `onnxruntime-gpu` is installed in place of `onnxruntime` (`--device auto` takes it, `cuda`
requires it); `--det-model`/`--rec-model` swap in other
ONNX files. `paddle` is PaddleOCR 3.x itself (the paper's tool; `pip install -r requirements-paddle.txt`), with
`--lang`, `--det-model-dir`, `--rec-model-dir`; it downloads its models on first use unless the two model folders
are given. `auto` (default) takes paddle when `paddleocr` is importable, else rapidocr. Both run detection +
recognition only (no text-line or page orientation models) and map to the same lines: (quad, text, score).
RapidOCR's detector upscales every image whose short side is under 736 px (its default), which is most of the
cost on 224-640 px web images: `--det-limit-side 64` about turns that off. On 20 synthetic 224-640 px images with
16-40 px words, on a 2-core CPU: 2.8 images/s by default, 7.5 with 64, reading 34 and 33 of the 35 lines exactly
(check on your own images before trading accuracy for speed). onnxruntime's threads help little on such small
images: on 400 224 px demo images with 64, one process read 11.6 images/s with 2 threads and 14.1 with 1, and
torchrun's two processes of one thread each 21.4 (identical lines), which is how `make demo` runs this stage.

Images: the image table in <work>/images/ (image_io.ensure_image_table; tar shards or loose files, as 01 takes
them) fixes the order; only rows with status ok are read (ImageTable.open: a loose file or one pread of a tar
member, EXIF-rotated RGB), the others get OCR status "skipped"; an ok row that fails to decode gets
"read_error" (the table reads headers only). Images whose long side is above --max-side are downscaled
(bicubic) for the engine and the boxes scaled back, so every box is in pixels of the upright original image.
An exception inside the engine is recorded as "engine_error" for that image. An image that RapidOCR's own
resizing would hand its detector at more than --max-engine-pixels (16.8M; very thin banners: a 2000 x 2 PNG
becomes 735,000 x 736 pixels, more than 20 GB) gets "too_thin" from its header size, before it is decoded. Decoding, EXIF rotation, the
downscale and the BGR conversion run in --workers DataLoader worker processes ahead of the engine
(chunk_engine.prefetched; -1: the process's share of the cores less one, at most 8), so the engine never waits on a
decode; the lines are the same bytes for any number of workers (tested).

Writes <work>/ocr/ (L = kept lines over all images):
    line_offsets.npy    int64 (n_images+1)  CSR: lines of image i are rows line_offsets[i]:line_offsets[i+1]
    boxes.npy           float32 (L, 4)      x0 y0 x1 y1, axis-aligned box of the line's quadrilateral
    scores.npy          float32 (L,)        recognition confidence, all > --min-score
    text_offsets.npy    int64 (L+1)         CSR over text_bytes: line k's UTF-8 text (stripped)
    text_bytes.npy      uint8
    token_offsets.npy   int64 (L+1)         CSR over tokens: line k's label ids
    tokens.npy          int32               unique token ids of the line, first-appearance order, at most M
    lines_found.npy     int32 (n_images)    lines the engine returned with non-empty text, before --min-score
    status.npy          uint8 (n_images)    OCR_STATUS below
    manifest.json       stage "ocr": config, engine, tokenizer, row and status counts (written last)
Labels: the CLIP BPE tokenizer that ships in open_clip (49,408 ids, offline), the line lower-cased and
cleaned as CLIP does, no start/end tokens; repeated ids count once (so do the losses); at most --max-tokens
(M = 10, RICE Tab. 5d) per line. A line whose text yields no token keeps its box with an empty label.
Every stage of the kit is resumable: rerun the same command after any interruption. The merged arrays are
byte-identical whatever the number of processes and interruptions (chunk_engine.run_chunks); chunk files left by a
run with another configuration are discarded, not mixed in.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402
import losses  # noqa: E402

# defaults -------------------------------------------------------------------------------------------------
WORK = "runs/demo"
ENGINE = "auto"             # auto | rapidocr | paddle
MIN_SCORE = 0.7             # RICE Sec. 3.1: keep lines with confidence > 0.7 (strictly greater)
MAX_SIDE = 1280             # longer image sides are downscaled to this for the engine (0: never)
MAX_TOKENS = losses.OCR_MAX_TOKENS   # M, token labels per line; RICE Tab. 5d: 10 is best
LANG = "en"                 # PaddleOCR recognition language (paddle engine only)
CHUNK_SIZE = 512            # images per resumable chunk: 780k chunk files at 400M images
MAX_ERRORS_SHOWN = 20       # per rank; the rest are only counted

OCR_STATUS = ["ok", "no_text", "skipped", "engine_error", "read_error", "too_thin"]
MAX_ENGINE_PIXELS = 1 << 24     # the detector's input (after the engine's own resizing) at most 16.8M pixels
# ok: >= 1 line kept; no_text: read and OCR'd, no line kept; skipped: not ok in the image table (never read);
# engine_error: the engine raised on this image; read_error: ok in the table but unreadable now


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    p.add_argument("--images", help=image_io.IMAGES_HELP)
    p.add_argument("--work", default=WORK)
    p.add_argument("--engine", default=ENGINE, choices=["auto", "rapidocr", "paddle"])
    p.add_argument("--det-model", help="rapidocr: detection ONNX file (default: the wheel's PP-OCR det model)")
    p.add_argument("--rec-model", help="rapidocr: recognition ONNX file (default: the wheel's PP-OCR rec model)")
    p.add_argument("--det-limit-side", type=int, help="rapidocr: the detector upscales images whose short side is "
                   "below this (its default: 736); 64 about turns that off: ~2.7x faster on 224-640 px images")
    p.add_argument("--lang", default=LANG, help="paddle: PaddleOCR language")
    p.add_argument("--det-model-dir", help="paddle: text detection model folder (default: PaddleOCR downloads)")
    p.add_argument("--rec-model-dir", help="paddle: text recognition model folder (default: PaddleOCR downloads)")
    p.add_argument("--max-pixels", type=int, help=image_io.MAX_PIXELS_HELP)
    p.add_argument("--device", default="auto", help="paddle: cpu, gpu:N, or auto (gpu:LOCAL_RANK when Paddle "
                   "has CUDA); rapidocr: auto (the CUDA provider when onnxruntime-gpu is installed), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="rapidocr: onnxruntime threads per process (0: all "
                                                          "cores, divided by the processes per node under torchrun)")
    p.add_argument("--min-score", type=float, default=MIN_SCORE, help="keep lines with score > this")
    p.add_argument("--max-side", type=int, default=MAX_SIDE, help="downscale larger images for the engine (0: off)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="M, token ids kept per line")
    p.add_argument("--max-engine-pixels", type=int, default=MAX_ENGINE_PIXELS, help="rapidocr: images its "
                   "detector would take at more pixels than this (after its own resizing) get status too_thin")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers that decode and resize ahead of "
                   "the engine (-1: the process's share of the cores, at most 8; 0: in this process)")
    p.add_argument("--force", action="store_true", help=workdir.FORCE_HELP)
    args = p.parse_args(argv)
    workdir.check_flags(args, {"det_limit_side": ">= 1", "max_pixels": ">= 1", "threads": ">= 0",
                               "min_score": "[0, 1)", "max_side": ">= 0", "max_tokens": ">= 1",
                               "max_engine_pixels": ">= 1", "chunk_size": ">= 1", "workers": ">= -1"})
    if args.workers < -1:
        p.error("--workers must be >= -1")
    if args.chunk_size < 1 or args.max_tokens < 1 or args.max_side < 0 or args.threads < 0:
        p.error("--chunk-size and --max-tokens must be >= 1, --max-side and --threads >= 0")
    if args.det_limit_side is not None and args.det_limit_side < 1:
        p.error("--det-limit-side must be >= 1")
    for flag in ("det_model", "rec_model", "det_model_dir", "rec_model_dir"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            p.error(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    if args.engine == "auto":
        args.engine = "paddle" if importlib.util.find_spec("paddleocr") else "rapidocr"
    if args.engine == "paddle" and not importlib.util.find_spec("paddleocr"):
        p.error("--engine paddle needs paddleocr: pip install -r requirements-paddle.txt")
    if args.engine == "rapidocr" and args.device not in ("auto", "cpu", "cuda"):
        p.error("--engine rapidocr takes --device auto, cpu or cuda (onnxruntime-gpu); gpu:N is for --engine paddle")
    return args


# engines: bgr uint8 (H, W, 3) -> [(quad (4, 2) or box (4,), text, score)] -----------------------------------


def rapidocr_engine(args):
    """RapidOCR 3.x: PP-OCR det + rec in onnxruntime; models from its wheel unless --det-model/--rec-model."""
    from rapidocr import RapidOCR
    rank_threads = args.threads
    if not rank_threads and workdir.dist_info()[1] > 1:
        # torchrun starts one process per slot: split the cores instead of each process taking all of them
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        rank_threads = max(1, len(os.sched_getaffinity(0)) // per_node)
    params = {"Global.log_level": "error",      # its per-image "no text found" warnings would flood the log
              "Global.text_score": 0.0,         # return every line: --min-score filters here, and is counted
              "Global.use_cls": False}          # like the paddle engine: no text-line orientation model
    if args.det_model:
        params["Det.model_path"] = args.det_model
    if args.rec_model:
        params["Rec.model_path"] = args.rec_model
    if args.det_limit_side:
        params["Det.limit_side_len"] = args.det_limit_side
    if rank_threads:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = rank_threads
    # onnxruntime-gpu (pip install onnxruntime-gpu in place of onnxruntime) brings the CUDA provider: det and
    # rec then run on this rank's GPU (--device auto or cuda); the CPU build has only the CPU provider
    import onnxruntime
    cuda = args.device in ("auto", "cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if args.device == "cuda" and not cuda:
        raise SystemExit("error: --device cuda: this onnxruntime has no CUDAExecutionProvider; install "
                         "onnxruntime-gpu instead of onnxruntime, or use --device cpu")
    if cuda:
        import torch
        params["EngineConfig.onnxruntime.use_cuda"] = True
        params["EngineConfig.onnxruntime.cuda_ep_cfg.device_id"] = \
            int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())
    given = [(flag, path) for flag, path in (("--det-model", args.det_model), ("--rec-model", args.rec_model)) if path]
    for flag, path in given:         # RapidOCR loads its models at the first image: a bad file stops here, once
        try:
            onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise SystemExit(f"error: {flag} {path}: not a loadable ONNX model ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:150]}); pass a PP-OCR {flag[2:5]} .onnx file, or "
                             "leave the flag out for the wheel's own") from None
    ocr = RapidOCR(params=params)
    try:                             # both models on a printed word: a det file given as rec, or the reverse
        ocr(warm_up_image())
    except Exception as e:
        names = " / ".join(f"{flag} {path}" for flag, path in given) or "the wheel's models"
        last = ([ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""])[-1]    # not the wrapped traceback
        raise SystemExit(f"error: RapidOCR with {names} fails on a printed word ({type(e).__name__}: "
                         f"{last[:150]}); pass PP-OCR det and rec .onnx files of the same version") from None
    det, rec = ocr.cfg.Det, ocr.cfg.Rec
    info = {"name": "rapidocr", "version": importlib.metadata.version("rapidocr"),
            "onnxruntime": importlib.metadata.version("onnxruntime"),
            "det": os.path.abspath(args.det_model) if args.det_model else
            f"wheel default {det.ocr_version.value} det {det.model_type.value}",
            "rec": os.path.abspath(args.rec_model) if args.rec_model else
            f"wheel default {rec.ocr_version.value} rec {rec.model_type.value}",
            "det_limit": f"{det.limit_type} {det.limit_side_len}", "textline_orientation": False,
            "provider": "CUDAExecutionProvider" if cuda else "CPUExecutionProvider",
            # how RapidOCR resizes before its detector (Global bounds, then Det's limit): det_input_pixels
            "resize": {"max_side": ocr.cfg.Global.max_side_len, "min_side": ocr.cfg.Global.min_side_len,
                       "limit_type": str(det.limit_type), "limit_side": det.limit_side_len}}

    def run(bgr):
        out = ocr(bgr)                          # a 3-channel ndarray is taken as BGR, like cv2.imread's
        txts = getattr(out, "txts", None)       # None when nothing was found (or detection only)
        if txts is None or getattr(out, "boxes", None) is None:
            return []
        return list(zip(out.boxes, txts, out.scores))
    return run, info


def warm_up_image():
    """A BGR array of a large printed word: the detector finds it, so both of RapidOCR's models run."""
    from PIL import Image, ImageDraw, ImageFont
    im = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(im).text((16, 16), "KIT 42", fill="black", font=ImageFont.load_default(size=56))
    return np.ascontiguousarray(np.asarray(im)[:, :, ::-1])


def paddle_engine(args):
    """PaddleOCR 3.x (`pip install -r requirements-paddle.txt`), the engine the paper used. Not exercised by the
    tests: paddlepaddle is not in the kit's environment. Written against the 3.x API: PaddleOCR(...).predict()
    yields results with rec_texts, rec_scores, rec_polys (pixels of the given array)."""
    import paddle
    from paddleocr import PaddleOCR
    device = args.device
    if device == "auto":
        n_gpu = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
        device = f"gpu:{int(os.environ.get('LOCAL_RANK', 0)) % n_gpu}" if n_gpu else "cpu"
    ocr = PaddleOCR(lang=args.lang, text_detection_model_dir=args.det_model_dir,
                    text_recognition_model_dir=args.rec_model_dir, use_doc_orientation_classify=False,
                    use_doc_unwarping=False, use_textline_orientation=False, device=device)
    info = {"name": "paddleocr", "version": importlib.metadata.version("paddleocr"),
            "paddlepaddle": paddle.__version__, "lang": args.lang, "device": device,
            "det": args.det_model_dir or "paddleocr default", "rec": args.rec_model_dir or "paddleocr default"}

    def run(bgr):
        lines = []
        for res in ocr.predict(bgr):            # ndarray input is BGR (PaddleX reads images with cv2)
            lines += zip(res["rec_polys"], res["rec_texts"], res["rec_scores"])
        return lines
    return run, info


def to_box(points, sx, sy, width, height):
    """Quad (4, 2) or box (4,) in engine pixels -> x0 y0 x1 y1 in original pixels, clipped to the image."""
    q = np.asarray(points, np.float64)
    q = q.reshape(-1, 2) if q.ndim == 2 else q.reshape(2, 2)
    x0, y0 = q.min(0)
    x1, y1 = q.max(0)
    return [min(max(x0 * sx, 0.0), width), min(max(y0 * sy, 0.0), height),
            min(max(x1 * sx, 0.0), width), min(max(y1 * sy, 0.0), height)]


def engine_input(image, max_side):
    """One RGB PIL image -> (BGR uint8 array for the engine, downscaled to max_side; sx, sy back to the
    original pixels; the original width and height). The CPU work of a line read: in a loader worker."""
    from PIL import Image
    w, h = image.size
    small = image
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        small = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(small)[:, :, ::-1]), w / small.width, h / small.height, w, h


def engine_lines(engine, bgr, sx, sy, w, h):
    """[(box x0y0x1y1 in original pixels, stripped text, score)] for every line with non-empty text, in the
    engine's order."""
    out = []
    for points, text, score in engine(bgr):
        text = str(text).strip()
        if text:
            out.append((to_box(points, sx, sy, w, h), text, float(score)))
    return out


def read_lines(engine, image, max_side):
    """Run the engine on one RGB PIL image (engine_input, then engine_lines)."""
    return engine_lines(engine, *engine_input(image, max_side))


def det_input_pixels(w: int, h: int, resize: dict | None) -> float:
    """The pixels RapidOCR's detector would get for a w x h input: its Global bounds (long side down to
    max_side, short side up to min_side), then Det's limit (limit_type min: the short side up to limit_side;
    max: the long side down to it). A 2000 x 2 banner becomes 735,000 x 736 (540M pixels, > 20 GB): such
    images get status too_thin instead of the engine. 0 when the engine's resizing is not known (paddle)."""
    if not resize:
        return 0.0
    w, h = float(w), float(h)
    if max(w, h) > resize["max_side"]:
        r = resize["max_side"] / max(w, h)
        w, h = w * r, h * r
    if min(w, h) < resize["min_side"]:
        r = resize["min_side"] / max(min(w, h), 1e-9)
        w, h = w * r, h * r
    L = resize["limit_side"]
    if (resize["limit_type"].endswith("min") and min(w, h) < L) or (resize["limit_type"].endswith("max")
                                                                      and max(w, h) > L):
        r = L / (min(w, h) if resize["limit_type"].endswith("min") else max(w, h))
        w, h = w * r, h * r
    return w * h


class PrepareOCR:
    """Decode (EXIF-rotated) and prepare one image for the engine, in a loader worker; an image the detector
    would take at more than max_engine_pixels (very thin ones: RapidOCR scales the short side up) gets
    too_thin, before any decode of its pixels."""

    def __init__(self, work, max_side, resize=None, max_engine_pixels=MAX_ENGINE_PIXELS):
        self.work, self.max_side, self._table = work, max_side, None
        self.resize, self.max_engine_pixels = resize, max_engine_pixels

    def __getstate__(self):                    # workers open their own memmaps
        return {**self.__dict__, "_table": None}

    def __call__(self, i):
        try:
            if self._table is None:
                self._table = image_io.read_image_table(self.work)
            table = self._table
            if table.status[i] != image_io.OK:
                return {"status": "skipped"}
            w, h = (int(v) for v in table.size[i])              # the upright size, from the header
            if self.max_side and max(w, h) > self.max_side:
                r = self.max_side / max(w, h)
                w, h = max(1, round(w * r)), max(1, round(h * r))
            if det_input_pixels(w, h, self.resize) > self.max_engine_pixels:
                return {"status": "too_thin"}
            image, _ = table.open(i)
            if image is None:                  # the table reads headers only: decoding can still fail
                return {"status": "read_error"}
            if i % 256 == 0:
                table.release()                # resident memory stays flat over a 400M-row table
            return {"status": "ok", "input": engine_input(image, self.max_side), "path": table.path(i)}
        except SystemExit as e:                # a failing filesystem: the main process stops with the line
            return {"status": "stop", "message": str(e)}
        except Exception as e:
            return {"status": "engine_error", "message": f"{type(e).__name__}: {e}", "path": str(i)}


# labels ----------------------------------------------------------------------------------------------------


# main ------------------------------------------------------------------------------------------------------


# the flags that change no byte of the output (--images: the image table checks it; --engine auto: the
# engine it resolves to is in the manifest)
NOT_IN_OUTPUT = ("images", "work", "device", "threads", "chunk_size", "workers", "force", "engine")


def chunk_key(args, engine_info, tokenizer, table_fingerprint):
    """What the chunk files depend on: chunks left by a run with another key are discarded, not mixed in."""
    return {"engine": engine_info, "min_score": args.min_score,
            "max_side": args.max_side, "max_tokens": args.max_tokens, "tokenizer": tokenizer.name,
            "image_table": table_fingerprint, "max_engine_pixels": args.max_engine_pixels}


@workdir.stage_main
def main(argv=None):
    args = parse_args(argv)
    workdir.check_folder_flag(args.work)
    rank, world = workdir.init_dist()
    folder = os.path.join(args.work, "ocr")
    done = workdir.begin_stage(folder, args, [k for k in vars(args) if k not in NOT_IN_OUTPUT], "OCR lines",
                               "02_extract_ocr.py", " (then 04 with --force)", changed=lambda d: engine_changed(d, args))
    if done:
        image_io.ensure_image_table(args.work, args.images, args.max_pixels)     # the same images, if named
        workdir.say(f"{folder} is complete ({done['rows']['lines']} lines on {done['rows']['images']} images, "
                    f"engine {done['engine']['name']}); --force redoes it")
        return done
    table = image_io.ensure_image_table(args.work, args.images, args.max_pixels)
    t_start = time.time()
    engine, engine_info = (paddle_engine if args.engine == "paddle" else rapidocr_engine)(args)
    tokenizer = losses.ClipTokens(args.max_tokens)
    fingerprint = workdir.read_manifest(os.path.join(args.work, "images"))["fingerprint"]
    key = {**chunk_key(args, engine_info, tokenizer, fingerprint), "max_pixels": table.max_pixels}
    t_ready = time.time()
    read_lines = OcrChunk(engine, tokenizer, table, args, engine_info.get("resize"), rank)
    num_chunks, done_before = chunk_engine.run_chunks(folder, len(table), args.chunk_size, read_lines, "ocr", key)
    rows = chunk_engine.merge_chunks(folder, num_chunks, ["status", "lines_found"],
                                     {"boxes": "line_counts", "scores": "line_counts",
                                      "text_bytes": "text_counts", "tokens": "token_counts"})
    manifest = None
    if rank == 0:
        manifest = workdir.finish_stage(folder, ocr_manifest(folder, args, rows, engine_info, tokenizer, table,
                                                             fingerprint, key))
        summarize(manifest, workdir.load(folder, "status"), workdir.load(folder, "lines_found"),
                  workdir.load(folder, "line_offsets"), table, num_chunks, done_before, args.chunk_size,
                  t_ready - t_start, time.time() - t_ready)
    workdir.barrier()
    return manifest


def engine_changed(done, args) -> list[str]:
    """--engine named explicitly and another engine made the finished lines (auto resolves to either)."""
    made = done["engine"]["name"]
    return [f"--engine {made} -> {args.engine}"] if args.engine != "auto" and not made.startswith(args.engine) else []


class OcrChunk:
    """Rows [start, end) of the image table -> the chunk's arrays (chunk_engine.run_chunks): loader workers
    decode and resize ahead (PrepareOCR), the engine reads the lines here, each kept line (score > --min-score,
    RICE Sec. 3.1) gets its CLIP-BPE token labels. An image the engine fails on is an engine_error; a failing
    GPU is not the image's: the process stops and the next run redoes the chunk."""

    def __init__(self, engine, tokenizer, table, args, resize, rank):
        self.engine, self.tokenizer, self.table, self.args, self.rank = engine, tokenizer, table, args, rank
        self.prepare = PrepareOCR(args.work, args.max_side, resize, args.max_engine_pixels)
        self.workers = chunk_engine.loader_workers(args.workers)
        self.errors_shown = 0

    def __call__(self, start, end):
        n = end - start
        status, line_counts, found = np.zeros(n, np.uint8), np.zeros(n, np.int64), np.zeros(n, np.int32)
        boxes, scores, texts, tokens = [], [], [], []
        for j, item in enumerate(chunk_engine.prefetched(start, end, self.prepare, self.workers)):
            if item["status"] == "stop":
                raise SystemExit(item["message"])
            if item["status"] in ("skipped", "read_error", "too_thin"):
                status[j] = OCR_STATUS.index(item["status"])
                continue
            lines = self.lines(item)
            if lines is None:
                status[j] = OCR_STATUS.index("engine_error")
                continue
            found[j] = len(lines)
            kept = [line for line in lines if line[2] > self.args.min_score]     # RICE: confidence > 0.7
            line_counts[j] = len(kept)
            status[j] = OCR_STATUS.index("ok" if kept else "no_text")
            for box, text, score in kept:
                boxes.append(box)
                scores.append(score)
                texts.append(text)
                tokens.append(self.tokenizer(text))
        self.table.release()                    # resident memory stays flat over a 400M-row table
        text_offsets, text_bytes = workdir.pack_strings(texts)
        return {"status": status, "lines_found": found, "line_counts": line_counts,
                "boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
                "text_counts": np.diff(text_offsets), "text_bytes": text_bytes,
                "token_counts": np.array([len(t) for t in tokens], np.int64),
                "tokens": np.array([t for ts in tokens for t in ts], np.int32)}

    def lines(self, item):
        """The engine's (box, text, score) lines of one prepared image; None: an engine error (recorded)."""
        try:
            if item["status"] != "ok":
                raise RuntimeError(item["message"])
            return engine_lines(self.engine, *item["input"])
        except Exception as e:                  # one bad image must not stop a long run: record it
            if any(w in str(e) for w in ("CUDA", "cudaError", "out of memory", "ResourceExhausted")):
                raise SystemExit(f"error: [rank {self.rank}] {type(e).__name__}: {str(e)[:300]}; this process stops "
                                 "and its unfinished chunk is redone by the next run") from None
            self.errors_shown += 1
            if self.errors_shown <= MAX_ERRORS_SHOWN:
                print(f"[rank {self.rank}] engine error on {item['path']}: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
            return None


def ocr_manifest(folder, args, rows, engine_info, tokenizer, table, fingerprint, key) -> dict:
    """(rank 0) The manifest of the merged arrays: settings, engine, tokenizer, row and status counts (the
    arrays read in blocks, so memory stays flat at any scale)."""
    status, found = workdir.load(folder, "status"), workdir.load(folder, "lines_found")
    token_offsets = workdir.load(folder, "token_offsets")
    lines_found = int(sum(int(np.asarray(found[s: s + (1 << 24)], np.int64).sum())
                          for s in range(0, len(found), 1 << 24)))
    lines = rows["boxes"]
    return {"stage": "ocr", "config": {k: v for k, v in vars(args).items() if k != "force"}, "engine": engine_info,
            "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                          "max_tokens": args.max_tokens, "start_end_tokens": False, "unique": True},
            "min_score": args.min_score,
            "rows": {"images": len(table), "lines": lines, "text_bytes": rows["text_bytes"], "tokens": rows["tokens"]},
            "lines_found": lines_found, "lines_dropped_score": lines_found - lines,
            "lines_without_tokens": sum(int((np.diff(np.asarray(token_offsets[k: k + (1 << 24) + 1])) == 0).sum())
                                        for k in range(0, len(token_offsets) - 1, 1 << 24)),
            "image_table": fingerprint, "settings": key, "status_names": OCR_STATUS,
            "status_counts": workdir.count_values(status, OCR_STATUS)}


def summarize(m, status, found, line_offsets, table, num_chunks, done_before, chunk_size, setup_s, elapsed,
              block=1 << 22):
    """Print the stage's summary, reading the per-image arrays in blocks (memory flat at any scale)."""
    ok_or_none = [OCR_STATUS.index("ok"), OCR_STATUS.index("no_text")]
    n_read = with_text = total = most = new_ok = 0
    hist = np.zeros(1025, np.int64)             # lines per image, the last bin holds 1024 and more: the median
    for s in range(0, len(status), block):
        e = min(s + block, len(status))
        per_image = np.diff(np.asarray(line_offsets[s: e + 1]))
        read = np.isin(np.asarray(status[s:e]), ok_or_none)
        k = per_image[read]
        n_read, with_text, total = n_read + len(k), with_text + int((k > 0).sum()), total + int(k.sum())
        most = max(most, int(k.max()) if len(k) else 0)
        hist += np.bincount(np.minimum(k, 1024), minlength=1025)
        # images OCR'd by this run: ok rows of the table in chunks that were not on disk before it
        chunks = np.arange(s, e) // chunk_size
        new = ~np.isin(chunks, np.fromiter(done_before, np.int64, len(done_before)))
        new_ok += int((new & (np.asarray(table.status[s:e]) == image_io.OK)).sum())
    lines, lines_found = m["rows"]["lines"], m["lines_found"]
    print("ocr: images by status: " + workdir.counts_line(m["status_counts"]), flush=True)
    print(f"ocr: lines found {lines_found}, kept {lines} (score > {m['min_score']}), dropped "
          f"{lines_found - lines} by score; {m['rows']['tokens']} token labels "
          f"({m['rows']['tokens'] / max(lines, 1):.1f} per line, {m['lines_without_tokens']} lines without)",
          flush=True)
    if n_read:
        median = int(np.searchsorted(np.cumsum(hist), (n_read + 1) // 2))
        print(f"ocr: lines per OCR'd image: mean {total / n_read:.2f}, median {median}, max {most}; images with "
              f"text {with_text / n_read:.1%}", flush=True)
    resumed = f" ({len(done_before)} of {num_chunks} chunks were done before)" if done_before else ""
    print(f"ocr: engine {m['engine']['name']} ready in {setup_s:.1f} s; {new_ok} images read in {elapsed:.1f} s, "
          f"{new_ok / max(elapsed, 1e-9):.2f} images/s over all processes{resumed}", flush=True)
    if m["status_counts"]["engine_error"] or m["status_counts"]["read_error"]:
        print(f"warning: {m['status_counts']['engine_error']} engine errors, {m['status_counts']['read_error']} "
              "read errors (see the log above)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
