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
    sbatch --nodes 8 slurm/04_train.sbatch --work runs/big --method rice --model L/14 --batch-size 32768
MLCD on its own codebook (03 --fit-on images --out runs/big/clusters_mlcd), on the paper's CLIP ViT-L/14:
    torchrun --nproc_per_node=8 04_train.py --work runs/big --method mlcd --clusters runs/big/clusters_mlcd \
        --run-dir runs/big/train_mlcd --batch-size 32768 --epochs 32
A 336 px fine-tune from the 224 px run (RICE: lr / 10; RoPE needs no position interpolation, a CLIP ViT's
position table is resampled to the new size):
    python 04_train.py --work runs/big --run-dir runs/big/train336 --init-from runs/big/train/ckpt/latest.pt \
        --image-size 336 --lr 1e-4
Continue from released weights: `--init-from /models/rice-vit-large-patch14-560` (a Hugging Face folder:
MLCDVisionModel, CLIPVisionModel such as mlcd-vit-large-patch14-336, or a CLIPModel's vision tower).

Reads <work>/images/, <work>/regions/ (01), <work>/ocr/ (02, RICE's OCR loss) and <work>/clusters/ (03; --clusters) and
the images themselves. Checks every stage output at start-up (complete manifests, matching lengths, labels
below K, 03 run on these regions, 01/02 run on this image table) before any GPU time is spent, on rank 0
only, reading each array once in blocks; a refusal stops every rank with the same line. A second trainer on
the same run folder is refused (.lock, held while the run lives; a killed run leaves none).
Writes the run folder (--run-dir, default <work>/train/):
    config.json          the settings; a resume with other data or model settings is refused
    train_images.npy     int64, the image-table rows that train (their order fixes the data order)
    log.jsonl            one JSON line every --log-every steps (fields below)
    skipped_images.jsonl images that failed to decode during training (rank, row, path, status)
    ckpt/latest.pt       written atomically every --save-every steps and at the end; ckpt/step_*.pt every
                         --keep-every steps (hard links). Plain dicts of tensors and numbers:
                         torch.load(path, weights_only=True); model.load_encoder(path) takes them directly.
    ckpt/banks_<step>/   the banks as each rank holds them: <bank>.<rank>-of-<world>.pt, rows [start, stop)
                         with both AdamW moments; latest.pt lists them. Saving needs no rank to hold a whole
                         bank, and a run resumes on any number of ranks (read_bank loads one whole).
    manifest.json        written last, when the run has reached its final step

The method (MLCD Sec. 3.2, RICE Sec. 3.2-3.3):
    --method mlcd   image level: L_img = MLCD Eq. 5 on the class embedding with the image's l = 8 labels from
                    03 (image_labels), against the object bank (K centres). Default model: the paper's CLIP
                    ViT-L/14 (clip-L/14, MLCD Tab. 9); --method rice defaults to the RoPE ViT-L/14 (L/14).
    --method rice   region level: each image brings N regions (--num-regions 10; more: a random N; fewer:
                    resampled with replacement up to N; none: only its image term, if enabled). An object
                    region takes L_obj (RICE Eq. 3: its one cluster label, object bank), a text region L_ocr
                    (RICE Eq. 4: its <= M token ids, OCR bank of 49,408 CLIP BPE tokens). Region embeddings
                    come from the region path of model.py (queries from the class token, attention masked to
                    the box). An optional image term L_img as in MLCD (--image-weight, default 0 for rice).
    loss = --object-weight * L_obj + --ocr-weight * L_ocr + --image-weight * L_img, each term the mean over
    the rows (regions or images) of the global batch that have a label. Both banks: s = 64, m = 0.3 (ArcFace
    margin on positives), negatives a uniform rho = 0.1 of each row's non-positive classes (--negatives
    per-row; shared and partial-fc are the other rules of losses.py), drawn afresh for every term at every
    step, once for the whole step however many micro-batches (--accum) it has.

Data: a map-style dataset read by DataLoader workers (--workers): each worker opens the memmaps lazily, reads
the image through the image table (a loose file, or its tar member with one pread at the offset the table
holds: random access, so resume stays exact; each worker keeps a few shard files open), decodes it with PIL
(image_io.ImageTable.open), resizes the short side to --image-size and cuts a square (--crop
random for training, center, or squash), moving the boxes with the pixels (image_io.resize_crop); a box with
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
position in train_images), and the losses' negative sample from one keyed by (seed, step, term) and blocks of
class ids, so restoring the step restores the data position and every random stream, with any number of
workers or ranks: a run killed and resumed follows the uninterrupted run's loss curve, and its log.jsonl
keeps only the records up to the checkpoint before the replayed steps log again (tests/test_train.py).

Optimisation: AdamW (papers: lr 1e-3, decoupled weight decay 0.2; biases, LayerNorms, the class token and its
rotary angles or the CLIP position table take no decay), linear warm-up for --warmup steps (MLCD Tab. 10:
2,000) then cosine to --min-lr-ratio x lr; the banks have their own optimiser with lr x --bank-lr-mult; the
gradient norm over encoder and banks together is clipped to --grad-clip. Gradient scale: the banks give every rank the
gradient of the global-batch mean loss (losses.py), and DDP averages the backbone gradients over ranks, so
the backbone gradients are multiplied by the world size before clipping (scale_and_clip_gradients): the
clipped gradient is that of the global-batch mean loss, the same as one process with the whole batch. With
--accum k each micro-batch's loss is its rows' share of the step's mean (the denominator is the step's
labelled rows, counted on the host), so the accumulated gradient is exact, not a mean of micro-batch means.
bf16 autocast on GPUs (--dtype), fp32 cosines in the banks; --compile (torch.compile), --grad-checkpointing.

