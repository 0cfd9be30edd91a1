"""What the test files share: the repository root on sys.path, one module object per digit-named stage script,
a free port for torchrun, and a session-scoped tiny demo world (00's generator) for the tests that chain stages."""
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_script(name, file):
    """The stage script `file` (e.g. "03_cluster.py") as a module, loaded once for the whole session whatever
    `name` a test file gives it (workdir.stage_module)."""
    import workdir
    return workdir.stage_module(file, name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """40 demo images of 128 px with objects and plainly printed words (seed 0), as loose files with their COCO
    box file: generated once per session."""
    out = tmp_path_factory.mktemp("tiny_world") / "data"
    load_script("make_demo_data", "00_make_demo_data.py").main(
        ["--out", str(out), "--num-images", "40", "--size", "128", "--seed", "0", "--vocab-size", "12",
         "--plain-words", "--workers", "1"])
    return out
