"""The work directory that the numbered stages share, and the few things more than one stage needs.

Layout (`--work`, default runs/demo): one sub-folder per stage, each holding `.npy` arrays written through
`np.lib.format.open_memmap` and a `manifest.json` (stage, config, row counts, inputs, status counts) written
last, so a folder with a complete manifest is a finished stage. Ragged per-image lists are CSR: an int64
`*_offsets.npy` with one more entry than rows, plus flat rows.

    images/    the image table: one row per sample (a loose file, or the members of a tar shard sharing a key)
    regions/   01_mine_regions.py        ocr/  02_extract_ocr.py        ...

Inputs (`resolve_source`): loose files (a folder, a list file) or tar shards as webdataset / img2dataset and
SA-1B ship them (a brace pattern, a glob, a folder of .tar files, a list of .tar paths). The image table holds,
per row, its shard, the image member's byte offset and length, the json member's, width, height and status, so
every stage reads a sample with one pread (`ImageTable.open`, `ImageTable.read_json`). It is built shard by
shard (one unit of work per shard, or per LOOSE_BLOCK loose files): only 512-byte tar headers, the samples'
json (for their sizes) and, where the json has none, image headers are read; nothing is decoded.

Sharded, resumable work (`run_chunks`, `merge_chunks`): the items are cut into fixed chunks whose boundaries do
not depend on the number of processes; ranks claim chunks dynamically (their own share first, then the others'
from the far end, one O_EXCL claim file per chunk and launch), so a slow rank holds nobody back and a dead
rank's chunk is retaken by the next launch; each finished chunk is one file written atomically (tmp +
os.replace), spread over sub-folders of 1,000. Then every rank copies its share of the chunks into disjoint
byte ranges of the preallocated final arrays (no serial merge, no rank reads the whole output). The final
arrays are therefore byte-identical whatever the number of processes and however often the run was
interrupted. Transient I/O errors (EIO, ESTALE, timeouts) are retried, then stop the rank with one line
(`retry_io`); only genuinely bad data becomes a per-item status.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass

import numpy as np

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
# --help of every stage


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every stage: the module docstring as written (its example commands) and every flag's default
    (none is shown for a flag without one, or a switch that is off by default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            import copy
            action = copy.copy(action)          # a flag without help text still shows its default
            action.help = "default: %(default)s"
        return super()._format_action(action)


# ----------------------------------------------------------------------------------------------------------
# atomic files


def write_npy(path: str, array) -> None:
    """Write one array as .npy through open_memmap, atomically (tmp file + os.replace); its space is reserved
    first (allocate_npy), so a full disk is one message, never a SIGBUS from a page of the mapping."""
    array = np.asarray(array)
    tmp = path + ".tmp.npy"
    out = allocate_npy(tmp, array.dtype, array.shape)
    if array.size:
        out[...] = array
    out.flush()
    del out
    os.replace(tmp, path)


def allocate_npy(path: str, dtype, shape) -> np.memmap:
    """open_memmap(path, "w+") with the file's blocks reserved (posix_fallocate): a disk without the space
    fails here, with a message naming the folder and the bytes needed, instead of at a page fault later."""
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    out = guard_disk(path, lambda: np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape)), need)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        guard_disk(path, lambda: os.posix_fallocate(fd, 0, size), need=size)
    except OSError as e:                 # a file system without fallocate (EOPNOTSUPP): write as before
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return out


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"

    def write():
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    guard_disk(path, write, partial=tmp)
    os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
    """data to path, atomically (tmp file + os.replace); a full disk is one line (guard_disk)."""
    tmp = path + ".tmp"

    def write():
        with open(tmp, "wb") as f:
            f.write(data)
    guard_disk(path, write, need=len(data), partial=tmp)
    os.replace(tmp, path)


def save_npz(path: str, **arrays) -> None:
    """np.savez to path, atomically; a full disk is one line (guard_disk)."""
    tmp = path + ".tmp"

    def write():
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    guard_disk(path, write, need=sum(np.asarray(a).nbytes for a in arrays.values()), partial=tmp)
    os.replace(tmp, path)


def read_manifest(folder: str, name: str = "manifest.json") -> dict | None:
    """The folder's manifest.json (or another JSON `name`), or None when there is none. One that does not
    parse (it is written atomically, so only damage from outside makes one) is taken as unfinished, with a
    warning: the stage that owns the folder redoes it, and a later stage says which stage to run."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read())
        if isinstance(m, dict):
            return m
    except (ValueError, UnicodeDecodeError):
        pass
    if dist_info()[0] == 0:
        print(f"warning: {path} is damaged (not a JSON object): {folder} is taken as unfinished", file=sys.stderr,
              flush=True)
    return None


# the papers' constants that more than one stage uses
IMAGE_TOPL = 8              # MLCD Sec. 4.1: l = 8 positive centres per image (03 labels them, 04 trains on them)
OCR_MAX_TOKENS = 10         # RICE Tab. 5d: M = 10 token ids per text line (02 writes them, 05 probes them)


