"""The work directory that the numbered stages share, and the few things more than one stage needs.

Layout (`--work`, default runs/demo): one sub-folder per stage, each holding `.npy` arrays written through
`np.lib.format.open_memmap` and a `manifest.json` (stage, config, row counts, inputs, status counts) written
last, so a folder with a complete manifest is a finished stage. Ragged per-image lists are CSR: an int64
`*_offsets.npy` with one more entry than rows, plus flat rows.

    images/    the image table: one row per sample (a loose file, or the members of a tar shard sharing a key)
    regions/   01_mine_regions.py        ocr/  02_extract_ocr.py        ...

The shared modules below the stages, one concern each: this one (ranks, atomic files, manifests, locks, flag
checks, `stage_main`, disk-full handling), `chunk_engine.py` (sharded, resumable work: claim, run, merge,
prefetch) and `image_io.py` (inputs and listings, the image table, reading a sample, I/O retries, the
encoder's resize and normalisation). The papers' constants live beside their equations in `losses.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# processes


def dist_info() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) for a plain `python` run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


PEER_TIMEOUT_S = float(os.environ.get("KIT_PEER_TIMEOUT_S", 60))   # a rank silent this long is gone
HEARTBEAT_S = min(5.0, PEER_TIMEOUT_S / 4)
_PEERS: dict = {}                         # the peer watchdog's store connection (watch_peers)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def lost_peer_line(error: BaseException) -> str:
    """One line for a collective that failed because a peer left (gloo's "Connection closed by peer", NCCL's
    abort): which ranks stopped beating within two heartbeats (or rank 0, when its store is gone too)."""
    import time
    rank, world = dist_info()
    reason = next(m for m in PEER_LOST if m in str(error))
    store, gone = _PEERS.get("store"), []
    if store is not None:
        try:
            before = peer_state(store, world)
            time.sleep(2 * HEARTBEAT_S + 0.5)
            after = peer_state(store, world)
            gone = [f"rank {r} ({store.get(f'kit/who/{r}').decode()})" for r in range(world)
                    if r != rank and after[1][r] != b"1" and after[0][r] == before[0][r]]
        except Exception:
            gone = [f"rank 0 (it served the group's store at {_PEERS['address']})"]
    return (f"error: rank {rank}: the group lost {', '.join(gone) or 'a rank'} during a collective ({reason}); "
            "under torchrun --max-restarts the group restarts and the stage resumes where it stopped")


def init_dist(backend: str = "gloo", timeout_hours: float = 48) -> tuple[int, int]:
    """A process group when launched by torchrun (gloo for coordination; 04 asks for nccl on GPUs); nothing
    for a plain `python` run. The group meets in a store of this launch's own (launch_store) and every rank
    starts a peer watchdog (watch_peers)."""
    rank, world = dist_info()
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            # long collective timeout: ranks that finish their chunks wait at the barrier for the slowest one;
            # a rank that dies or hangs is caught sooner by the peer watchdog
            timeout = datetime.timedelta(hours=timeout_hours)
            store, address = launch_store(rank, world)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
            watch_peers(address, rank, world)
    return rank, world


def launch_store(rank: int, world: int):
    """(store, "host:port") where the ranks of this launch meet. Under torchrun they would meet in the elastic
    agent's store, which outlives a restart of the worker group (--max-restarts): the keys an earlier attempt
    left there (each rank's gloo / NCCL address) are read by the new attempt as if current, and it connects to
    dead ports. So rank 0 serves a fresh store on a free port for each launch and publishes its address in the
    agent's store (or MASTER_ADDR:MASTER_PORT's); the other ranks read it, and an address that refuses the
    connection is an earlier attempt's: they read again."""
    import time

    import torch.distributed as dist
    base = next(dist.rendezvous("env://", timeout=datetime.timedelta(minutes=30)))[0]
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if rank == 0:
        store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(minutes=30))
        address = f"{host}:{store.port}"
        base.set("kit/launch_store", address)
        return store, address
    import socket
    deadline = time.time() + 1800
    while True:
        address = base.get("kit/launch_store").decode()
        h, port = address.rsplit(":", 1)
        try:
            with socket.create_connection((h, int(port)), timeout=5):    # refused at once if it is gone
                pass
            return dist.TCPStore(h, int(port), world, is_master=False,
                                 timeout=datetime.timedelta(seconds=30)), address
        except (RuntimeError, OSError) as e:           # an earlier attempt's store: read the address again
            if time.time() > deadline:
                raise SystemExit(f"error: rank {rank}: cannot reach rank 0's store at {address} ({e})") from None
            time.sleep(0.2)


def peer_keys(world: int) -> list[str]:
    return [f"kit/{k}/{r}" for k in ("beat", "done", "who") for r in range(world)]


def peer_state(store, world: int) -> tuple[list, list]:
    """Every rank's heartbeat count and done flag, in one request to the store. A heartbeat is three requests
    (set, check, this multi_get of 2 x world values): 64 ranks send rank 0's store about 40 a second, 512 ranks
    about 300, whatever the data's size; the store holds 3 keys per rank."""
    values = store.multi_get(peer_keys(world)[: 2 * world])
    return values[:world], values[world:]


