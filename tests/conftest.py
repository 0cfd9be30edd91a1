"""What the test files share: the repository root on sys.path, one module object per digit-named stage script,
a free port for torchrun, and a session-scoped tiny demo world (00's generator) for the tests that chain stages."""
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))       # bench/stage_scripts.py: the stage scripts as modules


def load_script(name, file):
    """The stage script `file` (e.g. "03_cluster.py") as a module, loaded once for the whole session whatever
    `name` a test file gives it (bench/stage_scripts.py, which the benchmarks use too)."""
    import stage_scripts
    return stage_scripts.load(file, name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_open_clip(folder, weights_name="tiny_clip.pt"):
    """A one-layer random open_clip ViT ("kit-tiny-clip", seed 0) whose config is <folder>/kit-tiny-clip.json
    (registered with open_clip) and whose weights are <folder>/<weights_name>: (config file, weights file,
    model, its preprocessing transform)."""
    import json
    import open_clip
    import torch
    cfg_file = os.path.join(folder, "kit-tiny-clip.json")
    with open(cfg_file, "w") as f:
        json.dump(TINY_CLIP, f)
    open_clip.add_model_config(cfg_file)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("kit-tiny-clip", pretrained=None)
    weights = os.path.join(folder, weights_name)
    torch.save(model.state_dict(), weights)
    return cfg_file, weights, model, preprocess


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """40 demo images of 128 px with objects and plainly printed words (seed 0), as loose files with their COCO
    box file: generated once per session."""
    out = tmp_path_factory.mktemp("tiny_world") / "data"
    load_script("make_demo_data", "00_make_demo_data.py").main(
        ["--out", str(out), "--num-images", "40", "--size", "128", "--seed", "0", "--vocab-size", "12",
         "--plain-words", "--workers", "1"])
    return out


# ----------------------------------------------------------------------------------------------------------
# torchrun launchers: one node, or several nodes on this machine meeting through a c10d rendezvous

TORCHRUN_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch_nodes(script, args, nodes=2, nproc=1, max_restarts=0, log_dir=None, env=None):
    """`nodes` torchrun launchers started on this machine as that many nodes of `nproc` workers each, meeting
    through a c10d rendezvous at 127.0.0.1:<free port> as on a cluster (RANK and LOCAL_RANK differ, each node
    has its own local rank 0): [(Popen, log file path)], each launcher's output in its own file."""
    import subprocess
    import tempfile
    port, run_id = free_port(), f"kit-test-{os.getpid()}-{free_port()}"
    log_dir = log_dir or tempfile.mkdtemp(prefix="nodes-")
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
        if node == 0:                  # node 0's agent hosts the rendezvous store, as the first node of a job does
            wait_for_port(port, procs[0][0])
    return procs


def wait_for_port(port, proc, timeout=60):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


def wait_nodes(procs, timeout=300):
    """Wait for every launcher of launch_nodes; on a timeout kill them all and fail. [(returncode, output)]."""
    import time
    deadline = time.time() + timeout
    for p, _ in procs:
        try:
            p.wait(max(1, deadline - time.time()))
        except Exception:
            for q, _ in procs:
                q.kill()
            outputs = "\n".join(open(log).read()[-3000:] for _, log in procs)
            pytest.fail(f"launchers still running after {timeout} s:\n{outputs}")
    return [(p.returncode, open(log).read()) for p, log in procs]


def run_nodes(script, args, nodes=2, nproc=1, timeout=300, **kw):
    """launch_nodes, then wait_nodes; asserts that every launcher ended with 0. The launchers' outputs."""
    got = wait_nodes(launch_nodes(script, args, nodes, nproc, **kw), timeout)
    for rc, out in got:
        assert rc == 0, out[-4000:]
    return [out for _, out in got]
