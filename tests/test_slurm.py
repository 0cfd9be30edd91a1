"""The sbatch scripts of slurm/ under a real Slurm: Debian's slurm-wlm (slurmctld + slurmd + munge, one node of
this machine) started by slurm/local-slurm.sh (which installs it with apt when missing: run as root, as CI
does) and stopped at the end. 01, 03, 04 and 05 are submitted with sbatch, two workers on the node, and their
outputs compared with local runs; 04 is requeued in its middle (scontrol requeue, what a preemption does to a
--requeue job) and still ends byte-identical to an uninterrupted run."""
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, SLOW_WRITES, load_script, run_nodes

import model as model_py  # noqa: E402

pytestmark = pytest.mark.cluster
demo = load_script("make_demo_data", "00_make_demo_data.py")
mine = load_script("mine_regions", "01_mine_regions.py")
ev = load_script("eval", "05_eval.py")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "KIT_SLURM_DIR": str(d / "slurm")}
    if os.geteuid() != 0 and not shutil.which("sbatch"):
        pytest.fail("the Slurm test needs root to install and start slurm-wlm (as CI runs), or a Slurm already "
                    "installed: run `sudo bash slurm/local-slurm.sh start` once")
    res = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local-slurm.sh"), "start"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    env["SLURM_CONF"] = str(d / "slurm" / "slurm.conf")
    yield d, env
    subprocess.run(["bash", os.path.join(ROOT, "slurm", "local-slurm.sh"), "stop"], env=env, timeout=120)


def submit(slurm, script, args, name, extra_env=None):
    """sbatch slurm/<script>.sbatch from the repository root with two workers on the one node; the job id."""
    d, env = slurm
    os.makedirs(d / "logs", exist_ok=True)
    exports = ",".join(["ALL", "KIT_GPUS_PER_NODE=2", "OMP_NUM_THREADS=1",
                        *(f"{k}={v}" for k, v in (extra_env or {}).items())])
    res = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--gpus-per-node=0", "--cpus-per-task=1",
                          f"--job-name={name}", f"--output={d / 'logs' / '%x-%j.out'}", f"--export={exports}",
                          os.path.join("slurm", f"{script}.sbatch"), *map(str, args)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_state(slurm, job):
    res = subprocess.run(["scontrol", "show", "job", job], env=slurm[1], capture_output=True, text=True, timeout=30)
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    return fields.get("JobState", "UNKNOWN"), fields


def wait_job(slurm, job, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, fields = job_state(slurm, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, log_of(slurm, fields)
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm[1], timeout=30)
    pytest.fail(f"job {job} still running after {timeout} s")


def log_of(slurm, fields):
    path = fields.get("StdOut", "")
    return open(path).read() if os.path.exists(path) else ""


def npy_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".npy")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm_data")
    demo.main(["--out", str(d / "data"), "--num-images", "60", "--size", "128", "--workers", "1", "--format",
               "webdataset", "--shard-size", "20"])
    (d / "slow").mkdir()
    (d / "slow" / "sitecustomize.py").write_text(SLOW_WRITES)
    return d


