r"""Stage 05: probes on frozen features, one protocol for every encoder: linear probes and k-NN on image, object
and text-region features, a dense patch probe, and a t-SNE of region features as in the papers' figures.

One process (GPU if there is one, else CPU):
    python 05_eval.py --images runs/demo/eval_data/images --coco runs/demo/eval_data/coco.json \
        --masks runs/demo/eval_data/masks \
        --encoder trained=runs/demo/train/ckpt/latest.pt --encoder random=random:runs/demo/train/ckpt/latest.pt
    python 05_eval.py --images /data/coco/val2017 --coco /data/coco/annotations/instances_val2017.json \
        --encoder rice=/models/rice-vit-large-patch14-560 --encoder clip=openclip:ViT-L-14-336:openai
    python 05_eval.py --image-folder /data/imagenet-subset --encoder rice=/models/rice-vit-large-patch14-560
torchrun (feature extraction is sharded over the ranks; rank 0 merges and runs the probes):
    torchrun --nproc_per_node=8 05_eval.py --images ... --coco ... --encoder ...
    sbatch --nodes 2 slurm/05_eval.sbatch --images ... --coco ... --encoder ...              # Slurm

Encoders (`--encoder NAME=SPEC`, repeatable; a bare SPEC gets a name derived from it):
    path/to/ckpt.pt              a kit checkpoint (04's training checkpoints, model.encoder_checkpoint files)
    path/to/hf_dir               a Hugging Face folder (config.json + safetensors): MLCDVisionModel (RICE, MLCD
                                 bigG), CLIPVisionModel (MLCD L/14-336, B/32), a CLIPModel's vision tower
    random:<ckpt or hf_dir>      the same architecture at random initialisation (torch.manual_seed(--seed))
    openclip:<arch>:<pretrained> an open_clip model; <pretrained> is a tag, a local weights file, or `none`
                                 (`--clip-config` registers a model-config JSON, as in 01)
Kit / HF encoders: image feature = class_embedding (ln_post(CLS), then the loss head if the checkpoint has
one), patch tokens = patch_tokens (the last hidden state, row-major over the grid), region feature = the
RICE region path's region_embeddings for the box (only when region_blocks > 0). open_clip: image feature =
the image tower's pooled, projected output; patch tokens = its ln_post'ed patch tokens (output_tokens).

Input: each encoder's own preprocessing (Preprocess; the report says which, per encoder): kit checkpoints the
kit's (short side to --image-size, bicubic, centre square, CLIP's mean and std: image_io.resize_crop +
normalize, as 04 trains); HF folders what their preprocessor_config.json says (mean, std, resampling, centre
crop or not); open_clip models their own transform (resize mode, interpolation, mean and std of their config).
The boxes and the masks take the same geometry. --image-size defaults to the kit encoder's image_size;
open_clip models always run at their configured size (their position embeddings are fixed). Unreadable images get a
status (as in the image table) and are left out of every probe; they never stop a run.

Data: --images DIR + --coco FILE (COCO detection; file_name relative to --images), or --images as tar shards
(as 01 takes them: a brace pattern, a glob, a folder of .tar files, a list file). Every input, --image-folder
too, is read through an image table built in <out>/images/ (image_io.ensure_image_table, as every stage reads
images), file_name matching a loose file's path under the folder, or the image member's name in its shard (or
its key). Annotations of the category
named --text-category ("text") are text boxes, with the word in their "text" field; the others are objects
(iscrowd boxes are groups, not objects: left out of the probes).
Optional --masks DIR: per image a uint8 PNG of the same name, 0 = background, k = the image's k-th annotation
in the COCO file's order (00_make_demo_data.py writes these). Or --image-folder ROOT: one class per
sub-folder, image-level probe only. The images are split into probe-train and probe-test by --seed
(--test-fraction 0.3), and a validation part (--val-fraction 0.2 of probe-train) is carved from probe-train
for the regularisation search; the split depends only on the image list, so every encoder gets the same one.

Probes (frozen features, each L2-normalised):
    image      label = category of the image's largest object annotation (images without objects are left
               out), or the --image-folder class; linear probe and k-NN, top-1 accuracy
    contents   what MLCD's multi-label image labels are about, on every readable image: the set of object
               classes present, a multi-label linear probe (one BCE output per class seen in probe-train, C
               searched on validation mAP) -> mAP (sklearn's average precision, macro over the classes present
               in probe-test; baseline: a constant score, whose AP is the class's prevalence); the same for
               every string field of the categories that varies (COCO's supercategory; the demo's shape,
               colour, texture); and the number of objects in the image, a linear probe, top-1 accuracy
    objects    object boxes, two feature kinds: "region" (the region path; kit/HF encoders with region_blocks
               > 0) and "pooled" (the mean of the patch tokens whose centre lies in the box, else the patch
               holding the box centre: model.box_patch_mask's rule, for every encoder alike); linear probe
               and k-NN over the object classes; and a linear probe (and k-NN) per string field of the
               categories that varies, its values as the classes ("obj linear (region, shape)": which factor
               of a class the region features carry). Boxes with less than --min-visible (0.5) of their area
               inside the centre crop are left out (counted).
    ocr        text boxes, the same two kinds: labels = the word's CLIP BPE token ids exactly as 02 makes them
               (unique, at most --max-tokens 10); a multi-label linear probe (one BCE output per token id seen
               in probe-train) -> recall@5 (share of a box's token ids among its 5 highest scores, averaged
               over probe-test boxes), and word k-NN accuracy (exact word, case-insensitive)
    dense      (with --masks) the semantic class of each patch = the majority of its pixels' classes after the
               same resize and crop (background and text are classes too); a linear classifier on the patch
               tokens -> mIoU over the classes present in the probe-test patches, and patch accuracy
Linear probes follow CLIP's protocol (Radford et al. 2021, App. A.3): L2-regularised logistic regression
(sklearn's objective 0.5 |W|^2 + C sum(loss), full-batch L-BFGS in torch from zero, stopped as sklearn stops
at a max-abs gradient of 1e-4, at most --probe-iters 1000 iterations) fitted on probe-train minus validation
for C in 10^-2 .. 10^6 (one per decade), then --c-refine rounds of a halving step around the best validation
score, then refitted on all of probe-train with the best C (the smallest C among ties) and scored once on
probe-test. The dense probe trains on a seeded subsample of --dense-max-patches (5,000) probe-train patches
and keeps the searched model (no refit): full-batch fits over every patch are what costs on a CPU. k-NN:
cosine similarity, the --knn-k (10) nearest probe-train samples vote with weight exp(cos / --knn-temperature)
(DINO's weighted k-NN). Each probe also reports the majority-class (OCR: most frequent tokens) baseline.
The probes themselves are probes.py: functions of arrays and a ProbeSettings, no file I/O; this script reads
the data, builds the encoders, extracts the features, draws the t-SNE and writes the report.

Writes --out (default runs/demo/eval):
    report.json          per encoder and probe: metrics, counts, settings, C search, timings; data counts
    report.md            a Markdown table, one row per encoder (also printed at the end)
    tsne_<encoder>.png   t-SNE of the probe-test objects' region features ("pooled" without a region path),
                         coloured by class, or, with more than --tsne-max-colours classes, one panel per
                         category field (the demo's shape, colour, texture); at most --tsne-max points
    features/<encoder>/  the extracted features (resumable chunks, then merged .npy and a manifest): a rerun
                         with the same encoder, data and settings reuses them (keyed by content: weights
                         that changed are extracted again), and when the report too was made from them with
                         the same settings it is only printed again. A finished report made with other probe
                         settings is refused, naming the changed flags: --force replaces it (the features
                         are still reused where their key matches; delete features/<encoder>/ to recompute)
Feature arrays: image_features (n, D) float32, ann_offsets (CSR over the COCO annotations of each image, in
file order; zero rows for unreadable images), pooled / region (A, D) float32, with --masks patch_offsets,
dense_tokens (fp16) and dense_labels (category id, 0 background, -1 unknown). Memory for the dense probe:
images x patches x width x 2 bytes (400 demo images at 112 px: 10 MB; 5,000 images at 560 px, ViT-L: 16 GB).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probes  # noqa: E402
import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402
import losses  # noqa: E402

# defaults -------------------------------------------------------------------------------------------------
OUT = "runs/demo/eval"
TEST_FRACTION = 0.3          # share of the images in probe-test
VAL_FRACTION = 0.2           # share of probe-train held out for the regularisation search
SEED = 0
BATCH_SIZE = 32
CHUNK_SIZE = 256             # images per resumable chunk of feature extraction
MIN_VISIBLE = 0.5            # boxes with less of their area inside the centre crop are left out
MAX_TOKENS = losses.OCR_MAX_TOKENS   # as 02 labels a line: unique CLIP BPE ids per word, at most M = 10
TSNE_MAX = 2000
TSNE_MAX_COLOURS = 20
TEXT_CATEGORY = "text"
PROBES = ("image", "contents", "objects", "ocr", "dense", "attentive")
NOT_IN_REPORT = ("force", "out", "device", "batch_size", "chunk_size")     # flags that change no reported number

EVAL_STATUS = ["ok", "not_image", "truncated", "unreadable", "empty_file", "too_large", "missing", "error",
               "outside_root"]
MASK_STATUS = ["ok", "missing", "unreadable", "wrong_size", "none"]
GENERIC_NAMES = {"latest", "last", "final", "best", "model", "checkpoint", "ckpt", "checkpoints", "export"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    p.add_argument("--encoder", action="append", default=[], metavar="NAME=SPEC",
                   help="repeatable: a kit .pt, an HF folder, random:<ckpt|dir>, openclip:<arch>:<pretrained>")
    p.add_argument("--images", help="image folder (COCO file_name entries are relative to it), or tar shards "
                                    "(a pattern, a folder of .tar, a list): file_name is the member's name")
    p.add_argument("--coco", help="COCO detection JSON with the boxes and categories")
    p.add_argument("--masks", help="folder of per-image mask PNGs: instance ids (00_make_demo_data.py's masks/, with "
                   "--coco) or class indices (--mask-format classes: ADE20K, VOC SegmentationClass)")
    p.add_argument("--mask-format", default="instances", choices=["instances", "classes"],
                   help="instances: k = the image's k-th COCO annotation; classes: each pixel its class index (then "
                   "--coco may be left out: the dense probe only)")
    p.add_argument("--mask-ignore", default="255", help="classes: comma-separated pixel values that are no class "
                   "(VOC's 255 boundary; ADE20K: 0,255, its 0 being 'other')")
    p.add_argument("--image-folder", help="instead of --images/--coco: ROOT/<class>/<image> (image probe only)")
    p.add_argument("--text-category", default=TEXT_CATEGORY, help="COCO category name of the text boxes")
    p.add_argument("--out", default=OUT)
    p.add_argument("--image-size", type=int, help="input size for kit / HF encoders (default: their image_size)")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    p.add_argument("--seed", type=int, default=SEED, help="the split, random: encoders, subsamples, t-SNE")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--workers", type=int, default=-1, help="--suite: DataLoader workers that decode and preprocess "
                   "the datasets' images ahead of the encoder (-1: the process's share of the cores, at most 8; 0: "
                   "in this process)")
    p.add_argument("--knn-k", type=int, default=probes.KNN_K)
    p.add_argument("--knn-temperature", type=float, default=probes.KNN_TEMPERATURE)
    p.add_argument("--c-refine", type=int, default=probes.C_REFINE, help="halving rounds of the C search")
    p.add_argument("--probe-iters", type=int, default=probes.PROBE_ITERS, help="L-BFGS iterations per fit")
    p.add_argument("--min-visible", type=float, default=MIN_VISIBLE)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--dense-max-patches", type=int, default=probes.DENSE_MAX_PATCHES)
    p.add_argument("--tsne-max", type=int, default=TSNE_MAX, help="t-SNE points (0: no t-SNE figure)")
    p.add_argument("--tsne-max-colours", type=int, default=TSNE_MAX_COLOURS)
    p.add_argument("--tsne-color-by", default="auto", help="auto, class, or one category field such as shape")
    p.add_argument("--clip-config", help="extra open_clip model-config JSON (file or folder) to register")
    p.add_argument("--max-pixels", type=int, help=image_io.MAX_PIXELS_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="encoder forward precision (auto: bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--probes", default=",".join(PROBES[:-1]), help=f"comma-separated subset of {','.join(PROBES)} "
                   "(image: the largest object's class; contents: the classes and category fields present, "
                   "multi-label mAP, and the object count; objects / ocr: box probes and the t-SNE; dense: patches; "
                   "attentive: the image labels from the frozen patch tokens through probes.attentive_probe, "
                   "which stores every image's tokens with its features)")
    p.add_argument("--force", action="store_true", help="replace a finished report made with other settings")
    p.add_argument("--suite", choices=["mlcd-linear"], help="MLCD Tab. 1's linear-probe suite on the datasets "
                   "under --data-root, in torchvision's layouts (instead of --images / --image-folder)")
    p.add_argument("--data-root", help="--suite: the folder holding the datasets as torchvision downloads them")
    p.add_argument("--datasets", help="--suite: a comma-separated subset of the Tab. 1 columns (default: all)")
    args = p.parse_args(argv)
    workdir.check_flags(args, {"image_size": "[1, 4096]", "test_fraction": "(0, 1)", "val_fraction": "(0, 1)",
                               "seed": ">= 0", "batch_size": ">= 1", "chunk_size": ">= 1", "knn_k": ">= 1",
                               "knn_temperature": "> 0", "c_refine": ">= 0", "probe_iters": ">= 1",
                               "min_visible": "[0, 1]", "max_tokens": ">= 1", "dense_max_patches": ">= 1",
                               "tsne_max": ">= 0", "tsne_max_colours": ">= 1", "max_pixels": ">= 1"})
    args.probes = [s.strip() for s in args.probes.split(",") if s.strip()]
    unknown = sorted(set(args.probes) - set(PROBES))
    if unknown or not args.probes:
        raise SystemExit(f"error: --probes {','.join(args.probes)}: choose a non-empty subset of {','.join(PROBES)}")
    if not args.encoder:
        raise SystemExit("error: pass at least one --encoder NAME=SPEC (a kit .pt, an HF folder, random:<...>, "
                         "openclip:<arch>:<pretrained>)")
    if args.suite:
        if not args.data_root or not os.path.isdir(args.data_root):
            raise SystemExit(f"error: --suite {args.suite} needs --data-root, a folder holding the datasets "
                             f"(got {args.data_root!r})")
        import eval_suite
        args.datasets = [d.strip() for d in (args.datasets or ",".join(eval_suite.BY_NAME)).split(",") if d.strip()]
        unknown = [d for d in args.datasets if d not in eval_suite.BY_NAME]
        if unknown or not args.datasets:
            raise SystemExit(f"error: --datasets {','.join(unknown)}: choose among {','.join(eval_suite.BY_NAME)}")
    elif args.image_folder:
        if args.coco or args.masks:
            raise SystemExit("error: --image-folder replaces --images/--coco/--masks; pass one or the other")
    elif args.mask_format == "classes" and args.images and args.masks and not args.coco:
        args.probes = ["dense"]                   # class-index masks alone: a semantic segmentation set
    elif not (args.images and args.coco):
        raise SystemExit("error: pass --images DIR and --coco FILE (or --image-folder ROOT, or --images with "
                         "--masks and --mask-format classes)")
    try:
        args.mask_ignore = sorted({int(v) for v in args.mask_ignore.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"error: --mask-ignore {args.mask_ignore}: comma-separated pixel values 0..255") from None
    if any(not 0 <= v <= 255 for v in args.mask_ignore):
        raise SystemExit(f"error: --mask-ignore {args.mask_ignore}: pixel values are 0..255")
    for flag in ("image_folder", "masks"):
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {path}: no such folder")
    if args.images and not os.path.isdir(args.images):
        image_io.resolve_source(args.images)        # tar shards (a pattern, a .tar, a list); else one clear line
    if args.coco and not os.path.isfile(args.coco):
        raise SystemExit(f"error: --coco {args.coco}: no such file")
    if args.clip_config and not os.path.exists(args.clip_config):
        raise SystemExit(f"error: --clip-config {args.clip_config}: no such file or folder")
    return args


# ----------------------------------------------------------------------------------------------------------
# data


@dataclass
class Data:
    root: str
    files: list                 # image paths relative to root, item order
    ann_offsets: np.ndarray     # CSR: annotations of item i are rows ann_offsets[i]:ann_offsets[i+1]
    boxes: np.ndarray           # float32 (A, 4) x0 y0 x1 y1, original pixels
    category: np.ndarray        # int64 (A,) COCO category id
    is_text: np.ndarray         # bool (A,)
    words: list                 # str or None per annotation (text boxes)
    area: np.ndarray            # float64 (A,)
    crowd: np.ndarray           # bool (A,): COCO iscrowd boxes (groups, not objects): left out of the probes
    image_label: np.ndarray     # int64 (n,): category id of the largest object / folder class index, -1 none
    class_names: dict           # label id -> name
    categories: dict            # category id -> COCO category dict
    masks: str | None
    fingerprint: str
    source: dict
    mask_format: str = "instances"     # --mask-format: instance ids (with the COCO file) or class indices
    mask_ignore: tuple = ()            # classes: pixel values that are no class (--mask-ignore)
    table: object = None        # the image table in <out>/images (attach_table; rows: its row per item)
    rows: np.ndarray | None = None
    split: np.ndarray | None = None     # int8 (n,): 0 probe-train, 1 its validation part, 2 probe-test (load_eval_data)


def attach_table(data: Data, images: str, out: str, max_pixels: int | None = None, force: bool = False) -> Data:
    """Every 05 input goes through the image table, as in the other stages: build (or reuse) it in <out>/images
    from --images or --image-folder (loose files or tar shards) and match each file_name to a row: its path
    relative to the folder, or in shards the image member's name, its key, or <shard>/<member> relative to
    the shards' folder. A file_name that leaves the folder (absolute, ../) is not read: status outside_root. An
    evaluation set is small, so the name map is held in memory. --force rebuilds a table made from other
    images."""
    folder = os.path.join(out, "images")
    m = workdir.read_manifest(folder)
    if force and m and m.get("source") != os.path.abspath(images):
        shutil.rmtree(folder)
    table = image_io.ensure_image_table(out, images, max_pixels)
    by_name = {}
    for r in range(len(table)):
        name = table.name(r)
        for k in (name, os.path.splitext(name)[0], os.path.relpath(table.path(r), table.root)):
            by_name.setdefault(k, r)
    outside = [os.path.isabs(f) or image_io.escapes(f) for f in data.files]
    data.rows = np.array([-2 if out_ else by_name.get(f, by_name.get(os.path.splitext(f)[0], -1))
                          for f, out_ in zip(data.files, outside)], np.int64)
    data.table = table
    table_fp = workdir.read_manifest(folder)["fingerprint"]
    data.fingerprint = hashlib.sha1(f"{data.fingerprint}\0{table_fp}".encode()).hexdigest()
    missing = int((data.rows == -1).sum())
    if missing:
        workdir.say(f"warning: {missing} of the annotated images are not in {images}: status missing")
    return data


def read_coco(images: str, coco_path: str, masks: str | None, text_category: str) -> Data:
    try:
        return _read_coco(images, coco_path, masks, text_category)
    except (KeyError, TypeError, AttributeError, ValueError) as e:    # a record without its fields
        raise SystemExit(f"error: --coco {coco_path}: not a COCO detection file ({type(e).__name__}: "
                         f"{str(e)[:100]})") from None


def text_json_as_coco(t: dict, text_category: str = TEXT_CATEGORY) -> dict:
    """COCO-Text v2 (cocotext.v2.json) or TextOCR (TextOCR_0.1_*.json): {"imgs": {id: image}, "anns": {id:
    {"image_id", "bbox" x y w h, "utf8_string", ...}}} -> a COCO detection dict whose words are text boxes
    (category `text_category`, the word in "text"). Illegible words carry no text: COCO-Text's legibility
    "illegible" and TextOCR's "." are boxes without a word, which the OCR probe leaves out (counted)."""
    images = [{"id": str(k), "file_name": im["file_name"], "width": im.get("width"), "height": im.get("height")}
              for k, im in t["imgs"].items()]
    annotations = []
    for k, a in t["anns"].items():
        word = a.get("utf8_string")
        legible = a.get("legibility", "legible") == "legible" and word not in (None, "", ".")
        annotations.append({"id": str(k), "image_id": str(a["image_id"]), "category_id": 1, "bbox": a["bbox"],
                            "area": a.get("area"), **({"text": word} if legible else {})})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": text_category}]}