def regions_fingerprint(manifest: dict) -> dict:
    """What identifies 01's regions/ for the stages after it (03 records it, 04 checks it): a rerun of 01
    changes it."""
    return json.loads(json.dumps({k: manifest.get(k) for k in ("finished", "rows", "image_table", "features")}))


STAGE_OF = {"images": "01_mine_regions.py (or 02_extract_ocr.py; both build the image table)",
            "regions": "01_mine_regions.py", "ocr": "02_extract_ocr.py", "clusters": "03_cluster.py"}


def writer_of(folder: str) -> str:
    """The stage that writes a work folder, for messages."""
    name = os.path.basename(os.path.normpath(folder))
    return STAGE_OF.get(name, "03_cluster.py" if name.startswith("clusters") else f"the stage that writes {name}/")


class MissingOutput(FileNotFoundError):
    """A stage's output file that is not there; stage_main turns it into its one line."""


def load(folder: str, name: str, mmap: bool = True) -> np.ndarray:
    """<folder>/<name>.npy (memory-mapped); a missing or damaged file is one line naming it."""
    path = os.path.join(folder, name + ".npy")
    if not os.path.exists(path):
        raise MissingOutput(f"{path} is missing, so {folder} is incomplete: remove the folder and rerun "
                            f"{writer_of(folder)}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise SystemExit(f"error: {path} is damaged ({str(e)[:120]}): rerun {writer_of(folder)} with --force") \
            from None


# ----------------------------------------------------------------------------------------------------------
# CSR helpers


def offsets_from_counts(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def fs_bytes(s: str) -> bytes:
    """UTF-8, with the undecodable bytes of a file name (os.fsdecode's surrogate escapes) given back as they
    were: a name that is not UTF-8 (Latin-1 from an old archive) round-trips to the same file."""
    return s.encode("utf-8", "surrogateescape")


def content_digest(path: str) -> str:
    """sha1 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order, recursive):
    what cached work is keyed by where a file can change under the same name, size and mtime."""
    h = hashlib.sha1()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files:
        h.update(fs_bytes(os.path.relpath(f, path)) + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha1").digest())
    return h.hexdigest()


def pack_strings(strings) -> tuple[np.ndarray, np.ndarray]:
    """list of str -> (offsets int64 (n+1), utf-8 bytes uint8; file names' undecodable bytes kept: fs_bytes)."""
    data = [fs_bytes(s) for s in strings]
    flat = np.frombuffer(b"".join(data), dtype=np.uint8) if data else np.zeros(0, np.uint8)
    return offsets_from_counts([len(d) for d in data]), flat


def unpack_string(offsets: np.ndarray, flat: np.ndarray, i: int) -> str:
    return bytes(flat[offsets[i]: offsets[i + 1]]).decode("utf-8", "surrogateescape")


# ----------------------------------------------------------------------------------------------------------
# sharded, resumable chunks, claimed dynamically and merged in parallel

CHUNKS_PER_DIR = 1000           # chunk files are spread over sub-folders: no folder holds more than ~2,000
COPY_BLOCK = 1 << 26            # bytes per pwrite when copying a chunk into the final arrays


def chunk_path(folder: str, c: int, suffix: str = ".npz") -> str:
    return os.path.join(folder, "chunks", f"{c // CHUNKS_PER_DIR:05d}", f"{c:08d}{suffix}")


def done_chunks(folder: str) -> set:
    done = set()
    root = os.path.join(folder, "chunks")
    for sub in (os.listdir(root) if os.path.isdir(root) else []):
        if os.path.isdir(os.path.join(root, sub)):
            done |= {int(f[:8]) for f in os.listdir(os.path.join(root, sub)) if f.endswith(".npz") and
                     ".tmp" not in f}
    return done


def from_rank0(obj):
    """rank 0's `obj` on every rank."""
    if dist_info()[1] == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn):
    """fn() on rank 0 only; its result (small: it is broadcast), or the one-line error it exits with, on
    every rank, so a refusal on rank 0 stops all ranks with the same line instead of leaving them waiting."""
    result, error = None, None
    if dist_info()[0] == 0:
        try:
            result = fn()
        except SystemExit as e:
            error = e.code if isinstance(e.code, str) else f"error: rank 0 stopped ({e.code})"
    result, error = from_rank0((result, error))
    if error is not None:
        raise SystemExit(error)
    return result


_LOCKS: dict = {}


def lock_folder(folder: str, what: str, hint: str) -> None:
    """Hold <folder>/.lock for as long as this process runs (or until unlock_folder): a second process on
    the same folder exits with one line naming the holder. fcntl.flock: the kernel drops the lock when the
    holder dies, so a killed run leaves none behind (NFS v4 and Lustre with -o flock support it). A run that
    ends, however it ends, removes the file and the folders it created that stayed empty (unlock_folder)."""
    import fcntl
    import socket
    folder = os.path.abspath(folder)
    if folder in _LOCKS:                      # this process holds it already (a stage called twice in one test)
        return
    created, up = [], folder
    while not os.path.isdir(up) and os.path.dirname(up) != up:
        created.append(up)
        up = os.path.dirname(up)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SystemExit(f"error: {folder} is in use by {holder}; {hint}")
        except OSError as e:                  # a file system without locks: say so, and go on
            print(f"note: cannot lock {folder} ({e.strerror}); make sure no other run uses it", flush=True)
            os.close(fd)
            return
        try:                                  # the holder before us removed the file between our open and flock:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:       # lock the file that is there now instead
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.pwrite(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {stamp})\n".encode(), 0)
    _LOCKS[folder] = (fd, created)


def lock_stage(folder: str, what: str, hint: str = "wait for it to end, or use another --work") -> None:
    """One run of a stage per output folder: rank 0 holds <folder>/.lock (lock_folder) for the run; a second
    copy, and every rank of a second torchrun, stops with one line naming the holder. The ranks of one run
    share rank 0's lock."""
    on_rank0(lambda: lock_folder(folder, what, hint))


def unlock_folder(folder: str) -> None:
    """Release lock_folder's lock: remove the .lock file (while still holding it, so no one else has locked
    it), then the folders lock_folder created that nothing was written into (a run refused before its first
    file leaves no empty folder behind)."""
    fd, created = _LOCKS.pop(os.path.abspath(folder), (None, []))
    if fd is None:
        return
    try:
        os.remove(os.path.join(os.path.abspath(folder), ".lock"))
    except OSError:
        pass
    os.close(fd)
    for d in created:                         # deepest first
        try:
            os.rmdir(d)
        except OSError:
            break


def check_folder_flag(path: str, flag: str = "--work") -> str:
    """A folder flag (--work, --out) that names an existing file: one line, not a traceback from makedirs."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a file, not a folder: pass a folder (created when missing)")
    return path


_STAGES: dict = {}


def stage_module(file: str, name: str | None = None):
    """A digit-named stage script ("03_cluster.py", beside this file) as a module, loaded once per process and
    registered in sys.modules (under `name`, default "stage_" + its stem) so that DataLoader workers and pickled
    functions find it: how tests and benchmarks call a stage's functions and main."""
    import importlib.util
    module = _STAGES.get(file)
    if module is None:
        name = name or "stage_" + os.path.splitext(os.path.basename(file))[0]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), file))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        _STAGES[file] = module
    if name:
        sys.modules.setdefault(name, module)
    return module


