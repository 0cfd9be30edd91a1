"""05_eval.py on a tiny generated world (00 -> 05) with three encoders (a random kit checkpoint, `random:` of it,
a tiny open_clip ViT from a local file): outputs and counts against the COCO file, features against plain
references (the model run by hand, a loop over patches, open_clip's own preprocessing), k-NN against
scikit-learn, the linear probe against scikit-learn's LogisticRegression and its C search, probes that must
succeed or fail, broken inputs, and a two-process torchrun run equal to one process."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, free_port, load_script, tiny_open_clip

import model as model_py  # noqa: E402
import probes  # noqa: E402
import image_io  # noqa: E402

SCRIPT = os.path.join(ROOT, "05_eval.py")
ev = load_script("eval_probes", "05_eval.py")
demo = load_script("make_demo_data", "00_make_demo_data.py")
FAST = ["--c-refine", "0", "--dense-max-patches", "1000"]     # the suite's time budget (defaults: 2, 5000)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """60 demo images of 128 px, a tiny random kit checkpoint and a tiny random open_clip ViT saved to a file."""
    d = tmp_path_factory.mktemp("evalworld")
    demo.main(["--out", str(d / "data"), "--num-images", "60", "--size", "128", "--workers", "1"])
    torch.manual_seed(1)
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny"))), d / "tiny.pt")
    tiny_open_clip(d)                            # d / "kit-tiny-clip.json", d / "tiny_clip.pt"
    return d


def data_flags(d, masks=True):
    return ["--images", str(d / "data" / "images"), "--coco", str(d / "data" / "coco.json")] + \
        (["--masks", str(d / "data" / "masks")] if masks else [])


def encoder_flags(d):
    return ["--encoder", f"kit={d / 'tiny.pt'}", "--encoder", f"random=random:{d / 'tiny.pt'}",
            "--encoder", f"clip=openclip:kit-tiny-clip:{d / 'tiny_clip.pt'}", "--clip-config",
            str(d / "kit-tiny-clip.json")]


@pytest.fixture(scope="module")
def report(world):
    out = world / "eval"
    return ev.main([*data_flags(world), *encoder_flags(world), "--out", str(out), *FAST]), out


def coco(world):
    return json.loads((world / "data" / "coco.json").read_text())


def metrics(probe):
    for part in ("linear", "knn"):
        for k, v in probe.get(part, {}).items():
            if k in ("top1", "recall@5", "word_top1", "miou", "patch_accuracy", "map"):
                yield f"{part}.{k}", v


def test_outputs_values_and_counts(report, world):
    rep, out = report
    assert json.loads((out / "report.json").read_text()) == rep
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in ("kit", "random", "clip"))
    for name in ("kit", "random", "clip"):
        png = out / f"tsne_{name}.png"
        assert png.exists() and Image.open(png).size[0] > 300
        assert rep["encoders"][name]["tsne"]["coloured_by"] == ["shape", "colour", "texture"]   # 108 classes
    c = coco(world)
    text_id = next(k["id"] for k in c["categories"] if k["name"] == "text")
    n_text = sum(a["category_id"] == text_id for a in c["annotations"])
    n_obj = len(c["annotations"]) - n_text
    d = rep["data"]
    assert d["images"] == {"total": 60, "ok": 60, "status": {"ok": 60}}
    assert d["split"]["train"] + d["split"]["val"] + d["split"]["test"] == 60 and d["split"]["test"] == 18
    assert d["objects"]["annotations"] == d["objects"]["kept"] == n_obj       # square images: nothing cut
    assert d["text_boxes"]["annotations"] == d["text_boxes"]["kept"] == n_text
    assert d["masks"] == {"ok": 60}
    images_with_objects = len({a["image_id"] for a in c["annotations"] if a["category_id"] != text_id})
    for name, e in rep["encoders"].items():
        p = e["probes"]
        assert ("objects_region" in p) == (name != "clip")                    # region path: kit encoders only
        kinds = ["pooled"] + (["region"] if name != "clip" else [])
        assert {k for k in p if k.startswith("objects_")} == \
            {f"objects_{kind}{f}" for kind in kinds for f in ("", "_shape", "_colour", "_texture")}
        assert p["objects_pooled_texture"]["counts"]["classes"] == 3               # plain, striped, dotted
        assert "obj linear (pooled, shape)" in md
        for key, probe in p.items():
            assert "skipped" not in probe, (name, key, probe)
            vals = dict(metrics(probe))
            assert vals and all(0 <= v <= 1 for v in vals.values()), (name, key, vals)
            cnt = probe["counts"]
            if key == "image":
                assert cnt["train"] + cnt["val"] + cnt["test"] == images_with_objects
            elif key.startswith("objects"):
                assert cnt["train"] + cnt["val"] + cnt["test"] == n_obj
            elif key.startswith("present_") or key == "object_count":       # every readable image
                assert cnt["train"] + cnt["val"] + cnt["test"] == 60
            elif key.startswith("ocr"):
                assert cnt["train"] + cnt["val"] + cnt["test"] == n_text       # every demo word has tokens
            elif key == "dense":
                grid = (e["encoder"]["image_size"] // e["encoder"]["patch_size"]) ** 2
                assert cnt["test_patches"] == d["split"]["test"] * grid
        assert e["encoder"]["image_size"] == (32 if name == "clip" else 64)
    assert rep["encoders"]["random"]["encoder"]["kind"] == "random"
    # the random baseline really is another network than the checkpoint
    f_kit = np.load(out / "features" / "kit" / "image_features.npy")
    f_rnd = np.load(out / "features" / "random" / "image_features.npy")
    assert not np.allclose(f_kit, f_rnd)


def test_features_equal_plain_references(report, world):
    """Image, region and pooled features of the kit encoder recomputed by hand for a few images; pooled-in-box
    against a loop over patches; open_clip's image feature against open_clip's own preprocessing; the patch
    labels against a loop over the nearest-resized mask."""
    import open_clip
    _, out = report
    c = coco(world)
    feats = {k: np.load(out / "features" / "kit" / f"{k}.npy") for k in
             ("image_features", "ann_offsets", "pooled", "region", "dense_labels", "patch_offsets")}
    enc = model_py.load_encoder(str(world / "tiny.pt")).eval()
    cats = [a["category_id"] for a in c["annotations"]]
    anns_of = {}
    for a in c["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    S, p, g = 64, 8, 8
    for i in (0, 7, 31):
        im = c["images"][i]
        img, _ = image_io.open_image(str(world / "data" / "images" / im["file_name"]))
        anns = anns_of.get(im["id"], [])
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        pixels, bx, _ = image_io.resize_crop(img, S, boxes, crop="center")
        x = image_io.normalize(torch.from_numpy(pixels.copy())[None])
        with torch.no_grad():
            o = enc(x)
        np.testing.assert_allclose(feats["image_features"][i], o.class_embedding[0].numpy(), atol=1e-5)
        tokens = o.patch_tokens[0].numpy()
        a0 = feats["ann_offsets"][i]
        assert feats["ann_offsets"][i + 1] - a0 == len(anns)
        for k, b in enumerate(bx):
            # the rule, written as a loop: patch centres in the closed box, else the patch holding the box centre
            inside = [r * g + q for r in range(g) for q in range(g)
                      if b[0] <= (q + 0.5) * p <= b[2] and b[1] <= (r + 0.5) * p <= b[3]]
            if not inside:
                inside = [min(int((b[1] + b[3]) / 2 // p), g - 1) * g + min(int((b[0] + b[2]) / 2 // p), g - 1)]
            np.testing.assert_allclose(feats["pooled"][a0 + k], tokens[inside].mean(0), atol=1e-5)
            with torch.no_grad():         # one box alone: a region's output does not depend on the other boxes
                r = enc(x, torch.tensor(b)[None, None], torch.ones(1, 1, dtype=torch.bool)).region_embeddings
            np.testing.assert_allclose(feats["region"][a0 + k], r[0, 0].numpy(), atol=1e-4)
        # dense labels: majority of the pixel classes per patch of the nearest-resized, cropped mask
        inst = np.asarray(Image.open(world / "data" / "masks" / im["file_name"]))
        sem = np.array([0] + [cats[c["annotations"].index(a)] for a in anns])[inst]
        nw, nh, left, top = image_io.short_side_geometry(img.width, img.height, S)
        sem_img = Image.fromarray(sem.astype(np.int32)).resize((nw, nh), Image.NEAREST)
        sem = np.asarray(sem_img)[top: top + S, left: left + S]
        ref = []
        for r in range(g):
            for q in range(g):
                vals, cnt = np.unique(sem[r * p:(r + 1) * p, q * p:(q + 1) * p], return_counts=True)
                ref.append(vals[cnt.argmax()])
        po = feats["patch_offsets"]
        np.testing.assert_array_equal(feats["dense_labels"][po[i]: po[i + 1]], ref)

    # open_clip: the same pixels as open_clip's own transforms, so the same image feature
    open_clip.add_model_config(str(world / "kit-tiny-clip.json"))
    clip, _, preprocess = open_clip.create_model_and_transforms("kit-tiny-clip", pretrained=str(world / "tiny_clip.pt"))
    img, _ = image_io.open_image(str(world / "data" / "images" / c["images"][3]["file_name"]))
    with torch.no_grad():
        ref = clip.eval().encode_image(preprocess(img)[None])[0].numpy()
    np.testing.assert_allclose(np.load(out / "features" / "clip" / "image_features.npy")[3], ref, atol=1e-5)


def test_each_encoder_gets_its_own_preprocessing(world, tmp_path):
    """An open_clip model whose config squashes, resamples bilinearly and normalises with other statistics gets
    exactly open_clip's own transform (its image feature equals open_clip's), and its boxes the squash
    geometry; an HF folder gets its preprocessor_config.json's mean and std; each is said in the encoder info."""
    import open_clip
    rng = np.random.default_rng(3)
    (tmp_path / "im").mkdir()
    sizes = [(90, 60), (60, 100), (128, 72)]
    for k, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / "im" / f"{k}.png")
    coco = {"images": [{"id": k, "file_name": f"{k}.png", "width": w, "height": h}
                       for k, (w, h) in enumerate(sizes)],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [5, 7, 20, 25], "area": 500}
                            for k in range(3)], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    local = tmp_path / "squash_clip"                      # an open_clip folder (as hf-hub ones are) with its
    local.mkdir()                                         # own preprocessing
    (local / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": json.loads((world / "kit-tiny-clip.json").read_text()),
        "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear",
                           "resize_mode": "squash"}}))
    shutil.copy(world / "tiny_clip.pt", local / "open_clip_pytorch_model.bin")
    args = ev.parse_args(["--images", str(tmp_path / "im"), "--coco", str(tmp_path / "coco.json"), "--encoder", "x",
                          "--out", str(tmp_path / "o")])
    data = ev.load_eval_data(args)                         # read, matched to the image table, split
    arrays, info = ev.extract("sq", f"openclip:local-dir:{local}:none", data, args, torch.device("cpu"))
    assert info["preprocess"]["source"] == "open_clip transform" and info["preprocess"]["resize"] == "squash"
    assert info["preprocess"]["mean"] == [0.5, 0.4, 0.3] and info["preprocess"]["resample"] == 2
    clip, _, transform = open_clip.create_model_and_transforms(f"local-dir:{local}")
    pre = ev.Preprocess(32, "squash")
    for k, (w, h) in enumerate(sizes):
        img = Image.open(tmp_path / "im" / f"{k}.png").convert("RGB")
        with torch.no_grad():
            ref = clip.eval().encode_image(transform(img)[None])[0].numpy()
        np.testing.assert_allclose(arrays["image_features"][k], ref, atol=1e-5)
        np.testing.assert_allclose(pre.boxes([[5, 7, 25, 32]], w, h)[0], [5 * 32 / w, 7 * 32 / h, 25 * 32 / w,
                                                                        32 * 32 / h], atol=1e-5)
    # an HF folder with its own statistics
    enc = model_py.load_encoder(str(world / "tiny.pt")).eval()
    folder = tmp_path / "hf"
    model_py.save_hf(enc, str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
        "resample": 3, "do_center_crop": True, "size": {"shortest_edge": 64},
        "crop_size": {"height": 64, "width": 64}}))
    arrays, info = ev.extract("hf", str(folder), data, args, torch.device("cpu"))
    assert info["preprocess"]["source"] == "preprocessor_config.json" and info["preprocess"]["mean"] == [0.5] * 3
    for k in range(3):
        img = Image.open(tmp_path / "im" / f"{k}.png").convert("RGB")
        pixels, _, _ = image_io.resize_crop(img, 64, crop="center")
        x = (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None] - 127.5) / 63.75
        with torch.no_grad():
            np.testing.assert_allclose(arrays["image_features"][k], enc(x).class_embedding[0].numpy(), atol=1e-5)