The step (train_step) makes no host-device sync: the labels and the negative draw live on the host (the
loader's tensors, a gloo all-gather), the statistics stay on the device, and the only syncs are on steps that
log (Meter.record reads the statistics) or save (NonFiniteGuard.check, before the optimiser step).

Logs (every --log-every steps, console via tqdm and log.jsonl; --tensorboard also writes TensorBoard):
    step, epoch, samples, lr, loss, loss_object, loss_ocr, loss_image (and their positive / negative parts),
    grad_norm, samples_per_s, samples_per_s_per_device, step_s, data_wait_s, data_wait_frac, mfu, tflops_per_
    device, eta_s, skipped_images, max_mem_gib. MFU = model FLOPs per step (model.flops_per_image for the
    encoder incl. the region path, plus 6 x rows x active centres x D for the bank cosines) / (step time x
    devices x peak); the peak is --peak-tflops, or looked up for known GPUs (H100/H200 989 bf16 dense), else
    MFU is not reported.
A non-finite loss stops the run at the next step that logs or saves, before its optimiser step, naming the
first non-finite step and its terms; no checkpoint holds it, the last one is left as it was.
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
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import losses
import workdir
import image_io
import stage_folders
from losses import CentreBank
from model import ViTConfig, VisionEncoder, flops_per_image, load_encoder, preset, read_checkpoint
from model import peak_tflops as model_peak_tflops

# ----------------------------------------------------------------------------------------------------------
# defaults (the papers' values where they state one; see docs/choices.md)
WORK = "runs/demo"
METHOD = "rice"
MODEL = {"rice": "L/14", "mlcd": "clip-L/14"}   # RICE: the RoPE ViT of its released weights; MLCD: its paper's CLIP ViT
BATCH_SIZE = 32768            # global batch (MLCD Tab. 10: 32,800; RICE: 32K)
LR = 1e-3                     # MLCD Sec. 4.1, RICE Sec. 4.1
WEIGHT_DECAY = 0.2
BETAS = (0.9, 0.98)           # not stated; CLIP's ViT values
EPS = 1e-6
WARMUP = 2000                 # MLCD Tab. 10
NUM_REGIONS = 10              # RICE Tab. 5a
IMAGE_TOPL = losses.IMAGE_TOPL  # MLCD Sec. 4.1: l = 8
RHO, SCALE, MARGIN = losses.RHO, losses.SCALE, losses.MARGIN   # RICE Sec. 3.3 and 4.1
NO_DECAY = ("class_embedding", "class_pos_emb", "position_embedding")   # as MAE / timm: tokens and positions
INIT_BLOCK = 65536            # bank rows are initialised in blocks seeded by (seed, block): any world size agrees
# settings that fix the data order and the model; a resume must keep them
SHUFFLE_BLOCK, SHUFFLE_WINDOW = 1024, 64     # epoch order: 64-block windows of 1,024 consecutive images
RESUME_KEYS = ["shuffle_block", "shuffle_window", "method", "model", "image_size", "region_blocks", "embed_dim",
               "num_regions", "batch_size", "seed", "crop", "min_box_visible", "min_crop_scale", "image_topl",
               "object_weight", "ocr_weight", "image_weight"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    a = p.add_argument
    a("--work", default=WORK, help="work directory with images/, regions/, ocr/, clusters/")
    a("--run-dir", default=None, help="run folder (default <work>/train)")
    a("--clusters", default=None, help="03's output folder (default <work>/clusters; MLCD's image codebook can "
      "live beside RICE's, 03 --out)")
    a("--method", default=METHOD, choices=["mlcd", "rice"])
    a("--model", default=None, help="model.py preset: tiny, B/16, L/14, L/14-560, bigG/14 (RoPE ViTs) or "
      "clip-tiny, clip-B/32, clip-B/16, clip-L/14, clip-L/14-336 (CLIP ViTs); default L/14 for rice, clip-L/14 "
      "for mlcd")
    a("--image-size", type=int, default=0, help="training resolution (default: the preset's)")
    a("--region-blocks", type=int, default=-1, help="blocks that run region attention (default: the preset's)")
    a("--embed-dim", type=int, default=-1, help="linear head after ln_post for the losses (0: none; default: "
      "the preset's, CLIP presets project as MLCD Tab. 9 does)")
    a("--init-from", default=None, help="kit checkpoint (.pt) or Hugging Face folder: MLCDVisionModel (RICE, "
      "MLCD bigG), CLIPVisionModel (MLCD L/14-336, B/32) or a CLIPModel's vision tower")
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
    a("--negatives", default="per-row", choices=list(losses.NEGATIVE_RULES),
      help="per-row: each row's negatives are rho of its non-positive classes (RICE Sec. 3.3); shared: all the "
      "batch's positives plus rho of the rest, for every row; partial-fc: max(rho K, positives) rows (losses.py)")
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
    workdir.check_flags(args, {"image_size": "[0, 4096]", "region_blocks": ">= -1", "embed_dim": ">= -1",
                               "num_regions": ">= 1", "image_topl": ">= 1", "min_box_visible": "[0, 1]",
                               "min_crop_scale": "(0, 1]", "workers": ">= 0", "shuffle_block": ">= 1",
                               "shuffle_window": ">= 1", "object_weight": ">= 0", "ocr_weight": ">= 0",
                               "image_weight": ">= 0", "rho": "(0, 1]", "scale": "> 0", "margin": "[0, 1]",
                               "batch_size": ">= 1", "accum": ">= 1", "steps": ">= 0", "epochs": "> 0",
                               "lr": ">= 0", "min_lr_ratio": "[0, 1]", "warmup": ">= 0", "weight_decay": ">= 0",
                               "bank_lr_mult": ">= 0", "bank_weight_decay": ">= 0", "beta2": "[0, 1)",
                               "grad_clip": ">= 0", "seed": ">= 0", "log_every": ">= 1", "save_every": ">= 1",
                               "keep_every": ">= 0", "peak_tflops": ">= 0"})
    rice = args.method == "rice"
    args.model = args.model or MODEL[args.method]
    args.object_weight = (1.0 if rice else 0.0) if args.object_weight is None else args.object_weight
    args.ocr_weight = (1.0 if rice else 0.0) if args.ocr_weight is None else args.ocr_weight
    args.image_weight = (0.0 if rice else 1.0) if args.image_weight is None else args.image_weight
    args.bank_weight_decay = args.weight_decay if args.bank_weight_decay is None else args.bank_weight_decay
    args.run_dir = args.run_dir or os.path.join(args.work, "train")
    args.clusters = args.clusters or os.path.join(args.work, "clusters")
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


def load_stage_outputs(args, rows_path) -> dict:
    """Paths and sizes of everything the dataset reads; the image-table rows that train are streamed to
    rows_path (int64 .npy, in blocks: memory does not grow with the data). Exits with a clear message on any
    inconsistency."""
    work = args.work
    img_m = stage_folders.image_table_manifest(work)
    table = image_io.read_image_table(work)
    n = len(table)
    reg = stage_folders.read_regions(work)
    reg.boxes()                                          # there, with one box per region
    cl = stage_folders.read_clusters(args.clusters or os.path.join(work, "clusters"), reg,
                                     check_region_labels=bool(args.object_weight),
                                     check_image_labels=bool(args.image_weight))
    K, reg_off, image_labels = cl["K"], reg.offsets, cl["image_labels"]
    if args.image_weight:
        if image_labels.shape[1] < args.image_topl:
            print(f"note: 03 kept {image_labels.shape[1]} labels per image; --image-topl {args.image_topl} uses "
                  f"{image_labels.shape[1]}", flush=True)
        positives = min(args.image_topl, image_labels.shape[1])
        if K <= positives and workdir.dist_info()[0] == 0:          # MLCD Eq. 5 then has no negative term
            print(f"warning: the codebook has K = {K} centres and every image has {positives} positives "
                  f"(--image-topl): no centre is left as a negative, so MLCD's loss (Eq. 5) learns from positives "
                  f"only; cluster into K > {positives} centres (03 --k) or lower --image-topl", file=sys.stderr,
                  flush=True)
    ocr = None
    if args.ocr_weight:
        ocr = stage_folders.read_ocr(work, "02_extract_ocr.py (or pass --ocr-weight 0)")
        line_off, tok_off = ocr["line_offsets"], ocr["token_offsets"]

    # the training rows, in blocks of images: memory is the rows themselves, not a few arrays per image
    rows, sums = image_io.NpyAppender(rows_path, np.int64), {"status_ok": 0, "object_regions": 0, "text_regions": 0,
                                                             "with_image_labels": 0}
    for s in range(0, n, 1 << 22):
        e = min(n, s + (1 << 22))
        ok = np.asarray(table.status[s:e]) == image_io.OK
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
        rows.add(s + sel)
        sums["status_ok"] += int(ok.sum())
        sums["object_regions"] += int(obj_count[sel].sum()) if args.object_weight else 0
        sums["text_regions"] += int(text_count[sel].sum()) if args.ocr_weight else 0
        sums["with_image_labels"] += int(has_image_label[sel].sum()) if args.image_weight else 0
    rows.close()
    counts = {"images": n, "status_ok": sums["status_ok"], "train_images": rows.n,
              **{k: sums[k] for k in ("object_regions", "text_regions", "with_image_labels")}}
    if not rows.n:
        fail(f"no image has a label for the enabled terms (object {args.object_weight}, ocr {args.ocr_weight}, "
             f"image {args.image_weight}); {counts}")
    ocr_m = ocr and ocr["manifest"]
    return dict(work=work, n=n, K=K, n_train=rows.n, counts=counts,
                ocr=ocr and {k: ocr[k] for k in ("folder", "vocab", "lines", "max_tokens")},
                clusters=cl["folder"], regions=reg.folder,
                fingerprints={"images": img_m.get("fingerprint"), "regions": reg.fingerprint,
                              "clusters": cl["manifest"].get("finished"),
                              # 02 rerun with other settings (--max-tokens, --min-score) gives other labels
                              "ocr": ({k: ocr_m.get(k) for k in ("finished", "rows", "tokenizer", "settings")}
                                      if ocr else None)})


# ----------------------------------------------------------------------------------------------------------
# the dataset: one image -> uint8 pixels, N boxes with their kind and labels, the image's labels


class RegionDataset(torch.utils.data.Dataset):
    """Items are (epoch, position in train_images). Memmaps are opened lazily in each worker process."""

    def __init__(self, *, work, clusters, train_rows_path, size, num_regions, max_tokens, image_topl, crop, min_visible,
                 seed, use_objects, use_ocr, use_image, min_crop_scale=1.0):
        self.work, self.clusters, self.train_rows_path = work, clusters, train_rows_path
        self.size, self.N, self.M = size, num_regions, max_tokens
        self.l, self.crop, self.min_visible, self.seed = image_topl, crop, min_visible, seed
        self.use_objects, self.use_ocr, self.use_image = use_objects, use_ocr, use_image
        self.min_crop_scale = min_crop_scale
        self._a = None

    def __getstate__(self):                      # workers open their own memmaps
        return {**self.__dict__, "_a": None}

    def arrays(self):
        if self._a is None:
            w, a = self.work, {}
            a["table"] = image_io.read_image_table(w)
            a["rows"] = np.load(self.train_rows_path, mmap_mode="r")
            if self.use_objects:
                a["reg_off"] = workdir.load(os.path.join(w, "regions"), "region_offsets")
                a["reg_boxes"] = workdir.load(os.path.join(w, "regions"), "boxes")
                a["reg_labels"] = workdir.load(self.clusters, "region_labels")
            if self.use_ocr:
                o = os.path.join(w, "ocr")
                a["line_off"], a["line_boxes"] = workdir.load(o, "line_offsets"), workdir.load(o, "boxes")
                a["tok_off"], a["tokens"] = workdir.load(o, "token_offsets"), workdir.load(o, "tokens")
            if self.use_image:
                a["img_labels"] = workdir.load(self.clusters, "image_labels")
            self._a = a
        return self._a

    def __len__(self):
        return len(self.arrays()["rows"])

    def __getitem__(self, item):
        epoch, pos = item
        a = self.arrays()
        self._reads = getattr(self, "_reads", 0) + 1
        if self._reads % 8192 == 0:                # random reads touch every page of the memmaps over an epoch
            image_io.release_pages(*(v for v in a.values() if isinstance(v, np.ndarray)))
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
        pixels, boxes, visible = image_io.resize_crop(img, S, boxes, self.crop, rng, self.min_crop_scale)
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


def peak_tflops(args, device, dtype):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":                  # fp32 trains with TF32 on (start_processes)
        found = model_peak_tflops(torch.cuda.get_device_name(device), dtype, tf32=True)
        return found[0] if found else None
    return None


def build_encoder(args, env) -> VisionEncoder:
    if args.init_from:
        overrides = {k: v for k, v in (("image_size", args.image_size),) if v}
        if args.region_blocks >= 0:
            overrides["region_blocks"] = args.region_blocks
        try:
            encoder = load_encoder(args.init_from, **overrides)
        except (ValueError, FileNotFoundError) as e:
            fail(f"--init-from {args.init_from}: {e}")
        if args.embed_dim >= 0 and encoder.cfg.embed_dim != args.embed_dim:
            fail(f"--embed-dim {args.embed_dim} differs from {args.init_from}'s {encoder.cfg.embed_dim}")
    else:
        overrides = {"embed_dim": args.embed_dim} if args.embed_dim >= 0 else {}
        if args.image_size:
            overrides["image_size"] = args.image_size
        if args.region_blocks >= 0:
            overrides["region_blocks"] = args.region_blocks
        torch.manual_seed(args.seed)                 # every rank builds the same initial encoder
        try:
            encoder = VisionEncoder(preset(args.model, **overrides))
        except ValueError as e:
            fail(f"--model {args.model}: {e}")
    cfg = encoder.cfg
    if cfg.image_size % cfg.patch_size:
        fail(f"--image-size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
    if args.method == "rice" and (args.object_weight or args.ocr_weight) and cfg.region_blocks == 0:
        fail("--method rice needs the region path: --region-blocks must be >= 1")
    encoder.grad_checkpointing = args.grad_checkpointing
    return encoder.to(env.device).train()


def embedding_dim(cfg: ViTConfig) -> int:
    return cfg.embed_dim or cfg.width


def build_banks(args, data, dim, env) -> torch.nn.ModuleDict:
    """The object bank (K centres from 03) and the OCR bank (the tokenizer's ids), sharded over the ranks
    (losses.py), initialised the same for any world size."""
    kw = dict(rho=args.rho, scale=args.scale, margin=args.margin, margin_kind=args.margin_kind, group=env.group,
              negatives=args.negatives)
    banks = torch.nn.ModuleDict()
    if args.object_weight or args.image_weight:
        banks["object"] = CentreBank(data["K"], dim, **kw)
    if args.ocr_weight:
        banks["ocr"] = CentreBank(data["ocr"]["vocab"], dim, **kw)
    for i, bank in enumerate(banks.values()):
        init_bank(bank, args.seed + 7919 * (i + 1))
    return banks.to(env.device)


def build_optimisers(args, encoder, banks, env):
    """AdamW for the encoder (no decay on biases, norms, the class token, its rotary angles and the absolute
    positions) and one for the banks with their own lr multiplier and decay."""
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        (no_decay if p.ndim < 2 or name in NO_DECAY else decay).append(p)
    fused = {"fused": True} if env.use_cuda else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(BETAS[0], args.beta2), eps=EPS, **fused)
    bank_opt = torch.optim.AdamW(list(banks.parameters()), lr=args.lr * args.bank_lr_mult,
                                 betas=(BETAS[0], args.beta2), eps=EPS, weight_decay=args.bank_weight_decay, **fused)
    return opt, bank_opt


def set_lr(opt, bank_opt, lr, args):
    for g in opt.param_groups:
        g["lr"] = lr
    for g in bank_opt.param_groups:
        g["lr"] = lr * args.bank_lr_mult


# ----------------------------------------------------------------------------------------------------------
# processes, the run folder, checkpoints


def start_processes(args) -> SimpleNamespace:
    """Device, dtype and process groups. The losses' labels travel between ranks on the host, over a gloo
    group beside NCCL (losses.all_gather_host), so the step needs no device-to-host copy."""
    rank, world = workdir.dist_info()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = workdir.stage_device(args.device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and use_cuda) else torch.float32
    workdir.init_dist("nccl" if use_cuda else "gloo", timeout_hours=2)
    group = dist.group.WORLD if world > 1 else None
    host_group = (dist.new_group(backend="gloo") if use_cuda else group) if world > 1 else None
    return SimpleNamespace(rank=rank, world=world, local_rank=local_rank, use_cuda=use_cuda, device=device,
                           dtype=dtype, group=group, host_group=host_group, table=None)


def open_run_folder(args) -> None:
    """(rank 0) Lock the run folder against a second trainer; --force empties it."""
    run = args.run_dir
    workdir.lock_folder(run, "04_train.py", "wait for it to end, or use another --run-dir")
    if args.force:
        for sub in ("ckpt", "log.jsonl", "manifest.json", "skipped_images.jsonl", "tensorboard", "train_images.npy"):
            path = os.path.join(run, sub)
            shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))