def watch_peers(address: str, rank: int, world: int) -> None:
    """A daemon thread: every HEARTBEAT_S this rank stamps its heartbeat into the launch store and reads the
    others'. A rank whose heartbeat stops for PEER_TIMEOUT_S (env KIT_PEER_TIMEOUT_S, default 60) without having
    ended is gone (killed, its node down, hung): this rank says which one in one line and exits with status 1,
    instead of waiting in a collective for the group's timeout; under torchrun --max-restarts the group then
    restarts and the stage resumes. The store itself unreachable for as long means rank 0 (which serves it) is
    gone. A rank that ends marks itself done (atexit), so its silence is not a failure."""
    import atexit
    import socket
    import threading
    import time

    import torch.distributed as dist
    h, port = address.rsplit(":", 1)
    store = dist.TCPStore(h, int(port), world, is_master=False, timeout=datetime.timedelta(seconds=10))
    store.set(f"kit/who/{rank}", f"pid {os.getpid()} on {socket.gethostname()}")
    store.set(f"kit/beat/{rank}", "0")
    store.set(f"kit/done/{rank}", "0")
    _PEERS.update(store=store, address=address)
    ended = threading.Event()

    def end():
        ended.set()
        try:
            store.set(f"kit/done/{rank}", "1")
        except Exception:
            pass

    def beat():
        seen, since, beats, store_lost = {}, {}, 0, None
        while not ended.wait(HEARTBEAT_S):
            now = time.monotonic()
            try:
                beats += 1
                store.set(f"kit/beat/{rank}", str(beats))
                if not store.check(peer_keys(world)):          # a rank still starting: not watched yet
                    continue
                beat_of, done_of = peer_state(store, world)
                for r in range(world):
                    if r == rank or done_of[r] == b"1":
                        since.pop(r, None)
                        continue
                    if seen.get(r) != beat_of[r]:
                        seen[r], since[r] = beat_of[r], now
                    elif now - since[r] > PEER_TIMEOUT_S and not ended.is_set():
                        print(f"error: rank {rank}: rank {r} ({store.get(f'kit/who/{r}').decode()}) sent no heartbeat "
                              f"for {PEER_TIMEOUT_S:g} s: it is gone; stopping this rank (torchrun --max-restarts "
                              "restarts the group and the stage resumes where it stopped)", file=sys.stderr, flush=True)
                        os._exit(1)
                store_lost = None
            except Exception as e:                     # the store is rank 0's: unreachable means rank 0 is gone
                store_lost = store_lost or now
                if now - store_lost > PEER_TIMEOUT_S and not ended.is_set():
                    print(f"error: rank {rank}: rank 0 (it serves the group's store at {address}) is gone "
                          f"({type(e).__name__}); stopping this rank", file=sys.stderr, flush=True)
                    os._exit(1)
    atexit.register(end)
    threading.Thread(target=beat, name="kit-peer-watchdog", daemon=True).start()


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


# ----------------------------------------------------------------------------------------------------------
# manifests: a folder with a complete manifest is a finished stage; its arrays, read back

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
# ragged lists (CSR), packed strings, content digests

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
# rank 0 decides, every rank learns (a refusal on rank 0 stops every rank with its line)

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


# ----------------------------------------------------------------------------------------------------------
# one run per folder

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


# ----------------------------------------------------------------------------------------------------------
# flags, and the one rule for a finished stage rerun with other settings

def check_folder_flag(path: str, flag: str = "--work") -> str:
    """A folder flag (--work, --out) that names an existing file: one line, not a traceback from makedirs."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a file, not a folder: pass a folder (created when missing)")
    return path


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


FORCE_HELP = ("replace a finished output, whatever settings made it (without --force a finished folder is reused "
              "with the same settings and refused with others); chunk files of an interrupted run with the same "
              "settings are resumed either way")


def begin_stage(folder: str, args, settings, what: str, script: str, then: str = "",
                elsewhere: str = "use another --work", changed=None) -> dict | None:
    """The start of every stage that writes a folder (01, 02, 03), one lifecycle for all of them:
    - a finished `folder` made with the same `settings` (the flags that change its bytes) is returned: the
      stage reuses it and ends;
    - one made with other settings is refused with one line naming them and --force (refuse_changed);
      `changed(done)` adds differences the flags alone do not show (another feature model, other inputs);
    - otherwise this run takes the folder (lock_stage: a second copy is refused) and returns None. With
      --force a finished folder's manifest is removed first: the folder is unfinished until finish_stage.
    --force means the same in every stage: replace the finished output, whatever settings made it. Chunk files
    of an interrupted run are kept only when written under the same settings (chunk_engine.prepare_chunks), so
    a rerun, with or without --force, resumes them."""
    done = read_manifest(folder)
    finished = bool(done and done.get("complete"))
    if finished and not args.force:
        refuse_changed(folder, what, changed_settings(done.get("config", {}), args, settings) +
                       (changed(done) if changed else []), then, elsewhere)
        return done
    lock_stage(folder, script, "wait for it to end, or " + elsewhere)
    barrier()                                  # every rank has read the old manifest before rank 0 removes it
    if finished and dist_info()[0] == 0:
        os.remove(os.path.join(folder, "manifest.json"))
    return None


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


# ----------------------------------------------------------------------------------------------------------
# a full disk, a failed write, host memory: one line naming the file; stage_main

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
            if not isinstance(e, MemoryError) and dist_info()[1] > 1 and any(m in str(e) for m in PEER_LOST):
                raise SystemExit(lost_peer_line(e)) from None
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


# ----------------------------------------------------------------------------------------------------------
# the finish: status counts and the manifest

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
