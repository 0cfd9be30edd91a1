"""Sharded, resumable work (`run_chunks`, `merge_chunks`): the items are cut into fixed chunks whose boundaries do
not depend on the number of processes; ranks claim chunks dynamically (their own share first, then the others'
from the far end, one O_EXCL claim file per chunk and launch), so a slow rank holds nobody back and a dead
rank's chunk is retaken by the next launch; each finished chunk is one file written atomically (tmp +
os.replace), spread over sub-folders of 1,000. Then every rank copies its share of the chunks into disjoint
byte ranges of the preallocated final arrays (no serial merge, no rank reads the whole output). The final
arrays are therefore byte-identical whatever the number of processes and however often the run was
interrupted.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

import workdir


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
    rank, world = workdir.dist_info()
    state = None
    if rank == 0:
        prepare_chunks(folder, {"chunk_size": chunk_size, "num_items": num_items, **key})
        # one id per launch (claims of an earlier launch are stale) and the chunks finished before it
        state = (uuid.uuid4().hex[:12], sorted(done_chunks(folder)))
    rid, done_before = workdir.from_rank0(state)
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
            workdir.guard_disk(path, lambda: np.savez(tmp, **arrays), need=sum(np.asarray(a).nbytes for a in arrays.values()),
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
    workdir.write_json(key_path, key)


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
    rank, world = workdir.dist_info()
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
    workdir.barrier()
    fd = os.open(rows_path, os.O_WRONLY)
    layout = _npy_layout(rows_path)
    for c in range(rank, num_chunks, world):
        try:
            counts = [npz_shape(files[c], n)[0][0] for n in shape_names]
        except Exception as e:               # a chunk damaged on disk since it was written (atomically)
            damaged_chunk(files[c], e)
        _pwrite_rows(fd, layout, c, np.array([counts], np.int64))
    os.close(fd)
    workdir.barrier()
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
            raise SystemExit(workdir.disk_message(os.path.join(folder, "*.npy"), need, "not enough space for the merged "
                                          "arrays"))
        for n in arrays:
            shape, dtype = layout[n]
            out = workdir.allocate_npy(tmp["array", n], dtype, (total[n],) + tuple(shape[1:]))
            del out
        for cn in counted:
            out = workdir.allocate_npy(tmp["offsets", cn], np.int64, (total[cn] + 1,))
            out[0] = 0
            out.flush()
            del out
    workdir.on_rank0(preallocate)
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
                workdir.guard_disk(tmp["array", n], lambda: _pwrite_rows(fds["array", n], layouts["array", n],
                                                                 int(base[c, col[n]]), z[n]))
            for cn in counted:             # offsets: where each owning row's rows start in the owned array
                ends = int(base[c, col[owner[cn]]]) + np.cumsum(z[cn].astype(np.int64))
                workdir.guard_disk(tmp["offsets", cn], lambda: _pwrite_rows(fds["offsets", cn], layouts["offsets", cn],
                                                                    int(base[c, col[cn]]) + 1, ends))
    finally:
        for f in fds.values():
            os.close(f)
    workdir.barrier()
    if rank == 0:
        for t, p in targets.items():
            os.replace(tmp[t], p)
        shutil.rmtree(merge_dir, ignore_errors=True)
    workdir.barrier()
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
