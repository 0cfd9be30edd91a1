"""bench/gpu.py --smoke: every part of the prepared GPU run on tiny CPU sizes, so the script a GPU session runs
at once cannot rot: each part ends ok, the JSON and Markdown tables are written, each part's figures are read."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_bench_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    assert set(parts) == {"world", "encoder", "step", "bank", "kmeans", "data", "sam", "loaders"}
    for name, p in parts.items():
        assert p["status"] == "ok", (name, p["status"], p["log_tail"])
        if name != "world":
            assert p["summary"] and not p["summary"].startswith("(unread"), (name, p["summary"])
    md = (tmp_path / "gpu.md").read_text()
    assert "| part | status | s | figures |" in md and report["torch"] in md and report["smoke"]
    # refused without --smoke on a machine without CUDA, with one line
    import torch
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, env=env)
        assert r.returncode != 0 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
