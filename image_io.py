"""Images in, for every stage: the inputs, the image table, reading one sample, and the encoder's input.

Inputs (`resolve_source`): loose files (a folder, a list file) or tar shards as webdataset / img2dataset and
SA-1B ship them (a brace pattern, a glob, a folder of .tar files, a list of .tar paths). The image table holds,
per row, its shard, the image member's byte offset and length, the json member's, width, height and status, so
every stage reads a sample with one pread (`ImageTable.open`, `ImageTable.read_json`). It is built shard by
shard (one unit of work per shard, or per LOOSE_BLOCK loose files): only 512-byte tar headers, the samples'
json (for their sizes) and, where the json has none, image headers are read; nothing is decoded.

Transient I/O errors (EIO, ESTALE, timeouts) are retried, then stop the rank with one line (`retry_io`); only
genuinely bad data becomes a per-item status. The encoder's input (`resize_crop`, `normalize`) is here too:
04 trains on it, 05 evaluates with it and 06 exports a CLIPImageProcessor with exactly these settings.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np

import chunk_engine
import workdir


# ----------------------------------------------------------------------------------------------------------
# reading bytes: transient I/O errors retry, then stop the rank; bad data is the caller's per-item status

IO_TRIES = 4
TRANSIENT_ERRNOS = {"EIO", "ESTALE", "ETIMEDOUT", "EAGAIN", "EINTR", "ENETDOWN", "ENETUNREACH", "ENETRESET",
                    "ECONNRESET", "ECONNABORTED", "EHOSTDOWN", "EHOSTUNREACH", "EREMOTEIO", "ENOLINK", "ECOMM"}


def transient(e: BaseException) -> bool:
    return isinstance(e, OSError) and errno.errorcode.get(e.errno or -1) in TRANSIENT_ERRNOS


def retry_io(fn, what: str):
    """fn() with retries on transient I/O errors (EIO, ESTALE, timeouts: a network filesystem's hiccup);
    still failing after IO_TRIES: this rank stops with one line. Its unfinished chunk stays unclaimed for the
    next launch, so nothing is recorded as bad data that was not."""
    import time
    for attempt in range(IO_TRIES):
        try:
            return fn()
        except OSError as e:
            if not transient(e):
                raise
            if attempt == IO_TRIES - 1:
                raise SystemExit(f"error: I/O error reading {what}: {e.strerror} ({IO_TRIES} tries); this process "
                                 "stops and its unfinished work is redone by the next run of the same command "
                                 "once the filesystem is back") from None
            time.sleep(0.5 * 2 ** attempt)


class ShardFiles:
    """Open file descriptors of tar shards, a few per process (LRU), reopened after a fork (loader workers)."""

    def __init__(self, capacity: int = 64):
        self.capacity, self.pid, self.fds = capacity, os.getpid(), {}

    def pread(self, path: str, offset: int, length: int) -> bytes:
        def read():
            if os.getpid() != self.pid:        # a forked worker: its parent's descriptors are not its own
                self.pid, self.fds = os.getpid(), {}
            fd = self.fds.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if len(self.fds) >= self.capacity:
                    os.close(self.fds.pop(next(iter(self.fds))))
            self.fds[path] = fd                  # most recently used last
            out = bytearray()
            while len(out) < length:
                part = os.pread(fd, length - len(out), offset + len(out))
                if not part:
                    break                        # the file ends early: the caller sees a short read
                out += part
            return bytes(out)
        return retry_io(read, path)

    def __getstate__(self):                      # descriptors do not travel to other processes
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.__init__(state["capacity"])


# ----------------------------------------------------------------------------------------------------------
# inputs: loose image files, or tar shards (webdataset / img2dataset, SA-1B)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")          # a sample's image member
LOOSE_BLOCK = 8192                                    # loose files per unit of work in the image table


@dataclass
class Source:
    kind: str                   # "tar" or "files"
    root: str                   # folder that relative names are relative to
    shards: list[str] | None    # kind tar: shard paths (absolute), in order
    list_file: str | None       # kind files: a text file with one path per line, else None (a folder walk)


MAX_PIXELS_HELP = ("decode budget: images with more pixels get status too_large from their header, before any decode "
                   "(default 178,956,970, PIL's limit; fixed with the table)")
IMAGES_HELP = ("tar shards (a brace pattern, a glob, a folder of .tar, a list of .tar paths), a folder of images "
               "(recursive) or a text file of paths; optional once <work>/images exists")


def resolve_source(source: str) -> Source:
    """--images: a folder of images (recursive), a text file of image paths, or tar shards: a brace pattern
    (/data/laion/{00000..41407}.tar), a glob (/data/*.tar), a folder whose top level holds .tar files, one
    .tar file, or a text file listing .tar paths. Lists only shard paths (a few MB at 41k shards), never the
    samples: those come from the shards, shard by shard."""
    import glob
    if any(ch in source for ch in "{*?[") and not os.path.exists(source):
        if "{" in source:
            from braceexpand import braceexpand
            shards = list(braceexpand(source))
        else:
            shards = sorted(glob.glob(source))
        if not shards:
            raise SystemExit(f"error: --images {source}: the pattern matches no file")
        if not all(s.endswith(".tar") for s in shards):
            raise SystemExit(f"error: --images {source}: a pattern must name .tar shards")
        if not any(os.path.exists(s) for s in shards):
            raise SystemExit(f"error: --images {source}: none of its {len(shards)} shards exists")
        shards = [os.path.abspath(s) for s in shards]
        return Source("tar", os.path.dirname(os.path.commonpath(shards) + os.sep), shards, None)
    if os.path.isdir(source):
        root = os.path.abspath(source)
        tars = sorted(e.name for e in os.scandir(root) if e.name.endswith(".tar") and e.is_file())
        if tars:
            return Source("tar", root, [os.path.join(root, t) for t in tars], None)
        return Source("files", root, None, None)
    if os.path.isfile(source) and source.endswith(".tar"):
        path = os.path.abspath(source)
        return Source("tar", os.path.dirname(path), [path], None)
    if os.path.isfile(source):
        root = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8-sig", errors="surrogateescape") as f:      # as iter_listed reads it
            first = [line.strip() for line, _ in zip(f, range(1000)) if line.strip() and not line.startswith("#")]
        if not first:
            raise SystemExit(f"error: the list {source} names no images")
        if all(p.endswith(".tar") for p in first):
            with open(source, encoding="utf-8-sig", errors="surrogateescape") as f:
                shards = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            if not all(p.endswith(".tar") for p in shards):
                raise SystemExit(f"error: the list {source} mixes .tar shards and other paths: list one kind")
            return Source("tar", root, [p if os.path.isabs(p) else os.path.join(root, p) for p in shards], None)
        return Source("files", root, None, os.path.abspath(source))
    raise SystemExit(f"error: --images {source}: neither a folder, a list file, a .tar shard nor a shard pattern")


LEFT_OUT = {"hidden": "hidden files or folders (names starting with '.')",
            "unreadable_folders": "folders that cannot be listed (permissions or I/O errors)",
            "link_loops": "symlinked folders that lead back into a folder being walked",
            "not_files": "entries that are neither files nor folders (broken symlinks, sockets, devices)"}


def walk_files(root: str, left_out: dict | None = None, _above: tuple = ()):
    """Every regular file under root, as a path relative to root, in sorted order of those paths, one folder's
    listing in memory at a time (a folder sorts as its name plus '/', which is the global sorted order).
    Symlinked files and folders are followed. What is left out on purpose is counted in `left_out` (keys of
    LEFT_OUT): hidden names (.DS_Store, macOS ._ files, .ipynb_checkpoints), sub-folders that cannot be read,
    symlink loops, and entries that are not files."""
    left_out = {} if left_out is None else left_out
    real = os.path.realpath(root)
    try:
        with os.scandir(root) as it:
            listing = list(it)
    except OSError as e:
        if not _above:
            raise SystemExit(f"error: cannot list {root}: {e.strerror}") from None
        left_out["unreadable_folders"] = left_out.get("unreadable_folders", 0) + 1
        return
    entries = []
    for e in listing:
        if e.name.startswith("."):
            left_out["hidden"] = left_out.get("hidden", 0) + 1
            continue
        try:
            is_dir = e.is_dir()
            is_file = not is_dir and e.is_file()
        except OSError:
            is_dir = is_file = False
        if not (is_dir or is_file):
            left_out["not_files"] = left_out.get("not_files", 0) + 1
            continue
        entries.append((e.name + "/" if is_dir else e.name, e))
    entries.sort(key=lambda t: t[0])
    for key, e in entries:
        if key.endswith("/"):
            if os.path.realpath(e.path) in _above + (real,):
                left_out["link_loops"] = left_out.get("link_loops", 0) + 1
                continue
            for sub in walk_files(e.path, left_out, _above + (real,)):
                yield e.name + "/" + sub
        else:
            yield e.name


def say_left_out(where: str, left_out: dict) -> None:
    """One warning line with the count of each kind of entry that a folder walk left out (walk_files)."""
    parts = [f"{n} {LEFT_OUT[k]}" for k, n in left_out.items() if n]
    if parts and workdir.dist_info()[0] == 0:
        print(f"warning: left out of {where}: " + "; ".join(parts) + ". To take such files in, list their paths "
              "in a text file and pass that as --images", file=sys.stderr, flush=True)


def list_inputs(source: str) -> tuple[str, list[str]]:
    """(root, paths) of loose image inputs, in memory: for callers with small inputs (05's evaluation sets).
    The image table streams instead (write_listing)."""
    src = resolve_source(source)
    if src.kind == "tar":
        raise SystemExit(f"error: {source} holds tar shards; this input takes a folder of images or a list file")
    left_out = {}
    paths = list(iter_listed(src, left_out))
    say_left_out(src.root, left_out)
    if not paths:
        raise SystemExit(f"error: no files in {source}: nothing to do")
    return src.root, paths


def iter_listed(src: Source, left_out: dict | None = None):
    if src.list_file is None:
        yield from walk_files(src.root, left_out)
        return
    # utf-8-sig: a byte-order mark is not part of the first path; surrogateescape: a list written in Latin-1
    # (or any bytes) names the same files os.listdir would
    with open(src.list_file, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                yield line.strip()


class NpyAppender:
    """Append 1-D blocks of one dtype to <path> (.npy) without holding them in memory: the bytes go to a side
    file, and close() writes the .npy (open_memmap, copied in 16 MB blocks) atomically."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.raw = open(path + ".raw.tmp", "wb")

    def add(self, block) -> None:
        a = np.ascontiguousarray(block, self.dtype).reshape(-1)
        self.raw.write(memoryview(a).cast("B"))
        self.n += len(a)

    def close(self) -> None:
        self.raw.close()
        out = workdir.allocate_npy(self.path + ".tmp.npy", self.dtype, (self.n,))
        step = max(1, (16 << 20) // self.dtype.itemsize)
        with open(self.path + ".raw.tmp", "rb") as fh:
            for at in range(0, self.n, step):
                out[at: at + step] = np.fromfile(fh, self.dtype, count=min(step, self.n - at))
        out.flush()
        del out
        os.replace(self.path + ".tmp.npy", self.path)
        os.remove(self.path + ".raw.tmp")


class StringsWriter:
    """Append strings to a CSR pair (offsets int64, utf-8 bytes) on disk without holding them in memory."""

    def __init__(self, path_stem: str):
        self.stem, self.nbytes = path_stem, 0
        self.ends, self.data = NpyAppender(path_stem + ".ends", np.int64), NpyAppender(path_stem + ".bytes", np.uint8)
        self.ends.add([0])
        self.buf_ends = []

    @property
    def n(self) -> int:
        return self.ends.n - 1 + len(self.buf_ends)

    def add(self, s: str) -> None:
        b = workdir.fs_bytes(s)
        self.data.raw.write(b)
        self.data.n += len(b)
        self.nbytes += len(b)
        self.buf_ends.append(self.nbytes)
        if len(self.buf_ends) >= 1 << 16:
            self.ends.add(self.buf_ends)
            self.buf_ends = []

    def close(self, offsets_path: str, bytes_path: str) -> None:
        self.ends.add(self.buf_ends)
        self.buf_ends = []
        for appender, dst in ((self.ends, offsets_path), (self.data, bytes_path)):
            appender.close()
            os.replace(appender.path, dst)


def write_listing(src: Source, folder: str) -> dict:
    """(rank 0) The inputs, once, in their fixed order, to <folder>/listing/: tar shards (their paths) or loose
    files (their paths, streamed to disk, plus which rows repeat an earlier row of a list file). Returns
    {"kind", "units", "rows" (loose only), "fingerprint"}."""
    out = os.path.join(folder, "listing")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    h = hashlib.sha1(workdir.fs_bytes(f"{src.kind}\0{src.root}"))
    writer = StringsWriter(os.path.join(out, "names"))
    if src.kind == "tar":
        for p in src.shards:
            writer.add(p)
            try:
                st = os.stat(p)
                h.update(workdir.fs_bytes(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}"))
            except OSError:
                h.update(workdir.fs_bytes(f"\0{p}\0missing"))
        writer.close(os.path.join(out, "name_offsets.npy"), os.path.join(out, "name_bytes.npy"))
        info = {"kind": "tar", "units": len(src.shards), "shards": len(src.shards)}
    else:
        hash_path, buf = os.path.join(out, "hashes.u64"), []
        with open(hash_path, "wb") as hash_file:   # one uint64 per listed path, on disk, not in a Python list
            left_out = {}
            for p in iter_listed(src, left_out):
                writer.add(p)
                h.update(b"\0" + workdir.fs_bytes(p))
                if src.list_file is not None:      # a folder walk cannot list a path twice; a list file can
                    # (a path outside the list's folder gets outside_root: it must not make a later row a repeat)
                    key = (p if os.path.isabs(p) else f"\0outside\0{writer.n}" if escapes(p)
                           else os.path.join(src.root, p))
                    buf.append(path_hash(os.path.normpath(key)))
                    if len(buf) >= 1 << 16:
                        hash_file.write(np.asarray(buf, np.uint64).tobytes())
                        buf = []
            hash_file.write(np.asarray(buf, np.uint64).tobytes())
        writer.close(os.path.join(out, "name_offsets.npy"), os.path.join(out, "name_bytes.npy"))
        if not writer.n:
            raise SystemExit(f"error: no files in {src.list_file or src.root}: nothing to do")
        hashes = (np.memmap(hash_path, np.uint64, mode="r") if os.path.getsize(hash_path)
                  else np.zeros(0, np.uint64))
        workdir.write_npy(os.path.join(out, "duplicate.npy"), repeated(hashes, writer.n))
        del hashes
        os.remove(hash_path)
        info = {"kind": "files", "units": (writer.n + LOOSE_BLOCK - 1) // LOOSE_BLOCK, "rows": writer.n,
                "left_out": left_out}
    info["fingerprint"] = h.hexdigest()
    workdir.write_json(os.path.join(out, "listing.json"), info)
    return info


def escapes(relative: str) -> bool:
    """True when a relative path leads out of the folder it is relative to (../x, a/../../x)."""
    norm = os.path.normpath(relative)
    return norm == ".." or norm.startswith(".." + os.sep)


def path_hash(p: str) -> int:
    return int.from_bytes(hashlib.blake2b(workdir.fs_bytes(p), digest_size=8).digest(), "little")


def repeated(hashes: np.ndarray, n: int, part_rows: int = 16 << 20) -> np.ndarray:
    """bool (n,): row i repeats an earlier row's hash (hashes: an array or a memmap). Sorting is by hash
    partition (h mod P), so besides the n-byte result and a one-byte mask per pass, memory stays under ~16 bytes
    x part_rows whatever n is."""
    dup = np.zeros(n, bool)
    if not len(hashes):
        return dup
    parts = max(1, len(hashes) // part_rows + 1)
    for p in range(parts):
        rows = np.flatnonzero(hashes % np.uint64(parts) == p) if parts > 1 else np.arange(len(hashes))
        if not len(rows):
            continue
        h = hashes[rows]
        order = np.lexsort((rows, h))                # by hash, then row: the first of equals is the original
        same = np.concatenate([[False], h[order][1:] == h[order][:-1]])
        dup[rows[order[same]]] = True
    return dup


# ----------------------------------------------------------------------------------------------------------
# the image table: one row per sample (a loose file, or the members of a tar that share a key)

# status of every row; the decoding stages (01, 02, 04, 05) record a decode failure in their own statuses
IMAGE_STATUS = ["ok", "not_image", "truncated", "unreadable", "empty_file", "too_large", "duplicate", "no_image",
                "outside_root"]
SHARD_STATUS = ["ok", "empty", "truncated", "not_tar", "missing"]
OK = 0
MAX_PIXELS = 178_956_970      # PIL's decompression-bomb limit; larger images get status too_large (--max-pixels)
NO_SHARD = -1                 # shard of a loose file
TABLE_VERSION = 2             # the layout of images/ (1: paths only, every file decoded)


def to_rgb(im):
    """Any PIL mode -> 8-bit RGB: 16-bit scaled to 0..255, float in 0..1 scaled by 255, other float and 32-bit
    integer images outside 0..255 stretched from their min..max, alpha composited onto white. Converted in
    blocks of rows, so a 13000 x 13000 16-bit PNG costs its own size once more, not eight times in float64."""
    from PIL import Image
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im)
        out = np.empty(a.shape, np.uint8)
        if im.mode.startswith("I;16"):
            for s in range(0, len(a), 1024):           # rint(v / 257), in integers: no tie can occur
                out[s: s + 1024] = (a[s: s + 1024].astype(np.uint32) + 128) // 257
        else:
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if im.mode == "F" and 0 <= lo and hi <= 1:
                scale, shift = 255.0, 0.0                  # a float image in 0..1
            elif lo < 0 or hi > 255:
                scale, shift = 255.0 / max(hi - lo, 1e-12), lo
            else:
                scale, shift = 1.0, 0.0
            for s in range(0, len(a), 1024):
                block = (a[s: s + 1024].astype(np.float64) - shift) * scale
                out[s: s + 1024] = np.clip(np.rint(block), 0, 255)
        return Image.fromarray(out, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _decode_status(e: BaseException) -> str:
    msg = str(e).lower()
    return "truncated" if any(w in msg for w in ("truncat", "broken", "premature", "end of file")) else "unreadable"


def open_image(path_or_bytes, max_pixels: int = MAX_PIXELS, header_only: bool = False):
    """(RGB PIL image or None, status name) from a file path or the bytes of a tar member. EXIF orientation is
    applied; the size is the upright one. header_only: ((width, height) or None, status), reading the header
    alone (no decode: what the image table needs)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    Image.MAX_IMAGE_PIXELS = None          # checked here, with a status instead of an exception
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    try:
        if (len(path_or_bytes) if is_bytes else os.path.getsize(path_or_bytes)) == 0:
            return None, "empty_file"
        with Image.open(io.BytesIO(path_or_bytes) if is_bytes else path_or_bytes) as im:
            if im.width * im.height > max_pixels:
                return None, "too_large"
            if header_only:
                w, h = im.size
                return ((h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)), "ok"
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im), "ok"
    except UnidentifiedImageError:
        return None, "not_image"
    except OSError as e:
        if not is_bytes and transient(e):
            raise
        return None, _decode_status(e)
    except (SyntaxError, ValueError, EOFError) as e:
        return None, _decode_status(e)
    except Exception:                      # a decoder bug on odd input must not stop a long run
        return None, "unreadable"


def json_size(meta: dict | None) -> tuple[int, int] | None:
    """(width, height) from a sample's json: SA-1B's {"image": {"width", "height"}} or img2dataset's top-level
    width / height (the stored image's size); None when it has neither."""
    if not isinstance(meta, dict):
        return None
    for d in (meta.get("image"), meta):
        if isinstance(d, dict):
            w, h = d.get("width"), d.get("height")
            if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
                return w, h
    return None


@dataclass
class ImageTable:
    root: str
    shard_offsets: np.ndarray   # CSR over shard_bytes: the shard paths (absolute)
    shard_bytes: np.ndarray
    shard: np.ndarray           # int32 (n,): index of the row's shard, NO_SHARD for a loose file
    name_offsets: np.ndarray    # CSR over name_bytes: the loose file's path (relative to root, or absolute), or
    name_bytes: np.ndarray      # the image member's name in its shard (the key when the sample has no image)
    offset: np.ndarray          # int64 (n,): byte offset of the image member's data in the tar (0 for files)
    length: np.ndarray          # int64 (n,): its length in bytes (-1 when none)
    json_offset: np.ndarray     # int64 (n,): the sample's .json member (-1 when none)
    json_length: np.ndarray
    status: np.ndarray          # uint8, index into IMAGE_STATUS
    size: np.ndarray            # int32 (n, 2): width, height (upright); 0 when not ok
    max_pixels: int = MAX_PIXELS  # the decode budget the table was built with (ensure_image_table)
    files: ShardFiles | None = None

    def __len__(self):
        return len(self.status)

    def shard_path(self, s: int) -> str:
        return workdir.unpack_string(self.shard_offsets, self.shard_bytes, s)

    def name(self, i: int) -> str:
        return workdir.unpack_string(self.name_offsets, self.name_bytes, i)

    def path(self, i: int) -> str:
        """The loose file's path, or <shard path>/<member> for a tar sample (a name for messages and matching,
        not a file)."""
        p, s = self.name(i), int(self.shard[i])
        if s != NO_SHARD:
            return os.path.join(self.shard_path(s), p)
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def _read(self, i: int, offset: int, length: int) -> bytes:
        if self.files is None:
            self.files = ShardFiles()
        return self.files.pread(self.shard_path(int(self.shard[i])), offset, length)

    def read_json(self, i: int) -> dict | None:
        """The sample's .json member (img2dataset's fields, or SA-1B's image record and annotations); None when
        it has none or it does not parse."""
        if int(self.json_length[i]) < 0:
            return None
        try:
            meta = json.loads(self._read(i, int(self.json_offset[i]), int(self.json_length[i])))
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def open(self, i: int, max_pixels: int | None = None):
        """(RGB PIL image or None, status) of row i: a loose file, or the image member read with one pread;
        within the table's decode budget (or a smaller max_pixels)."""
        max_pixels = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        if int(self.shard[i]) == NO_SHARD:
            path = self.path(i)
            if not os.path.isfile(path):
                return None, "unreadable"
            return retry_io(lambda: open_image(path, max_pixels), path)
        if int(self.length[i]) < 0:
            return None, "no_image"
        data = self._read(i, int(self.offset[i]), int(self.length[i]))
        if len(data) < int(self.length[i]):
            return None, "truncated"
        return open_image(data, max_pixels)

    def release(self) -> None:
        """Drop this process's mapping of the table's pages (release_pages); call it between chunks."""
        release_pages(*(v for v in self.__dict__.values() if isinstance(v, np.ndarray)))

    def __getstate__(self):                      # DataLoader workers reopen the memmaps lazily
        return {k: v for k, v in self.__dict__.items() if k != "files"}

    def __setstate__(self, state):
        self.__dict__.update(state, files=None)


def release_pages(*arrays) -> None:
    """Unmap the touched pages of memmapped arrays from this process (MADV_DONTNEED; they stay in the page
    cache and fault back in on the next read). A stage that walks a 400M-row table would otherwise count every
    page it read (66 bytes a row, 26 GB) in its resident memory."""
    import mmap
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    seen = set()
    for a in arrays:
        while isinstance(a, np.ndarray) and getattr(a, "_mmap", None) is None and a.base is not None:
            a = a.base
        m = getattr(a, "_mmap", None)
        if m is not None and id(m) not in seen:
            seen.add(id(m))
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


TABLE_ARRAYS = ["shard", "offset", "length", "json_offset", "json_length", "status", "size"]


def read_image_table(work: str) -> ImageTable:
    folder = os.path.join(work, "images")
    m = workdir.read_manifest(folder)
    if not m or not m.get("complete"):
        raise SystemExit(f"error: {folder} has no finished image table: run 01_mine_regions.py or "
                         "02_extract_ocr.py with --images first")
    if m.get("version") != TABLE_VERSION:
        raise SystemExit(f"error: {folder} is an image table of an older layout: rerun the stage that builds it "
                         "with --images and a new --work (or delete that folder)")
    return ImageTable(m["root"], workdir.load(folder, "shard_path_offsets"), workdir.load(folder, "shard_path_bytes"),
                      *[workdir.load(folder, n) for n in ("shard", "name_offsets", "name_bytes", "offset", "length",
                                                  "json_offset", "json_length", "status", "size")],
                      max_pixels=int(m.get("max_pixels", MAX_PIXELS)))


def scan_shard(path: str, max_pixels: int, files: ShardFiles) -> dict:
    """One tar shard -> its rows (one per key, in order of first appearance) and the shard's status.

    The tar's headers are read with the standard tarfile module (one 512-byte header per member; member data is
    skipped by seeking); members sharing a key form one sample wherever they sit in the tar; each sample's .json
    is read for its size (img2dataset, SA-1B); only samples without a size there have their image header read
    (no decode). A member name seen a second time starts a duplicate row; a member whose data runs past the end
    of the file is truncated; a sample without an image member is no_image; other members (txt, cls, a second
    image) stay in the tar, unread, and are counted."""
    import tarfile
    from webdataset.tariterators import base_plus_ext
    rows, by_key, stats = [], {}, {"members": 0, "other_members": 0, "bad_json": 0}
    shard_status = "ok"
    if not os.path.exists(path):
        return {"rows": rows, "status": "missing", **stats}
    file_size = retry_io(lambda: os.path.getsize(path), path)
    try:
        tf = retry_io(lambda: tarfile.open(path, mode="r:"), path)
    except (tarfile.ReadError, EOFError):
        return {"rows": rows, "status": "empty" if file_size == 0 else "not_tar", **stats}
    try:
        it = iter(tf)
        while True:
            try:
                ti = retry_io(lambda: next(it, None), path)
            except (tarfile.ReadError, EOFError):
                shard_status = "truncated"
                break
            if ti is None:
                break
            if not ti.isfile():
                continue
            stats["members"] += 1
            name = ti.name[2:] if ti.name.startswith("./") else ti.name
            key, ext = base_plus_ext(name)
            if key is None:
                key, ext = name, ""
            ext = ext.lower()
            cur = by_key.get(key)
            if cur is None or name in cur["members"]:
                # a new key, or a member name seen before (a tar appended to itself): a row of its own
                cur = {"key": key, "name": key, "offset": 0, "length": -1, "json_offset": -1, "json_length": -1,
                       "status": "duplicate" if cur is not None else "ok", "members": set()}
                by_key.setdefault(key, cur)
                rows.append(cur)
            cur["members"].add(name)
            cut = ti.offset_data + ti.size > file_size
            if cut:
                shard_status = "truncated"
            if ext.rsplit(".", 1)[-1] in IMAGE_EXTS and cur["length"] < 0:
                cur.update(name=name, offset=ti.offset_data, length=ti.size, cut=cut)
            elif ext == "json" and cur["json_length"] < 0 and not cut:
                cur.update(json_offset=ti.offset_data, json_length=ti.size)
            else:
                stats["other_members"] += 1
    finally:
        tf.close()
    for r in rows:
        r["size"] = (0, 0)
        del r["members"]
        if r["status"] == "duplicate":
            continue
        if r["length"] < 0:
            r["status"] = "no_image"
            continue
        if r.pop("cut", False):
            r["status"] = "truncated"
            continue
        if r["length"] == 0:
            r["status"] = "empty_file"
            continue
        meta = None
        if r["json_length"] >= 0:
            try:
                meta = json.loads(files.pread(path, r["json_offset"], r["json_length"]))
            except ValueError:
                stats["bad_json"] += 1
        size = json_size(meta)
        if size is not None:
            r["size"] = size
            if size[0] * size[1] > max_pixels:
                r["status"], r["size"] = "too_large", (0, 0)
            continue
        size, st = open_image(files.pread(path, r["offset"], r["length"]), max_pixels, header_only=True)
        r["status"] = st
        r["size"] = size if size is not None else (0, 0)
    if not rows and shard_status == "ok":
        shard_status = "empty"
    return {"rows": rows, "status": shard_status, **stats}


def ensure_image_table(work: str, source: str | None, max_pixels: int | None = None) -> ImageTable:
    """Build (sharded over ranks, resumable) or reuse the image table of `work`. Every sample gets a row and a
    status; the order (shard by shard, members in tar order; loose files sorted) is fixed here, once, for every
    later stage. Units of work: one tar shard, or LOOSE_BLOCK loose files.

    max_pixels (--max-pixels): the decode budget, fixed with the table. An image above it gets too_large from
    its header, before anything is decoded; every later decode of the table keeps to the same budget (a decode
    holds about 3 bytes per pixel as RGB, plus the file's own mode: 537 MB + 358 MB for a 16-bit image at the
    default). None: the table's own, or MAX_PIXELS for a new one. A list file's relative path that leads out of
    the list's folder (../) gets outside_root: write absolute paths to name files elsewhere on purpose."""
    rank, world = workdir.init_dist()
    folder = os.path.join(work, "images")
    m = workdir.read_manifest(folder)
    if max_pixels is not None and max_pixels < 1:
        raise SystemExit(f"error: --max-pixels {max_pixels}: must be >= 1 (default {MAX_PIXELS:,}, PIL's limit)")
    if m and m.get("complete"):
        table = read_image_table(work)
        if max_pixels is not None and max_pixels != table.max_pixels:
            raise SystemExit(f"error: {folder} was built with --max-pixels {table.max_pixels}, not {max_pixels}: "
                             "pass the same budget (or leave it out), or use another --work")
        if source is not None and rank == 0:   # one listing is enough; torchrun stops the others if it fails
            src = resolve_source(source)
            tmp = os.path.join(folder, "check")
            os.makedirs(tmp, exist_ok=True)
            info = write_listing(src, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if info["fingerprint"] != m["fingerprint"]:
                raise SystemExit(f"error: {work} was built from other images ({m['source']}); use another --work "
                                 "or the same --images")
        return table
    if source is None:
        raise SystemExit(f"error: {work} has no image table yet: pass --images")
    src = resolve_source(source)
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    workdir.lock_stage(folder, f"{os.path.basename(sys.argv[0]) or 'a stage'} building the image table",
               "wait for it to end (the table is built once for every stage), or use another --work")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        say_left_out(src.root, write_listing(src, folder).get("left_out", {}))
    workdir.barrier()
    lst = os.path.join(folder, "listing")
    with open(os.path.join(lst, "listing.json")) as fh:
        info = json.load(fh)
    names_off, names = workdir.load(lst, "name_offsets"), workdir.load(lst, "name_bytes")
    files = ShardFiles(capacity=4)
    if info["kind"] == "tar":
        def process(u, _end):
            path = workdir.unpack_string(names_off, names, u)
            scan = scan_shard(path, max_pixels, files)
            rows = scan["rows"]
            name_off, name_flat = workdir.pack_strings([r["name"] for r in rows])
            return {"shard_status": np.array([SHARD_STATUS.index(scan["status"])], np.uint8),
                    "shard_members": np.array([[scan["members"], scan["other_members"], scan["bad_json"]]], np.int64),
                    "sample_counts": np.array([len(rows)], np.int64),
                    "shard": np.full(len(rows), u, np.int32),
                    "name_counts": np.diff(name_off), "name_bytes": name_flat,
                    **{k: np.array([r[k] for r in rows], np.int64) for k in
                       ("offset", "length", "json_offset", "json_length")},
                    "status": np.array([IMAGE_STATUS.index(r["status"]) for r in rows], np.uint8),
                    "size": np.array([r["size"] for r in rows], np.int32).reshape(-1, 2)}
        unit = "shard"
    else:
        dup = workdir.load(lst, "duplicate")
        rows_total = info["rows"]

        def process(u, _end):
            start, end = u * LOOSE_BLOCK, min((u + 1) * LOOSE_BLOCK, rows_total)
            status = np.zeros(end - start, np.uint8)
            size = np.zeros((end - start, 2), np.int32)
            for j, i in enumerate(range(start, end)):
                if dup[i]:
                    status[j] = IMAGE_STATUS.index("duplicate")
                    continue
                p = workdir.unpack_string(names_off, names, i)
                if not os.path.isabs(p) and escapes(p):
                    status[j] = IMAGE_STATUS.index("outside_root")
                    continue
                p = p if os.path.isabs(p) else os.path.join(src.root, p)
                if not os.path.isfile(p):
                    status[j] = IMAGE_STATUS.index("unreadable")
                    continue
                wh, st = retry_io(lambda: open_image(p, max_pixels, header_only=True), p)
                status[j] = IMAGE_STATUS.index(st)
                if wh is not None:
                    size[j] = wh
            n = end - start
            out = {"shard_status": np.zeros(1, np.uint8), "shard_members": np.zeros((1, 3), np.int64),
                   "sample_counts": np.array([n], np.int64), "shard": np.full(n, NO_SHARD, np.int32),
                   "name_counts": np.diff(names_off[start: end + 1]),
                   "name_bytes": np.array(names[names_off[start]: names_off[end]]),
                   "offset": np.zeros(n, np.int64), "length": np.full(n, -1, np.int64),
                   "json_offset": np.full(n, -1, np.int64), "json_length": np.full(n, -1, np.int64),
                   "status": status, "size": size}
            release_pages(names_off, names, dup)
            return out
        unit = "block"
    n_units = info["units"]
    n_chunks, _ = chunk_engine.run_chunks(folder, n_units, 1, process, "image table",
                             {"fingerprint": info["fingerprint"], "max_pixels": max_pixels, "version": TABLE_VERSION,
                              "loose_block": LOOSE_BLOCK}, unit=unit)
    rows = chunk_engine.merge_chunks(folder, n_chunks, ["shard_status", "shard_members"],
                        {"shard": "sample_counts", "offset": "sample_counts", "length": "sample_counts",
                         "json_offset": "sample_counts", "json_length": "sample_counts", "status": "sample_counts",
                         "size": "sample_counts", "name_bytes": "name_counts"})
    if rank == 0:
        os.replace(os.path.join(folder, "sample_offsets.npy"), os.path.join(folder, "shard_rows.npy"))
        if info["kind"] == "tar":
            os.replace(os.path.join(lst, "name_offsets.npy"), os.path.join(folder, "shard_path_offsets.npy"))
            os.replace(os.path.join(lst, "name_bytes.npy"), os.path.join(folder, "shard_path_bytes.npy"))
        else:
            workdir.write_npy(os.path.join(folder, "shard_path_offsets.npy"), np.zeros(1, np.int64))
            workdir.write_npy(os.path.join(folder, "shard_path_bytes.npy"), np.zeros(0, np.uint8))
        status = workdir.load(folder, "status")
        counts = workdir.count_values(status, IMAGE_STATUS)
        shard_counts = workdir.count_values(workdir.load(folder, "shard_status"), SHARD_STATUS) if info["kind"] == "tar" else {}
        members = np.asarray(workdir.load(folder, "shard_members")).sum(0).tolist()
        manifest = {"stage": "images", "version": TABLE_VERSION, "source": os.path.abspath(source), "kind": info["kind"],
                    "root": src.root, "fingerprint": info["fingerprint"], "rows": rows["status"],
                    "max_pixels": max_pixels, "left_out": info.get("left_out", {}),
                    "status_names": IMAGE_STATUS, "status_counts": counts}
        if info["kind"] == "tar":
            manifest.update(shards=n_units, shard_status_names=SHARD_STATUS, shard_status_counts=shard_counts,
                            members={"files": members[0], "not_image_or_json": members[1], "bad_json": members[2]})
        shutil.rmtree(lst, ignore_errors=True)
        workdir.finish_stage(folder, manifest)
        summary = workdir.counts_line(counts)
        shards = (f" from {n_units} shards (" + workdir.counts_line(shard_counts) + ")"
                  if info["kind"] == "tar" else "")
        print(f"image table: {rows['status']} samples{shards}: {summary}", flush=True)
        if counts["too_large"]:
            workdir.say(f"note: {counts['too_large']} images are above --max-pixels {max_pixels:,}: status too_large, not "
                "decoded")
        if counts["outside_root"]:
            print(f"warning: {counts['outside_root']} relative paths of {src.list_file} lead out of its folder "
                  "(../): status outside_root, not read; write absolute paths to take such files in",
                  file=sys.stderr, flush=True)
        if counts["ok"] == 0:
            print("warning: no readable image among the inputs", file=sys.stderr, flush=True)
    workdir.barrier()
    if rank == 0:
        workdir.unlock_folder(folder)
    return read_image_table(work)


def short_side_check(table: ImageTable, min_side: int, flag: str = "--min-image-side", sample: int = 100_000):
    """(rank 0) Warn when most readable images are smaller than `min_side` on their short side (from the
    table's sizes, on up to `sample` evenly spaced rows: free at any scale). RICE Sec. 3.1 keeps images of
    at least 336 px; img2dataset's LAION recipe stores 256 px images, which then yield no region at all."""
    n = len(table)
    if not n or min_side <= 0 or workdir.dist_info()[0] != 0:
        return None
    rows = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    ok = np.asarray(table.status[rows]) == OK
    short = np.asarray(table.size[rows]).min(1)[ok]
    if not len(short):
        return None
    small = int((short < min_side).sum())
    table.release()
    if small * 2 > len(short):
        what = f"{small} of {len(short)} readable images" + (" sampled" if len(rows) < n else "")
        print(f"warning: {what} ({100 * small / len(short):.0f}%) have a short side below {flag} {min_side} px "
              f"(median {int(np.median(short))} px) and get no regions. RICE keeps images of >= 336 px; an "
              "img2dataset download at --image_size 256 has none: download at 336 px or more (or with "
              f"--resize_mode no), or lower {flag}.", file=sys.stderr, flush=True)
    return small, len(short)


# ----------------------------------------------------------------------------------------------------------
# the encoder's input: resize, crop, boxes moved with the pixels, normalisation (04 trains, 05 evaluates and
# 06 exports a CLIPImageProcessor with exactly these settings)

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)     # CLIP's (OpenAI) mean and std, as the released MLCD/RICE
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)     # preprocessor configs use


def short_side_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, height, left, top) of the centre crop: the short side becomes `size`, the long side
    floor(size * long / short) (CLIPImageProcessor's and torchvision's Resize(int) arithmetic, so 06's exported
    preprocessor gives the same pixels), the square cut from the middle."""
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_crop(img, size: int, boxes=None, crop: str = "center", rng=None, min_scale: float = 1.0,
                resample: int = 3):
    """PIL RGB image -> (uint8 array (size, size, 3), boxes (n, 4) float32 in output pixels, visible (n,)).

    crop "center": resize the short side to `size` (bicubic), cut the centre square (CLIPImageProcessor);
    "random": the same resize, the square cut at a uniform random offset (rng: np.random.Generator); with
    min_scale < 1 the square first covers a random share in [min_scale, 1] of the short side's square area
    (scale augmentation, as RandomResizedCrop with a fixed aspect ratio), cut and resized in one step;
    "squash": resize both sides to `size` (aspect ratio changes; nothing is cut).
    Boxes (x0 y0 x1 y1, input pixels) get the same scale and shift and are clipped to the output; `visible`
    is the share of each box's (scaled) area that is left inside the output. resample: PIL's filter code (3,
    bicubic, the kit's; an HF folder's preprocessor_config.json may say 2, bilinear)."""
    w, h = img.size
    if crop == "random" and min_scale < 1:
        if rng is None:
            raise ValueError("crop='random' needs rng")
        side = min(w, h) * math.sqrt(rng.uniform(min_scale, 1.0))
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        pixels = np.asarray(img.resize((size, size), resample, box=(x0, y0, x0 + side, y0 + side)), np.uint8)
        s = size / side
        return pixels, *move_boxes(boxes, s, s, x0 * s, y0 * s, size)
    if crop == "squash":
        sx, sy, nw, nh = size / w, size / h, size, size
    elif crop in ("center", "random"):
        nw, nh, left, top = short_side_geometry(w, h, size)
        sx, sy = nw / w, nh / h
    else:
        raise ValueError(f"crop must be center, random or squash, got {crop!r}")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs rng")
        left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    elif crop != "center":
        left = top = 0
    if (left, top, nw, nh) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels, *move_boxes(boxes, sx, sy, left, top, size)


def move_boxes(boxes, sx, sy, left, top, size):
    """Boxes scaled by (sx, sy), shifted by (-left, -top), clipped to [0, size]; the visible share of each."""
    if boxes is None:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * [sx, sy, sx, sy] - [left, top, left, top]
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    c = np.clip(b, 0, size)
    kept = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    visible = np.where(area > 0, kept / np.maximum(area, 1e-12), 0.0)
    return c.astype(np.float32), visible.astype(np.float32)


def normalize(pixels, mean=IMAGE_MEAN, std=IMAGE_STD):
    """uint8 (B, H, W, 3) or (B, 3, H, W) torch tensor -> float (B, 3, H, W) with CLIP's mean and std (or
    another encoder's). Done on the training device, so the loader ships uint8 (a quarter of the bytes of
    float32)."""
    import torch
    if pixels.shape[-1] == 3 and pixels.shape[1] != 3:
        pixels = pixels.permute(0, 3, 1, 2)
    mean = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std