def changed_settings(old_config: dict, args, names) -> list[str]:
    """["--flag old -> new", ...] for the settings in `names` that a finished stage's manifest config recorded
    with another value than `args` has now (settings it did not record are not compared)."""
    return [f"--{k.replace('_', '-')} {old_config[k]} -> {getattr(args, k)}" for k in names
            if k in old_config and old_config[k] != getattr(args, k)]


def refuse_changed(folder: str, what: str, changed: list[str], then: str = "",
                   elsewhere: str = "use another --work") -> None:
    """The one rule of every stage for a finished output and other settings: never kept silently, never
    replaced silently; one line naming the changed flags and --force (`then`: the stages to rerun after)."""
    if changed:
        raise SystemExit(f"error: {folder} holds {what} made with other settings ({', '.join(changed)}): rerun "
                         f"with --force to replace them{then}, or {elsewhere}")


def finished_output(folder: str, args, settings, what: str, then: str = "",
                    elsewhere: str = "use another --work") -> dict | None:
    """The manifest of a finished stage folder that this run can reuse as it is: made with the same `settings`
    (the flags that change its bytes); None when it is unfinished or --force redoes it; refused when made with
    other settings (refuse_changed)."""
    done = read_manifest(folder)
    if not (done and done.get("complete")) or getattr(args, "force", False):
        return None
    refuse_changed(folder, what, changed_settings(done.get("config", {}), args, settings), then, elsewhere)
    return done


def check_flags(args, rules: dict) -> None:
    """Numeric flags against their ranges, after argparse: rules {dest: ">= 1" | "> 0" | "[0, 1]" | "(0, 1]" |
    "[0, 1)"}; a flag left at None (optional) is not checked. One line naming the first flag out of range (NaN
    is out of every range)."""
    import math
    for dest, rule in rules.items():
        v = getattr(args, dest)
        if v is None:
            continue
        r = rule.replace(" ", "")
        if r[0] in "[(":
            lo, hi = (float(x) for x in r[1:-1].split(","))
            ok = (v >= lo if r[0] == "[" else v > lo) and (v <= hi if r[-1] == "]" else v < hi)
            want = f"in {rule}"
        else:
            op, bound = (r[:2], float(r[2:])) if r[1] == "=" else (r[:1], float(r[1:]))
            ok = v >= bound if op == ">=" else v > bound
            want = f"{op} {bound:g}"
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise SystemExit(f"error: --{dest.replace('_', '-')} {v}: must be {want}")


def stage_device(text: str):
    """--device of 01, 04 and 05: auto (this rank's GPU when there is one, else the CPU), cpu, cuda (this rank's
    GPU: LOCAL_RANK) or cuda:N; one line naming the flag for anything else, or for a GPU that is not there."""
    import re
    import torch
    local = int(os.environ.get("LOCAL_RANK", 0))
    if text == "auto":
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if text == "cuda" and torch.cuda.is_available():
        text = f"cuda:{local}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise SystemExit(f"error: --device {text!r}: use auto, cpu, cuda or cuda:N")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {text}: torch sees no CUDA device here; use --device cpu (or auto)")
    device = torch.device(text)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