def test_crop_geometry_and_visible_share():
    """resize_crop moves boxes by the centre crop's scale and shift (a box at the centre, mapped by hand); the
    visible share is measured on the original image, so every encoder and input size leaves out the same boxes."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        w, h, S = int(rng.integers(40, 300)), int(rng.integers(40, 300)), int(rng.choice([32, 64, 96]))
        box = np.array([[w / 2 - 3, h / 2 - 2, w / 2 + 4, h / 2 + 5]])           # the centre is always kept
        _, moved, _ = image_io.resize_crop(Image.new("RGB", (w, h)), S, box, crop="center")
        nw, nh, left, top = image_io.short_side_geometry(w, h, S)
        np.testing.assert_allclose(moved[0], box[0] * [nw / w, nh / h, nw / w, nh / h] - [left, top, left, top],
                                   atol=1e-4)
    # 200 x 100: the centre square is x in [50, 150]; a box [30, 10, 70, 20] is half inside
    np.testing.assert_allclose(ev.visible_share(np.array([[30, 10, 70, 20], [60, 0, 80, 100], [0, 0, 40, 50],
                                                          [5, 5, 5, 9]]), 200, 100), [0.5, 1.0, 0.0, 0.0])


def test_image_contents_and_multilabel_probe(world):
    # image_contents against a plain pass over the COCO file; the multi-label probe scores features that carry
    # the labels far above a constant score (its baseline: the labels' prevalence) and noise near it
    data = ev.read_coco(str(world / "data" / "images"), str(world / "data" / "coco.json"), None, "text")
    contents, count = ev.image_contents(data)
    c = coco(world)
    cats = {k["id"]: k for k in c["categories"]}
    for i, im in enumerate(c["images"]):
        objs = [a["category_id"] for a in c["annotations"]
                if a["image_id"] == im["id"] and cats[a["category_id"]]["name"] != "text"]
        assert contents["classes"][i] == set(objs) and count[i] == len(objs)
        assert contents["colour"][i] == {cats[o]["colour"] for o in objs}
    assert set(contents) == {"classes", "shape", "colour", "texture"}      # supercategory is one value: left out
    rng = np.random.default_rng(0)
    n, L = 400, 6
    Y = rng.random((n, L)) < 0.3
    sets = [set(np.flatnonzero(r).tolist()) for r in Y]
    split = ev.split_images(n, 0.3, 0.2, 0)
    settings = probes.ProbeSettings()
    good = probes.multilabel_probe(probes.unit(Y + 0.3 * rng.standard_normal((n, L))), sets, split, settings)
    noise = probes.multilabel_probe(probes.unit(rng.standard_normal((n, 8))), sets, split, settings)
    assert good["linear"]["map"] > 0.85 and good["linear"]["labels_scored"] == L
    assert abs(good["prevalence_map"] - Y[split == 2].mean()) < 1e-6
    assert abs(noise["linear"]["map"] - noise["prevalence_map"]) < 0.1


def test_object_probe_per_category_field(world):
    # the per-field object probes take the field's values as classes: region features that carry the colour
    # (and nothing else) score ~1 on colour and about chance on shape and texture; the class probe falls between
    data = ev.read_coco(str(world / "data" / "images"), str(world / "data" / "coco.json"), None, "text")
    assert ev.category_fields(data, data.category[~data.is_text]) == ["colour", "shape", "texture"]
    n = len(data.files)
    data.split = ev.split_images(n, 0.3, 0.2, 0)
    obj = ~data.is_text
    colours = sorted({c.get("colour") for c in data.categories.values() if c.get("colour")})
    colour = np.array([colours.index(data.categories[int(c)]["colour"]) if o else 0
                       for c, o in zip(data.category, obj)])
    rng = np.random.default_rng(0)
    f = {"image_features": rng.standard_normal((n, 8)).astype(np.float32),
         "region": (np.eye(16)[colour] + 0.05 * rng.standard_normal((len(colour), 16))).astype(np.float32),
         "pooled": rng.standard_normal((len(colour), 16)).astype(np.float32)}
    args = SimpleNamespace(probes=["objects"], image_folder=None, tsne_max=0)
    res, _ = ev.probe_encoder("x", f, data, np.ones(n, bool), np.ones(len(colour), bool), [[]] * len(colour),
                              None, probes.ProbeSettings(c_refine=0), args)
    assert res["objects_region_colour"]["linear"]["top1"] > 0.95
    assert res["objects_region_colour"]["counts"]["classes"] == len(colours)
    for field in ("shape", "texture"):
        r = res[f"objects_region_{field}"]
        assert r["linear"]["top1"] < r["majority_top1"] + 0.2, (field, r["linear"], r["majority_top1"])
    assert res["objects_region"]["linear"]["top1"] < 0.6


def test_knn_equals_sklearn():
    from sklearn.neighbors import KNeighborsClassifier
    rng = np.random.default_rng(0)
    train, test = probes.unit(rng.standard_normal((300, 16))), probes.unit(rng.standard_normal((120, 16)))
    y = rng.integers(0, 7, 300)
    for k, T in [(10, 0.07), (1, 0.07), (25, 0.5)]:
        ours = probes.knn_predict(train, y, test, k, T)
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                   weights=lambda dist, T=T: np.exp((1 - dist) / T)).fit(train, y).predict(test)
        np.testing.assert_array_equal(ours, ref)


def test_linear_probe_matches_sklearn_and_picks_best_c(report):
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 12))
    y = rng.integers(0, 5, 400)
    x = probes.unit(centres[y] + 1.5 * rng.standard_normal((400, 12)))
    X = torch.tensor(x, dtype=torch.float64)

    def objective(W, b, C):            # sklearn's, divided by C n
        W, b = torch.as_tensor(W, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return (torch.nn.functional.cross_entropy(X @ W + b, torch.tensor(y)) + (W * W).sum() / (2 * C * len(y))).item()

    for C in (0.1, 10.0, 1000.0):
        # the same objective: solved tightly, a minimum as low as sklearn's (to float32 precision) and the same
        # probabilities; at the default tolerance (sklearn's) the same predictions
        ref = LogisticRegression(C=C, max_iter=1000, tol=1e-8).fit(x, y)
        tight = probes.fit_linear(x, y, C, 5, iters=1000, tol=1e-7)
        assert objective(tight.W, tight.b, C) <= objective(ref.coef_.T, ref.intercept_, C) + 1e-6
        p_tight = torch.softmax(torch.from_numpy(probes.linear_scores(x, tight)), 1).numpy()
        np.testing.assert_allclose(p_tight, ref.predict_proba(x), atol=1e-3)
        default = probes.linear_scores(x, probes.fit_linear(x, y, C, 5)).argmax(1)
        assert (default == ref.predict(x)).mean() >= 0.99
    # the search keeps the C with the best validation score (the smallest among ties), in every report probe
    split = np.where(np.arange(400) < 280, 0, np.where(np.arange(400) < 330, 1, 2))
    res = probes.classification_probe(x, y, split, probes.ProbeSettings())
    rep, _ = report
    searched = [res["linear"]] + [p["linear"] for e in rep["encoders"].values() for p in e["probes"].values()]
    for lin in searched:
        scores = dict(lin["search"])
        best = max(scores.values())
        assert scores[lin["C"]] == best and lin["C"] == min(c for c, v in scores.items() if v == best)
    assert len(res["linear"]["search"]) == len(probes.C_GRID) + 2 * probes.C_REFINE


def test_probes_succeed_on_informative_features_and_fail_on_noise():
    args = probes.ProbeSettings()
    rng = np.random.default_rng(0)
    n, K = 600, 12
    y = rng.integers(0, K, n)
    split = rng.choice(3, n, p=[0.55, 0.15, 0.3])
    informative = probes.unit(np.eye(32)[y] + 0.05 * rng.standard_normal((n, 32)))
    noise = probes.unit(rng.standard_normal((n, 32)))
    good = probes.classification_probe(informative, y, split, args)
    bad = probes.classification_probe(noise, y, split, args)
    assert good["linear"]["top1"] > 0.98 and good["knn"]["top1"] > 0.98
    assert bad["linear"]["top1"] < 3 / K and bad["knn"]["top1"] < 3 / K              # chance is 1/12
    # OCR: features that encode the word's tokens recall them; noise does not
    vocab = [[i, i + 1] for i in range(0, 40, 2)]
    w = rng.integers(0, len(vocab), n)
    tokens = [vocab[i] for i in w]
    words = np.array([f"w{i}" for i in w], dtype=object)
    feats = probes.unit(np.eye(len(vocab))[w] + 0.05 * rng.standard_normal((n, len(vocab))))
    ocr_good = probes.ocr_probe(feats, tokens, words, split, args)
    ocr_bad = probes.ocr_probe(probes.unit(rng.standard_normal((n, 20))), tokens, words, split, args)
    assert ocr_good["linear"]["recall@5"] > 0.98 and ocr_good["knn"]["word_top1"] > 0.98
    assert ocr_bad["linear"]["recall@5"] < 0.5 and ocr_bad["knn"]["word_top1"] < 0.2  # 5 of 40 ids: 0.125
    # dense: patch tokens that encode the class give mIoU ~1
    labels = rng.choice([0, 3, 9], n * 4)
    dense = probes.dense_probe(np.eye(16)[labels] + 0.05 * rng.standard_normal((n * 4, 16)), labels,
                           np.repeat(split, 4), args)
    assert dense["linear"]["miou"] > 0.98


def test_bad_input(world, tmp_path, capsys):
    base = [*data_flags(world, masks=False), "--encoder", str(world / "tiny.pt"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--coco .*: no such file"):
        ev.main([*base, "--coco", str(tmp_path / "missing.json")])
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(SystemExit, match="not readable JSON"):
        ev.main([*base, "--coco", str(tmp_path / "notjson.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no files"):
        ev.main(["--image-folder", str(tmp_path / "empty"), "--encoder", str(world / "tiny.pt")])
    (tmp_path / "oneclass" / "cats").mkdir(parents=True)
    shutil.copy(world / "data" / "images" / "00000.png", tmp_path / "oneclass" / "cats")
    with pytest.raises(SystemExit, match="at least two class sub-folders"):
        ev.main(["--image-folder", str(tmp_path / "oneclass"), "--encoder", str(world / "tiny.pt")])
    with pytest.raises(SystemExit, match="no such file or folder"):
        ev.main([*data_flags(world), "--encoder", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit, match="two encoders named"):
        ev.main([*data_flags(world), "--encoder", f"a={world / 'tiny.pt'}", "--encoder", f"a={world / 'tiny.pt'}"])
    with pytest.raises(SystemExit, match="at least one --encoder"):
        ev.main(data_flags(world))

    # a corrupt image and a missing one get a status and are left out; a non-square image (its mask now the
    # wrong size) loses the boxes that the centre crop cuts; a crowd box is left out; an HF folder as encoder
    images = tmp_path / "images"
    shutil.copytree(world / "data" / "images", images)
    (images / "00004.png").write_bytes((images / "00004.png").read_bytes()[:300])      # cut short
    os.remove(images / "00009.png")
    c = coco(world)
    text_id = next(k["id"] for k in c["categories"] if k["name"] == "text")
    wide = next(im for im in c["images"] if im["id"] not in (4, 9) and
                sum(a["image_id"] == im["id"] and a["category_id"] != text_id for a in c["annotations"]) >= 2)
    Image.open(images / wide["file_name"]).crop((0, 0, 128, 60)).save(images / wide["file_name"])
    crowd = next(a for a in c["annotations"] if a["image_id"] not in (4, 9, wide["id"]) and a["category_id"] != text_id)
    crowd["iscrowd"] = 1
    (tmp_path / "coco.json").write_text(json.dumps(c))
    hf_dir = tmp_path / "hf"
    model_py.save_hf(model_py.load_encoder(str(world / "tiny.pt")), str(hf_dir))
    rep = ev.main(["--images", str(images), "--coco", str(tmp_path / "coco.json"), "--masks",
                   str(world / "data" / "masks"), "--encoder", f"hf={hf_dir}", "--out", str(tmp_path / "o2"),
                   "--tsne-max", "0", *FAST])
    assert "2 unreadable images left out" in capsys.readouterr().out
    d = rep["data"]
    assert d["images"]["ok"] == 58 and d["images"]["status"] == {"ok": 58, "truncated": 1, "missing": 1}
    assert d["masks"] == {"ok": 57, "wrong_size": 1}
    objs = [a for a in c["annotations"] if a["category_id"] != text_id]
    lost = sum(a["image_id"] in (4, 9) for a in objs)
    # the 128 x 60 image keeps x in [34, 94]: boxes with less than half their area there are cut
    cut = 0
    for a in objs:
        if a["image_id"] == wide["id"]:
            x, y, w, h = a["bbox"]
            inside = max(0, min(x + w, 94) - max(x, 34)) * max(0, min(y + h, 60) - max(y, 0))
            cut += inside < 0.5 * w * h
    o = d["objects"]
    assert (o["on_unreadable"], o["dropped_crop"], o["crowd"]) == (lost, cut, 1) and lost > 0 and cut > 0
    assert o["kept"] + o["on_unreadable"] + o["dropped_crop"] + o["crowd"] == o["annotations"] == len(objs)
    probes = rep["encoders"]["hf"]["probes"]
    assert sum(probes["objects_pooled"]["counts"][k] for k in ("train", "val", "test")) == o["kept"]
    assert rep["encoders"]["hf"]["encoder"]["kind"] == "kit"
    # the HF folder is the same network as the kit checkpoint: the same image features where the image is
    keep = [i for i in range(60) if i not in (4, 9, wide["id"])]
    hf_f = np.load(tmp_path / "o2" / "features" / "hf" / "image_features.npy")
    np.testing.assert_allclose(hf_f[keep], np.load(world / "eval" / "features" / "kit" / "image_features.npy")[keep],
                               atol=1e-5)
    assert not hf_f[[4, 9]].any()


def test_clip_folders_as_encoders(world, tmp_path):
    # a Hugging Face CLIPModel folder (the layout of CLIP releases; its vision tower is taken) and random: of it:
    # 05's image feature is CLIPVisionModel's pooler_output on 05's own input, at the folder's size and at
    # another (--image-size: positions resampled, HF's interpolate_pos_encoding)
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    torch.manual_seed(3)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=48)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(tmp_path / "clip")
    hf = CLIPVisionModel.from_pretrained(str(tmp_path / "clip")).eval()
    c = coco(world)
    for size in (48, 64):
        out = tmp_path / f"o{size}"
        rep = ev.main([*data_flags(world, masks=False), "--encoder", f"clip={tmp_path / 'clip'}", "--encoder",
                       f"rand=random:{tmp_path / 'clip'}", "--out", str(out), "--image-size", str(size),
                       "--probes", "image", *FAST])
        info = rep["encoders"]["clip"]["encoder"]
        assert info["config"]["arch"] == "clip" and info["image_dim"] == 64 and info["image_size"] == size
        assert rep["encoders"]["rand"]["encoder"]["config"]["arch"] == "clip"
        assert set(rep["encoders"]["clip"]["probes"]) == {"image"}                # --probes image
        feats = np.load(out / "features" / "clip" / "image_features.npy")
        for i in (0, 5):
            img, _ = image_io.open_image(str(world / "data" / "images" / c["images"][i]["file_name"]))
            pixels, _, _ = image_io.resize_crop(img, size, crop="center")
            x = image_io.normalize(torch.from_numpy(pixels.copy())[None])
            with torch.no_grad():
                ref = hf(pixel_values=x, interpolate_pos_encoding=size != 48).pooler_output[0]
            np.testing.assert_allclose(feats[i], ref.numpy(), atol=1e-4)


def test_image_folder_mode(world, tmp_path, capsys):
    """--image-folder: one class per sub-folder (here the demo image kinds), the image probe only."""
    gt = json.loads((world / "data" / "ground_truth.json").read_text())
    for im in gt["images"][:36]:
        kind = "both" if im["objects"] and im["texts"] else "objects" if im["objects"] else "text"
        (tmp_path / "folder" / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy(world / "data" / "images" / im["file_name"], tmp_path / "folder" / kind)
    shutil.copy(world / "tiny.pt", tmp_path / "tiny.pt")
    flags = ["--image-folder", str(tmp_path / "folder"), "--encoder", str(tmp_path / "tiny.pt"),
             "--out", str(tmp_path / "o"), "--tsne-max", "0", *FAST]
    rep = ev.main(flags)
    probes = rep["encoders"]["tiny"]["probes"]
    assert list(probes) == ["image"] and probes["image"]["counts"]["classes"] == 3
    c = probes["image"]["counts"]
    assert c["train"] + c["val"] + c["test"] == 36 and 0 <= probes["image"]["linear"]["top1"] <= 1
    assert "| tiny |" in (tmp_path / "o" / "report.md").read_text()
    # the attentive probe on the same images, from the frozen patch tokens stored with the features
    att = ev.main([*flags, "--probes", "image,attentive", "--out", str(tmp_path / "att")])
    a = att["encoders"]["tiny"]["probes"]["image_attentive"]
    assert 0 <= a["top1"] <= 1 and a["counts"]["test"] == c["test"] and "| image attentive |" in \
        (tmp_path / "att" / "report.md").read_text()
    # loose files are read through the image table, as every stage reads them
    table = json.loads((tmp_path / "o" / "images" / "manifest.json").read_text())
    assert table["complete"] and table["kind"] == "files" and table["rows"] == 36
    # a rerun only prints the finished report (and writes report.md again if a kill took it); other probe
    # settings reuse the features; a touched file with the same bytes too; other weights of the same size and
    # mtime (the cache is keyed by content) recompute them
    (tmp_path / "o" / "report.md").unlink()
    assert ev.main(flags) == rep and "report complete" in capsys.readouterr().out
    assert "| tiny |" in (tmp_path / "o" / "report.md").read_text()
    # other probe settings: refused naming them (the one rule of every stage); --force replaces the report
    # and still reuses the features
    with pytest.raises(SystemExit, match=r"^error: .*o holds a report made with other settings \(--knn-k 10 -> 3\): "
                                         r"rerun with --force to replace them, or use another --out"):
        ev.main([*flags, "--knn-k", "3"])
    other = ev.main([*flags, "--knn-k", "3", "--force"])
    tiny = other["encoders"]["tiny"]
    assert tiny["encoder"]["reused"] and tiny["probes"]["image"]["knn"]["k"] == 3
    os.utime(tmp_path / "tiny.pt", (1, 1))
    flags += ["--knn-k", "3"]
    assert ev.main(flags)["encoders"]["tiny"]["encoder"]["reused"]
    ckpt = torch.load(tmp_path / "tiny.pt", weights_only=True)
    ckpt["encoder"] = {k: v.flip(0) for k, v in ckpt["encoder"].items()}
    size = os.path.getsize(tmp_path / "tiny.pt")
    torch.save(ckpt, tmp_path / "tiny.pt")
    os.utime(tmp_path / "tiny.pt", (1, 1))
    assert os.path.getsize(tmp_path / "tiny.pt") == size
    again = ev.main(flags)["encoders"]["tiny"]
    assert not again["encoder"]["reused"] and again["probes"] != other["encoders"]["tiny"]["probes"]


def test_cache_identity_is_the_content_of_every_local_file(tmp_path):
    """open_clip's local-dir:DIR:none, a weights file, --clip-config: other bytes under the same names, sizes
    and mtimes give another identity; a random: encoder depends on its config alone."""
    d = tmp_path / "dir"
    d.mkdir()
    (d / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 32}}')
    (d / "weights.bin").write_bytes(b"abcd")
    (tmp_path / "extra.json").write_text("{}")
    specs = [f"openclip:local-dir:{d}:none", f"openclip:ViT-B-32:{d / 'weights.bin'}"]
    before = [ev.encoder_identity(s, str(tmp_path / "extra.json")) for s in specs]
    for f, new in ((d / "weights.bin", b"abce"), (d / "open_clip_config.json", b'{"model_cfg": {"embed_dim": 33}}'),
                   (tmp_path / "extra.json", b"[]")):
        st = os.stat(f)
        f.write_bytes(new)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = [ev.encoder_identity(s, str(tmp_path / "extra.json")) for s in specs]
        assert after[0] != before[0]
        before = after
    ckpt = model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny")))
    torch.save(ckpt, tmp_path / "a.pt")
    ident = ev.encoder_identity(f"random:{tmp_path / 'a.pt'}")
    ckpt["encoder"] = {k: v * 2 for k, v in ckpt["encoder"].items()}
    torch.save(ckpt, tmp_path / "a.pt")
    assert ev.encoder_identity(f"random:{tmp_path / 'a.pt'}") == ident


def test_two_process_torchrun_equals_one(report, world, tmp_path):
    """Feature extraction sharded over two gloo processes (chunks of 8 images, one rank takes chunks 0, 2, ...):
    the same features as the one-process run of the report fixture (one chunk of 256) to float tolerance, and
    rank 0 alone writes the probe results that one process computes from those same features. (The probes are
    compared on identical features: a linear probe's argmax may flip on features that differ by 1e-5.)"""
    rep, out = report
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, *data_flags(world), "--encoder", f"kit={world / 'tiny.pt'}", "--chunk-size", "8",
           "--tsne-max", "0", *FAST, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("status", "size", "image_features", "ann_offsets", "pooled", "region", "patch_offsets",
                 "dense_tokens", "dense_labels"):
        a = np.load(out / "features" / "kit" / f"{name}.npy")
        b = np.load(tmp_path / "two" / "features" / "kit" / f"{name}.npy")
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-5, err_msg=name)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["settings"]["world"] == 2 and two["data"] == rep["data"]
    assert list(two["encoders"]) == ["kit"] and not os.path.exists(tmp_path / "two" / "features" / "kit" / "chunks")
    # one process, the same thread count, on the two-process features (reused: only the probes run)
    shutil.copytree(tmp_path / "two" / "features", tmp_path / "one" / "features")
    cmd = [sys.executable, SCRIPT, *data_flags(world), "--encoder", f"kit={world / 'tiny.pt'}", "--chunk-size", "8",
           "--tsne-max", "0", *FAST, "--out", str(tmp_path / "one")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kit: reusing the features" in res.stdout
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert one["settings"]["world"] == 1 and one["data"] == two["data"]
    assert set(one["encoders"]["kit"]["probes"]) == set(rep["encoders"]["kit"]["probes"])
    for key, probe in one["encoders"]["kit"]["probes"].items():
        assert list(metrics(probe)), key
        for m, v in metrics(probe):
            assert dict(metrics(two["encoders"]["kit"]["probes"][key]))[m] == pytest.approx(v, abs=1e-9), (key, m)


def test_class_index_masks_without_a_coco_file(tmp_path):
    """--masks of class indices (VOC SegmentationClass: palette PNGs, 255 the boundary) with --images and no COCO
    file: the dense probe over the dataset's classes; ignored pixels are no class; images without a mask are left
    out."""
    rng = np.random.default_rng(0)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253)
    for i in range(24):
        cls = np.zeros((64, 64), np.uint8)
        c = 1 + i % 2
        cls[:, 32:] = c                                          # right half: the image's class, left: background
        cls[:, 24:40] = 255                                      # the boundary VOC marks as void
        rgb = np.where(cls[..., None] == 0, 60, np.where(cls[..., None] == 1, [200, 40, 40], [40, 200, 40]))
        Image.fromarray((rgb + rng.normal(0, 10, rgb.shape)).clip(0, 255).astype(np.uint8)).save(
            tmp_path / "JPEGImages" / f"2007_{i:06d}.jpg", quality=95)
        m = Image.fromarray(cls, "P")
        m.putpalette(palette)
        m.save(tmp_path / "SegmentationClass" / f"2007_{i:06d}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "JPEGImages" / "2007_999999.jpg")   # no mask
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=64))),
               tmp_path / "t.pt")
    rep = ev.main(["--images", str(tmp_path / "JPEGImages"), "--masks", str(tmp_path / "SegmentationClass"),
                   "--mask-format", "classes", "--encoder", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"),
                   "--probe-iters", "50", "--c-refine", "0"])
    dense = rep["encoders"]["t"]["probes"]["dense"]
    assert list(rep["encoders"]["t"]["probes"]) == ["dense"] and rep["data"]["images"]["total"] == 24
    assert dense["counts"]["classes"] == 3 and 0 <= dense["linear"]["miou"] <= 1     # 0, 1, 2: never 255
    labels = np.load(tmp_path / "o" / "features" / "t" / "dense_labels.npy")
    assert set(np.unique(labels).tolist()) <= {-1, 0, 1, 2} and (labels == -1).any()


