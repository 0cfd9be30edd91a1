"""Every stage's main, in order, on one tiny world: 00 -> 01 -> 02 (real RapidOCR) -> 03 (both codebooks) -> 04
(RICE and MLCD) -> 05 -> 06, asserting each hand-off: what a stage writes is what the next one reads, row for
row, and each stage accepts its inputs' fingerprints. No stage is faked."""
import json
import os

import numpy as np
import torch

from conftest import load_script

import model as model_py  # noqa: E402
import workdir  # noqa: E402
import image_io  # noqa: E402

mine = load_script("mine_regions", "01_mine_regions.py")
ocr = load_script("extract_ocr", "02_extract_ocr.py")
cluster = load_script("cluster", "03_cluster.py")
train = load_script("train", "04_train.py")
ev = load_script("eval_probes", "05_eval.py")
export = load_script("export_hf", "06_export_hf.py")
K = 12
TRAIN = ["--image-size", "64", "--workers", "0", "--batch-size", "8", "--steps", "4", "--warmup", "1",
         "--negatives", "shared", "--scale", "16", "--log-every", "1"]


def test_every_stage_in_order(tiny_world, tmp_path):
    data, work = tiny_world, str(tmp_path / "work")
    coco = json.loads((data / "coco.json").read_text())
    text_id = next(c["id"] for c in coco["categories"] if c["name"] == "text")
    n = len(coco["images"])

    # 01: the image table and the regions (the world's boxes, the pixel stand-in features)
    regions = mine.main(["--images", str(data / "images"), "--work", work, "--boxes", str(data / "coco.json"),
                         "--features", "pixels", "--min-box-side", "12", "--min-image-side", "64", "--workers", "0"])
    table = image_io.read_image_table(work)
    images_m = workdir.read_manifest(os.path.join(work, "images"))
    assert len(table) == n and images_m["status_counts"]["ok"] == n
    assert regions["image_table"] == images_m["fingerprint"]
    reg = os.path.join(work, "regions")
    off = np.load(os.path.join(reg, "region_offsets.npy"))
    R = regions["rows"]["boxes"]
    assert len(off) == n + 1 and off[-1] == R == len(np.load(os.path.join(reg, "region_features.npy"))) > 0
    objects = {}
    for a in coco["annotations"]:
        if a["category_id"] != text_id:
            objects[a["image_id"]] = objects.get(a["image_id"], 0) + 1
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    for i in range(n):                             # never more regions than the box file has objects
        assert off[i + 1] - off[i] <= objects.get(by_name[table.name(i)], 0)

    # 02: the real OCR engine on the same table
    lines = ocr.main(["--work", work, "--det-limit-side", "64", "--workers", "0"])
    assert lines["image_table"] == images_m["fingerprint"] and lines["rows"]["images"] == n
    folder = os.path.join(work, "ocr")
    line_off = np.load(os.path.join(folder, "line_offsets.npy"))
    tokens = np.load(os.path.join(folder, "tokens.npy"))
    assert len(line_off) == n + 1 and line_off[-1] == lines["rows"]["lines"] > 0
    assert tokens.min() >= 0 and tokens.max() < lines["tokenizer"]["vocab_size"]
    worded = {a["image_id"] for a in coco["annotations"] if a["category_id"] == text_id}
    found = {by_name[table.name(i)] for i in range(n) if line_off[i + 1] > line_off[i]}
    assert len(found & worded) >= len(worded) // 2 and len(found - worded) <= n // 4     # words are read where drawn

    # 03: RICE's codebook on the regions, MLCD's on the images
    rice_k = cluster.main(["--work", work, "--k", str(K), "--fit-on", "regions"])
    mlcd_k = cluster.main(["--work", work, "--k", str(K), "--fit-on", "images", "--out",
                           os.path.join(work, "clusters_mlcd")])
    fingerprint = workdir.regions_fingerprint(regions)
    for m, folder in ((rice_k, "clusters"), (mlcd_k, "clusters_mlcd")):
        assert m["inputs"]["regions"] == fingerprint
        labels = np.load(os.path.join(work, folder, "region_labels.npy"))
        topl = np.load(os.path.join(work, folder, "image_labels.npy"))
        assert len(labels) == R and 0 <= labels.min() and labels.max() < K and topl.shape == (n, 8)

    # show.py: one image with regions and OCR lines, as a picture and as text
    both = next(i for i in range(n) if off[i + 1] > off[i] and line_off[i + 1] > line_off[i])
    [png] = load_script("show", "show.py").main(["--work", work, "--rows", str(both), "--out", str(tmp_path / "s")])
    text = open(png[:-4] + ".txt").read()
    labels = np.load(os.path.join(work, "clusters", "region_labels.npy"))[off[both]:off[both + 1]]
    assert f"cluster {labels[0]}" in text and "tokens [" in text and "not run yet" not in text
    topl = np.load(os.path.join(work, "clusters", "image_labels.npy"))[both]
    assert f"image labels (top-l centres): {[int(x) for x in topl]}" in text

    # 04: both methods train on what 01-03 wrote; the checkpoints are plain dicts
    runs = {}
    for method, flags in (("rice", ["--model", "tiny"]),
                          ("mlcd", ["--model", "clip-tiny", "--clusters", os.path.join(work, "clusters_mlcd")])):
        run = str(tmp_path / f"train_{method}")
        m = train.main(["--work", work, "--run-dir", run, "--method", method, *flags, *TRAIN])
        ckpt = torch.load(os.path.join(run, "ckpt", "latest.pt"), weights_only=True)
        assert m["complete"] and ckpt["step"] == 4 and ckpt["config"]["K"] == K
        assert ckpt["config"]["inputs"]["images"] == images_m["fingerprint"]
        assert (ckpt["config"]["inputs"]["ocr"] is None) == (method == "mlcd")
        log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
        assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
        runs[method] = os.path.join(run, "ckpt", "latest.pt")
    assert set(ckpt_banks(runs["rice"])) == {"object", "ocr"} and set(ckpt_banks(runs["mlcd"])) == {"object"}

    # 05: the trained RICE encoder against its random initialisation, on the world's COCO file
    rep = ev.main(["--images", str(data / "images"), "--coco", str(data / "coco.json"),
                   "--encoder", f"rice={runs['rice']}", "--encoder", f"random=random:{runs['rice']}",
                   "--out", str(tmp_path / "eval"), "--probes", "image,objects,ocr", "--tsne-max", "0",
                   "--c-refine", "0"])
    assert rep["data"]["images"]["ok"] == n
    for name in ("rice", "random"):
        probes = rep["encoders"][name]["probes"]
        assert {"objects_region", "ocr_region"} <= set(probes)
        assert rep["encoders"][name]["encoder"]["region_path"]

    # 06: both exports load in transformers alone and agree with the kit encoders
    from transformers import AutoModel
    for method, hf_class in (("rice", "MLCDVisionModel"), ("mlcd", "CLIPVisionModel")):
        out = str(tmp_path / f"export_{method}")
        res = export.main(["--checkpoint", runs[method], "--out", out])
        assert res["hf_class"] == res["auto_class"] == hf_class == type(AutoModel.from_pretrained(out)).__name__
        assert res["max_abs_diff_last_hidden_state"] <= 1e-4
        enc = model_py.load_encoder(out)
        assert enc.cfg.arch == ("mlcd" if method == "rice" else "clip")


def ckpt_banks(path):
    return torch.load(path, weights_only=True)["banks"]