def prepare_data(args) -> dict:
    """(rank 0) Check the stage outputs and write train_images.npy; every rank gets the small summary. A
    resume checks that the rows are the ones it trained on, compared in blocks."""
    rows_path = os.path.join(args.run_dir, "train_images.npy")
    data = load_stage_outputs(args, rows_path + ".new.npy")
    latest = os.path.join(args.run_dir, "ckpt", "latest.pt")
    if os.path.exists(latest) and os.path.exists(rows_path):
        old, new = np.load(rows_path, mmap_mode="r"), np.load(rows_path + ".new.npy", mmap_mode="r")
        if len(old) != len(new) or any(not np.array_equal(old[s: s + (1 << 24)], new[s: s + (1 << 24)])
                                       for s in range(0, len(new), 1 << 24)):
            fail(f"{rows_path} differs from the rows the stage outputs give now: the data changed; use --force")
    os.replace(rows_path + ".new.npy", rows_path)
    return {**data, "rows_path": rows_path}


def run_config(args, data, cfg, world) -> dict:
    return {**{k: v for k, v in vars(args).items() if k not in ("force",)},
            "image_size": cfg.image_size, "region_blocks": cfg.region_blocks, "encoder_config": asdict(cfg),
            "K": data["K"], "ocr_vocab": data["ocr"]["vocab"] if data["ocr"] else None, "world": world,
            "train_counts": data["counts"], "inputs": data["fingerprints"]}