def test_coco_text_and_textocr_json_give_the_same_ocr_probe(world, tmp_path):
    """The world's words written as COCO-Text v2 (legibility, int ids) and as TextOCR (string ids, "." for an
    illegible word): the OCR probe reads them as the same text boxes as a COCO file of those words alone,
    to the last digit; illegible words are boxes without a word."""
    c = coco(world)
    text_id = next(k["id"] for k in c["categories"] if k["name"] == "text")
    words = [a for a in c["annotations"] if a["category_id"] == text_id]
    only_text = {"images": c["images"], "annotations": words, "categories": [{"id": text_id, "name": "text"}]}
    cocotext = {"imgs": {str(im["id"]): {**im, "set": "train"} for im in c["images"]},
                "anns": {str(a["id"]): {"image_id": a["image_id"], "bbox": a["bbox"], "utf8_string": a["text"],
                                        "legibility": "legible", "language": "english", "class": "machine printed"}
                         for a in words}, "imgToAnns": {}, "cats": {}}
    textocr = {"imgs": {f"img{im['id']}": {"id": f"img{im['id']}", "file_name": im["file_name"],
                                           "width": im["width"], "height": im["height"], "set": "train"}
                        for im in c["images"]},
               "anns": {f"img{a['image_id']}_{k}": {"id": f"img{a['image_id']}_{k}", "image_id": f"img{a['image_id']}",
                                                    "bbox": a["bbox"], "utf8_string": a["text"]}
                        for k, a in enumerate(words)}, "img2Anns": {}}
    first = next(iter(cocotext["anns"]))
    cocotext_illegible = json.loads(json.dumps(cocotext))
    cocotext_illegible["anns"][first]["legibility"] = "illegible"
    results = {}
    for name, content in (("coco", only_text), ("cocotext", cocotext), ("textocr", textocr),
                          ("illegible", cocotext_illegible)):
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        rep = ev.main(["--images", str(world / "data" / "images"), "--coco", str(tmp_path / f"{name}.json"),
                       "--encoder", str(world / "tiny.pt"), "--out", str(tmp_path / name), "--probes", "ocr",
                       "--tsne-max", "0", *FAST])
        results[name] = (rep["encoders"]["tiny"]["probes"], rep["data"]["text_boxes"])
    strip = lambda p: {k: {kk: vv for kk, vv in v.items() if kk != "time_s"} for k, v in p.items()}   # noqa: E731
    assert "ocr_pooled" in results["coco"][0] and "recall@5" in results["coco"][0]["ocr_pooled"]["linear"]
    assert strip(results["cocotext"][0]) == strip(results["coco"][0]) == strip(results["textocr"][0])
    assert results["coco"][1]["kept"] == len(words) and results["illegible"][1]["without_word"] == 1