def _read_coco(images: str, coco_path: str, masks: str | None, text_category: str) -> Data:
    try:
        with open(coco_path, "rb") as f:
            coco = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --coco {coco_path}: not readable JSON ({e})") from None
    if isinstance(coco, dict) and "imgs" in coco and "anns" in coco:     # COCO-Text v2 or TextOCR
        coco = text_json_as_coco(coco, text_category)
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise SystemExit(f"error: --coco {coco_path} is not a COCO detection file (needs images, annotations, "
                         "categories)")
    if not coco["images"]:
        raise SystemExit(f"error: --coco {coco_path} lists no images")
    categories = {c["id"]: c for c in coco["categories"]}
    text_ids = {c["id"] for c in coco["categories"] if c.get("name") == text_category}
    if not text_ids and text_category != TEXT_CATEGORY:       # a name the user typed: say it matched nothing
        names = sorted({str(c.get("name")) for c in coco["categories"]})
        raise SystemExit(f"error: --text-category {text_category}: no category of that name in {coco_path} "
                         f"(it has {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    by_image = {}
    for a in coco["annotations"]:                 # file order within each image: the masks' instance ids
        by_image.setdefault(a["image_id"], []).append(a)
    files, counts, boxes, cats, words, areas, crowd, labels = [], [], [], [], [], [], [], []
    for im in coco["images"]:
        files.append(im["file_name"])
        anns = by_image.get(im["id"], [])
        counts.append(len(anns))
        best, best_area = -1, -1.0
        for a in anns:
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes.append([x, y, x + w, y + h])
            cats.append(a["category_id"])
            text = a["category_id"] in text_ids
            words.append(str(a.get("text")) if text and a.get("text") else None)
            area = float(a.get("area") or w * h)
            areas.append(area)
            crowd.append(bool(a.get("iscrowd", 0)))
            if not text and not crowd[-1] and area > best_area:
                best, best_area = a["category_id"], area
        labels.append(best)
    unknown = sorted({c for c in cats if c not in categories})
    if unknown:
        raise SystemExit(f"error: --coco {coco_path}: annotations use category ids {unknown[:5]} that are not in "
                         "its categories")
    fp = hashlib.sha1(f"{os.path.abspath(images)}\0{workdir.content_digest(coco_path)}\0"
                      f"{os.path.abspath(masks or '')}".encode())
    return Data(root=os.path.abspath(images), files=files, ann_offsets=workdir.offsets_from_counts(counts),
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4), category=np.asarray(cats, np.int64),
                is_text=np.array([c in text_ids for c in cats], bool), words=words,
                area=np.asarray(areas, np.float64), crowd=np.asarray(crowd, bool),
                image_label=np.asarray(labels, np.int64),
                class_names={i: c.get("name", str(i)) for i, c in categories.items()}, categories=categories,
                masks=masks, fingerprint=fp.hexdigest(),
                source={"images": os.path.abspath(images), "coco": os.path.abspath(coco_path),
                        "masks": os.path.abspath(masks) if masks else None})