def test_stages_under_slurm_equal_local_runs(slurm, data):
    d = data
    mine_flags = ["--images", str(d / "data" / "shards" / "{00000..00002}.tar"), "--boxes", str(d / "data" / "coco.json"),
                  "--features", "pixels", "--min-box-side", "8", "--min-image-side", "32", "--chunk-size", "4",
                  "--workers", "0"]
    work, local = str(d / "slurm_work"), str(d / "local_work")
    mine.main([*mine_flags, "--work", local])
    state, log = wait_job(slurm, submit(slurm, "01_mine_regions", [*mine_flags, "--work", work], "kit-mine"))
    assert state == "COMPLETED", log[-3000:]
    assert "1 nodes x 2 workers" in log and "regions [rank 1/2]" in log
    for stage in ("images", "regions"):
        a, b = npy_bytes(os.path.join(local, stage)), npy_bytes(os.path.join(work, stage))
        assert a and a.keys() == b.keys() and all(a[k] == b[k] for k in a), stage
    # 03 on two workers under Slurm, and locally on two workers (torchrun): byte for byte
    demo.write_ocr_stand_in(work, str(d / "data" / "coco.json"))
    demo.write_ocr_stand_in(local, str(d / "data" / "coco.json"))
    state, log = wait_job(slurm, submit(slurm, "03_cluster", ["--work", work, "--k", "6"], "kit-cluster"))
    assert state == "COMPLETED", log[-3000:]
    run_nodes("03_cluster.py", ["--work", local, "--k", "6"], nodes=1, nproc=2)
    a, b = npy_bytes(os.path.join(local, "clusters")), npy_bytes(os.path.join(work, "clusters"))
    assert a and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    # 05 under Slurm: the features of one local process, to float tolerance
    enc = str(d / "tiny.pt")
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=64))), enc)
    eval_flags = ["--images", str(d / "data" / "shards" / "{00000..00002}.tar"), "--coco", str(d / "data" / "coco.json"),
                  "--encoder", f"kit={enc}", "--probes", "image", "--tsne-max", "0", "--c-refine", "0",
                  "--chunk-size", "8", "--workers", "0"]
    ev.main([*eval_flags, "--out", str(d / "local_eval")])
    state, log = wait_job(slurm, submit(slurm, "05_eval", [*eval_flags, "--out", str(d / "slurm_eval")], "kit-eval"))
    assert state == "COMPLETED", log[-3000:]
    fa, fb = (np.load(d / o / "features" / "kit" / "image_features.npy") for o in ("local_eval", "slurm_eval"))
    np.testing.assert_allclose(fb.astype(np.float64), fa.astype(np.float64), atol=1e-5)
    assert json.load(open(d / "slurm_eval" / "report.json"))["settings"]["world"] == 2


def test_training_requeued_mid_run_resumes_byte_identical(slurm, data):
    d = data
    work = str(d / "train_work")
    mine.main(["--images", str(d / "data" / "shards" / "{00000..00002}.tar"), "--boxes", str(d / "data" / "coco.json"),
               "--features", "pixels", "--min-box-side", "8", "--min-image-side", "32", "--work", work])
    demo.write_ocr_stand_in(work, str(d / "data" / "coco.json"))
    load_script("cluster", "03_cluster.py").main(["--work", work, "--k", "6"])
    flags = ["--work", work, "--model", "tiny", "--image-size", "64", "--workers", "0", "--warmup", "2", "--lr", "2e-3",
             "--batch-size", "8", "--steps", "12", "--log-every", "1", "--save-every", "3"]
    ref, run = str(d / "ref_run"), str(d / "requeued_run")
    run_nodes("04_train.py", flags + ["--run-dir", ref], nodes=1, nproc=2)
    job = submit(slurm, "04_train", flags + ["--run-dir", run], "kit-train",
                 {"PYTHONPATH": str(d / "slow"), "KIT_TEST_SLOW_REPLACE_S": "0.3"})
    log = os.path.join(run, "log.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(os.path.join(run, "ckpt", "latest.pt")) and os.path.exists(log)
               and sum(1 for _ in open(log)) >= 4):
        assert time.time() < deadline and job_state(slurm, job)[0] in ("PENDING", "RUNNING", "CONFIGURING"), \
            job_state(slurm, job)
        time.sleep(0.05)
    res = subprocess.run(["scontrol", "requeue", job], env=slurm[1], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    # a requeued job waits (BeginTime) before it is eligible again; the test does not
    while job_state(slurm, job)[0] not in ("PENDING", "RUNNING", "COMPLETED"):
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm[1], timeout=30)
    state, out = wait_job(slurm, job)
    assert state == "COMPLETED", out[-3000:]
    assert "(restart 1)" in out and "resumed from" in out, out[-3000:]
    a = [json.loads(x) for x in open(os.path.join(ref, "log.jsonl"))]
    b = [json.loads(x) for x in open(log)]
    assert [r["step"] for r in b] == list(range(1, 13)) and [r["loss"] for r in b] == [r["loss"] for r in a]
    wa = torch.load(os.path.join(ref, "ckpt", "latest.pt"), weights_only=True)
    wb = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)
    assert all(torch.equal(wb["encoder"][k], v) for k, v in wa["encoder"].items())
