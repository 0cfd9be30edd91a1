r"""Stage 04: MLCD / RICE pre-training of the model.py encoder against the losses.py class-centre banks.

One script for every scale. One process (CPU with gloo-free code paths, or one GPU):
    python 04_train.py --work runs/demo --method rice --model tiny --image-size 96 --batch-size 64 \
        --steps 600 --warmup 60                                              # the offline demo, CPU
    python 04_train.py --work runs/big --method rice --model L/14 --batch-size 1024 --epochs 32
One node, 8 GPUs (backbone data-parallel with DDP, banks sharded over the 8 ranks):
    torchrun --nproc_per_node=8 04_train.py --work runs/big --method rice --model L/14 --batch-size 32768 \
        --accum 4 --compile
Several nodes (run on every node; $R = 0..7 the node's rank, $HOST the first node):
    torchrun --nnodes=8 --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \
        04_train.py --work runs/big --method rice --model L/14 --batch-size 32768
A 336 px fine-tune from the 224 px run (RICE: lr / 10; RoPE needs no position interpolation):
    python 04_train.py --work runs/big --run-dir runs/big/train336 --init-from runs/big/train/ckpt/latest.pt \
        --image-size 336 --lr 1e-4
Continue from released weights: `--init-from /models/rice-vit-large-patch14-560` (a Hugging Face directory).

Reads <work>/images/, <work>/regions/ (01), <work>/ocr/ (02, RICE's OCR loss) and <work>/clusters/ (03) and
the images themselves. Checks every stage output at start-up (complete manifests, matching lengths, labels
below K, 03 run on these regions, 01/02 run on this image table) before any GPU time is spent.
Writes the run folder (--run-dir, default <work>/train/):
    config.json          the settings; a resume with other data or model settings is refused
    train_images.npy     int64, the image-table rows that train (their order fixes the data order)
    log.jsonl            one JSON line every --log-every steps (fields below)
    skipped_images.jsonl images that failed to decode during training (rank, row, path, status)
    ckpt/latest.pt       written atomically every --save-every steps and at the end; ckpt/step_*.pt every
                         --keep-every steps (hard links). Plain dicts of tensors and numbers:
                         torch.load(path, weights_only=True); model.load_encoder(path) takes them directly.
    manifest.json        written last, when the run has reached its final step

The method (method notes 1.2-1.4, 2.3-2.5):
    --method mlcd   image level: L_img = MLCD Eq. 5 on the class embedding with the image's l = 8 labels from
                    03 (image_labels), against the object bank (K centres).
    --method rice   region level: each image brings N regions (--num-regions 10; more: a random N; fewer:
                    resampled with replacement up to N; none: only its image term, if enabled). An object
                    region takes L_obj (RICE Eq. 3: its one cluster label, object bank), a text region L_ocr
                    (RICE Eq. 4: its <= M token ids, OCR bank of 49,408 CLIP BPE tokens). Region embeddings
                    come from the region path of model.py (queries from the class token, attention masked to
                    the box). An optional image term L_img as in MLCD (--image-weight, default 0 for rice).
    loss = --object-weight * L_obj + --ocr-weight * L_ocr + --image-weight * L_img, each term the mean over
    the rows (regions or images) of the global batch that have a label. Both banks: s = 64, m = 0.3 (ArcFace
    margin on positives), rho = 0.1 uniform negatives, drawn afresh for every term at every step.

Data: a map-style dataset read by DataLoader workers (--workers): each worker opens the memmaps lazily, reads
the image through the image table (a loose file, or its tar member with one pread at the offset the table
holds: random access, so resume stays exact; each worker keeps a few shard files open), decodes it with PIL
(workdir.ImageTable.open), resizes the short side to --image-size and cuts a square (--crop
random for training, center, or squash), moving the boxes with the pixels (workdir.resize_crop); a box with
less than --min-box-visible of its area left in the crop is not a candidate. Workers ship uint8 pixels; the
normalisation (CLIP mean / std) runs on the device. Images whose status is not ok, or with no label for the
method's terms, never enter train_images.npy. An image that fails to decode anyway is logged and contributes
nothing to its step (never a crash).

Data order and resume: --batch-size is the global batch (all ranks, all accumulation steps). Epoch e's order
comes from (seed, e): blocks of --shuffle-block consecutive training images (mostly one tar shard) are
permuted, each window of --shuffle-window blocks is permuted inside (StepSampler; the whole epoch is one
window when block x window >= the training images); step t takes positions [t*G, (t+1)*G) of that order,
sorted, cut into --accum micro-batches and those into world slices, so a loader worker reads a few shards per
micro-batch. Every sample's random crop and region draw comes from a generator seeded by (seed, epoch, its
position in train_images), and the losses' negative sampling from one seeded by (seed, step,
micro-step, rank), so restoring the step restores the data position and every random stream, with any number
of workers: a run killed and resumed follows the uninterrupted run's loss curve (tests/test_train.py). The
banks and their optimiser moments are saved whole, so a run may resume on another number of processes.

Optimisation: AdamW (papers: lr 1e-3, decoupled weight decay 0.2; biases, LayerNorms, the class token and its
rotary angles take no decay), linear warm-up for --warmup steps (MLCD Tab. 10: 2,000) then cosine to
--min-lr-ratio x lr; the banks have their own optimiser with lr x --bank-lr-mult; the gradient norm over
encoder and banks together is clipped to --grad-clip. Gradient scale: the banks give every rank the
gradient of the global-batch mean loss (losses.py), and DDP averages the backbone gradients over ranks, so
the backbone gradients are multiplied by the world size before clipping: the clipped gradient is that of
the global-batch mean loss, the same as one process with the whole batch. bf16 autocast on GPUs (--dtype),
fp32 cosines in the banks; --compile (torch.compile), --grad-checkpointing, --accum.

Logs (every --log-every steps, console via tqdm and log.jsonl; --tensorboard also writes TensorBoard):
    step, epoch, samples, lr, loss, loss_object, loss_ocr, loss_image (and their positive / negative parts),
    grad_norm, samples_per_s, samples_per_s_per_device, step_s, data_wait_s, data_wait_frac, mfu, tflops_per_
    device, eta_s, skipped_images, max_mem_gib. MFU = model FLOPs per step (model.flops_per_image for the
    encoder incl. the region path, plus 6 x rows x active centres x D for the bank cosines) / (step time x
    devices x peak); the peak is --peak-tflops, or looked up for known GPUs (H100/H200 989 bf16 dense), else
    MFU is not reported.
A non-finite loss stops the run before the optimiser step, with the step and the terms; the last checkpoint is
left as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import workdir
from losses import CentreBank, all_gather_rows
from model import ViTConfig, VisionEncoder, flops_per_image, load_encoder, preset

# ----------------------------------------------------------------------------------------------------------
# defaults (the papers' values where they state one; see README "Choices and deviations")
WORK = "runs/demo"
METHOD = "rice"
MODEL = "L/14"
BATCH_SIZE = 32768            # global batch (MLCD Tab. 10: 32,800; RICE: 32K)
LR = 1e-3                     # MLCD Sec. 4.1, RICE Sec. 4.1
WEIGHT_DECAY = 0.2
BETAS = (0.9, 0.98)           # not stated; CLIP's ViT values
EPS = 1e-6
WARMUP = 2000                 # MLCD Tab. 10
NUM_REGIONS = 10              # RICE Tab. 5a
IMAGE_TOPL = 8                # MLCD l
OCR_VOCAB = 49408             # CLIP BPE, 02_extract_ocr.py
RHO, SCALE, MARGIN = 0.1, 64.0, 0.3
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 494.7}, "H200": {"bf16": 989.4, "fp32": 494.7},
               "A100": {"bf16": 312.0, "fp32": 156.0}}      # dense tensor-core peaks (fp32 = TF32)
INIT_BLOCK = 65536            # bank rows are initialised in blocks seeded by (seed, block): any world size agrees
# settings that fix the data order and the model; a resume must keep them
SHUFFLE_BLOCK, SHUFFLE_WINDOW = 1024, 64     # epoch order: 64-block windows of 1,024 consecutive images
RESUME_KEYS = ["shuffle_block", "shuffle_window", "method", "model", "image_size", "region_blocks", "embed_dim",
               "num_regions", "batch_size", "seed", "crop", "min_box_visible", "min_crop_scale", "image_topl",
               "object_weight", "ocr_weight", "image_weight"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--work", default=WORK, help="work directory with images/, regions/, ocr/, clusters/")
    a("--run-dir", default=None, help="run folder (default <work>/train)")
    a("--method", default=METHOD, choices=["mlcd", "rice"])
    a("--model", default=MODEL, help="model.py preset: tiny, B/16, L/14, L/14-560, bigG/14")
    a("--image-size", type=int, default=0, help="training resolution (default: the preset's)")
    a("--region-blocks", type=int, default=-1, help="blocks that run region attention (default: the preset's)")
    a("--embed-dim", type=int, default=0, help="linear head after ln_post for the losses (0: none)")
    a("--init-from", default=None, help="kit checkpoint (.pt) or Hugging Face MLCD/RICE directory")
    # data
    a("--num-regions", type=int, default=NUM_REGIONS, help="N regions per image (RICE)")
    a("--image-topl", type=int, default=IMAGE_TOPL, help="labels per image for the image term (MLCD l)")
    a("--crop", default="random", choices=["random", "center", "squash"])
    a("--min-box-visible", type=float, default=0.5, help="share of a box that must stay inside the crop")
    a("--min-crop-scale", type=float, default=1.0,
      help="--crop random: the square covers a random share in [this, 1] of the image's (scale augmentation)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers per rank")
    a("--shuffle-block", type=int, default=SHUFFLE_BLOCK, help="consecutive training images kept together in "
      "the epoch order (a tar shard's worth: few shard files opened per micro-batch)")
    a("--shuffle-window", type=int, default=SHUFFLE_WINDOW, help="blocks shuffled together (block x window "
      ">= the training images: a full permutation)")
    # loss
    a("--object-weight", type=float, default=None, help="weight of L_obj (default 1 for rice, 0 for mlcd)")
    a("--ocr-weight", type=float, default=None, help="weight of L_ocr (default 1 for rice, 0 for mlcd)")
    a("--image-weight", type=float, default=None, help="weight of L_img (default 1 for mlcd, 0 for rice)")
    a("--rho", type=float, default=RHO, help="negative sampling rate")
    a("--scale", type=float, default=SCALE)
    a("--margin", type=float, default=MARGIN)
    a("--margin-kind", default="arcface", choices=["arcface", "cosface", "none"])
    # optimisation
    a("--batch-size", type=int, default=BATCH_SIZE, help="global batch: all ranks and accumulation steps")
    a("--accum", type=int, default=1, help="gradient accumulation steps")
    a("--steps", type=int, default=0, help="optimiser steps (default: from --epochs)")
    a("--epochs", type=float, default=1.0)
    a("--lr", type=float, default=LR)
    a("--min-lr-ratio", type=float, default=0.0, help="cosine ends at this fraction of --lr")
    a("--warmup", type=int, default=WARMUP, help="linear warm-up steps")
    a("--weight-decay", type=float, default=WEIGHT_DECAY)
    a("--bank-lr-mult", type=float, default=1.0, help="learning-rate multiplier of the class-centre banks")
    a("--bank-weight-decay", type=float, default=None, help="default: --weight-decay")
    a("--beta2", type=float, default=BETAS[1])
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype (auto: bf16 on GPU)")
    a("--compile", action="store_true", help="torch.compile the encoder")
    a("--grad-checkpointing", action="store_true")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int, default=0)
    # bookkeeping
    a("--log-every", type=int, default=10)
    a("--save-every", type=int, default=1000, help="write ckpt/latest.pt every this many steps")
    a("--keep-every", type=int, default=0, help="keep ckpt/step_*.pt every this many steps (0: none)")
    a("--peak-tflops", type=float, default=0, help="peak per device for MFU (default: known GPUs)")
    a("--tensorboard", action="store_true")
    a("--force", action="store_true", help="start over: discard the run folder's checkpoint and log")
    args = p.parse_args(argv)
    rice = args.method == "rice"
    args.object_weight = (1.0 if rice else 0.0) if args.object_weight is None else args.object_weight
    args.ocr_weight = (1.0 if rice else 0.0) if args.ocr_weight is None else args.ocr_weight
    args.image_weight = (0.0 if rice else 1.0) if args.image_weight is None else args.image_weight
    args.bank_weight_decay = args.weight_decay if args.bank_weight_decay is None else args.bank_weight_decay
    args.run_dir = args.run_dir or os.path.join(args.work, "train")
    for name in ("object_weight", "ocr_weight", "image_weight"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0")
    if args.object_weight + args.ocr_weight + args.image_weight == 0:
        raise SystemExit("error: every loss weight is 0: nothing to train")
    if not rice and (args.object_weight or args.ocr_weight):
        raise SystemExit("error: --method mlcd trains the image term only; use --method rice for region terms")
    if not 0 < args.min_crop_scale <= 1:
        raise SystemExit("error: --min-crop-scale must be in (0, 1]")
    if args.num_regions < 1 or args.image_topl < 1 or args.accum < 1 or args.batch_size < 1:
        raise SystemExit("error: --num-regions, --image-topl, --accum and --batch-size must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------
# stage outputs: read and check everything before training starts


def fail(msg):
    raise SystemExit(f"error: {msg}")


def complete_manifest(work, stage, hint):
    folder = os.path.join(work, stage)
    m = workdir.read_manifest(folder)
    if m is None or not m.get("complete"):
        fail(f"{folder}/ is missing or unfinished: run {hint} first")
    return folder, m


def array(folder, name, shape=None, what=""):
    path = os.path.join(folder, name + ".npy")
    if not os.path.exists(path):
        fail(f"{path} is missing ({what}): rerun that stage with --force")
    a = np.load(path, mmap_mode="r")
    if shape is not None and (len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape))):
        fail(f"{path} has shape {a.shape}, expected {tuple('?' if s is None else s for s in shape)} ({what}): "
             f"the stage outputs do not belong together; rerun the stages in order with --force")
    return a


def check_ids(a, low, high, path, what):
    """min/max over a memmap in blocks (it can be billions of rows)."""
    for s in range(0, len(a), 1 << 24):
        block = np.asarray(a[s: s + (1 << 24)])
        if block.size and (block.min() < low or block.max() >= high):
            bad = block[(block < low) | (block >= high)][:5]
            fail(f"{path}: {what} must be in [{low}, {high}); found {bad.tolist()}")


def load_stage_outputs(args) -> dict:
    """Paths and sizes of everything the dataset reads, and the rows that train. Exits with a clear message
    on any inconsistency."""
    work = args.work
    img_folder, img_m = complete_manifest(work, "images", "01_mine_regions.py (it writes the image table)")
    table = workdir.read_image_table(work)
    n = len(table)
    reg_folder, reg_m = complete_manifest(work, "regions", "01_mine_regions.py")
    cl_folder, cl_m = complete_manifest(work, "clusters", "03_cluster.py")
    if reg_m.get("image_table") != img_m.get("fingerprint"):
        fail(f"{reg_folder} was made from another image table than {img_folder}: rerun 01_mine_regions.py --force")
    regions_fp = json.loads(json.dumps({k: reg_m.get(k) for k in ("finished", "rows", "image_table", "features")}))
    if cl_m.get("inputs", {}).get("regions") != regions_fp:
        fail(f"{cl_folder} was clustered from other region features than {reg_folder} now holds "
             f"(01 was rerun after 03): rerun 03_cluster.py --force")
    K = int(cl_m["k"])
    reg_off = array(reg_folder, "region_offsets", (n + 1,), "one offset per image + 1")
    R = int(reg_off[-1]) if n else 0
    boxes = array(reg_folder, "boxes", (R, 4), "one box per region")
    reg_status = array(reg_folder, "status", (n,), "one status per image")
    region_labels = array(cl_folder, "region_labels", (R,), "one label per region")
    image_labels = array(cl_folder, "image_labels", (n, None), "top-l labels per image")
    if args.object_weight:
        check_ids(region_labels, 0, K, os.path.join(cl_folder, "region_labels.npy"), "region labels")
    if args.image_weight:
        check_ids(image_labels.reshape(-1), -1, K, os.path.join(cl_folder, "image_labels.npy"), "image labels")
        if image_labels.shape[1] < args.image_topl:
            print(f"note: 03 kept {image_labels.shape[1]} labels per image; --image-topl {args.image_topl} uses "
                  f"{image_labels.shape[1]}", flush=True)

    ocr = None
    if args.ocr_weight:
        ocr_folder, ocr_m = complete_manifest(work, "ocr", "02_extract_ocr.py (or pass --ocr-weight 0)")
        if ocr_m.get("image_table") != img_m.get("fingerprint"):
            fail(f"{ocr_folder} was made from another image table than {img_folder}: rerun 02_extract_ocr.py --force")
        line_off = array(ocr_folder, "line_offsets", (n + 1,), "one offset per image + 1")
        L = int(line_off[-1]) if n else 0
        array(ocr_folder, "boxes", (L, 4), "one box per text line")
        tok_off = array(ocr_folder, "token_offsets", (L + 1,), "one offset per line + 1")
        tokens = array(ocr_folder, "tokens", (int(tok_off[-1]) if L + 1 else 0,), "token ids")
        vocab = int(ocr_m.get("tokenizer", {}).get("vocab_size", OCR_VOCAB))
        check_ids(tokens, 0, vocab, os.path.join(ocr_folder, "tokens.npy"), "OCR token ids")
        ocr = dict(folder=ocr_folder, vocab=vocab, lines=L,
                   max_tokens=int(ocr_m.get("tokenizer", {}).get("max_tokens", 10)))

    # the training rows, in blocks of images: memory is the rows themselves, not a few arrays per image
    rows, sums = [], {"status_ok": 0, "object_regions": 0, "text_regions": 0, "with_image_labels": 0}
    for s in range(0, n, 1 << 22):
        e = min(n, s + (1 << 22))
        ok = np.asarray(table.status[s:e]) == workdir.OK
        obj_count = np.diff(np.asarray(reg_off[s: e + 1]))
        text_count = np.zeros(e - s, np.int64)
        if args.ocr_weight:
            lo = np.asarray(line_off[s: e + 1])
            has_token = np.diff(np.asarray(tok_off[lo[0]: lo[-1] + 1])) > 0       # lines with a token label
            labelled = np.concatenate([[0], np.cumsum(has_token)])
            text_count = labelled[lo[1:] - lo[0]] - labelled[lo[:-1] - lo[0]]
        has_image_label = (np.asarray(image_labels[s:e, 0]) >= 0 if image_labels.shape[1]
                           else np.zeros(e - s, bool))
        trains = np.zeros(e - s, bool)
        if args.object_weight:
            trains |= obj_count > 0
        if args.ocr_weight:
            trains |= text_count > 0
        if args.image_weight:
            trains |= has_image_label
        sel = np.flatnonzero(ok & trains)
        rows.append((s + sel).astype(np.int64))
        sums["status_ok"] += int(ok.sum())
        sums["object_regions"] += int(obj_count[sel].sum()) if args.object_weight else 0
        sums["text_regions"] += int(text_count[sel].sum()) if args.ocr_weight else 0
        sums["with_image_labels"] += int(has_image_label[sel].sum()) if args.image_weight else 0
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    counts = {"images": n, "status_ok": sums["status_ok"], "train_images": len(rows),
              **{k: sums[k] for k in ("object_regions", "text_regions", "with_image_labels")}}
    if not len(rows):
        fail(f"no image has a label for the enabled terms (object {args.object_weight}, ocr {args.ocr_weight}, "
             f"image {args.image_weight}); {counts}")
    del reg_status, boxes
    return dict(work=work, n=n, K=K, rows=rows, counts=counts, ocr=ocr, clusters=cl_folder, regions=reg_folder,
                fingerprints={"images": img_m.get("fingerprint"), "regions": regions_fp,
                              "clusters": cl_m.get("finished")})


# ----------------------------------------------------------------------------------------------------------
# the dataset: one image -> uint8 pixels, N boxes with their kind and labels, the image's labels


class RegionDataset(torch.utils.data.Dataset):
    """Items are (epoch, position in train_images). Memmaps are opened lazily in each worker process."""

    def __init__(self, work, train_rows_path, size, num_regions, max_tokens, image_topl, crop, min_visible,
                 seed, use_objects, use_ocr, use_image, min_crop_scale=1.0):
        self.work, self.train_rows_path, self.size, self.N, self.M = work, train_rows_path, size, num_regions, max_tokens
        self.l, self.crop, self.min_visible, self.seed = image_topl, crop, min_visible, seed
        self.use_objects, self.use_ocr, self.use_image = use_objects, use_ocr, use_image
        self.min_crop_scale = min_crop_scale
        self._a = None

    def __getstate__(self):                      # workers open their own memmaps
        return {**self.__dict__, "_a": None}

    def arrays(self):
        if self._a is None:
            w, a = self.work, {}
            a["table"] = workdir.read_image_table(w)
            a["rows"] = np.load(self.train_rows_path, mmap_mode="r")
            if self.use_objects:
                a["reg_off"] = workdir.load(os.path.join(w, "regions"), "region_offsets")
                a["reg_boxes"] = workdir.load(os.path.join(w, "regions"), "boxes")
                a["reg_labels"] = workdir.load(os.path.join(w, "clusters"), "region_labels")
            if self.use_ocr:
                o = os.path.join(w, "ocr")
                a["line_off"], a["line_boxes"] = workdir.load(o, "line_offsets"), workdir.load(o, "boxes")
                a["tok_off"], a["tokens"] = workdir.load(o, "token_offsets"), workdir.load(o, "tokens")
            if self.use_image:
                a["img_labels"] = workdir.load(os.path.join(w, "clusters"), "image_labels")
            self._a = a
        return self._a

    def __len__(self):
        return len(self.arrays()["rows"])

    def __getitem__(self, item):
        epoch, pos = item
        a = self.arrays()
        self._reads = getattr(self, "_reads", 0) + 1
        if self._reads % 8192 == 0:                # random reads touch every page of the memmaps over an epoch
            workdir.release_pages(*(v for v in a.values() if isinstance(v, np.ndarray)))
            a["table"].release()
        row = int(a["rows"][pos])
        # this sample's crop and region draw, keyed by its place in train_images.npy (not its table row), so
        # the same images as loose files or as tar shards (other rows around them) train identically
        rng = np.random.default_rng([self.seed, epoch, pos])
        N, M, S = self.N, self.M, self.size
        out = dict(row=np.int64(row), ok=np.bool_(False), pixels=np.zeros((S, S, 3), np.uint8),
                   boxes=np.zeros((N, 4), np.float32), kind=np.zeros(N, np.int8),
                   object_label=np.full(N, -1, np.int64), ocr_tokens=np.full((N, M), -1, np.int64),
                   image_labels=np.full(self.l, -1, np.int64))
        img, status = a["table"].open(row)          # a loose file, or one pread of its tar member
        if img is None:
            out["status"] = status
            return out
        # candidates: object regions (label: nearest centre) and text lines (labels: their token ids)
        cand_boxes, kinds, obj, toks = [], [], [], []
        if self.use_objects:
            s, e = int(a["reg_off"][row]), int(a["reg_off"][row + 1])
            cand_boxes.append(np.asarray(a["reg_boxes"][s:e], np.float32))
            kinds.append(np.ones(e - s, np.int8))
            obj.append(np.asarray(a["reg_labels"][s:e], np.int64))
            toks.append(np.full((e - s, M), -1, np.int64))
        if self.use_ocr:
            s, e = int(a["line_off"][row]), int(a["line_off"][row + 1])
            t = np.full((e - s, M), -1, np.int64)
            for k in range(s, e):
                ids = np.asarray(a["tokens"][int(a["tok_off"][k]): int(a["tok_off"][k + 1])])[:M]
                t[k - s, :len(ids)] = ids
            has = (t >= 0).any(1)                                   # a line without tokens has no label
            cand_boxes.append(np.asarray(a["line_boxes"][s:e], np.float32)[has])
            kinds.append(np.full(int(has.sum()), 2, np.int8))
            obj.append(np.full(int(has.sum()), -1, np.int64))
            toks.append(t[has])
        boxes = np.concatenate(cand_boxes) if cand_boxes else np.zeros((0, 4), np.float32)
        pixels, boxes, visible = workdir.resize_crop(img, S, boxes, self.crop, rng, self.min_crop_scale)
        keep = np.flatnonzero(visible >= self.min_visible)
        # RICE Sec. 3.2: N regions per image; more -> a random N; fewer -> all, padded by resampling
        if len(keep) > N:
            pick = rng.choice(keep, N, replace=False)
        elif len(keep):
            pick = np.concatenate([keep, rng.choice(keep, N - len(keep), replace=True)])
        else:
            pick = keep
        k = len(pick)
        if k:
            out["boxes"][:k] = boxes[pick]
            out["kind"][:k] = np.concatenate(kinds)[pick]
            out["object_label"][:k] = np.concatenate(obj)[pick]
            out["ocr_tokens"][:k] = np.concatenate(toks)[pick]
        if self.use_image:
            labels = np.asarray(a["img_labels"][row][: self.l], np.int64)
            out["image_labels"][: len(labels)] = labels
        out["pixels"], out["ok"] = pixels, np.bool_(True)
        out["status"] = "ok"
        return out


class StepSampler:
    """Yields this rank's micro-batches, step after step from `start_step`: a list of (epoch, position).

    Global batch G per step; drop-last per epoch. Epoch e's order, from (seed, e) only: the positions of
    train_images are cut into blocks of `block` consecutive positions (consecutive rows: mostly one tar shard),
    the blocks are permuted, groups of `window` blocks in that order form windows, and each window's positions
    are permuted. Step t takes positions [t*G, (t+1)*G) of that order, sorted, so each rank's and each loader
    worker's slice covers few blocks: a worker opens a few shard files per micro-batch, not one per sample.
    Memory: n / block ints for the block order plus one window's block * window positions, independent of the
    dataset size at a fixed block (3 MB at 400M images). With block * window >= n the whole epoch is one window:
    a full random permutation, then sorted within each step."""

    def __init__(self, n, global_batch, accum, rank, world, seed, start_step, total_steps, block=1024, window=64):
        if global_batch % (accum * world):
            fail(f"--batch-size {global_batch} is not divisible by --accum {accum} x {world} processes")
        if global_batch > n:
            fail(f"--batch-size {global_batch} is larger than the {n} training images")
        if block < 1 or window < 1:
            fail("--shuffle-block and --shuffle-window must be >= 1")
        self.n, self.G, self.accum, self.rank, self.world, self.seed = n, global_batch, accum, rank, world, seed
        self.block, self.window = block, window
        self.micro = global_batch // (accum * world)
        self.steps_per_epoch = n // global_batch
        self.start, self.total = start_step, total_steps
        self._epoch, self._windows = None, {}

    def _setup(self, epoch):
        if self._epoch != epoch:
            blocks = (self.n + self.block - 1) // self.block
            self._order = np.random.default_rng([self.seed, epoch]).permutation(blocks)
            sizes = np.minimum(self.block, self.n - self._order * self.block)
            self._start = np.concatenate([[0], np.cumsum(sizes)])[:: self.window]   # first position of each window
            self._start = np.append(self._start, self.n) if self._start[-1] != self.n else self._start
            self._epoch, self._windows = epoch, {}

    def _window(self, epoch, w):
        if w not in self._windows:
            blocks = self._order[w * self.window: (w + 1) * self.window]
            pos = np.concatenate([np.arange(b * self.block, min((b + 1) * self.block, self.n)) for b in blocks])
            np.random.default_rng([self.seed, epoch, w]).shuffle(pos)
            self._windows = {w: pos}                                            # one window held at a time
        return self._windows[w]

    def positions(self, epoch, lo, hi):
        """Positions [lo, hi) of epoch's order."""
        self._setup(epoch)
        out, w = [], int(np.searchsorted(self._start, lo, side="right") - 1)
        while lo < hi:
            s, e = int(self._start[w]), int(self._start[w + 1])
            take = min(hi, e) - lo
            out.append(self._window(epoch, w)[lo - s: lo - s + take])
            lo, w = lo + take, w + 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def __len__(self):
        return (self.total - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.steps_per_epoch)
            batch = np.sort(self.positions(epoch, pos * self.G, (pos + 1) * self.G))
            for a in range(self.accum):
                base = (a * self.world + self.rank) * self.micro
                yield [(epoch, int(j)) for j in batch[base: base + self.micro]]