def read_segmentation_folder(images: str, masks: str) -> Data:
    """--images with --masks of class indices and no COCO file (ADE20K's images/ and annotations/, VOC's
    JPEGImages/ and SegmentationClass/): every image with a mask of the same stem, for the dense probe."""
    root_abs, paths = image_io.list_inputs(images)
    stems = {os.path.splitext(os.path.relpath(os.path.join(d, f), masks))[0]
             for d, _, fs in os.walk(masks) for f in fs if f.lower().endswith(".png")}
    files = [p for p in paths if os.path.splitext(p)[0] in stems]
    if not files:
        raise SystemExit(f"error: --masks {masks}: no mask named as an image of --images {images} (<stem>.png)")
    if len(files) < len(paths):
        workdir.say(f"note: {len(paths) - len(files)} images of {images} have no mask in {masks}: left out")
    fp = hashlib.sha1(("\0".join([root_abs, os.path.abspath(masks)] + files)).encode()).hexdigest()
    return Data(root=root_abs, files=files, ann_offsets=np.zeros(len(files) + 1, np.int64),
                boxes=np.zeros((0, 4), np.float32), category=np.zeros(0, np.int64), is_text=np.zeros(0, bool),
                words=[], area=np.zeros(0), crowd=np.zeros(0, bool), image_label=np.full(len(files), -1, np.int64),
                class_names={}, categories={}, masks=masks, fingerprint=fp,
                source={"images": root_abs, "masks": os.path.abspath(masks)})


def read_image_folder(root: str) -> Data:
    root_abs, paths = image_io.list_inputs(root)        # SystemExit when the folder is empty
    files = [p for p in paths if os.sep in p]
    classes = sorted({p.split(os.sep)[0] for p in files})
    if len(classes) < 2:
        raise SystemExit(f"error: --image-folder {root}: needs images in at least two class sub-folders, found "
                         f"{len(classes)} ({len(paths)} files)")
    if len(files) < len(paths):
        workdir.say(f"warning: {len(paths) - len(files)} files directly in {root} belong to no class: left out")
    labels = np.array([classes.index(p.split(os.sep)[0]) for p in files], np.int64)
    fp = hashlib.sha1(("\0".join([root_abs] + files)).encode()).hexdigest()
    return Data(root=root_abs, files=files, ann_offsets=np.zeros(len(files) + 1, np.int64),
                boxes=np.zeros((0, 4), np.float32), category=np.zeros(0, np.int64), is_text=np.zeros(0, bool),
                words=[], area=np.zeros(0), crowd=np.zeros(0, bool), image_label=labels,
                class_names=dict(enumerate(classes)),
                categories={}, masks=None, fingerprint=fp, source={"image_folder": root_abs})


