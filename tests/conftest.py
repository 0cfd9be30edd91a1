"""What the test files share: the repository root on sys.path, one module object per digit-named stage script,
a free port for torchrun, and a session-scoped tiny demo world (00's generator) for the tests that chain stages."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))       # bench/stage_scripts.py: the stage scripts as modules

from launch import free_port  # noqa: E402,F401    (bench/launch.py: torchrun launchers, free ports)


def load_script(name, file):
    """The stage script `file` (e.g. "03_cluster.py") as a module, loaded once for the whole session whatever
    `name` a test file gives it (bench/stage_scripts.py, which the benchmarks use too)."""
    import stage_scripts
    return stage_scripts.load(file, name)


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


# a sitecustomize module that slows every os.replace (the kit's atomic writes: chunk files, k-means and training
# checkpoints) by $KIT_TEST_SLOW_REPLACE_S in the processes that have its folder on PYTHONPATH, so a test can
# stop a run in its middle on any machine without changing the stages
SLOW_WRITES = '''import os, time
_replace = os.replace


def _slow_replace(*args, **kwargs):
    time.sleep(float(os.environ["KIT_TEST_SLOW_REPLACE_S"]))
    return _replace(*args, **kwargs)


if os.environ.get("KIT_TEST_SLOW_REPLACE_S"):
    os.replace = _slow_replace
'''


# ----------------------------------------------------------------------------------------------------------
# torchrun launchers (bench/launch.py: the benchmarks use them too)

from launch import first_worker, launch_nodes, wait_nodes  # noqa: E402,F401


def run_nodes(script, args, nodes=2, nproc=1, timeout=300, **kw):
    """launch_nodes, then wait_nodes; asserts that every launcher ended with 0. The launchers' outputs."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="nodes-") as logs:
        got = wait_nodes(launch_nodes(script, args, nodes, nproc, log_dir=kw.pop("log_dir", logs), **kw), timeout)
    for rc, out in got:
        assert rc == 0, out[-4000:]
    return [out for _, out in got]