def collate(items):
    out = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0] if k != "status"}
    out["status"] = [it["status"] for it in items]
    return out


# ----------------------------------------------------------------------------------------------------------
# model pieces


def init_bank(bank: CentreBank, seed: int, std: float = 0.01):
    """Fill this rank's shard from row blocks seeded by (seed, block), so the full bank is the same whatever
    the number of ranks (a two-process run starts where a one-process run starts)."""
    with torch.no_grad():
        lo, hi = bank.start, bank.start + bank.num_local
        for b in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1 if hi > lo else 0):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            rows = min(INIT_BLOCK, bank.num_classes - b * INIT_BLOCK)
            block = torch.normal(0.0, std, (rows, bank.dim), generator=g)
            s, e = max(lo, b * INIT_BLOCK), min(hi, b * INIT_BLOCK + rows)
            bank.weight[s - lo: e - lo] = block[s - b * INIT_BLOCK: e - b * INIT_BLOCK].to(bank.weight.device)


def lr_at(step, args, total):
    """Linear warm-up, then cosine from lr to min_lr_ratio * lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def step_seed(seed, step, micro, rank):
    return (seed * 1_000_003 + step) * 1009 + micro * 131 + rank


def compute_losses(out, batch, banks, args):
    """The terms of one micro-batch. Each is the mean over the global micro-batch's labelled rows (banks
    all-gather); a term with no labelled row anywhere is 0 and still reaches every parameter (DDP)."""
    terms = {}
    if args.object_weight or args.ocr_weight:
        B, N, E = out.region_embeddings.shape
        emb = out.region_embeddings.reshape(B * N, E)
        kind = batch["kind"].reshape(-1)
        if args.object_weight:          # RICE Eq. 3: one positive, the region's nearest centre
            rows = kind == 1
            batch["rows_object"] = int(rows.sum())
            terms["object"] = banks["object"](emb[rows], batch["object_label"].reshape(-1)[rows])
        if args.ocr_weight:             # RICE Eq. 4: positives are the text region's token ids
            rows = kind == 2
            batch["rows_ocr"] = int(rows.sum())
            terms["ocr"] = banks["ocr"](emb[rows], batch["ocr_tokens"].reshape(B * N, -1)[rows])
    if args.image_weight:               # MLCD Eq. 5: the image's l nearest centres
        batch["rows_image"] = len(out.class_embedding)
        terms["image"] = banks["object"](out.class_embedding, batch["image_labels"])
    weights = {"object": args.object_weight, "ocr": args.ocr_weight, "image": args.image_weight}
    total = sum(weights[k] * t.loss for k, t in terms.items())
    return total, terms


def bank_flops(terms, batch_rows, E, world):
    """Model FLOPs of the bank cosines of one micro-step, all ranks: 6 x global rows x active centres x D
    (forward and backward), from this rank's rows and active count (ranks hold similar numbers)."""
    return sum(6.0 * E * batch_rows[k] * world * t.num_active * world for k, t in terms.items())


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def gather_bank_state(bank, opt):
    """Whole bank weight and its AdamW moments (collective)."""
    st = opt.state.get(bank.weight, {})
    whole = {"weight": bank.full_weight().cpu()}
    for k in ("exp_avg", "exp_avg_sq"):
        if k in st:          # sharded like the weight
            whole[k] = all_gather_rows(st[k].detach(), bank.group)[0].cpu()
    if "step" in st:
        whole["step"] = st["step"].detach().cpu().reshape(())
    return whole


