"""The work directory that the numbered stages share, and the few things more than one stage needs.

Layout (`--work`, default runs/demo): one sub-folder per stage, each holding `.npy` arrays written through
`np.lib.format.open_memmap` and a `manifest.json` (stage, config, row counts, inputs, status counts) written
last, so a folder with a complete manifest is a finished stage. Ragged per-image lists are CSR: an int64
`*_offsets.npy` with one more entry than rows, plus flat rows.

    images/    the image table: every input file in a fixed order, with a decode status and its size
    regions/   01_mine_regions.py        ocr/  02_extract_ocr.py        ...

Sharded, resumable work (`run_chunks`): the items are cut into fixed chunks whose boundaries do not depend on
the number of processes; under torchrun rank r takes chunks r, r + world, ...; each finished chunk is one file
written atomically (tmp + os.replace), so a rerun after any kill skips exactly the finished chunks; rank 0
then concatenates the chunks in order. The merged arrays are therefore byte-identical whatever the number of
processes and however often the run was interrupted.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np

# decode status of every file in the image table
IMAGE_STATUS = ["ok", "not_image", "truncated", "unreadable", "empty_file", "too_large", "duplicate"]
OK = 0
MAX_PIXELS = 178_956_970      # PIL's decompression-bomb limit; larger images get status too_large


# ----------------------------------------------------------------------------------------------------------
# processes


def dist_info() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) for a plain `python` run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_dist(backend: str = "gloo", timeout_hours: float = 48) -> tuple[int, int]:
    """A process group when launched by torchrun (gloo for coordination; 04 asks for nccl on GPUs); nothing
    for a plain `python` run."""
    rank, world = dist_info()
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            # long default timeout: ranks that finish their chunks wait at the barrier for the slowest one
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=timeout_hours))
    return rank, world


def barrier() -> None:
    if dist_info()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def say(*args) -> None:
    """print on rank 0 only."""
    if dist_info()[0] == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------
# atomic files


def write_npy(path: str, array) -> None:
    """Write one array as .npy through open_memmap, atomically (tmp file + os.replace)."""
    array = np.asarray(array)
    tmp = path + ".tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
    if array.size:
        out[...] = array
    out.flush()
    del out
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load(folder: str, name: str, mmap: bool = True) -> np.ndarray:
    path = os.path.join(folder, name + ".npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the stage that writes {os.path.basename(folder)}/ first")
    return np.load(path, mmap_mode="r" if mmap else None)


# ----------------------------------------------------------------------------------------------------------
# CSR helpers


def offsets_from_counts(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def pack_strings(strings) -> tuple[np.ndarray, np.ndarray]:
    """list of str -> (offsets int64 (n+1), utf-8 bytes uint8)."""
    data = [s.encode("utf-8") for s in strings]
    flat = np.frombuffer(b"".join(data), dtype=np.uint8) if data else np.zeros(0, np.uint8)
    return offsets_from_counts([len(d) for d in data]), flat


def unpack_string(offsets: np.ndarray, flat: np.ndarray, i: int) -> str:
    return bytes(flat[offsets[i]: offsets[i + 1]]).decode("utf-8")


# ----------------------------------------------------------------------------------------------------------
# sharded, resumable chunks


def run_chunks(folder: str, num_items: int, chunk_size: int, process, desc: str, key: dict) -> tuple[int, set]:
    """Run `process(start, end) -> dict[name, array]` over fixed chunks of [0, num_items), this rank's share,
    skipping chunks already on disk. `key` holds every setting that changes a chunk's content (chunk size,
    model, thresholds, inputs): chunk files left by a run with another key are discarded, never mixed in.
    Returns (number of chunks, set of chunks already done before this run); then call `barrier()` and
    `merge_chunks` on rank 0."""
    if dist_info()[0] == 0:
        prepare_chunks(folder, {"chunk_size": chunk_size, "num_items": num_items, **key})
    barrier()
    from tqdm import tqdm
    rank, world = dist_info()
    chunk_dir = os.path.join(folder, "chunks")
    done_before = {int(f[:7]) for f in os.listdir(chunk_dir) if f.endswith(".npz") and ".tmp" not in f}
    num_chunks = (num_items + chunk_size - 1) // chunk_size
    mine = [c for c in range(rank, num_chunks, world) if c not in done_before]
    if len(mine) < len(range(rank, num_chunks, world)):
        print(f"[rank {rank}] {desc}: {len(range(rank, num_chunks, world)) - len(mine)} chunks already done, "
              f"{len(mine)} to go", flush=True)
    items = sum(min(chunk_size, num_items - c * chunk_size) for c in mine)
    with tqdm(total=items, desc=f"{desc} [rank {rank}/{world}]", unit="img", disable=not items,
              position=rank if world > 1 else None, dynamic_ncols=True) as bar:
        for c in mine:
            start, end = c * chunk_size, min((c + 1) * chunk_size, num_items)
            arrays = process(start, end)
            tmp = os.path.join(chunk_dir, f"{c:07d}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, os.path.join(chunk_dir, f"{c:07d}.npz"))
            bar.update(end - start)
    return num_chunks, done_before


def prepare_chunks(folder: str, key: dict) -> None:
    """(rank 0) Keep the chunk files of an interrupted run only if they were written under the same key."""
    chunk_dir = os.path.join(folder, "chunks")
    key_path = os.path.join(chunk_dir, "key.json")
    key = json.loads(json.dumps(key))          # the form it has once read back from disk
    old = None
    if os.path.exists(key_path):
        with open(key_path) as f:
            old = json.load(f)
    if os.path.isdir(chunk_dir) and old != key:
        stale = [f for f in os.listdir(chunk_dir) if f.endswith(".npz")]
        if stale:
            print(f"{os.path.basename(folder)}: discarding {len(stale)} chunk files of an interrupted run with "
                  "other settings", flush=True)
        shutil.rmtree(chunk_dir)
    os.makedirs(chunk_dir, exist_ok=True)
    write_json(key_path, key)


def merge_chunks(folder: str, num_chunks: int, per_image: list[str], per_row: dict[str, str]) -> dict:
    """Concatenate chunk files in order into folder/<name>.npy (rank 0).

    per_image: arrays with one row per item. per_row: {name: counts_name}: flat arrays whose rows belong to the
    rows of another array (items, or another per_row array's rows); counts_name, stored in the chunk files
    with one int per owning row, becomes a global CSR `<...>offsets.npy` ("counts" -> "offsets").
    Returns {name: number of rows}."""
    chunk_dir = os.path.join(folder, "chunks")
    files = [os.path.join(chunk_dir, f"{c:07d}.npz") for c in range(num_chunks)]
    rows = {}
    for name in per_image + list(per_row):
        shapes = [npz_shape(f, name) for f in files]        # headers only: memory stays flat
        dtype = shapes[0][1]
        total = sum(s[0][0] for s in shapes)
        out_path = os.path.join(folder, name + ".npy")
        tmp = out_path + ".tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,) + shapes[0][0][1:])
        at = 0
        for f in files:
            with np.load(f) as z:
                a = z[name]
            out[at: at + len(a)] = a
            at += len(a)
        out.flush()
        del out
        os.replace(tmp, out_path)
        rows[name] = total
    for counts_name in sorted(set(per_row.values())):
        counts = []
        for f in files:
            with np.load(f) as z:
                counts.append(z[counts_name])
        write_npy(os.path.join(folder, counts_name.replace("counts", "offsets") + ".npy"),
                  offsets_from_counts(np.concatenate(counts) if counts else []))
    return rows


def npz_shape(path: str, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array in an .npz, from its header."""
    import zipfile
    with zipfile.ZipFile(path) as zf, zf.open(name + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def finish_stage(folder: str, manifest: dict) -> dict:
    """Write the manifest (the stage is complete from here on), drop the chunk files, return the manifest."""
    manifest = {**manifest, "complete": True,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_json(os.path.join(folder, "manifest.json"), manifest)
    shutil.rmtree(os.path.join(folder, "chunks"), ignore_errors=True)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# images


def list_inputs(source: str) -> tuple[str, list[str]]:
    """(root, paths relative to root or absolute) from a folder (recursive, every regular file, sorted) or a
    text file with one path per line (kept in its order; relative paths are relative to the file's folder)."""
    if os.path.isdir(source):
        root = os.path.abspath(source)
        paths = []
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            paths += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files) if not f.startswith(".")]
        paths.sort()
        if not paths:
            raise SystemExit(f"error: no files in {source}: nothing to do")
        return root, paths
    if os.path.isfile(source):
        root = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8") as f:
            paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not paths:
            raise SystemExit(f"error: the list {source} names no images")
        return root, paths
    raise SystemExit(f"error: {source} is neither a folder of images nor a file listing them")


def to_rgb(im):
    """Any PIL mode -> 8-bit RGB: 16-bit and float scaled to 0..255, alpha composited onto white."""
    from PIL import Image
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and (a.max() > 255 or a.min() < 0):
            lo, hi = a.min(), a.max()
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def open_image(path: str, max_pixels: int = MAX_PIXELS):
    """(RGB PIL image or None, status name). EXIF orientation is applied; the size is the upright one."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    Image.MAX_IMAGE_PIXELS = None          # checked here, with a status instead of an exception
    try:
        if os.path.getsize(path) == 0:
            return None, "empty_file"
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                return None, "too_large"
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im), "ok"
    except UnidentifiedImageError:
        return None, "not_image"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).lower()
        return None, ("truncated" if any(w in msg for w in ("truncat", "broken", "premature", "end of file"))
                      else "unreadable")
    except Exception:                      # a decoder bug on odd input must not stop a long run
        return None, "unreadable"


@dataclass
class ImageTable:
    root: str
    path_offsets: np.ndarray
    path_bytes: np.ndarray
    status: np.ndarray          # uint8, index into IMAGE_STATUS
    size: np.ndarray            # int32 (n, 2): width, height after EXIF rotation; 0 when not ok

    def __len__(self):
        return len(self.status)

    def path(self, i: int) -> str:
        p = unpack_string(self.path_offsets, self.path_bytes, i)
        return p if os.path.isabs(p) else os.path.join(self.root, p)


def read_image_table(work: str) -> ImageTable:
    folder = os.path.join(work, "images")
    m = read_manifest(folder)
    if not m or not m.get("complete"):
        raise SystemExit(f"error: {folder} has no finished image table: run 01_mine_regions.py or "
                         "02_extract_ocr.py with --images first")
    return ImageTable(m["root"], load(folder, "path_offsets"), load(folder, "path_bytes"),
                      load(folder, "status"), load(folder, "size"))


def ensure_image_table(work: str, source: str | None, chunk_size: int = 512,
                       max_pixels: int = MAX_PIXELS) -> ImageTable:
    """Build (sharded, resumable) or reuse the image table of `work`. Every input file gets a row and a status;
    the order is fixed here, once, for every later stage."""
    rank, world = init_dist()
    folder = os.path.join(work, "images")
    m = read_manifest(folder)
    if m and m.get("complete"):
        if source is not None and rank == 0:   # one listing is enough; torchrun stops the others if it fails
            root, paths = list_inputs(source)
            if fingerprint(root, paths) != m["fingerprint"]:
                raise SystemExit(f"error: {work} was built from other images ({m['source']}); use another --work "
                                 "or the same --images")
        return read_image_table(work)
    if source is None:
        raise SystemExit(f"error: {work} has no image table yet: pass --images")
    root, paths = list_inputs(source)
    os.makedirs(folder, exist_ok=True)
    seen, dup = set(), np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        key = os.path.realpath(p if os.path.isabs(p) else os.path.join(root, p))
        dup[i] = key in seen
        seen.add(key)

    def probe(start, end):
        status = np.zeros(end - start, np.uint8)
        size = np.zeros((end - start, 2), np.int32)
        for j, i in enumerate(range(start, end)):
            if dup[i]:
                status[j] = IMAGE_STATUS.index("duplicate")
                continue
            p = paths[i] if os.path.isabs(paths[i]) else os.path.join(root, paths[i])
            if not os.path.isfile(p):
                status[j] = IMAGE_STATUS.index("unreadable")
                continue
            im, st = open_image(p, max_pixels)
            status[j] = IMAGE_STATUS.index(st)
            if im is not None:
                size[j] = im.size
        return {"status": status, "size": size}

    n_chunks, _ = run_chunks(folder, len(paths), chunk_size, probe, "image table",
                          {"fingerprint": fingerprint(root, paths), "max_pixels": max_pixels})
    barrier()
    if rank == 0:
        offsets, flat = pack_strings(paths)
        write_npy(os.path.join(folder, "path_offsets.npy"), offsets)
        write_npy(os.path.join(folder, "path_bytes.npy"), flat)
        merge_chunks(folder, n_chunks, ["status", "size"], {})
        status = load(folder, "status")
        counts = {name: int((status == k).sum()) for k, name in enumerate(IMAGE_STATUS)}
        finish_stage(folder, {"stage": "images", "source": os.path.abspath(source), "root": root,
                              "fingerprint": fingerprint(root, paths), "rows": len(paths),
                              "status_names": IMAGE_STATUS, "status_counts": counts})
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        print(f"image table: {len(paths)} files: {summary}", flush=True)
        if counts["ok"] == 0:
            print("warning: no readable image among the inputs", file=sys.stderr, flush=True)
    barrier()
    return read_image_table(work)


def fingerprint(root: str, paths: list[str]) -> str:
    h = hashlib.sha1(root.encode())
    for p in paths:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# the encoder's input: resize, crop, boxes moved with the pixels, normalisation (04 trains, 05 evaluates and
# 06 exports a CLIPImageProcessor with exactly these settings)

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)     # CLIP's (OpenAI) mean and std, as the released MLCD/RICE
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)     # preprocessor configs use


def resize_crop(img, size: int, boxes=None, crop: str = "center", rng=None, min_scale: float = 1.0):
    """PIL RGB image -> (uint8 array (size, size, 3), boxes (n, 4) float32 in output pixels, visible (n,)).

    crop "center": resize the short side to `size` (bicubic), cut the centre square (CLIPImageProcessor);
    "random": the same resize, the square cut at a uniform random offset (rng: np.random.Generator); with
    min_scale < 1 the square first covers a random share in [min_scale, 1] of the short side's square area
    (scale augmentation, as RandomResizedCrop with a fixed aspect ratio), cut and resized in one step;
    "squash": resize both sides to `size` (aspect ratio changes; nothing is cut).
    Boxes (x0 y0 x1 y1, input pixels) get the same scale and shift and are clipped to the output; `visible`
    is the share of each box's (scaled) area that is left inside the output."""
    from PIL import Image
    w, h = img.size
    if crop == "random" and min_scale < 1:
        if rng is None:
            raise ValueError("crop='random' needs rng")
        side = min(w, h) * math.sqrt(rng.uniform(min_scale, 1.0))
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        pixels = np.asarray(img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side)), np.uint8)
        s = size / side
        return pixels, *_move_boxes(boxes, s, s, x0 * s, y0 * s, size)
    if crop == "squash":
        sx, sy, nw, nh = size / w, size / h, size, size
    elif crop in ("center", "random"):
        # the short side becomes `size`, the long side floor(size * long / short): CLIPImageProcessor's and
        # torchvision's Resize(int) arithmetic, so 06's exported preprocessor gives the same pixels
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        sx, sy = nw / w, nh / h
    else:
        raise ValueError(f"crop must be center, random or squash, got {crop!r}")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs rng")
        left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    elif crop == "center":
        left, top = (nw - size) // 2, (nh - size) // 2
    else:
        left = top = 0
    if (left, top, nw, nh) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels, *_move_boxes(boxes, sx, sy, left, top, size)


def _move_boxes(boxes, sx, sy, left, top, size):
    """Boxes scaled by (sx, sy), shifted by (-left, -top), clipped to [0, size]; the visible share of each."""
    if boxes is None:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * [sx, sy, sx, sy] - [left, top, left, top]
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    c = np.clip(b, 0, size)
    kept = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    visible = np.where(area > 0, kept / np.maximum(area, 1e-12), 0.0)
    return c.astype(np.float32), visible.astype(np.float32)


def normalize(pixels):
    """uint8 (B, H, W, 3) or (B, 3, H, W) torch tensor -> float (B, 3, H, W) with CLIP's mean and std.
    Done on the training device, so the loader ships uint8 (a quarter of the bytes of float32)."""
    import torch
    if pixels.shape[-1] == 3 and pixels.shape[1] != 3:
        pixels = pixels.permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGE_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std