class _Rows:
    """Map-style dataset over rows [start, end): item j is prepare(start + j) (in a DataLoader worker)."""

    def __init__(self, start, end, prepare):
        self.start, self.end, self.prepare = start, end, prepare

    def __len__(self):
        return self.end - self.start

    def __getitem__(self, j):
        return self.prepare(self.start + j)


def _as_is(item):
    return item                                # no tensor conversion: items are what prepare returned


def prefetched(start: int, end: int, prepare, workers: int, prefetch: int = 4):
    """prepare(i) for i in [start, end), in order, computed ahead of the caller by `workers` DataLoader worker
    processes (decoding, EXIF, resizing, crop preprocessing: the CPU work of 01 and 02), each `prefetch` items
    ahead; workers 0 runs prepare in this process. prepare must be picklable (a top-level class instance)."""
    if workers <= 0 or end - start <= 1:
        for i in range(start, end):
            yield prepare(i)
        return
    import torch
    loader = torch.utils.data.DataLoader(_Rows(start, end, prepare), batch_size=None, shuffle=False,
                                         num_workers=min(workers, end - start), collate_fn=_as_is,
                                         prefetch_factor=prefetch)
    yield from loader


def loader_workers(requested: int) -> int:
    """--workers: -1 (the default) = this process's share of the node's cores, at most 8 (clip-retrieval's
    8 preprocessing workers per GPU), leaving one core to the process itself."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(8, cores - 1))


def run_chunks(folder: str, num_items: int, chunk_size: int, process, desc: str, key: dict,
               unit: str = "img") -> tuple[int, set]:
    """Run `process(start, end) -> dict[name, array]` over the fixed chunks [c * chunk_size, (c + 1) * chunk_size)
    of [0, num_items), skipping chunks already on disk. `key` holds every setting that changes a chunk's content:
    chunk files left by a run with another key are discarded, never mixed in.

    Ranks claim chunks dynamically (an O_EXCL claim file per chunk and launch): rank r first takes r, r + world,
    ..., then takes over the others' unclaimed chunks from the far end, so a slow rank does not hold the rest
    back; a chunk claimed by a rank that died is retaken by the next launch. Chunk boundaries never depend on
    the number of processes, so the merged arrays are the same bytes for any world size and interruption.
    Returns (number of chunks, chunks already done before this run); then call `merge_chunks` on every rank."""
    import uuid
    rank, world = dist_info()
    state = None
    if rank == 0:
        prepare_chunks(folder, {"chunk_size": chunk_size, "num_items": num_items, **key})
        # one id per launch (claims of an earlier launch are stale) and the chunks finished before it
        state = (uuid.uuid4().hex[:12], sorted(done_chunks(folder)))
    rid, done_before = from_rank0(state)
    done_before = set(done_before)
    from tqdm import tqdm
    num_chunks = (num_items + chunk_size - 1) // chunk_size
    own = [c for c in range(rank, num_chunks, world) if c not in done_before]
    others = [c for r in range(1, world) for c in reversed(range((rank + r) % world, num_chunks, world))
              if c not in done_before]
    if done_before:
        print(f"[rank {rank}] {desc}: {len(done_before)} of {num_chunks} chunks already done", flush=True)
    items = sum(min(chunk_size, num_items - c * chunk_size) for c in own)
    with tqdm(total=items, desc=f"{desc} [rank {rank}/{world}]", unit=unit, disable=not items,
              position=rank if world > 1 else None, dynamic_ncols=True) as bar:
        for c in own + others:
            if not claim(folder, c, rid):
                continue
            start, end = c * chunk_size, min((c + 1) * chunk_size, num_items)
            arrays = process(start, end)
            path = chunk_path(folder, c)
            tmp = chunk_path(folder, c, f".{rid}.tmp.npz")
            guard_disk(path, lambda: np.savez(tmp, **arrays), need=sum(np.asarray(a).nbytes for a in arrays.values()),
                       partial=tmp)
            os.replace(tmp, path)
            if c not in own:
                bar.total += end - start
            bar.update(end - start)
    return num_chunks, done_before


def claim(folder: str, c: int, rid: str) -> bool:
    """True if this rank may run chunk c: not done yet and no other rank of this launch claimed it."""
    if os.path.exists(chunk_path(folder, c)):
        return False
    path = chunk_path(folder, c, f".{rid}.claim")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
# what torch.save's zip writer says when a write fails (it raises RuntimeError, not OSError)
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def disk_message(path: str, need: int | None = None, reason: str = "no space left on the device") -> str:
    """One line for a write that the disk refused: the folder, its free space, the bytes needed when known."""
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or "/").free
    needed = f", {human_bytes(need)} needed" if need else ""
    return (f"error: cannot write {path}: {reason} ({folder} has {human_bytes(free)} free{needed}): free "
            "space (or pass a folder on another disk) and rerun the same command; finished work is kept")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def guard_disk(path: str, write, need: int | None = None, partial: str | None = None):
    """write(); a full disk, a quota or a read-only file system ends the run with disk_message, not a
    traceback (also torch.save's RuntimeError when the disk is what failed). need: the bytes it writes, when
    known: checked against the free space first. partial: the temporary file write() fills, removed on failure
    so that the space it took is free again."""
    def refuse(reason):
        if partial and os.path.exists(partial):
            os.remove(partial)
        return SystemExit(disk_message(path, need, reason))
    if need:
        probe = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(probe) and shutil.disk_usage(probe).free < need:
            raise refuse("not enough space")
    try:
        return write()
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise refuse(e.strerror.lower()) from None
        raise
    except RuntimeError as e:
        if any(w in str(e) for w in TORCH_WRITE_FAILED):
            raise refuse("the write failed (disk full?)") from None
        raise


def stage_main(main):
    """Decorator of the stages' main(argv=None). A full disk (or quota, or read-only file system) that a write
    outside guard_disk meets still ends in disk_message's one line, naming the file (or the --out / --run-dir /
    --work folder when the error names none); the folder locks main took are released however it ends, so a
    test or notebook that calls main again, or starts a subprocess after it, is not refused by its own lock."""
    import functools

    @functools.wraps(main)
    def wrapped(argv=None):
        held = set(_LOCKS)
        try:
            return main(argv)
        except KeyboardInterrupt:
            raise SystemExit("interrupted: finished work is kept; rerun the same command to continue") from None
        except MissingOutput as e:                   # a hand-off file deleted since its stage finished
            raise SystemExit(f"error: {e}") from None
        except (MemoryError, RuntimeError) as e:     # host memory; the GPU's is each stage's (smaller batches)
            if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
                raise
            need = re.search(r"allocate (\d+) bytes", str(e))
            raise SystemExit(f"error: out of host memory{f' allocating {human_bytes(int(need[1]))}' if need else ''}"
                             f": lower the batch or size flags (see --help) or use a machine with more memory") \
                from None
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            where = e.filename
            if not where:
                args = list(sys.argv[1:] if argv is None else argv)
                flags = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--run-dir", "--work")]
                where = os.path.join(flags[0] if flags else os.getcwd(), "...")
            raise SystemExit(disk_message(where, None, e.strerror.lower())) from None
        finally:
            for folder in reversed([f for f in _LOCKS if f not in held]):     # the last taken first
                unlock_folder(folder)
    return wrapped


def prepare_chunks(folder: str, key: dict) -> None:
    """(rank 0) Keep the chunk files of an interrupted run only if they were written under the same key; drop
    the claims and temporary files of earlier launches."""
    chunk_dir = os.path.join(folder, "chunks")
    key_path = os.path.join(chunk_dir, "key.json")
    key = json.loads(json.dumps(key))          # the form it has once read back from disk
    old = None
    if os.path.exists(key_path):
        with open(key_path) as f:
            old = json.load(f)
    if os.path.isdir(chunk_dir) and old != key:
        stale = len(done_chunks(folder))
        if stale:
            print(f"{os.path.basename(folder)}: discarding {stale} chunk files of an interrupted run with "
                  "other settings", flush=True)
        shutil.rmtree(chunk_dir)
    os.makedirs(chunk_dir, exist_ok=True)
    for sub in os.listdir(chunk_dir):
        d = os.path.join(chunk_dir, sub)
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.endswith(".claim") or ".tmp" in f:
                    os.remove(os.path.join(d, f))
    shutil.rmtree(os.path.join(folder, "merge"), ignore_errors=True)
    write_json(key_path, key)


def merge_chunks(folder: str, num_chunks: int, per_image: list[str], per_row: dict[str, str]) -> dict:
    """Copy the chunk files into folder/<name>.npy, on every rank at once (a collective: call it on all ranks).

    per_image: arrays with one row per item. per_row: {name: counts_name}: flat arrays whose rows belong to the
    rows of another array (items, or another per_row array's rows); counts_name, stored in the chunk files
    with one int per owning row, becomes a global CSR `<...>offsets.npy` ("counts" -> "offsets").

    No rank reads the whole output: rank r reads the row counts of its chunks (c = r mod world) from their
    headers into one shared table, every rank turns that small table into each chunk's place in the final
    arrays, rank 0 preallocates them, and each rank writes its chunks' rows into disjoint byte ranges (pwrite,
    exact byte ranges, so nodes sharing a network filesystem never write the same page). A kill leaves only
    temporary files; the rerun copies again. Returns {name: number of rows}."""
    rank, world = dist_info()
    arrays = list(per_image) + list(per_row)
    counted = sorted(set(per_row.values()))
    shape_names = list(dict.fromkeys(arrays + counted))
    owner = {cn: next(n for n, c in per_row.items() if c == cn) for cn in counted}
    merge_dir = os.path.join(folder, "merge")
    rows_path = os.path.join(merge_dir, "rows.npy")
    files = [chunk_path(folder, c) for c in range(num_chunks)]
    if rank == 0:
        os.makedirs(merge_dir, exist_ok=True)
        np.lib.format.open_memmap(rows_path + ".tmp.npy", mode="w+", dtype=np.int64,
                                  shape=(num_chunks, len(shape_names)))
        os.replace(rows_path + ".tmp.npy", rows_path)
    barrier()
    fd = os.open(rows_path, os.O_WRONLY)
    layout = _npy_layout(rows_path)
    for c in range(rank, num_chunks, world):
        try:
            counts = [npz_shape(files[c], n)[0][0] for n in shape_names]
        except Exception as e:               # a chunk damaged on disk since it was written (atomically)
            damaged_chunk(files[c], e)
        _pwrite_rows(fd, layout, c, np.array([counts], np.int64))
    os.close(fd)
    barrier()
    chunk_rows = np.load(rows_path)                                      # (num_chunks, names): small
    base = np.concatenate([np.zeros((1, len(shape_names)), np.int64), np.cumsum(chunk_rows, 0)])
    col = {n: k for k, n in enumerate(shape_names)}
    total = {n: int(base[-1, col[n]]) for n in shape_names}
    targets = {("array", n): os.path.join(folder, n + ".npy") for n in arrays}
    targets.update({("offsets", cn): os.path.join(folder, cn.replace("counts", "offsets") + ".npy") for cn in counted})
    tmp = {t: p + ".tmp.npy" for t, p in targets.items()}
    def preallocate():
        """(rank 0) The final arrays, their space checked as a whole first: a refusal comes before any byte is
        written, the chunks stay, and every rank stops with the same line (on_rank0)."""
        layout = {n: npz_shape(files[0], n) if num_chunks else ((0,), np.dtype(np.float32)) for n in arrays}
        need = sum(total[n] * int(np.prod(s[1:], dtype=np.int64)) * d.itemsize for n, (s, d) in layout.items()) + \
            sum(8 * (total[cn] + 1) for cn in counted)
        if need > shutil.disk_usage(folder).free:
            raise SystemExit(disk_message(os.path.join(folder, "*.npy"), need, "not enough space for the merged "
                                          "arrays"))
        for n in arrays:
            shape, dtype = layout[n]
            out = allocate_npy(tmp["array", n], dtype, (total[n],) + tuple(shape[1:]))
            del out
        for cn in counted:
            out = allocate_npy(tmp["offsets", cn], np.int64, (total[cn] + 1,))
            out[0] = 0
            out.flush()
            del out
    on_rank0(preallocate)
    layouts = {t: _npy_layout(p) for t, p in tmp.items()}
    fds = {t: os.open(p, os.O_WRONLY) for t, p in tmp.items()}
    try:
        for c in range(rank, num_chunks, world):
            try:
                with np.load(files[c]) as npz:
                    z = {k: npz[k] for k in list(arrays) + counted}     # one chunk's rows
            except Exception as e:
                damaged_chunk(files[c], e)
            for n in arrays:
                guard_disk(tmp["array", n], lambda: _pwrite_rows(fds["array", n], layouts["array", n],
                                                                 int(base[c, col[n]]), z[n]))
            for cn in counted:             # offsets: where each owning row's rows start in the owned array
                ends = int(base[c, col[owner[cn]]]) + np.cumsum(z[cn].astype(np.int64))
                guard_disk(tmp["offsets", cn], lambda: _pwrite_rows(fds["offsets", cn], layouts["offsets", cn],
                                                                    int(base[c, col[cn]]) + 1, ends))
    finally:
        for f in fds.values():
            os.close(f)
    barrier()
    if rank == 0:
        for t, p in targets.items():
            os.replace(tmp[t], p)
        shutil.rmtree(merge_dir, ignore_errors=True)
    barrier()
    return {n: total[n] for n in arrays}


def _npy_layout(path: str) -> tuple[int, int]:
    """(header bytes, bytes per row) of an .npy file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        header = fh.tell()
    return header, int(np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64)))