def split_images(n: int, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Per image 0 = probe-train, 1 = validation (part of probe-train), 2 = probe-test; from the seed only."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round((n - n_test) * val_fraction))
    split = np.zeros(n, np.int8)
    split[perm[:n_test]] = 2
    split[perm[n_test: n_test + n_val]] = 1
    return split


def visible_share(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Share of each box's area inside the centre square crop, on the original image (no resampling): the
    same for every encoder and input size, so all encoders see the same boxes."""
    s = min(w, h)
    _, _, left, top = image_io.short_side_geometry(w, h, s)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    c = np.clip(b - [left, top, left, top], 0, s)
    kept = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    return np.where(area > 0, kept / np.maximum(area, 1e-12), 0.0)


def patch_labels(inst: np.ndarray, sem_of_inst: np.ndarray, pre, patch: int) -> np.ndarray:
    """Instance-id mask (h, w) -> the semantic class of each patch of the encoder's input square (row-major), by
    majority of its pixels after the encoder's own resize and crop (pre: Preprocess, or an int size for the kit's
    centre crop; nearest neighbour for labels, padding as background). sem_of_inst maps an instance id to its
    category id (0 background, -1 unknown); a tie goes to the smaller class id."""
    from PIL import Image
    pre = Preprocess(pre) if isinstance(pre, int) else pre
    size = pre.size
    h, w = inst.shape
    _, _, left, top, nw, nh = pre.geometry(w, h)
    resized = np.asarray(Image.fromarray(inst).resize((nw, nh), Image.NEAREST))
    m = np.zeros((size, size), resized.dtype)
    x0, y0, px, py = int(max(left, 0)), int(max(top, 0)), int(max(-left, 0)), int(max(-top, 0))
    part = resized[y0: y0 + size, x0: x0 + size]
    m[py: py + part.shape[0], px: px + part.shape[1]] = part
    sem = sem_of_inst[m]
    g = size // patch
    blocks = sem[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    values, inv = np.unique(blocks, return_inverse=True)
    counts = np.zeros((g * g, len(values)), np.int64)
    np.add.at(counts, (np.repeat(np.arange(g * g), blocks.shape[1]), inv.ravel()), 1)
    return values[counts.argmax(1)].astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# encoders


@dataclass
class Preprocess:
    """An encoder's own input: its resize rule, resampling, crop and normalisation, as its config says (the kit's
    for kit checkpoints; the folder's preprocessor_config.json for HF folders; open_clip's own transform for
    open_clip models), with the same geometry applied to the boxes and the masks.

    mode "shortest": the short side to `size` (the long side floored), then the centre square, its offset
    floored (CLIPImageProcessor, the kit's image_io.resize_crop) or rounded (torchvision's CenterCrop, open_clip);
    "squash": both sides to `size`; "longest": the long side to `size` (rounded sides), padded to the square
    (open_clip's ResizeKeepRatio + CenterCropOrPad)."""
    size: int
    mode: str = "shortest"
    resample: int = 3                      # PIL's code: 3 bicubic, 2 bilinear
    round_offset: bool = False
    mean: tuple = image_io.IMAGE_MEAN
    std: tuple = image_io.IMAGE_STD
    source: str = "kit"
    transform: object = None               # open_clip: its own transform (PIL image -> normalised tensor)

    def __post_init__(self):
        if self.transform is None and (self.mode not in ("shortest", "squash") or self.round_offset):
            raise ValueError(f"resize {self.mode!r} (rounded offsets: {self.round_offset}) needs its own transform")

    def geometry(self, w: int, h: int) -> tuple[float, float, float, float, int, int]:
        """(scale x, scale y, left, top, resized width, height): output pixel = input pixel * scale - offset."""
        S = self.size
        if self.mode == "squash":
            return S / w, S / h, 0.0, 0.0, S, S
        if self.mode == "longest":
            r = max(w / S, h / S)
            nw, nh = round(w / r), round(h / r)
        else:
            nw, nh, _, _ = image_io.short_side_geometry(w, h, S)
        off = (lambda d: int(round(d / 2.0))) if self.round_offset else (lambda d: d // 2)
        left = off(nw - S) if nw >= S else -((S - nw) // 2)
        top = off(nh - S) if nh >= S else -((S - nh) // 2)
        return nw / w, nh / h, float(left), float(top), nw, nh

    def pixels(self, img):
        """The normalised (3, S, S) float tensor of a PIL RGB image: the encoder's own transform, else
        image_io.resize_crop + normalize with this resampling and these statistics (the modes without a transform
        are "shortest" floored and "squash": the kit's and CLIPImageProcessor's)."""
        import torch
        if self.transform is not None:
            return self.transform(img)
        pixels, _, _ = image_io.resize_crop(img, self.size, crop="center" if self.mode == "shortest" else "squash",
                                           resample=self.resample)
        return image_io.normalize(torch.from_numpy(pixels.copy())[None], self.mean, self.std)[0]

    def boxes(self, boxes, w: int, h: int) -> np.ndarray:
        """Boxes (x0 y0 x1 y1, input pixels) -> output pixels, clipped to the square (image_io.move_boxes)."""
        sx, sy, left, top, _, _ = self.geometry(w, h)
        return image_io.move_boxes(boxes, sx, sy, left, top, self.size)[0]

    def info(self) -> dict:
        return {"source": self.source, "size": self.size, "resize": self.mode, "resample": self.resample,
                "crop_offset": "rounded" if self.round_offset else "floored", "mean": list(self.mean),
                "std": list(self.std)}


def hf_preprocess(folder: str, size: int) -> Preprocess | None:
    """The Preprocess of an HF folder's preprocessor_config.json (a CLIPImageProcessor's mean, std, resample and
    do_center_crop) at the encoder's input size (--image-size, else its config's image_size, which the
    released folders' crop_size equals); None without the file."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            pp = json.loads(f.read())
        mean, std = tuple(pp.get("image_mean", image_io.IMAGE_MEAN)), tuple(pp.get("image_std", image_io.IMAGE_STD))
        resample = int(pp.get("resample", 3))
        mode = "shortest" if pp.get("do_center_crop", True) else "squash"
    except (ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {path} is not a readable image-processor config ({e})") from None
    if len(mean) != 3 or len(std) != 3:
        raise SystemExit(f"error: {path}: image_mean and image_std need three values")
    return Preprocess(size, mode, resample, False, mean, std, source="preprocessor_config.json")


def parse_encoder(text: str) -> tuple[str, str]:
    """'NAME=SPEC' or 'SPEC' -> (name, spec); names are file-safe."""
    name, spec = None, text
    if "=" in text:
        left, right = text.split("=", 1)
        if re.fullmatch(r"[\w.-]+", left):
            name, spec = left, right
    if name is None:
        if spec.startswith("openclip:"):
            name = "openclip-" + spec.split(":")[1]
        else:
            body = spec[len("random:"):] if spec.startswith("random:") else spec
            parts = [p for p in os.path.normpath(body).split(os.sep) if p not in ("", ".", "..")]
            stem = os.path.splitext(parts[-1])[0] if parts else "encoder"
            ancestors = [p for p in parts[:-1] if p.lower() not in GENERIC_NAMES]
            if stem.lower() in GENERIC_NAMES and ancestors:
                stem = f"{ancestors[-1]}-{stem}"
            name = ("random-" if spec.startswith("random:") else "") + stem
    return re.sub(r"[^\w.-]+", "-", name), spec


def checkpoint_config(path: str):
    """model.read_encoder_config, its ValueError as one line."""
    import model as kit
    try:
        return kit.read_encoder_config(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def encoder_identity(spec: str, clip_config: str | None = None) -> dict:
    """What the features depend on besides the settings: the content (workdir.content_digest) of every local
    file the encoder is built from, its weights, config and --clip-config, so that other weights under the same
    name, size and mtime never reuse old features. A random: encoder depends on its config alone."""
    local = []
    if spec.startswith("openclip:"):
        rest = spec[len("openclip:"):]
        arch, _, pre = rest.rpartition(":") if ":" in rest else (rest, "", "")
        for part in (arch[len("local-dir:"):] if arch.startswith("local-dir:") else arch, pre):
            if part and os.path.exists(part):
                local.append(part)
        if clip_config and os.path.exists(clip_config):
            local.append(clip_config)
    elif spec.startswith("random:"):
        return {"spec": spec, "config": asdict(checkpoint_config(spec[len("random:"):]))}
    else:
        local.append(spec)
    return {"spec": spec, **{os.path.abspath(p): workdir.content_digest(p) for p in local}}


class KitEncoder:
    """model.VisionEncoder (kit checkpoint, HF folder, or random init)."""

    def __init__(self, spec: str, args, device):
        import torch
        import model as kit
        if spec.startswith("random:"):
            cfg = checkpoint_config(spec[len("random:"):])
            torch.manual_seed(args.seed)
            try:
                self.model, self.kind = kit.VisionEncoder(cfg), "random"
            except ValueError as e:
                raise SystemExit(f"error: --encoder {spec}: {e}")
        else:
            try:
                self.model, self.kind = kit.load_encoder(spec), "kit"
            except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
                raise SystemExit(f"error: --encoder {spec}: {e}")
        cfg = self.model.cfg
        self.size = args.image_size or cfg.image_size
        if self.size % cfg.patch_size:
            raise SystemExit(f"error: --image-size {self.size} is not a multiple of the patch size {cfg.patch_size} "
                             f"of {spec}")
        self.patch, self.has_region = cfg.patch_size, cfg.region_blocks > 0
        self.image_dim = self.region_dim = cfg.embed_dim or cfg.width
        self.token_dim = cfg.width
        self.params = self.model.num_params()
        self.model.to(device).eval()
        self.device, self.torch = device, torch
        body = spec[len("random:"):] if spec.startswith("random:") else spec
        self.preprocess = (hf_preprocess(body, self.size) if os.path.isdir(body) else None) or Preprocess(self.size)

    def __call__(self, pixels, boxes, valid):
        """normalised (B, 3, S, S) -> image (B, Di), patch tokens (B, P, Dt), regions (B, N, Dr) or None."""
        out = self.model(pixels.to(self.device), boxes, valid)
        return out.class_embedding, out.patch_tokens, out.region_embeddings

    def info(self):
        return {"kind": self.kind, "image_size": self.size, "patch_size": self.patch, "region_path": self.has_region,
                "preprocess": self.preprocess.info(),
                "image_dim": self.image_dim, "token_dim": self.token_dim, "params": self.params,
                "config": {k: v for k, v in vars(self.model.cfg).items()}}


class OpenClipEncoder:
    """An open_clip model's image tower: pooled (projected) output and its patch tokens."""

    def __init__(self, spec: str, args, device):
        import open_clip
        rest = spec[len("openclip:"):]
        if rest.startswith("hf-hub:") and rest.count(":") == 1:
            arch, pretrained = rest, None
        elif ":" in rest:
            arch, pretrained = rest.rsplit(":", 1)
        else:
            arch, pretrained = rest, None
        if pretrained and pretrained.lower() in ("none", "random"):
            pretrained = None
        if args.clip_config:
            open_clip.add_model_config(args.clip_config)
        model, transform = workdir.load_open_clip(      # unknown name or tag, no network, bad file: one line
            arch, pretrained, device, f"--encoder {spec}",
            "offline, name a local weights file (openclip:ARCH:/path/open_clip_pytorch_model.bin), a local HF "
            "folder, or a kit checkpoint")
        visual = model.visual
        if not hasattr(visual, "output_tokens") or not hasattr(visual, "patch_size"):
            raise SystemExit(f"error: --encoder {spec}: the image tower ({type(visual).__name__}) gives no patch "
                             "tokens; 05 needs an open_clip VisionTransformer")
        visual.output_tokens = True                  # forward -> (pooled, tokens)
        self.model, self.kind = visual.eval(), "openclip"
        size = visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.patch = int(visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size)
        if args.image_size and args.image_size != self.size:
            workdir.say(f"note: {spec} runs at its configured {self.size} px, not --image-size {args.image_size} "
                        "(fixed position embeddings)")
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        # its own transform for the pixels, its resize mode for the boxes and masks
        self.preprocess = Preprocess(self.size, pp.get("resize_mode", "shortest"),
                                     {"bilinear": 2, "bicubic": 3}.get(pp.get("interpolation", "bicubic"), 3), True,
                                     tuple(pp.get("mean", image_io.IMAGE_MEAN)), tuple(pp.get("std", image_io.IMAGE_STD)),
                                     source="open_clip transform", transform=transform)
        self.has_region = False
        self.image_dim = int(visual.output_dim)
        self.token_dim = int(visual.transformer.width)
        self.params = sum(p.numel() for p in visual.parameters())
        self.device, self.spec = device, spec

    def __call__(self, pixels, boxes, valid):
        pooled, tokens = self.model(pixels.to(self.device))
        g = self.size // self.patch
        if tokens.shape[1] != g * g:
            raise SystemExit(f"error: --encoder {self.spec}: {tokens.shape[1]} output tokens, not a {g}x{g} grid "
                             "(attention-pooled towers are not supported)")
        return pooled, tokens, None

    def info(self):
        return {"kind": self.kind, "image_size": self.size, "patch_size": self.patch, "region_path": False,
                "image_dim": self.image_dim, "token_dim": self.token_dim, "params": self.params,
                "preprocess": self.preprocess.info()}


def build_encoder(spec: str, args, device):
    return OpenClipEncoder(spec, args, device) if spec.startswith("openclip:") else KitEncoder(spec, args, device)


def pool_in_boxes(tokens, boxes, grid: int, patch: int):
    """Mean patch token inside each box: patches whose centre lies in the closed box, else the patch holding
    the box centre (model.box_patch_mask). tokens (B, P, D), boxes (B, N, 4) input pixels -> (B, N, D)."""
    import model as kit
    mask = kit.box_patch_mask(boxes, grid, grid, patch).to(tokens.dtype)
    return (mask @ tokens) / mask.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------
# feature extraction (sharded over ranks, resumable)


def extract(name: str, spec: str, data: Data, args, device) -> tuple[dict, dict]:
    """Features of every image for one encoder into <out>/features/<name>/; returns (arrays, encoder info)."""
    rank, world = workdir.dist_info()
    folder = os.path.join(args.out, "features", name)
    # rank 0 reads the weights for their hash (once, not once per rank); every rank gets the same key
    identity = workdir.from_rank0(encoder_identity(spec, args.clip_config) if rank == 0 else None)
    key = {"encoder": identity, "image_size": args.image_size, "seed": args.seed,
           "data": data.fingerprint, "files": len(data.files), "dtype": args.dtype, "max_pixels": args.max_pixels,
           "version": 3, **({"image_tokens": True} if "attentive" in args.probes else {})}
    key = json.loads(json.dumps(key))
    done = workdir.read_manifest(folder)
    workdir.barrier()                       # every rank has read the manifest before rank 0 may remove it
    reuse = bool(done and done.get("complete") and done.get("key") == key)
    t0 = time.time()
    if reuse:
        workdir.say(f"{name}: reusing the features in {folder} (delete the folder to recompute them)")
        info = done["encoder"]
    else:
        enc = build_encoder(spec, args, device)       # weights that fail to load leave no folder behind
        if rank == 0 and done:
            os.remove(os.path.join(folder, "manifest.json"))
        os.makedirs(folder, exist_ok=True)
        info = enc.info()
        amp = (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda"))
        process = FeatureChunk(enc, data, args, amp)
        num_chunks, _ = chunk_engine.run_chunks(folder, len(data.files), args.chunk_size, process,
                                           f"features {name}", {**key, "chunk_size": args.chunk_size})
        per_row = {"pooled": "ann_counts"}
        if enc.has_region:
            per_row["region"] = "ann_counts"
        if data.masks:
            per_row.update({"dense_tokens": "patch_counts", "dense_labels": "patch_counts"})
        if "attentive" in args.probes:
            per_row["image_tokens"] = "token_counts"
        per_image = ["status", "size", "image_features"] + (["mask_status"] if data.masks else [])
        chunk_engine.merge_chunks(folder, num_chunks, per_image, per_row)
        if rank == 0:
            workdir.finish_stage(folder, {"stage": "eval_features", "name": name, "key": key, "encoder": info,
                                          "extract_s": round(time.time() - t0, 2)})
        workdir.barrier()
        del enc
    if rank != 0:
        return {}, info
    names = ["status", "size", "image_features", "ann_offsets", "pooled"] + \
        (["region"] if info["region_path"] else []) + \
        (["mask_status", "patch_offsets", "dense_tokens", "dense_labels"] if data.masks else []) + \
        (["token_offsets", "image_tokens"] if "attentive" in args.probes else [])
    arrays = {n: workdir.load(folder, n) for n in names}
    info = {**info, "extract_s": None if reuse else round(time.time() - t0, 2), "reused": reuse, "key": key}
    return arrays, info


class FeatureChunk:
    """Items [start, end) -> the chunk's feature arrays (chunk_engine.run_chunks): decode through the image
    table, resize / crop with the encoder's own preprocessing (the boxes and mask labels with the pixels),
    encode in batches of --batch-size, pool the patch tokens in each box."""

    def __init__(self, enc, data: Data, args, amp: bool):
        self.enc, self.data, self.args, self.amp = enc, data, args, amp
        self.grid = enc.size // enc.patch

    def __call__(self, start, end):
        enc, data, n = self.enc, self.data, end - start
        counts = np.diff(data.ann_offsets[start: end + 1]).astype(np.int64)
        out = {"status": np.zeros(n, np.uint8), "size": np.zeros((n, 2), np.int32),
               "image_features": np.zeros((n, enc.image_dim), np.float32), "ann_counts": counts,
               "pooled": np.zeros((int(counts.sum()), enc.token_dim), np.float32)}
        if enc.has_region:
            out["region"] = np.zeros((int(counts.sum()), enc.region_dim), np.float32)
        mask_status = np.full(n, MASK_STATUS.index("none"), np.uint8)
        dense_tok, dense_lab, self.image_tok = [None] * n, [None] * n, [None] * n
        ready = self.read(start, end, out["status"], out["size"], mask_status, dense_lab)
        for s in range(0, len(ready), self.args.batch_size):
            self.encode(ready[s: s + self.args.batch_size], start, out, dense_lab, dense_tok)
        if data.masks:
            have = [j for j in range(n) if dense_tok[j] is not None]
            out["mask_status"] = mask_status
            out["patch_counts"] = np.array([self.grid ** 2 if dense_tok[j] is not None else 0 for j in range(n)],
                                           np.int64)
            out["dense_tokens"] = (np.concatenate([dense_tok[j] for j in have]) if have
                                   else np.zeros((0, enc.token_dim), np.float16))
            out["dense_labels"] = (np.concatenate([dense_lab[j] for j in have]) if have else np.zeros(0, np.int32))
        if "attentive" in self.args.probes:           # every image's patch tokens, for the attentive probe
            have = [j for j in range(n) if self.image_tok[j] is not None]
            out["token_counts"] = np.array([0 if t is None else len(t) for t in self.image_tok], np.int64)
            out["image_tokens"] = (np.concatenate([self.image_tok[j] for j in have]) if have
                                   else np.zeros((0, enc.token_dim), np.float16))
        return out

    def read(self, start, end, status, size, mask_status, dense_lab):
        """(j, pixels, boxes) of the readable items; the others get their status (never a stop)."""
        data, pre, ready = self.data, self.enc.preprocess, []
        for j, i in enumerate(range(start, end)):
            path, row = data.files[i], int(data.rows[i])
            img, st = data.table.open(row) if row >= 0 else (None, "missing" if row == -1 else "outside_root")
            if img is None:
                status[j] = EVAL_STATUS.index(st if st in EVAL_STATUS else "missing")
                continue
            try:
                a, b = data.ann_offsets[i], data.ann_offsets[i + 1]
                pixels, boxes = pre.pixels(img), pre.boxes(data.boxes[a:b], *img.size)
                size[j] = img.size
                if data.masks:
                    dense_lab[j] = read_patch_labels(data, i, img.size, pre, self.enc.patch, mask_status, j,
                                                     data.category)
                ready.append((j, pixels, boxes))
            except Exception as e:                   # one odd image must not stop the run: record it
                status[j] = EVAL_STATUS.index("error")
                print(f"error on {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return ready

    def encode(self, batch, start, out, dense_lab, dense_tok):
        """One batch through the encoder: image features, box-pooled patch tokens, region features, and the
        patch tokens of the items with mask labels."""
        import torch
        enc, data = self.enc, self.data
        B, N = len(batch), max(len(bx) for _, _, bx in batch)
        pixels = torch.stack([px for _, px, _ in batch])
        boxes, valid = torch.zeros(B, N, 4), torch.zeros(B, N, dtype=torch.bool)
        for k, (_, _, bx) in enumerate(batch):
            boxes[k, :len(bx)] = torch.from_numpy(bx)
            valid[k, :len(bx)] = True
        with torch.inference_mode(), torch.autocast(enc.device.type, torch.bfloat16, enabled=self.amp):
            img_f, tokens, regions = enc(pixels, boxes.to(enc.device) if N else None,
                                         valid.to(enc.device) if N else None)
            tokens = tokens.float()
            pool = pool_in_boxes(tokens, boxes.to(tokens.device), self.grid, enc.patch) if N else None
        img_f, tokens_np, A0 = img_f.float().cpu().numpy(), tokens.cpu().numpy(), data.ann_offsets[start]
        for k, (j, _, bx) in enumerate(batch):
            out["image_features"][j] = img_f[k]
            lo = data.ann_offsets[start + j] - A0
            if len(bx):
                out["pooled"][lo: lo + len(bx)] = pool[k, :len(bx)].cpu().numpy()
                if "region" in out:
                    out["region"][lo: lo + len(bx)] = regions[k, :len(bx)].float().cpu().numpy()
            if data.masks and dense_lab[j] is not None:
                dense_tok[j] = tokens_np[k].astype(np.float16)
            if "attentive" in self.args.probes:
                self.image_tok[j] = tokens_np[k].astype(np.float16)


def read_patch_labels(data: Data, i: int, image_size, pre: Preprocess, p: int, mask_status, j: int, category_lut):
    """The patch classes of item i from its mask PNG, or None (with a mask status) when it is unusable."""
    from PIL import Image
    path = os.path.join(data.masks, data.files[i])
    if not os.path.isfile(path):                      # a JPEG image's mask is a PNG of the same stem
        path = os.path.splitext(path)[0] + ".png"
    if not os.path.isfile(path):
        mask_status[j] = MASK_STATUS.index("missing")
        return None
    try:
        with Image.open(path) as m:
            inst = np.asarray(m.convert("L") if m.mode not in ("L", "P") else m, np.uint8)
    except Exception:
        mask_status[j] = MASK_STATUS.index("unreadable")
        return None
    if inst.shape != (image_size[1], image_size[0]):
        mask_status[j] = MASK_STATUS.index("wrong_size")
        return None
    if data.mask_format == "classes":              # the pixel is its class; the ignored values are none
        lut = np.arange(256, dtype=np.int64)
        lut[list(data.mask_ignore)] = -1
    else:
        a, b = data.ann_offsets[i], data.ann_offsets[i + 1]
        lut = np.full(256, -1, np.int64)           # instance id -> category id; ids past the annotations: unknown
        lut[0] = 0
        lut[1: 1 + min(b - a, 255)] = category_lut[a: a + min(b - a, 255)]
    mask_status[j] = MASK_STATUS.index("ok")
    return patch_labels(inst, lut, pre, p)


# ----------------------------------------------------------------------------------------------------------
# the contents of an image (its classes and category fields): the multi-label probes' labels


def category_fields(data: Data, category_ids) -> list[str]:
    """The category fields whose value varies over these categories (COCO's supercategory; the demo's shape,
    colour, texture): the factors the image-contents and per-field object probes score one at a time."""
    used = sorted({int(c) for c in category_ids})
    fields = sorted({k for c in used for k, v in data.categories[c].items()
                     if k not in ("id", "name") and isinstance(v, str)})
    return [f for f in fields if len({data.categories[c].get(f) for c in used}) > 1]


def image_contents(data: Data) -> tuple[dict, np.ndarray]:
    """Per image, what its object annotations (not text, not crowd) contain: {"classes": [set of category
    ids]} plus, for every category field that varies over those categories (COCO's supercategory; the demo's
    shape, colour, texture), {field: [set of values]}; and the number of objects per image."""
    obj = ~data.is_text & ~data.crowd
    fields = category_fields(data, data.category[obj])
    n = len(data.files)
    out = {"classes": [set() for _ in range(n)], **{f: [set() for _ in range(n)] for f in fields}}
    count = np.zeros(n, np.int64)
    for i in range(n):
        for a in range(int(data.ann_offsets[i]), int(data.ann_offsets[i + 1])):
            if obj[a]:
                c = int(data.category[a])
                out["classes"][i].add(c)
                for f in fields:
                    out[f][i].add(data.categories[c].get(f))
                count[i] += 1
    return out, count


# ----------------------------------------------------------------------------------------------------------
# t-SNE figure and the report


def tsne_figure(path: str, name: str, kind: str, x, class_ids, data: Data, args) -> dict | None:
    """t-SNE of region features of probe-test objects, one panel per colouring: by class when there are at
    most --tsne-max-colours classes, else one panel per category field with few values (the demo's shape,
    colour and texture: which factor the features separate is what the figure shows), or the one field
    --tsne-color-by names. The same embedding in every panel."""
    n = len(x)
    if n < 10 or args.tsne_max <= 0:
        return None
    from sklearn.manifold import TSNE
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(n, min(n, args.tsne_max), replace=False))
    x, class_ids = x[idx], class_ids[idx]

    def values_of(field):
        if field == "class":
            return np.array([data.class_names.get(int(c), str(c)) for c in class_ids])
        return np.array([str(data.categories.get(int(c), {}).get(field, "?")) for c in class_ids])

    if args.tsne_color_by != "auto":
        panels = [args.tsne_color_by]
    elif len(set(class_ids.tolist())) <= args.tsne_max_colours:
        panels = ["class"]
    else:
        fields = dict.fromkeys(k for c in data.categories.values() for k in c
                               if k not in ("id", "name", "supercategory"))
        panels = [k for k in fields if len(set(values_of(k).tolist())) <= args.tsne_max_colours][:3] or ["class"]
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    emb = TSNE(2, perplexity=perplexity, init="pca", random_state=args.seed).fit_transform(x)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.2, 5.2), dpi=110, squeeze=False)
    for ax, field in zip(axes[0], panels):
        groups = values_of(field)
        values, counts = np.unique(groups, return_counts=True)
        shown = values[np.argsort(-counts, kind="stable")][: args.tsne_max_colours]
        cmap = plt.get_cmap("tab20" if len(shown) > 10 else "tab10")
        named = all(matplotlib.colors.is_color_like(g) for g in shown)      # a colour field: draw its colours
        for k, g in enumerate(shown):
            sel = groups == g
            ax.scatter(emb[sel, 0], emb[sel, 1], s=8, color=g if named else cmap(k % cmap.N),
                       label=f"{g} ({int(sel.sum())})")
        rest = ~np.isin(groups, shown)
        if rest.any():
            ax.scatter(emb[rest, 0], emb[rest, 1], s=5, color="lightgrey", label=f"other ({int(rest.sum())})")
        ax.set_title(f"coloured by {field}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=1.5, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False,
                  ncol=min(3, len(shown) + int(rest.any())))
    fig.suptitle(f"{name}: t-SNE of {kind} features of {len(x)} probe-test objects", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    workdir.write_bytes(path, buf.getvalue())
    return {"file": os.path.basename(path), "points": int(len(x)), "kind": kind, "coloured_by": panels,
            "perplexity": perplexity}


def markdown(report: dict) -> str:
    fields = sorted({k[len("present_"):] for e in report["encoders"].values() for k in e["probes"]
                     if k.startswith("present_") and k != "present_classes"})
    at = [c[1] for c in probes.COLUMNS].index("object_count")
    columns = probes.COLUMNS[:at] + [(f"image mAP ({f})", f"present_{f}", ("linear", "map")) for f in fields] + \
        probes.COLUMNS[at:]
    for kind in ("region", "pooled"):     # "obj linear (<kind>, <field>)" after the kind's k-NN column
        prefix = f"objects_{kind}_"
        object_fields = sorted({k[len(prefix):] for e in report["encoders"].values() for k in e["probes"]
                                if k.startswith(prefix)})
        at = [c[0] for c in columns].index(f"obj k-NN ({kind})") + 1
        columns = columns[:at] + [(f"obj linear ({kind}, {f})", prefix + f, ("linear", "top1"))
                                  for f in object_fields] + columns[at:]
    cols = [c for c in columns if any(probes.metric(e["probes"], c[1], c[2]) is not None
                                      for e in report["encoders"].values())]
    lines = ["| encoder | input | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for name, e in report["encoders"].items():
        cells = []
        for _, key, path in cols:
            v = probes.metric(e["probes"], key, path)
            cells.append("-" if v is None or v != v else f"{100 * v:.1f}")
        enc = e["encoder"]
        lines.append(f"| {name} | {enc['kind']}, {enc['image_size']} px / {enc['patch_size']} | "
                     + " | ".join(cells) + " |")
    base = next(iter(report["encoders"].values()))["probes"]
    chance = []
    for key, label, field in (("image", "image", "majority_top1"), ("present_classes", "image mAP", "prevalence_map"),
                              ("object_count", "count", "majority_top1"),
                              ("objects_pooled", "objects", "majority_top1"),
                              ("ocr_pooled", "OCR R@5", "frequency_recall@5"),
                              ("dense", "dense mIoU", "majority_miou")):
        if isinstance(base.get(key), dict) and base[key].get(field) is not None:
            chance.append(f"{label} {100 * base[key][field]:.1f}")
    for key in sorted(k for k in base if k.startswith("objects_pooled_")):
        if base[key].get("majority_top1") is not None:
            chance.append(f"objects ({key[len('objects_pooled_'):]}) {100 * base[key]['majority_top1']:.1f}")
    d = report["data"]
    text = "\n".join(lines) + "\n\n"
    text += (f"Top-1 accuracy, mAP, recall@5 and mIoU in %, on probe-test ({d['split']['test']} of "
             f"{d['images']['total']} "
             f"images; {d['images']['ok']} readable). Majority / frequency baselines: "
             f"{', '.join(chance) or 'n/a'}.\n")
    if any("dense" in e["probes"] for e in report["encoders"].values()):
        text += ("Dense mIoU is over the classes present in each encoder's own patch grid (input / patch): compare "
                 "encoders with the same grid.\n")
    if "objects" in d:
        o, t = d["objects"], d["text_boxes"]
        text += (f"Objects: {o['kept']} of {o['annotations']} boxes kept ({o['dropped_crop']} less than "
                 f"{100 * report['settings']['min_visible']:.0f}% visible after the centre crop, "
                 f"{o['on_unreadable']} on unreadable images{', %d crowd' % o['crowd'] if o['crowd'] else ''}); "
                 f"text boxes: {t['kept']} of {t['annotations']}.\n")
    return text


def jsonable(o):
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and o != o:
        return None
    return o


# ----------------------------------------------------------------------------------------------------------
# main


def write_report_md(out: str, md: str) -> None:
    workdir.write_bytes(os.path.join(out, "report.md"), f"# Probes on frozen features\n\n{md}".encode())


@workdir.stage_main
def main(argv=None):
    args = parse_args(argv)
    workdir.check_folder_flag(args.out, "--out")
    rank, world = workdir.init_dist()
    t_start = time.time()
    device = workdir.stage_device(args.device)
    encoders = check_encoders(args.encoder)
    open_out(args)
    if args.suite:
        return run_suite(args, encoders, device, t_start)
    data = load_eval_data(args)
    features, infos = {}, {}
    for name, spec in encoders:
        features[name], infos[name] = extract(name, spec, data, args, device)
    report = None
    if rank == 0:
        key = jsonable({"settings": {k: v for k, v in vars(args).items() if k != "force"},
                        "features": {nm: infos[nm]["key"] for nm in infos}})
        report = replay_report(args, infos, key)
        if report is None:
            report = probe_all(args, data, encoders, features, infos, key, device, world)
            report = jsonable({**report, "elapsed_s": round(time.time() - t_start, 2)})
            write_report(args, report, infos)
    workdir.barrier()
    return report


def check_encoders(specs) -> list[tuple[str, str]]:
    """--encoder NAME=SPEC, each named once; a missing path is the user's to fix, before any work."""
    encoders = [parse_encoder(e) for e in specs]
    names = [n for n, _ in encoders]
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SystemExit(f"error: two encoders named {dup[0]}: name them with --encoder NAME=SPEC")
    for name, spec in encoders:
        body = spec[len("random:"):] if spec.startswith("random:") else spec
        if not spec.startswith("openclip:") and not os.path.exists(body):
            raise SystemExit(f"error: --encoder {name}={spec}: no such file or folder {body}")
    return encoders


def open_out(args) -> None:
    """The lock of --out, and the one rule of every stage for its report: a finished report made with other
    probe settings is refused naming them (workdir.refuse_changed); --force replaces it."""
    workdir.lock_stage(args.out, "05_eval.py", "wait for it to end, or use another --out")
    previous = workdir.read_manifest(args.out, "report.json")
    if previous and not args.force:
        compared = [k for k in vars(args) if k not in NOT_IN_REPORT]
        workdir.refuse_changed(args.out, "a report", workdir.changed_settings(previous.get("settings", {}), args,
                                                                              compared), elsewhere="use another --out")


def load_eval_data(args) -> Data:
    """The images and their annotations (--image-folder, or --images with --coco and --masks), and the seeded
    probe-train / val / test split of the images (Data.split)."""
    if args.image_folder:
        data = read_image_folder(args.image_folder)
    elif args.coco:
        data = read_coco(args.images, args.coco, args.masks, args.text_category)
    else:
        data = read_segmentation_folder(args.images, args.masks)
    data.mask_format, data.mask_ignore = args.mask_format, tuple(args.mask_ignore)
    fields = {"class"} | {k for c in data.categories.values() for k in c if k not in ("id", "name")}
    if args.tsne_max and args.tsne_color_by not in fields | {"auto"}:
        raise SystemExit(f"error: --tsne-color-by {args.tsne_color_by}: not a category field of the data (choose "
                         f"auto or one of {', '.join(sorted(fields))})")
    data = attach_table(data, args.image_folder or args.images, args.out, args.max_pixels, args.force)
    data.split = split_images(len(data.files), args.test_fraction, args.val_fraction, args.seed)
    return data


def replay_report(args, infos, key) -> dict | None:
    """(rank 0) The finished report, printed again, when it was made from these features with these settings:
    nothing to recompute (report.md is written again from report.json, whatever happened to it)."""
    old = os.path.join(args.out, "report.json")
    if not all(info["reused"] for info in infos.values()) or not os.path.exists(old):
        return None
    with open(old) as fh:
        previous = json.load(fh)
    if previous.get("key") != key:
        return None
    md = markdown(previous)
    write_report_md(args.out, md)
    print(f"{args.out}: report complete for these features and settings\n\n{md}", flush=True)
    return previous


def probe_all(args, data, encoders, features, infos, key, device, world) -> dict:
    """(rank 0) Every probe of every encoder on the images readable for all of them: the report."""
    names = [n for n, _ in encoders]
    status = np.stack([features[nm]["status"] for nm in names])
    ok = (status == 0).all(0)               # the same set unless files changed between extractions
    kept, data_report = annotation_counts(data, ok, status[0], features[names[0]], args)
    if data_report["images"]["ok"] == 0:
        raise SystemExit("error: no readable image among the inputs: nothing to probe "
                         f"({data_report['images']['status']})")
    bad = {k: v for k, v in data_report["images"]["status"].items() if k != "ok"}
    if bad:
        print(f"note: {sum(bad.values())} unreadable images left out: {bad}", flush=True)
    tokenizer = losses.ClipTokens(args.max_tokens) if not args.image_folder and data.is_text.any() else None
    report = {"settings": jsonable({**vars(args), "c_grid": probes.C_GRID, "recall_at": probes.RECALL_AT,
                                    "tokenizer": tokenizer.name if tokenizer else None, "world": world}),
              "key": key, "data": data_report, "encoders": {}}
    settings = probes.ProbeSettings(knn_k=args.knn_k, knn_temperature=args.knn_temperature, c_refine=args.c_refine,
                                    probe_iters=args.probe_iters, dense_max_patches=args.dense_max_patches,
                                    seed=args.seed, device=device)
    token_lists = [tokenizer(w) if (tokenizer and w) else [] for w in data.words]
    contents = image_contents(data) if not args.image_folder and "contents" in args.probes else None
    for name, spec in encoders:
        t_enc = time.time()
        results, tsne = probe_encoder(name, features[name], data, ok, kept, token_lists, contents, settings, args)
        report["encoders"][name] = {"spec": spec, "encoder": {k: v for k, v in infos[name].items() if k != "key"},
                                    "probes": results, "tsne": tsne, "probe_s": round(time.time() - t_enc, 2)}
    say_small_probes(report, args.knn_k)
    return report


def annotation_counts(data, ok, status, first, args):
    """(the annotations kept for the region probes: on readable images, visible enough after the centre crop,
    not crowd; the data section of the report: images by status, the split, annotations kept and dropped)"""
    n, split = len(data.files), data.split
    ann_image = np.repeat(np.arange(n), np.diff(data.ann_offsets))
    visible = np.zeros(len(data.category))
    for i in np.flatnonzero(ok):
        a, b = data.ann_offsets[i], data.ann_offsets[i + 1]
        visible[a:b] = visible_share(data.boxes[a:b], *first["size"][i])
    kept = ok[ann_image] & (visible >= args.min_visible) & ~data.crowd
    status_counts = {s: int((status == k).sum()) for k, s in enumerate(EVAL_STATUS)}
    report = {
        "source": data.source,
        "images": {"total": n, "ok": int(ok.sum()), "status": {k: v for k, v in status_counts.items() if v}},
        "split": {"train": int(((split == 0) & ok).sum()), "val": int(((split == 1) & ok).sum()),
                  "test": int(((split == 2) & ok).sum()), "seed": args.seed, "test_fraction": args.test_fraction,
                  "val_fraction": args.val_fraction},
    }
    if not args.image_folder and len(data.category):
        obj, txt = ~data.is_text, data.is_text
        report["objects"] = {"annotations": int(obj.sum()), "kept": int((obj & kept).sum()),
                             "crowd": int((obj & ok[ann_image] & data.crowd).sum()),
                             "dropped_crop": int((obj & ok[ann_image] & ~kept & ~data.crowd).sum()),
                             "on_unreadable": int((obj & ~ok[ann_image]).sum()),
                             "classes": int(len(set(data.category[obj].tolist())))}
        has_word = np.array([w is not None for w in data.words], bool)
        report["text_boxes"] = {"annotations": int(txt.sum()), "kept": int((txt & kept & has_word).sum()),
                                "dropped_crop": int((txt & ok[ann_image] & ~kept & ~data.crowd).sum()),
                                "on_unreadable": int((txt & ~ok[ann_image]).sum()),
                                "without_word": int((txt & ~has_word).sum())}
    if data.masks:
        ms = first["mask_status"]
        report["masks"] = {s: int((ms[ok] == k).sum()) for k, s in enumerate(MASK_STATUS) if (ms[ok] == k).any()}
    return kept, report


def probe_encoder(name, f, data, ok, kept, token_lists, contents, settings, args):
    """One encoder's probes on its features f -> (results by probe, t-SNE figure info or None)."""
    n, split, results, tsne = len(data.files), data.split, {}, None
    ann_image = np.repeat(np.arange(n), np.diff(data.ann_offsets))
    img_sel = ok & (data.image_label >= 0)
    if "image" in args.probes or args.image_folder:
        results["image"] = probes.classification_probe(probes.unit(f["image_features"][img_sel]),
                                                       data.image_label[img_sel], split[img_sel], settings)
    if "attentive" in args.probes:                  # the same images and labels, on the frozen patch tokens
        offsets, rows = f["token_offsets"], np.flatnonzero(img_sel)
        tokens = np.stack([np.asarray(f["image_tokens"][offsets[i]: offsets[i + 1]], np.float32) for i in rows])
        results["image_attentive"] = probes.attentive_probe(tokens, data.image_label[img_sel], split[img_sel],
                                                            settings)
    if args.image_folder:
        return results, tsne
    if contents is not None:
        # what MLCD's image-level labels are about: which objects an image holds, and how many
        present, object_count = contents
        x_img = probes.unit(f["image_features"][ok])
        for what, sets in present.items():
            results[f"present_{what}"] = probes.multilabel_probe(
                x_img, [sets[i] for i in np.flatnonzero(ok)], split[ok], settings)
        results["object_count"] = probes.classification_probe(x_img, object_count[ok], split[ok], settings)
    obj = kept & ~data.is_text
    txt = kept & data.is_text & np.array([bool(tk) for tk in token_lists], bool)
    kinds = (["region"] if "region" in f else []) + ["pooled"]
    fields = category_fields(data, data.category[obj]) if "objects" in args.probes else []
    for kind in kinds:
        feats = f[kind]
        if "objects" in args.probes:
            x_obj, obj_split = probes.unit(feats[obj]), split[ann_image[obj]]
            results[f"objects_{kind}"] = probes.classification_probe(x_obj, data.category[obj], obj_split, settings)
            # each factor of the class alone (the demo's shape, colour, texture; COCO's supercategory): which of
            # them the region features carry is what the region codebook's features put into RICE's labels
            for field in fields:             # objects whose category has no such field are left out of its probe
                values = np.array([data.categories[int(c)].get(field) for c in data.category[obj]], dtype=object)
                has = np.array([isinstance(v, str) for v in values], bool)
                results[f"objects_{kind}_{field}"] = probes.classification_probe(x_obj[has], values[has],
                                                                                 obj_split[has], settings)
        sel = np.flatnonzero(txt)
        if not len(sel) or "ocr" not in args.probes:   # no text category in these annotations: no OCR probe
            continue
        results[f"ocr_{kind}"] = probes.ocr_probe(
            probes.unit(feats[txt]), [token_lists[i] for i in sel],
            np.array([data.words[i].lower() for i in sel], dtype=object), split[ann_image[txt]], settings)
    tsne_sel = obj & (split[ann_image] == 2)
    if args.tsne_max > 0 and "objects" in args.probes:
        tsne = tsne_figure(os.path.join(args.out, f"tsne_{name}.png"), name, kinds[0],
                           probes.unit(f[kinds[0]][tsne_sel]), data.category[tsne_sel], data, args)
    if data.masks and "dense" in args.probes:
        patch_image = np.repeat(np.arange(n), np.diff(f["patch_offsets"]))
        use = ok[patch_image]
        results["dense"] = probes.dense_probe(np.asarray(f["dense_tokens"], np.float32)[use],
                                              np.asarray(f["dense_labels"])[use], split[patch_image[use]], settings)
    return results, tsne


def write_report(args, report, infos) -> None:
    """report.md (before report.json: a kill between leaves the old key), report.json, the printed table."""
    md = markdown(report)
    write_report_md(args.out, md)
    workdir.write_json(os.path.join(args.out, "report.json"), report)
    timing = ", ".join(f"{nm}: features " + ("reused" if infos[nm].get("reused") else f"{infos[nm]['extract_s']} s")
                       + f", probes {report['encoders'][nm]['probe_s']} s" for nm in report["encoders"])
    print(f"\n{md}\n{args.out}/report.json, report.md" +
          "".join(f", {e['tsne']['file']}" for e in report["encoders"].values() if e.get("tsne")) +
          f"; {timing}; total {report['elapsed_s']} s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# --suite mlcd-linear: MLCD Tab. 1 on the datasets under --data-root (eval_suite.py)


def run_suite(args, encoders, device, t_start):
    """Every encoder's image features on every dataset's splits (cached by content, sharded over ranks), the
    CLIP-protocol linear probe with the dataset's metric, and a table in Tab. 1's column order next to the
    published MLCD row."""
    import eval_suite
    rank = workdir.dist_info()[0]
    # rank 0 checks every listed file once; the other ranks open the readers and take its verdict
    opened = {name: eval_suite.open_dataset(eval_suite.BY_NAME[name], args.data_root, check_files=rank == 0)
              for name in args.datasets}
    verdict = workdir.from_rank0({n: got if isinstance(got, str) else None for n, got in opened.items()}
                                 if rank == 0 else None)
    opened = {n: verdict[n] or got for n, got in opened.items()}
    for name, got in opened.items():
        if isinstance(got, str):
            workdir.say(f"{name}: {got}")
    settings = probes.ProbeSettings(probe_iters=args.probe_iters, c_refine=args.c_refine, seed=args.seed,
                                    device=device)
    report = {"suite": args.suite, "data_root": os.path.abspath(args.data_root), "datasets": {}, "encoders": {},
              "settings": jsonable({k: v for k, v in vars(args).items() if k != "force"})}
    for name, got in opened.items():
        report["datasets"][name] = ({"status": got} if isinstance(got, str) else
                                    {"status": "ok", "metric": eval_suite.BY_NAME[name].metric,
                                     **{k: len(got[k]) for k in eval_suite.SPLITS if got[k] is not None},
                                     **({"note": got["note"]} if got.get("note") else {})})
    for enc_name, spec in encoders:
        enc, results = build_encoder(spec, args, device), {}
        for name, splits in opened.items():
            if isinstance(splits, str):
                continue
            x = suite_features(enc, enc_name, spec, name, splits, args)
            if rank == 0:
                results[name] = {**eval_suite.probe_dataset(x, eval_suite.BY_NAME[name].metric, settings),
                                 "unreadable": x["unreadable"]}
                if "attentive" in args.probes and eval_suite.BY_NAME[name].metric != "map11":
                    # the same splits as the linear probe's (its carved validation share), unreadable images out
                    results[name]["attentive"] = probes.attentive_probe(x["tokens"], x["all_labels"], x["split"],
                                                                        settings)
        report["encoders"][enc_name] = {"spec": spec, "encoder": enc.info(), "results": results}
        del enc
    if workdir.dist_info()[0] == 0:
        report = jsonable({**report, "elapsed_s": round(time.time() - t_start, 2)})
        md = eval_suite.markdown(report)
        workdir.write_bytes(os.path.join(args.out, "suite.md"), md.encode())
        workdir.write_json(os.path.join(args.out, "suite.json"), report)
        print(f"\n{md}\n{args.out}/suite.json, suite.md; total {report['elapsed_s']} s", flush=True)
    workdir.barrier()
    return report if workdir.dist_info()[0] == 0 else None


def suite_features(enc, enc_name, spec, name, splits, args) -> dict:
    """One dataset's image features, extracted once per encoder and dataset into <out>/suite/<encoder>/<dataset>/
    (chunk_engine: sharded over ranks, resumable; keyed by the encoder's and the dataset folder's content, both
    read on rank 0 only). An image that fails to decode gets status 1 and is left out of the probes, counted.
    On rank 0: {split: (rows, D) unit features, "labels": {split: labels}, "unreadable": n, and with the
    attentive probe "tokens" (images, patches, width) memmap, "all_labels", "split" (0 / 1 / 2, -1 unreadable)}."""
    import eval_suite
    import torch
    order = [k for k in ("train", "val", "test") if splits[k] is not None]
    sizes = [len(splits[k]) for k in order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    folder = os.path.join(args.out, "suite", enc_name, name)
    attentive = "attentive" in args.probes
    key = workdir.from_rank0(json.loads(json.dumps({
        "encoder": encoder_identity(spec, args.clip_config), "image_size": args.image_size, "dtype": args.dtype,
        "dataset": eval_suite.fingerprint(args.data_root, eval_suite.BY_NAME[name]), "sizes": sizes, "version": 2,
        **({"tokens": True} if attentive else {})})) if workdir.dist_info()[0] == 0 else None)
    done = workdir.read_manifest(folder)
    if not (done and done.get("complete") and done.get("key") == key):
        amp = args.dtype == "bf16" or (args.dtype == "auto" and enc.device.type == "cuda")
        grid = (enc.size // enc.patch) ** 2

        prepare = eval_suite.SuitePixels(splits, order, starts, enc.preprocess)
        workers = chunk_engine.loader_workers(args.workers)

        def process(start, end):
            n = end - start
            out = {"features": np.zeros((n, enc.image_dim), np.float32), "status": np.zeros(n, np.uint8)}
            if attentive:                           # every image's patch tokens (zeros for an unreadable one)
                out.update(tokens=np.zeros((n * grid, enc.token_dim), np.float16),
                           token_counts=np.full(n, grid, np.int64))
            items = iter(chunk_engine.prefetched(start, end, prepare, workers))
            for s in range(start, end, args.batch_size):
                got = [(i - start, next(items)) for i in range(s, min(end, s + args.batch_size))]
                for j, (px, error) in got:
                    out["status"][j] = px is None
                    if error:                       # one bad file must not stop the suite: its status
                        print(f"{name}: item {start + j}: {error}", file=sys.stderr, flush=True)
                got = [(j, px) for j, (px, _) in got if px is not None]
                if not got:
                    continue
                rows = np.array([j for j, _ in got])
                with torch.inference_mode(), torch.autocast(enc.device.type, torch.bfloat16, enabled=amp):
                    image_f, patch_tokens, _ = enc(torch.stack([px for _, px in got]), None, None)
                out["features"][rows] = image_f.float().cpu().numpy()
                if attentive:
                    t = patch_tokens.float().cpu().numpy().astype(np.float16)
                    for r, j in enumerate(rows):
                        out["tokens"][j * grid: (j + 1) * grid] = t[r]
            return out
        num_chunks, _ = chunk_engine.run_chunks(folder, int(starts[-1]), args.chunk_size, process,
                                                f"{name} ({enc_name})", key)
        chunk_engine.merge_chunks(folder, num_chunks, ["features", "status"],
                                  {"tokens": "token_counts"} if attentive else {})
        if workdir.dist_info()[0] == 0:
            workdir.finish_stage(folder, {"stage": "suite_features", "dataset": name, "key": key})
        workdir.barrier()
    if workdir.dist_info()[0] != 0:
        return {}
    x, ok = probes.unit(workdir.load(folder, "features", mmap=False)), workdir.load(folder, "status") == 0
    part = {k: slice(starts[i], starts[i + 1]) for i, k in enumerate(order)}
    out = {k: x[part[k]][ok[part[k]]] for k in order}
    out.update(labels={k: splits[k].labels[ok[part[k]]] for k in order}, unreadable=int((~ok).sum()))
    carved = None if splits["val"] is not None else eval_suite.validation_rows(splits["train"].labels, args.seed)
    if carved is not None:                          # the seeded validation share of train, for both probes
        out["carved"] = carved[ok[part["train"]]]
    if attentive:                                   # (images, patches, width), a memmap: read by batches
        flat = workdir.load(folder, "tokens")
        split = np.concatenate([np.full(sizes[i], ("train", "val", "test").index(k), np.int8)
                                for i, k in enumerate(order)])
        if carved is not None:
            split[part["train"]][carved] = 1
        split[~ok] = -1
        out.update(tokens=flat.reshape(int(starts[-1]), -1, flat.shape[1]), split=split,
                   all_labels=np.concatenate([splits[k].labels for k in order]))
    return out


MIN_PROBE_TEST = 50     # below this many probe-test items a score moves by 2 points or more per item


def say_small_probes(report, knn_k):
    """One warning per probe whose probe-test split is small (its score is noise), and per probe whose probe-train
    split is smaller than --knn-k (k-NN then votes over all of it), on stderr."""
    seen = set()
    for enc in report["encoders"].values():
        for probe, res in enc["probes"].items():
            counts = res.get("counts", {}) if isinstance(res, dict) else {}
            if probe in seen or not counts:
                continue
            seen.add(probe)
            # the dense probe counts patches; its items, for this rule, are its probe-test images
            n, unit = (counts["test"], "items") if "test" in counts else (report["data"]["split"]["test"], "images")
            if n < MIN_PROBE_TEST:
                print(f"warning: probe {probe}: {n} probe-test {unit} (fewer than {MIN_PROBE_TEST}): its scores "
                      "are noise at this size; evaluate on more images", file=sys.stderr, flush=True)
            k_used = (res.get("knn") or {}).get("k")
            if k_used is not None and k_used < knn_k:
                print(f"warning: probe {probe}: --knn-k {knn_k} is more than its {k_used} probe-train items; "
                      f"k-NN voted over all {k_used}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