def resume(args, config, encoder, opt, banks, bank_opt, env) -> int:
    """The step of ckpt/latest.pt (0 without one), its state restored on every rank; a resume with other
    data or model settings is refused. The log keeps only the steps up to the checkpoint: the steps after
    it are trained and logged again, so the log equals the uninterrupted run's."""
    latest = os.path.join(args.run_dir, "ckpt", "latest.pt")
    if not os.path.exists(latest):
        if env.rank == 0:
            cut_log(args.run_dir, 0)           # a run stopped before its first checkpoint starts again from step 0
        return 0
    kept = sorted(f for f in os.listdir(os.path.dirname(latest)) if f.startswith("step_") and f.endswith(".pt"))
    instead = (f"copy the newest kept checkpoint over it (cp {os.path.join(os.path.dirname(latest), kept[-1])} "
               f"{latest}), or " if kept else "")
    try:
        ckpt = read_checkpoint(latest, mmap=True)
    except ValueError as e:
        fail(f"cannot resume: {e}. {instead}--force to start over")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("config", "encoder", "optimizer", "banks", "step")):
        fail(f"cannot resume: {latest} is not a checkpoint of 04_train.py (no config / encoder / optimizer / banks / "
             f"step). {instead}--force to start over")
    old = ckpt["config"]
    changed = {k: (old.get(k), config[k]) for k in RESUME_KEYS if old.get(k) != config[k]}
    if old.get("inputs") != config["inputs"]:
        changed["stage outputs"] = "the work directory's stages were rerun since"
    if changed:
        fail(f"{latest} was trained with other settings: {changed}. Resume with the old settings, use another "
             f"--run-dir, or --force to start over")
    try:
        encoder.load_state_dict(ckpt["encoder"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"cannot resume: {latest} does not fit this model ({type(e).__name__}: {str(e)[:200]}). "
             f"{instead}--force to start over")
    for name, bank in banks.items():
        if name not in ckpt["banks"]:
            fail(f"cannot resume: {latest} has no bank {name!r}: {instead}--force to start over")
        restore_bank(bank, bank_opt, ckpt["banks"][name], os.path.dirname(latest))
    step = int(ckpt["step"])
    if env.rank == 0:
        cut_log(args.run_dir, step)
    workdir.say(f"train: resumed from {latest} at step {step}")
    return step


def cut_log(run_dir: str, step: int) -> None:
    """(rank 0) Keep the records of the steps before `step`, the step training resumes from: the steps after
    it are trained and logged again, so log.jsonl and skipped_images.jsonl equal the uninterrupted run's. A
    line cut off by a kill or a full disk is dropped. (log.jsonl counts a record's step from 1, after the
    step; skipped_images.jsonl from 0, the step that read the image.)"""
    for name, last in (("log.jsonl", step), ("skipped_images.jsonl", step - 1)):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= last:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass
        workdir.write_bytes(path, "".join(kept).encode())


def bank_folder(step: int) -> str:
    return f"banks_{step:08d}"


def save_checkpoint(args, step, config, encoder, opt, banks, bank_opt, env) -> str:
    """Collective. Each rank writes its shard of every bank (rows [start, stop), weight and AdamW moments)
    to ckpt/banks_<step>/<bank>.<rank>-of-<world>.pt; then rank 0 writes latest.pt (encoder, its optimiser,
    the step, the config, and the list of bank shards), atomically, and drops bank folders no checkpoint
    lists. Host memory per rank: its own shards (3 x K / world x D floats), never the whole bank. Any
    world size reads them back (restore_bank)."""
    ckpt_dir = os.path.join(args.run_dir, "ckpt")
    folder = bank_folder(step)
    os.makedirs(os.path.join(ckpt_dir, folder), exist_ok=True)
    listing = {}
    for name, bank in banks.items():
        st = bank_opt.state.get(bank.weight, {})
        shard = {"start": bank.start, "stop": bank.start + bank.num_local, "weight": bank.weight.detach().cpu(),
                 **{k: st[k].detach().cpu() for k in ("exp_avg", "exp_avg_sq") if k in st}}
        file = f"{name}.{env.rank:05d}-of-{env.world:05d}.pt"
        save_atomic(shard, os.path.join(ckpt_dir, folder, file))
        del shard
        base, extra = divmod(bank.num_classes, env.world)
        listing[name] = {"num_classes": bank.num_classes, "dim": bank.dim,
                         "step": float(st["step"]) if "step" in st else None,
                         "shards": [{"file": f"{folder}/{name}.{r:05d}-of-{env.world:05d}.pt",
                                     "start": r * base + min(r, extra), "stop": (r + 1) * base + min(r + 1, extra)}
                                    for r in range(env.world)]}
    workdir.barrier()                                   # every shard is on disk before latest.pt names it
    latest = os.path.join(ckpt_dir, "latest.pt")
    if env.rank == 0:
        save_atomic({"step": step, "samples": step * args.batch_size, "config": config,
                     "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
                     "encoder_config": asdict(encoder.cfg), "optimizer": opt.state_dict(), "banks": listing}, latest)
        if args.keep_every and step % args.keep_every == 0:
            keep = os.path.join(ckpt_dir, f"step_{step:08d}.pt")
            if os.path.exists(keep):
                os.remove(keep)
            try:
                os.link(latest, keep)
            except OSError:
                shutil.copyfile(latest, keep)
        listed = {folder} | {bank_folder(int(f[5:13])) for f in os.listdir(ckpt_dir) if f.startswith("step_")
                             and f.endswith(".pt")}
        for f in os.listdir(ckpt_dir):
            if f.startswith("banks_") and f not in listed:
                shutil.rmtree(os.path.join(ckpt_dir, f), ignore_errors=True)
    workdir.barrier()
    return latest


def restore_bank(bank, opt, meta, ckpt_dir):
    """This rank's rows of a bank saved by save_checkpoint with any world size: the shard files are mapped
    (torch.load mmap), so only the rows this rank holds are read."""
    lo, hi = bank.start, bank.start + bank.num_local
    if (meta["num_classes"], meta["dim"]) != (bank.num_classes, bank.dim):
        fail(f"the checkpoint's bank is {meta['num_classes']} x {meta['dim']}, this run's {bank.num_classes} x "
             f"{bank.dim}: use --force or another --run-dir")
    moments = {k: torch.zeros_like(bank.weight) for k in ("exp_avg", "exp_avg_sq")}
    for shard in meta["shards"]:
        s, e = max(lo, shard["start"]), min(hi, shard["stop"])
        if s >= e:
            continue
        path = os.path.join(ckpt_dir, shard["file"])
        if not os.path.exists(path):
            fail(f"{path} is missing (a bank shard the checkpoint lists): copy the whole ckpt/ folder, or --force")
        try:
            part = read_checkpoint(path, mmap=True)
            whole = (shard["stop"] - shard["start"], bank.dim)
            if not isinstance(part, dict) or tuple(part["weight"].shape) != whole:
                raise ValueError(f"{path} does not hold the {whole[0]} x {whole[1]} rows the checkpoint lists")
        except (ValueError, KeyError) as err:
            fail(f"cannot resume: a bank shard is damaged: {err}. Copy the ckpt/ folder again, or --force to start "
                 "over")
        rows = slice(s - shard["start"], e - shard["start"])
        with torch.no_grad():
            bank.weight[s - lo: e - lo] = part["weight"][rows].to(bank.weight.device)
            for k in moments:
                if k in part:
                    moments[k][s - lo: e - lo] = part[k][rows].to(bank.weight.device)
    if meta.get("step") is not None:
        fused = bool(opt.defaults.get("fused"))          # fused AdamW keeps its step count on the device
        opt.state[bank.weight] = {"step": torch.tensor(float(meta["step"]), device=bank.weight.device if fused else "cpu"),
                                  **moments}


def read_bank(ckpt_path: str, name: str) -> dict:
    """A whole bank of a checkpoint (weight and moments, K x D each) in memory: for inspection and tests."""
    meta = torch.load(ckpt_path, map_location="cpu", weights_only=True)["banks"][name]
    parts = [torch.load(os.path.join(os.path.dirname(ckpt_path), s["file"]), map_location="cpu", weights_only=True)
             for s in meta["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in ("weight", "exp_avg", "exp_avg_sq") if k in parts[0]}


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill or a full disk leaves the previous file whole (a
    full disk: one line with the bytes needed, and the partial file removed)."""
    tmp = path + ".tmp"
    workdir.guard_disk(path, lambda: torch.save(obj, tmp), need=tensor_bytes(obj), partial=tmp)
    os.replace(tmp, path)


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ----------------------------------------------------------------------------------------------------------
# the training step

TERMS = {"object": ("object", 1), "ocr": ("ocr", 2), "image": ("object", 3)}   # term -> (bank, draw key)
STATS = ["loss"] + [f"{t}_{p}" for t in TERMS for p in ("loss", "pos", "neg")] + ["grad_norm"]
STAT = {k: i for i, k in enumerate(STATS)}


def term_labels(batch, term) -> tuple[np.ndarray, np.ndarray]:
    """(rows of this rank's micro-batch that have a label for `term`, their labels), on the host."""
    if term == "object":        # RICE Eq. 3: one positive, the region's nearest centre
        labels = batch["object_label"].numpy().reshape(-1, 1)
    elif term == "ocr":         # RICE Eq. 4: the text region's token ids
        labels = batch["ocr_tokens"].numpy().reshape(-1, batch["ocr_tokens"].shape[-1])
    else:                       # MLCD Eq. 5: the image's l nearest centres
        labels = batch["image_labels"].numpy()
    rows = np.flatnonzero((labels >= 0).any(1))
    return rows, labels[rows]


def draw_negatives(step, batches, banks, args, env) -> list[dict]:
    """Every enabled term's negative sample for the whole step (losses.CentreBank.draw), on the host: one
    all-gather of the labels over the gloo group, one draw per term and step (so --accum is exact), keyed by
    (seed, step, term) so a resume and any number of ranks draw the same. One {term: (rows, Draw)} per
    micro-batch."""
    terms = [t for t in TERMS if getattr(args, f"{t}_weight")]
    local = [[term_labels(b, t) for b in batches] for t in terms]
    gathered = losses.all_gather_host([labels for per in local for _, labels in per], env.host_group)
    out = [{} for _ in batches]
    for i, term in enumerate(terms):
        parts = gathered[i * len(batches): (i + 1) * len(batches)]
        bank_name, key = TERMS[term]
        draws = banks[bank_name].draw([g for g, _ in parts], [s for _, s in parts], (args.seed, step, key))
        for a, d in enumerate(draws):
            out[a][term] = (torch.from_numpy(local[i][a][0]).to(env.device, non_blocking=True), d)
    return out


def compute_losses(out, draws, banks, args):
    """The terms of one micro-batch; each is its rows' share of the term's mean over the labelled rows of the
    step's global batch (BankLoss.rows counts them). A term with no labelled row anywhere is 0 and still
    reaches every parameter (DDP). Returns (weighted sum, {term: BankLoss})."""
    emb = {"image": out.class_embedding}
    if out.region_embeddings is not None:
        emb["object"] = emb["ocr"] = out.region_embeddings.reshape(-1, out.region_embeddings.shape[-1])
    terms = {t: banks[TERMS[t][0]](emb[t].index_select(0, rows), draw=d) for t, (rows, d) in draws.items()}
    return sum(getattr(args, f"{t}_weight") * v.loss for t, v in terms.items()), terms


def scale_and_clip_gradients(encoder, banks, max_norm, env) -> torch.Tensor:
    """Gradient scale. The banks give every rank the gradient of the global-batch mean loss (losses.py);
    DDP averages the backbone gradients over the ranks, which divides them by the world size relative to one
    process with the whole batch, so they are multiplied back here. Then the norm over encoder and banks
    together (each rank holds another bank shard: their squares are summed over the ranks) is clipped to
    max_norm (0: off). The clipped gradient is that of the global-batch mean loss, the same as one process.
    Returns the norm before clipping, on the device (no sync)."""
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    bank_grads = [p.grad for p in banks.parameters() if p.grad is not None]
    if env.world > 1 and grads:
        torch._foreach_mul_(grads, float(env.world))
    zero = torch.zeros((), device=env.device)
    sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() if grads else zero
    bank_sq = torch.stack(torch._foreach_norm(bank_grads)).float().pow(2).sum() if bank_grads else zero.clone()
    if env.world > 1:
        dist.all_reduce(bank_sq, group=env.group)
    norm = (sq + bank_sq).sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads + bank_grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


class NonFiniteGuard:
    """The first step whose loss was not finite, remembered on the device. `check` reads it (a host sync) on
    the steps that log or save, before their optimiser step, so no checkpoint ever holds such a step."""

    def __init__(self, device, last_good):
        self.first = torch.full((1 + len(STATS),), -1.0, dtype=torch.float64, device=device)
        self.last_good = last_good                       # the checkpoint to name in the message

    def note(self, step, stats):
        bad = ~torch.isfinite(stats[STAT["loss"]]) & (self.first[0] < 0)
        now = torch.cat([stats.new_full((1,), step + 1.0), stats]).double()     # new_full: no host copy, no sync
        self.first = torch.where(bad, now, self.first)

    def check(self, step, terms):
        first = self.first.tolist()
        if first[0] >= 0:
            shown = {t: first[1 + STAT[f"{t}_loss"]] for t in terms}
            raise SystemExit(f"error: the loss is {first[1]} at step {int(first[0])} (terms {shown}); stopped at step "
                             f"{step + 1} before its optimiser step. The last good checkpoint is "
                             f"{self.last_good or 'none (no checkpoint written yet)'}. Lower --lr, raise --warmup, or "
                             f"check the data")


def train_step(step, batches, model, encoder, banks, optimisers, guard, check, args, env):
    """One optimiser step on the global batch: this rank's --accum micro-batches, one negative draw for the
    whole step, losses that add up to the global-batch means (so no division by --accum), the gradient scale
    and clip, the optimiser steps. Returns the step's statistics (a device vector in STATS order) and the
    model FLOPs of its bank cosines. No host-device sync unless `check` (guard.check)."""
    draws = draw_negatives(step, batches, banks, args, env)
    N = args.num_regions if args.object_weight or args.ocr_weight else 0
    stats, flops = torch.zeros(len(STATS), device=env.device), 0.0
    for micro, (batch, draw) in enumerate(zip(batches, draws)):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        pixels = image_io.normalize(batch["pixels"])
        syncs = micro == len(batches) - 1 or not hasattr(model, "no_sync")   # DDP reduces on the last only
        with contextlib.nullcontext() if syncs else model.no_sync():
            with torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32):
                out = model(pixels, batch["boxes"], batch["kind"] > 0) if N else model(pixels)
                loss, terms = compute_losses(out, draw, banks, args)
            loss.backward()
        stats[STAT["loss"]] += loss.detach()
        for t, v in terms.items():
            stats[STAT[f"{t}_loss"]: STAT[f"{t}_loss"] + 3] += torch.stack([v.loss.detach(), v.positive, v.negative])
            flops += 6.0 * embedding_dim(encoder.cfg) * v.rows * v.num_active * env.world
    stats[STAT["grad_norm"]] = scale_and_clip_gradients(encoder, banks, args.grad_clip, env)
    guard.note(step, stats)
    if check:                           # the step's only host sync, and only on a step that logs or saves
        guard.check(step, list(draws[0]))
    for opt in optimisers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stats, flops


def record_skipped(batches, step, args, env) -> int:
    """Images that failed to decode (the loader's ok flag, on the host) -> skipped_images.jsonl."""
    bad = [(b, i) for b in batches for i in np.flatnonzero(~b["ok"].numpy())]
    if bad:
        env.table = env.table or image_io.read_image_table(args.work)
        with open(os.path.join(args.run_dir, "skipped_images.jsonl"), "a") as f:
            for b, i in bad:
                row = int(b["row"][i])
                f.write(json.dumps({"rank": env.rank, "step": step, "row": row, "status": b["status"][i],
                                    "path": env.table.path(row)}) + "\n")
    return len(bad)


class Meter:
    """Sums of the step statistics on the device and times on the host, between two log records."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums, self.steps, self.wait, self.flops = torch.zeros(len(STATS), device=self.device), 0, 0.0, 0.0
        self.t0 = time.perf_counter()

    def add(self, stats, flops, wait):
        self.sums += stats
        self.steps, self.flops, self.wait = self.steps + 1, self.flops + flops, self.wait + wait

    def record(self, step, total, lr, skipped, terms, args, env, encoder_flops, peak, steps_per_epoch) -> dict:
        """The log record (the host sync of a logging step: .tolist())."""
        elapsed = time.perf_counter() - self.t0
        host = torch.tensor([self.wait, float(skipped)], dtype=torch.float64)
        if env.world > 1:
            dist.all_reduce(host, group=env.host_group)          # mean data wait, all skipped images
            host[0] /= env.world
        mean = dict(zip(STATS, (self.sums / self.steps).tolist()))
        step_s = elapsed / self.steps
        sps = args.batch_size / step_s
        flops = encoder_flops + self.flops / self.steps
        rec = {"step": step, "epoch": round(step / max(steps_per_epoch, 1), 4), "samples": step * args.batch_size,
               "lr": lr, **{k: round(v, 6) for k, v in mean.items() if k in ("loss", "grad_norm")
                            or k.rsplit("_", 1)[0] in terms},
               "samples_per_s": round(sps, 2), "samples_per_s_per_device": round(sps / env.world, 2),
               "step_s": round(step_s, 4), "data_wait_s": round(float(host[0]) / self.steps, 4),
               "data_wait_frac": round(float(host[0]) / elapsed, 4),
               "tflops_per_device": round(flops / step_s / env.world / 1e12, 3),
               "mfu": round(flops / step_s / env.world / (peak * 1e12), 4) if peak else None,
               "eta_s": round((total - step) * step_s, 1), "skipped_images": int(host[1])}
        if env.use_cuda:
            rec["max_mem_gib"] = round(torch.cuda.max_memory_allocated(env.device) / 2 ** 30, 2)
        self.reset()
        return rec


# ----------------------------------------------------------------------------------------------------------


@workdir.stage_main
def main(argv=None):
    args = parse_args(argv)
    workdir.check_folder_flag(args.work)
    workdir.check_folder_flag(args.run_dir, "--run-dir")
    t_start = time.time()
    env = start_processes(args)
    try:
        return train(args, env, t_start)
    finally:
        workdir.unlock_folder(args.run_dir)


def train(args, env, t_start):
    workdir.on_rank0(lambda: open_run_folder(args))          # the lock; --force
    data = workdir.on_rank0(lambda: prepare_data(args))      # every stage output checked once, on rank 0
    encoder = build_encoder(args, env)
    banks = build_banks(args, data, embedding_dim(encoder.cfg), env)
    opt, bank_opt = build_optimisers(args, encoder, banks, env)
    config = run_config(args, data, encoder.cfg, env.world)
    start_step = resume(args, config, encoder, opt, banks, bank_opt, env)
    if env.rank == 0:
        workdir.write_json(os.path.join(args.run_dir, "config.json"), config)
    n_train = data["n_train"]
    steps_per_epoch = n_train // args.batch_size if args.batch_size <= n_train else 0
    total = args.steps or max(1, math.ceil(args.epochs * max(steps_per_epoch, 1)))
    if start_step >= total:
        workdir.say(f"train: {args.run_dir} is complete ({start_step} of {total} steps); --steps more, or --force")
        return finish(args, start_step, total, t_start, env)
    if env.rank == 0 and os.path.exists(os.path.join(args.run_dir, "manifest.json")):
        os.remove(os.path.join(args.run_dir, "manifest.json"))   # the run is not complete until it ends again

    S, N = encoder.cfg.image_size, args.num_regions if args.object_weight or args.ocr_weight else 0
    loader, sampler = build_loader(args, data, S, start_step, total, env)
    model = parallel_model(encoder, args, env)
    encoder_flops = args.batch_size * flops_per_image(encoder.cfg, S, S, N)   # for MFU, with the bank cosines
    peak = peak_tflops(args, env.device, env.dtype)
    terms = [t for t in TERMS if getattr(args, f"{t}_weight")]
    tb = open_tensorboard(args, env)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=env.rank != 0, dynamic_ncols=True)
    workdir.say(f"train: {args.method}, {args.model} at {S} px ({encoder.num_params() / 1e6:.2f}M params), "
                f"{n_train} images ({data['counts']}), global batch {args.batch_size} = {env.world} x "
                f"{sampler.micro} x {args.accum}, {total} steps ({steps_per_epoch} per epoch), banks "
                f"{ {k: b.num_classes for k, b in banks.items()} } on {env.device}, {env.dtype}")

    latest = os.path.join(args.run_dir, "ckpt", "latest.pt")
    guard = NonFiniteGuard(env.device, latest if os.path.exists(latest) else None)
    meter, skipped, data_iter = Meter(env.device), 0, iter(loader)
    with bar:                                            # closed however the loop ends
        for step in range(start_step, total):            # the loop: lr, one step, log and save when due
            lr = lr_at(step, args, total)
            set_lr(opt, bank_opt, lr, args)
            t_wait = time.perf_counter()
            batches = [next(data_iter) for _ in range(args.accum)]
            wait = time.perf_counter() - t_wait
            skipped += record_skipped(batches, step, args, env)
            logs = (step + 1) % args.log_every == 0 or step + 1 == total
            saves = (step + 1) % args.save_every == 0 or step + 1 == total or \
                bool(args.keep_every and (step + 1) % args.keep_every == 0)
            stats, flops = train_step(step, batches, model, encoder, banks, (opt, bank_opt), guard, logs or saves,
                                      args, env)
            meter.add(stats, flops, wait)
            bar.update(1)
            if logs:
                write_log(meter.record(step + 1, total, lr, skipped, terms, args, env, encoder_flops, peak,
                                       steps_per_epoch), tb, bar, args, env)
            if saves:
                guard.last_good = save_checkpoint(args, step + 1, config, encoder, opt, banks, bank_opt, env)
    if tb is not None:
        tb.close()
    return finish(args, total, total, t_start, env)


def build_loader(args, data, size, start_step, total, env):
    """The DataLoader of this rank's micro-batches from `start_step` on (StepSampler, RegionDataset)."""
    sampler = StepSampler(data["n_train"], args.batch_size, args.accum, env.rank, env.world, args.seed, start_step,
                          total, args.shuffle_block, args.shuffle_window)
    dataset = RegionDataset(work=args.work, clusters=data["clusters"], train_rows_path=data["rows_path"], size=size,
                            num_regions=args.num_regions, image_topl=args.image_topl,
                            max_tokens=data["ocr"]["max_tokens"] if data["ocr"] else 10, crop=args.crop,
                            min_visible=args.min_box_visible, seed=args.seed,
                            use_objects=bool(args.object_weight), use_ocr=bool(args.ocr_weight),
                            use_image=bool(args.image_weight), min_crop_scale=args.min_crop_scale)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate,
                                         pin_memory=env.use_cuda, prefetch_factor=4 if args.workers else None)
    return loader, sampler


def parallel_model(encoder, args, env):
    """DDP over the ranks (the backbone is data-parallel; the banks are sharded, not wrapped), then compile."""
    model = encoder
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(encoder, device_ids=[env.local_rank] if env.use_cuda else None)
    return torch.compile(model) if args.compile else model


def open_tensorboard(args, env):
    if not (args.tensorboard and env.rank == 0):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(args.run_dir, "tensorboard"))


def write_log(rec, tb, bar, args, env):
    if env.rank != 0:
        return
    with open(os.path.join(args.run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    if tb is not None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                tb.add_scalar(k, v, rec["step"])
    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.1f}",
                    wait=f"{rec['data_wait_frac']:.0%}", **({"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] else {}))


def finish(args, step, total, t_start, env):
    manifest = None
    run = args.run_dir
    if env.rank == 0:
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