def _pwrite_rows(fd: int, layout: tuple[int, int], row: int, array) -> None:
    header, row_bytes = layout
    array = np.ascontiguousarray(array)
    if not array.size:
        return
    data = memoryview(array.reshape(-1)).cast("B")
    at = header + row * row_bytes
    for s in range(0, len(data), COPY_BLOCK):
        part = data[s: s + COPY_BLOCK]
        while len(part):
            n = os.pwrite(fd, part, at)
            part, at = part[n:], at + n


def damaged_chunk(path: str, e: BaseException):
    """A chunk file that no longer reads (damaged on disk after its atomic write): remove it, so that the rerun
    redoes that chunk, and stop with one line."""
    if os.path.exists(path):
        os.remove(path)
    raise SystemExit(f"error: the chunk file {path} is damaged ({type(e).__name__}: {str(e)[:100]}); it is removed: "
                     "rerun the same command, which redoes that chunk") from None


def npz_shape(path: str, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array in an .npz, from its header."""
    import zipfile
    with zipfile.ZipFile(path) as zf, zf.open(name + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def counts_line(counts: dict) -> str:
    """"45 ok, 15 no_regions": the non-zero counts of a status histogram, for the stages' summary lines."""
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)


def count_values(array, names: list[str], block: int = 1 << 24) -> dict:
    """{name: how many entries equal its index}, read in blocks so memory stays flat."""
    counts = np.zeros(len(names), np.int64)
    for s in range(0, len(array), block):
        counts += np.bincount(np.asarray(array[s: s + block]), minlength=len(names))[: len(names)]
    return {n: int(v) for n, v in zip(names, counts)}


