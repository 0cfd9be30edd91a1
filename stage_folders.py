"""The stage folders a later stage reads, each through one checked reader: `read_regions` (01's regions/),
`read_ocr` (02's ocr/) and `read_clusters` (03's codebook folder). 03, 04 and show.py read them here and
nowhere else, so a folder's layout and its checks live in one place.

A reader checks, once and before any work, what its consumers rely on: the folder is finished (its manifest
says complete), every array is there with the shape the others imply (CSR offsets end at the row count), the
folder was made from the same image table (01, 02) or the same region features (03) as the work directory
holds now, and the ids are in range where a consumer asks for it (`check_ids`, in blocks of 16M values, so
the memory stays flat at 2B regions). Each failure is one line naming the file and the stage to rerun.
Arrays come back as memmaps (workdir.load): nothing is read whole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import workdir


def fail(msg):
    raise SystemExit(f"error: {msg}")


def complete_manifest(folder: str, hint: str) -> dict:
    """The manifest of a finished stage folder; one line naming the stage to run otherwise."""
    m = workdir.read_manifest(folder)
    if m is None:
        fail(f"{folder}/ is missing or unfinished: run {hint} first")
    if not m.get("complete"):
        fail(f"{folder}/ is incomplete (a run that stopped): rerun {hint} to finish it")
    return m


def array(folder: str, name: str, shape=None, what: str = ""):
    """<folder>/<name>.npy as a memmap, its shape checked against `shape` (None: any size on that axis)."""
    path = os.path.join(folder, name + ".npy")
    if not os.path.exists(path):
        fail(f"{path} is missing ({what}): rerun that stage with --force")
    a = workdir.load(folder, name)
    if shape is not None and (len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape))):
        fail(f"{path} has shape {a.shape}, expected {tuple('?' if s is None else s for s in shape)} ({what}): "
             f"the stage outputs do not belong together; rerun the stages in order with --force")
    return a


def check_ids(a, low: int, high: int, path: str, what: str) -> None:
    """Every value of `a` in [low, high): min / max over a memmap in blocks (it can be billions of rows)."""
    for s in range(0, len(a), 1 << 24):
        block = np.asarray(a[s: s + (1 << 24)])
        if block.size and (block.min() < low or block.max() >= high):
            bad = block[(block < low) | (block >= high)][:5]
            fail(f"{path}: {what} must be in [{low}, {high}); found {bad.tolist()}")


def image_table_manifest(work: str) -> dict:
    return complete_manifest(os.path.join(work, "images"), "01_mine_regions.py (it writes the image table)")


@dataclass
class Regions:
    """01's regions/: per image (n rows) a status and an image feature; per region (R rows, CSR by
    region_offsets) a feature, and (boxes(), scores(), read when a consumer asks) a box and a score."""
    folder: str
    manifest: dict
    n: int
    R: int
    C: int
    offsets: np.ndarray
    status: np.ndarray
    region_features: np.ndarray
    image_features: np.ndarray
    fingerprint: dict               # what 03's clusters and 04's checkpoints record of these regions

    def boxes(self):
        return array(self.folder, "boxes", (self.R, 4), "one box per region")

    def scores(self):
        return array(self.folder, "scores", (self.R,), "one score per region")

    def status_names(self) -> list[str]:
        return self.manifest.get("status_names", ["ok", "skipped", "too_small", "no_regions", "error"])


def read_regions(work: str, against_table: bool = True) -> Regions:
    """01's regions/ of `work`, checked in itself (offsets, features, status, its manifest's counts) and, by
    default, against the image table it was made from (03 reads the regions alone: no table needed)."""
    folder = os.path.join(work, "regions")
    img_m = image_table_manifest(work) if against_table else None
    m = complete_manifest(folder, "01_mine_regions.py")
    if img_m is not None and m.get("image_table") != img_m.get("fingerprint"):
        fail(f"{folder} was made from another image table than {work}/images: rerun 01_mine_regions.py --force")
    image_features = array(folder, "image_features", (int(img_m["rows"]) if img_m else None, None),
                           "one feature per image")
    n, C = (int(x) for x in image_features.shape)
    offsets = array(folder, "region_offsets", (n + 1,), "one offset per image + 1")
    R = int(offsets[-1]) if n else 0
    region_features = array(folder, "region_features", (R, C), "one feature per region, with the same feature dimension as the images'")
    if n and offsets[0] != 0:
        fail(f"{folder}/region_offsets.npy starts at {offsets[0]}, not 0: rerun 01_mine_regions.py --force")
    rows, dim = m.get("rows", {}), m.get("features", {}).get("dim", C)
    if rows.get("images", n) != n or rows.get("region_features", R) != R or dim != C:
        fail(f"{folder}: the manifest says {rows.get('images')} images, {rows.get('region_features')} regions, dim "
             f"{dim}; the arrays hold {n}, {R}, {C}: rerun 01_mine_regions.py --force")
    return Regions(folder=folder, manifest=m, n=n, R=R, C=C, offsets=offsets,
                   status=array(folder, "status", (n,), "one status per image"), region_features=region_features,
                   image_features=image_features, fingerprint=workdir.regions_fingerprint(m))


def read_ocr(work: str, hint: str = "02_extract_ocr.py", check_tokens: bool = True) -> dict:
    """02's ocr/ of `work`, checked against the image table: line_offsets (n + 1), boxes (L, 4), the text
    (CSR bytes) and the token ids (CSR; each in [0, vocab), unless check_tokens is off: a reader of a few
    lines, show.py, need not read them all)."""
    folder = os.path.join(work, "ocr")
    img_m = image_table_manifest(work)
    m = complete_manifest(folder, hint)
    if m.get("image_table") != img_m.get("fingerprint"):
        fail(f"{folder} was made from another image table than {work}/images: rerun 02_extract_ocr.py --force")
    n = int(img_m.get("rows", 0))
    line_offsets = array(folder, "line_offsets", (n + 1,), "one offset per image + 1")
    L = int(line_offsets[-1]) if n else 0
    token_offsets = array(folder, "token_offsets", (L + 1,), "one offset per line + 1")
    text_offsets = array(folder, "text_offsets", (L + 1,), "one offset per line + 1")
    tokens = array(folder, "tokens", (int(token_offsets[-1]) if L + 1 else 0,), "token ids")
    import losses                               # the vocabulary's home (and torch's: imported when needed)
    vocab = int(m.get("tokenizer", {}).get("vocab_size", losses.CLIP_BPE_VOCAB))
    if check_tokens:
        check_ids(tokens, 0, vocab, os.path.join(folder, "tokens.npy"), "OCR token ids")
    return dict(folder=folder, manifest=m, lines=L, vocab=vocab,
                max_tokens=int(m.get("tokenizer", {}).get("max_tokens", losses.OCR_MAX_TOKENS)), line_offsets=line_offsets,
                boxes=array(folder, "boxes", (L, 4), "one box per text line"), token_offsets=token_offsets,
                tokens=tokens, text_offsets=text_offsets,
                text_bytes=array(folder, "text_bytes", (int(text_offsets[-1]) if L + 1 else 0,), "the lines' text"))


# 02's ocr/ arrays and their dtypes: what 02 merges from its chunks, and what write_ocr writes
OCR_ARRAYS = {"status": np.uint8, "lines_found": np.int32, "line_offsets": np.int64, "boxes": np.float32,
              "scores": np.float32, "text_offsets": np.int64, "text_bytes": np.uint8, "token_offsets": np.int64,
              "tokens": np.int32}


def write_ocr(work: str, lines: list[list[tuple]], manifest: dict, status=None) -> dict:
    """An ocr/ folder in 02's layout from lines given per image row, each (box x0 y0 x1 y1, text, score, token
    ids): how a stand-in for the OCR engine (00's world words, in tests and benchmarks) writes what 04 and
    show.py read. `status`: per image (default 0, ok); the manifest gets the image table's fingerprint."""
    folder = os.path.join(work, "ocr")
    os.makedirs(folder, exist_ok=True)
    flat = [line for per_image in lines for line in per_image]
    text_offsets, text_bytes = workdir.pack_strings([text for _, text, _, _ in flat])
    arrays = {"status": np.zeros(len(lines)) if status is None else status,
              "lines_found": [len(per_image) for per_image in lines],
              "line_offsets": workdir.offsets_from_counts([len(per_image) for per_image in lines]),
              "boxes": np.asarray([box for box, _, _, _ in flat], np.float64).reshape(-1, 4),
              "scores": [score for _, _, score, _ in flat], "text_offsets": text_offsets, "text_bytes": text_bytes,
              "token_offsets": workdir.offsets_from_counts([len(ids) for _, _, _, ids in flat]),
              "tokens": [t for _, _, _, ids in flat for t in ids]}
    for name, dtype in OCR_ARRAYS.items():
        workdir.write_npy(os.path.join(folder, name + ".npy"), np.asarray(arrays[name]).astype(dtype))
    fingerprint = image_table_manifest(work)["fingerprint"]
    return workdir.finish_stage(folder, {"stage": "ocr", "image_table": fingerprint,
                                         "rows": {"images": len(lines), "lines": len(flat),
                                                  "text_bytes": len(text_bytes), "tokens": len(arrays["tokens"])},
                                         **manifest})


def read_clusters(folder: str, regions: Regions, check_region_labels: bool = False,
                  check_image_labels: bool = False) -> dict:
    """03's codebook folder, checked against the regions it must have been clustered from (01 rerun after 03:
    one line); region_labels (R) and image_labels (n, l), their ids checked in [0, K) on request."""
    m = complete_manifest(folder, "03_cluster.py")
    if m.get("inputs", {}).get("regions") != regions.fingerprint:
        fail(f"{folder} was clustered from other region features than {regions.folder} now holds "
             f"(01 was rerun after 03): rerun 03_cluster.py --force")
    K = int(m["k"])
    region_labels = array(folder, "region_labels", (regions.R,), "one label per region")
    image_labels = array(folder, "image_labels", (regions.n, None), "top-l labels per image")
    if check_region_labels:
        check_ids(region_labels, 0, K, os.path.join(folder, "region_labels.npy"), "region labels")
    if check_image_labels:
        check_ids(image_labels.reshape(-1), -1, K, os.path.join(folder, "image_labels.npy"), "image labels")
    return dict(folder=folder, manifest=m, K=K, region_labels=region_labels, image_labels=image_labels)
