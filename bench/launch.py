"""torchrun launchers on one machine, for the tests and the benchmarks: one node, or several nodes meeting
through a c10d rendezvous at 127.0.0.1 as on a cluster (RANK and LOCAL_RANK differ, each node has its own
local rank 0), and the worker process of a given rank (to kill it)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(script, args, nodes=2, nproc=1, max_restarts=0, log_dir=None, env=None):
    """`nodes` torchrun launchers started on this machine as that many nodes of `nproc` workers each, meeting
    through a c10d rendezvous at 127.0.0.1:<free port>: [(Popen, log file path)], each launcher's output in its
    own file. Node 0 starts first and hosts the rendezvous store, as the first node of a Slurm job does."""
    port, run_id = free_port(), f"kit-{os.getpid()}-{free_port()}"
    log_dir = log_dir or tempfile.mkdtemp(prefix="nodes-")
    os.makedirs(log_dir, exist_ok=True)
    full_env = {**os.environ, **TORCHRUN_ENV, **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    procs = []
    for node in range(nodes):
        log = os.path.join(str(log_dir), f"node{node}.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
               f"--nproc_per_node={nproc}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               f"--rdzv_id={run_id}", f"--max-restarts={max_restarts}", "--monitor-interval=0.5",
               os.path.join(ROOT, script), *map(str, args)]
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT), log))
        if node == 0:
            wait_for_port(port, procs[0][0])
    return procs


def wait_for_port(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


def wait_nodes(procs, timeout=300):
    """Wait for every launcher of launch_nodes: [(returncode, output)]; on a timeout kill them all and raise
    TimeoutError with their last output."""
    deadline = time.time() + timeout
    for p, _ in procs:
        try:
            p.wait(max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            outputs = "\n".join(open(log).read()[-3000:] for _, log in procs)
            raise TimeoutError(f"launchers still running after {timeout} s:\n{outputs}") from None
    return [(p.returncode, open(log).read()) for p, log in procs]


def first_worker(script, rank):
    """pid of the first attempt's worker process of `rank` running `script` (its parent is a torchrun agent),
    or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{ppid}/cmdline", "rb") as f:
                parent = f.read()
        except (OSError, IndexError):
            continue
        if (script.encode() in cmd and env.get(b"RANK") == str(rank).encode() and b"torch.distributed.run" in parent
                and env.get(b"TORCHELASTIC_RESTART_COUNT") == b"0"):
            return int(pid)
    return None