def finish_stage(folder: str, manifest: dict) -> dict:
    """Write the manifest (the stage is complete from here on), drop the chunk files, return the manifest."""
    manifest = {**manifest, "complete": True,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")}
    write_json(os.path.join(folder, "manifest.json"), manifest)
    shutil.rmtree(os.path.join(folder, "chunks"), ignore_errors=True)
    return manifest


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
    if parts and dist_info()[0] == 0:
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
        out = allocate_npy(self.path + ".tmp.npy", self.dtype, (self.n,))
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
        b = fs_bytes(s)
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
    h = hashlib.sha1(fs_bytes(f"{src.kind}\0{src.root}"))
    writer = StringsWriter(os.path.join(out, "names"))
    if src.kind == "tar":
        for p in src.shards:
            writer.add(p)
            try:
                st = os.stat(p)
                h.update(fs_bytes(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}"))
            except OSError:
                h.update(fs_bytes(f"\0{p}\0missing"))
        writer.close(os.path.join(out, "name_offsets.npy"), os.path.join(out, "name_bytes.npy"))
        info = {"kind": "tar", "units": len(src.shards), "shards": len(src.shards)}
    else:
        hash_path, buf = os.path.join(out, "hashes.u64"), []
        with open(hash_path, "wb") as hash_file:   # one uint64 per listed path, on disk, not in a Python list
            left_out = {}
            for p in iter_listed(src, left_out):
                writer.add(p)
                h.update(b"\0" + fs_bytes(p))
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
        write_npy(os.path.join(out, "duplicate.npy"), repeated(hashes, writer.n))
        del hashes
        os.remove(hash_path)
        info = {"kind": "files", "units": (writer.n + LOOSE_BLOCK - 1) // LOOSE_BLOCK, "rows": writer.n,
                "left_out": left_out}
    info["fingerprint"] = h.hexdigest()
    write_json(os.path.join(out, "listing.json"), info)
    return info


def escapes(relative: str) -> bool:
    """True when a relative path leads out of the folder it is relative to (../x, a/../../x)."""
    norm = os.path.normpath(relative)
    return norm == ".." or norm.startswith(".." + os.sep)


def path_hash(p: str) -> int:
    return int.from_bytes(hashlib.blake2b(fs_bytes(p), digest_size=8).digest(), "little")


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
        return unpack_string(self.shard_offsets, self.shard_bytes, s)

    def name(self, i: int) -> str:
        return unpack_string(self.name_offsets, self.name_bytes, i)

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
    m = read_manifest(folder)
    if not m or not m.get("complete"):
        raise SystemExit(f"error: {folder} has no finished image table: run 01_mine_regions.py or "
                         "02_extract_ocr.py with --images first")
    if m.get("version") != TABLE_VERSION:
        raise SystemExit(f"error: {folder} is an image table of an older layout: rerun the stage that builds it "
                         "with --images and a new --work (or delete that folder)")
    return ImageTable(m["root"], load(folder, "shard_path_offsets"), load(folder, "shard_path_bytes"),
                      *[load(folder, n) for n in ("shard", "name_offsets", "name_bytes", "offset", "length",
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
    rank, world = init_dist()
    folder = os.path.join(work, "images")
    m = read_manifest(folder)
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
    lock_stage(folder, f"{os.path.basename(sys.argv[0]) or 'a stage'} building the image table",
               "wait for it to end (the table is built once for every stage), or use another --work")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        say_left_out(src.root, write_listing(src, folder).get("left_out", {}))
    barrier()
    lst = os.path.join(folder, "listing")
    with open(os.path.join(lst, "listing.json")) as fh:
        info = json.load(fh)
    names_off, names = load(lst, "name_offsets"), load(lst, "name_bytes")
    files = ShardFiles(capacity=4)
    if info["kind"] == "tar":
        def process(u, _end):
            path = unpack_string(names_off, names, u)
            scan = scan_shard(path, max_pixels, files)
            rows = scan["rows"]
            name_off, name_flat = pack_strings([r["name"] for r in rows])
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
        dup = load(lst, "duplicate")
        rows_total = info["rows"]

        def process(u, _end):
            start, end = u * LOOSE_BLOCK, min((u + 1) * LOOSE_BLOCK, rows_total)
            status = np.zeros(end - start, np.uint8)
            size = np.zeros((end - start, 2), np.int32)
            for j, i in enumerate(range(start, end)):
                if dup[i]:
                    status[j] = IMAGE_STATUS.index("duplicate")
                    continue
                p = unpack_string(names_off, names, i)
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
    n_chunks, _ = run_chunks(folder, n_units, 1, process, "image table",
                             {"fingerprint": info["fingerprint"], "max_pixels": max_pixels, "version": TABLE_VERSION,
                              "loose_block": LOOSE_BLOCK}, unit=unit)
    rows = merge_chunks(folder, n_chunks, ["shard_status", "shard_members"],
                        {"shard": "sample_counts", "offset": "sample_counts", "length": "sample_counts",
                         "json_offset": "sample_counts", "json_length": "sample_counts", "status": "sample_counts",
                         "size": "sample_counts", "name_bytes": "name_counts"})
    if rank == 0:
        os.replace(os.path.join(folder, "sample_offsets.npy"), os.path.join(folder, "shard_rows.npy"))
        if info["kind"] == "tar":
            os.replace(os.path.join(lst, "name_offsets.npy"), os.path.join(folder, "shard_path_offsets.npy"))
            os.replace(os.path.join(lst, "name_bytes.npy"), os.path.join(folder, "shard_path_bytes.npy"))
        else:
            write_npy(os.path.join(folder, "shard_path_offsets.npy"), np.zeros(1, np.int64))
            write_npy(os.path.join(folder, "shard_path_bytes.npy"), np.zeros(0, np.uint8))
        status = load(folder, "status")
        counts = count_values(status, IMAGE_STATUS)
        shard_counts = count_values(load(folder, "shard_status"), SHARD_STATUS) if info["kind"] == "tar" else {}
        members = np.asarray(load(folder, "shard_members")).sum(0).tolist()
        manifest = {"stage": "images", "version": TABLE_VERSION, "source": os.path.abspath(source), "kind": info["kind"],
                    "root": src.root, "fingerprint": info["fingerprint"], "rows": rows["status"],
                    "max_pixels": max_pixels, "left_out": info.get("left_out", {}),
                    "status_names": IMAGE_STATUS, "status_counts": counts}
        if info["kind"] == "tar":
            manifest.update(shards=n_units, shard_status_names=SHARD_STATUS, shard_status_counts=shard_counts,
                            members={"files": members[0], "not_image_or_json": members[1], "bad_json": members[2]})
        shutil.rmtree(lst, ignore_errors=True)
        finish_stage(folder, manifest)
        summary = counts_line(counts)
        shards = (f" from {n_units} shards (" + counts_line(shard_counts) + ")"
                  if info["kind"] == "tar" else "")
        print(f"image table: {rows['status']} samples{shards}: {summary}", flush=True)
        if counts["too_large"]:
            say(f"note: {counts['too_large']} images are above --max-pixels {max_pixels:,}: status too_large, not "
                "decoded")
        if counts["outside_root"]:
            print(f"warning: {counts['outside_root']} relative paths of {src.list_file} lead out of its folder "
                  "(../): status outside_root, not read; write absolute paths to take such files in",
                  file=sys.stderr, flush=True)
        if counts["ok"] == 0:
            print("warning: no readable image among the inputs", file=sys.stderr, flush=True)
    barrier()
    if rank == 0:
        unlock_folder(folder)
    return read_image_table(work)


def short_side_check(table: ImageTable, min_side: int, flag: str = "--min-image-side", sample: int = 100_000):
    """(rank 0) Warn when most readable images are smaller than `min_side` on their short side (from the
    table's sizes, on up to `sample` evenly spaced rows: free at any scale). RICE Sec. 3.1 keeps images of
    at least 336 px; img2dataset's LAION recipe stores 256 px images, which then yield no region at all."""
    n = len(table)
    if not n or min_side <= 0 or dist_info()[0] != 0:
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
# weights from open_clip (01's CLIP features, 05's openclip: encoders): a failure is one line, once


@contextlib.contextmanager
def quiet_hub():
    """Keeps a weights download's noise off the terminal (huggingface_hub's retry warnings, urllib3's, open_clip's
    logging.error) while a model is built; the caller turns a failure into one line."""
    import logging
    import warnings
    disabled = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def load_open_clip(name: str, pretrained, device, flag: str, offline: str):
    """open_clip.create_model_and_transforms(name, pretrained) -> (model, preprocess). An unknown name or tag,
    weights that cannot be fetched (no network: after the hub's retries, kept quiet) or a local file that is
    not a checkpoint of `name` stop with one line naming `flag`, the tag or file, and `offline` (the choices
    that need no download)."""
    import open_clip
    try:
        with quiet_hub():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except Exception as e:
        first = re.split(r"(?<=\.)\s", (str(e).strip().splitlines() or [""])[0])[0][:160]     # first sentence
        if pretrained and os.path.isfile(pretrained):
            what = f"{pretrained} is not a loadable {name} checkpoint"
        elif pretrained and ("download" in str(e).lower() or "hub" in str(e).lower()):
            what = f"the {name} weights {pretrained!r} could not be fetched (no network?)"
        else:
            what = f"open_clip could not build {name} with weights {pretrained!r}"
        raise SystemExit(f"error: {flag}: {what} ({type(e).__name__}: {first}); {offline}") from None
    return model, preprocess


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