def restore_bank_state(bank, opt, whole):
    bank.load_full_weight(whole["weight"].to(bank.weight.device))
    if "exp_avg" in whole:
        lo, hi = bank.start, bank.start + bank.num_local
        fused = bool(opt.defaults.get("fused"))          # fused AdamW keeps its step count on the device
        opt.state[bank.weight] = {
            "step": whole["step"].to(torch.float32).to(bank.weight.device if fused else "cpu"),
            "exp_avg": whole["exp_avg"][lo:hi].to(bank.weight.device).clone(),
            "exp_avg_sq": whole["exp_avg_sq"][lo:hi].to(bank.weight.device).clone()}


def peak_tflops(args, device, dtype):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS.items():
            if key in name:
                return peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
    return None


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    rank, world = workdir.dist_info()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        fail("--device cuda but torch sees no GPU")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and use_cuda) else torch.float32

    # 1. check the stage outputs before anything expensive
    data = load_stage_outputs(args)
    workdir.init_dist("nccl" if use_cuda else "gloo", timeout_hours=2)
    group = dist.group.WORLD if world > 1 else None

    # 2. the encoder
    if args.init_from:
        overrides = {k: v for k, v in (("image_size", args.image_size),) if v}
        if args.region_blocks >= 0:
            overrides["region_blocks"] = args.region_blocks
        encoder = load_encoder(args.init_from, **overrides)
        if args.embed_dim and encoder.cfg.embed_dim != args.embed_dim:
            fail(f"--embed-dim {args.embed_dim} differs from {args.init_from}'s {encoder.cfg.embed_dim}")
    else:
        overrides = {"embed_dim": args.embed_dim}
        if args.image_size:
            overrides["image_size"] = args.image_size
        if args.region_blocks >= 0:
            overrides["region_blocks"] = args.region_blocks
        torch.manual_seed(args.seed)                 # every rank builds the same initial encoder
        encoder = VisionEncoder(preset(args.model, **overrides))
    cfg: ViTConfig = encoder.cfg
    S = cfg.image_size
    if S % cfg.patch_size:
        fail(f"--image-size {S} is not a multiple of the patch size {cfg.patch_size}")
    if args.method == "rice" and (args.object_weight or args.ocr_weight) and cfg.region_blocks == 0:
        fail("--method rice needs the region path: --region-blocks must be >= 1")
    encoder.grad_checkpointing = args.grad_checkpointing
    encoder.to(device).train()
    E = cfg.embed_dim or cfg.width

    # 3. the banks, sharded over the ranks (losses.py), initialised world-size independently
    bank_kw = dict(rho=args.rho, scale=args.scale, margin=args.margin, margin_kind=args.margin_kind, group=group)
    banks = torch.nn.ModuleDict()
    if args.object_weight or args.image_weight:
        banks["object"] = CentreBank(data["K"], E, **bank_kw)
    if args.ocr_weight:
        banks["ocr"] = CentreBank(data["ocr"]["vocab"], E, **bank_kw)
    for i, bank in enumerate(banks.values()):
        init_bank(bank, args.seed + 7919 * (i + 1))
    banks.to(device)

    # 4. optimisers: AdamW for the encoder (no decay on biases, norms, class token, its rotary angles), and one
    # for the banks with its own lr multiplier
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        (no_decay if p.ndim < 2 or name in ("class_embedding", "class_pos_emb") else decay).append(p)
    fused = {"fused": True} if use_cuda else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(BETAS[0], args.beta2), eps=EPS, **fused)
    bank_opt = torch.optim.AdamW(list(banks.parameters()), lr=args.lr * args.bank_lr_mult,
                                 betas=(BETAS[0], args.beta2), eps=EPS, weight_decay=args.bank_weight_decay, **fused)

    # 5. the run folder: config, train rows, resume
    run, ckpt_dir = args.run_dir, os.path.join(args.run_dir, "ckpt")
    latest = os.path.join(ckpt_dir, "latest.pt")
    config = {**{k: v for k, v in vars(args).items() if k not in ("force",)},
              "image_size": S, "region_blocks": cfg.region_blocks, "encoder_config": asdict(cfg),
              "K": data["K"], "ocr_vocab": data["ocr"]["vocab"] if data["ocr"] else None, "world": world,
              "train_counts": data["counts"], "inputs": data["fingerprints"]}
    if rank == 0:
        if args.force and os.path.isdir(run):
            for sub in ("ckpt", "log.jsonl", "manifest.json", "skipped_images.jsonl", "tensorboard"):
                path = os.path.join(run, sub)
                shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
        os.makedirs(ckpt_dir, exist_ok=True)
    workdir.barrier()
    start_step, resumed = 0, None
    if os.path.exists(latest):
        resumed = torch.load(latest, map_location="cpu", weights_only=True)
        old = resumed["config"]
        changed = {k: (old.get(k), config[k]) for k in RESUME_KEYS if old.get(k) != config[k]}
        if old.get("inputs") != config["inputs"]:
            changed["stage outputs"] = "the work directory's stages were rerun since"
        if changed:
            fail(f"{latest} was trained with other settings: {changed}. Resume with the old settings, use another "
                 f"--run, or --force to start over")
    rows_path = os.path.join(run, "train_images.npy")
    if rank == 0:
        if resumed is not None and os.path.exists(rows_path) and not np.array_equal(np.load(rows_path), data["rows"]):
            fail(f"{rows_path} differs from the rows the stage outputs give now: the data changed; use --force")
        workdir.write_npy(rows_path, data["rows"])
        workdir.write_json(os.path.join(run, "config.json"), config)
    workdir.barrier()

    n_train = len(data["rows"])
    steps_per_epoch = n_train // args.batch_size if args.batch_size <= n_train else 0
    total = args.steps or max(1, math.ceil(args.epochs * max(steps_per_epoch, 1)))
    if resumed is not None:
        encoder.load_state_dict(resumed["encoder"])
        opt.load_state_dict(resumed["optimizer"])
        for name, bank in banks.items():
            restore_bank_state(bank, bank_opt, resumed["banks"][name])
        start_step = int(resumed["step"])
        if rank == 0:       # keep the log up to the checkpoint: the steps after it are trained again
            log_path = os.path.join(run, "log.jsonl")
            if os.path.exists(log_path):
                with open(log_path) as f:
                    kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
                with open(log_path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(log_path + ".tmp", log_path)
        del resumed
        workdir.say(f"train: resumed from {latest} at step {start_step}")
    if start_step >= total:
        workdir.say(f"train: {run} is complete ({start_step} of {total} steps); --steps more, or --force")
        return finish(args, run, start_step, total, None, t_start, rank)
    if rank == 0 and os.path.exists(os.path.join(run, "manifest.json")):
        os.remove(os.path.join(run, "manifest.json"))          # the run is not complete until it ends again

    sampler = StepSampler(n_train, args.batch_size, args.accum, rank, world, args.seed, start_step, total,
                          args.shuffle_block, args.shuffle_window)
    dataset = RegionDataset(args.work, rows_path, S, args.num_regions, data["ocr"]["max_tokens"] if data["ocr"]
                            else 10, args.image_topl, args.crop, args.min_box_visible, args.seed,
                            bool(args.object_weight), bool(args.ocr_weight), bool(args.image_weight),
                            args.min_crop_scale)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=use_cuda,
                                         prefetch_factor=4 if args.workers else None,
                                         persistent_workers=False)

    model = encoder
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(encoder, device_ids=[local_rank] if use_cuda else None)
    if args.compile:
        model = torch.compile(model)

    # FLOPs of one step, for MFU: encoder (incl. region path) on the global batch + the bank cosines
    N = args.num_regions if args.method == "rice" and (args.object_weight or args.ocr_weight) else 0
    encoder_flops = args.batch_size * flops_per_image(cfg, S, S, N)
    peak = peak_tflops(args, device, dtype)

    tb = None
    if args.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--tensorboard needs the tensorboard package: pip install tensorboard")
        tb = SummaryWriter(os.path.join(run, "tensorboard"))
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    workdir.say(f"train: {args.method}, {args.model} at {S} px ({encoder.num_params() / 1e6:.2f}M params), "
                f"{n_train} images ({data['counts']}), global batch {args.batch_size} = {world} x "
                f"{sampler.micro} x {args.accum}, {total} steps ({steps_per_epoch} per epoch), banks "
                f"{ {k: b.num_classes for k, b in banks.items()} } on {device}, {dtype}")

    all_params = list(encoder.parameters())
    bank_params = list(banks.parameters())
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "bank_flops": 0.0}
    stats_keys = ["loss"] + [f"{t}_{p}" for t in ("object", "ocr", "image") for p in ("loss", "pos", "neg")]
    acc = torch.zeros(len(stats_keys) + 3, dtype=torch.float64)
    skipped = 0
    data_iter = iter(loader)
    step = start_step
    last_good = latest if os.path.exists(latest) else None
    while step < total:
        lr = lr_at(step, args, total)
        for g in opt.param_groups:
            g["lr"] = lr
        for g in bank_opt.param_groups:
            g["lr"] = lr * args.bank_lr_mult
        step_terms = {}
        step_loss = 0.0
        for micro in range(args.accum):
            t_wait = time.perf_counter()
            batch = next(data_iter)
            window["wait"] += time.perf_counter() - t_wait
            bad = ~batch["ok"]
            if bad.any():
                skipped += int(bad.sum())
                with open(os.path.join(run, "skipped_images.jsonl"), "a") as f:
                    for i in np.flatnonzero(bad.numpy()):
                        row = int(batch["row"][i])
                        f.write(json.dumps({"rank": rank, "step": step, "row": row, "status": batch["status"][i],
                                            "path": workdir.read_image_table(args.work).path(row)}) + "\n")
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            torch.manual_seed(step_seed(args.seed, step, micro, rank))   # negative sampling of this micro-step
            pixels = workdir.normalize(batch["pixels"])
            sync = world > 1 and micro < args.accum - 1
            with (model.no_sync() if sync and hasattr(model, "no_sync") else contextlib.nullcontext()):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    if N:
                        out = model(pixels, batch["boxes"], batch["kind"] > 0)
                    else:
                        out = model(pixels)
                    loss, terms = compute_losses(out, batch, banks, args)
                (loss / args.accum).backward()
            step_loss += float(loss.detach()) / args.accum          # the same value on every rank
            window["bank_flops"] += bank_flops(terms, {k: batch[f"rows_{k}"] for k in terms}, E, world)
            for k, t in terms.items():
                prev = step_terms.get(k, (0.0, 0.0, 0.0))
                step_terms[k] = tuple(p + float(v) / args.accum for p, v in zip(prev, (t.loss.detach(), t.positive, t.negative)))

        if not math.isfinite(step_loss):
            bar.close()
            raise SystemExit(f"error: the loss is {step_loss} at step {step + 1} (terms "
                             f"{ {k: v[0] for k, v in step_terms.items()} }); stopped before the optimiser step. "
                             f"The last good checkpoint is {last_good or 'none (no checkpoint written yet)'}. "
                             f"Lower --lr, raise --warmup, or check the data")
        # DDP averaged the backbone gradients over ranks; the banks' gradients are already those of the
        # global mean loss: bring the backbone to the same scale (see the docstring)
        grads = [p.grad for p in all_params if p.grad is not None]
        if world > 1 and grads:
            torch._foreach_mul_(grads, float(world))
        bank_grads = [p.grad for p in bank_params if p.grad is not None]
        sq = torch.zeros((), device=device)
        if grads:
            sq = sq + torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        bank_sq = torch.stack(torch._foreach_norm(bank_grads)).float().pow(2).sum() if bank_grads else torch.zeros((), device=device)
        if world > 1:
            dist.all_reduce(bank_sq, group=group)            # each rank holds a different shard
        grad_norm = (sq + bank_sq).sqrt()
        if args.grad_clip > 0:
            coef = (args.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads + bank_grads, coef)
        opt.step()
        bank_opt.step()
        opt.zero_grad(set_to_none=True)
        bank_opt.zero_grad(set_to_none=True)
        step += 1
        window["steps"] += 1
        vals = [step_loss] + [v for t in ("object", "ocr", "image") for v in step_terms.get(t, (0.0, 0.0, 0.0))]
        acc += torch.tensor(vals + [float(grad_norm), 1.0, 0.0], dtype=torch.float64)
        bar.update(1)

        if step % args.log_every == 0 or step == total:
            now = time.perf_counter()
            elapsed = now - window["t0"]
            wait = torch.tensor([window["wait"], float(skipped)], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(wait)                        # mean data wait, all skipped images
                wait[0] /= world
            n_steps = window["steps"]
            mean = acc[: len(stats_keys)] / acc[-2]
            rec = {"step": step, "epoch": round(step / max(steps_per_epoch, 1), 4), "samples": step * args.batch_size,
                   "lr": lr, **{k: round(float(v), 6) for k, v in zip(stats_keys, mean) if k == "loss" or
                                 any(k.startswith(t) for t in step_terms)},
                   "grad_norm": round(float(acc[-3] / acc[-2]), 6)}
            step_s = elapsed / n_steps
            sps = args.batch_size / step_s
            flops = encoder_flops + window["bank_flops"] / n_steps
            rec.update(samples_per_s=round(sps, 2), samples_per_s_per_device=round(sps / world, 2),
                       step_s=round(step_s, 4), data_wait_s=round(float(wait[0]) / n_steps, 4),
                       data_wait_frac=round(float(wait[0]) / elapsed, 4),
                       tflops_per_device=round(flops / step_s / world / 1e12, 3),
                       mfu=round(flops / step_s / world / (peak * 1e12), 4) if peak else None,
                       eta_s=round((total - step) * step_s, 1), skipped_images=int(wait[1]))
            if use_cuda:
                rec["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            if rank == 0:
                with open(os.path.join(run, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if tb is not None:
                    for k, v in rec.items():
                        if isinstance(v, (int, float)) and k != "step":
                            tb.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}",
                                wait=f"{rec['data_wait_frac']:.0%}", **({"mfu": f"{rec['mfu']:.1%}"} if peak else {}))
            acc.zero_()
            window.update(t0=time.perf_counter(), wait=0.0, steps=0, bank_flops=0.0)

        if step % args.save_every == 0 or step == total or (args.keep_every and step % args.keep_every == 0):
            state = {"step": step, "samples": step * args.batch_size, "config": config,
                     "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
                     "encoder_config": asdict(cfg), "optimizer": opt.state_dict(),
                     "banks": {name: gather_bank_state(bank, bank_opt) for name, bank in banks.items()}}
            if rank == 0:
                save_atomic(state, latest)
                last_good = latest
                if args.keep_every and step % args.keep_every == 0:
                    keep = os.path.join(ckpt_dir, f"step_{step:08d}.pt")
                    try:
                        if os.path.exists(keep):
                            os.remove(keep)
                        os.link(latest, keep)
                    except OSError:
                        shutil.copyfile(latest, keep)
            del state
            workdir.barrier()
    bar.close()
    if tb is not None:
        tb.close()
    return finish(args, run, step, total, skipped, t_start, rank)


def finish(args, run, step, total, skipped, t_start, rank):
    manifest = None
    if rank == 0:
        last = None
        log_path = os.path.join(run, "log.jsonl")
        if os.path.exists(log_path):
            with open(log_path) as f:
                lines = [json.loads(ln) for ln in f if ln.strip()]
            last = lines[-1] if lines else None
        manifest = workdir.finish_stage(run, {
            "stage": "train", "method": args.method, "model": args.model, "steps": step, "total_steps": total,
            "samples": step * args.batch_size, "final": last, "checkpoint": os.path.join(run, "ckpt", "latest.pt"),
            "elapsed_s_this_run": round(time.time() - t_start, 1)})
        if last:
            print(f"train: {step} steps, loss {last['loss']:.4f}, checkpoint {manifest['checkpoint']}", flush=True)
    workdir.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return manifest


if __name__ == "__main__":
    main()
