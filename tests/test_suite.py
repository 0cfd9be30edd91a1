"""05 --suite mlcd-linear (eval_suite.py): datasets written in the exact layouts torchvision's downloads leave
(CIFAR-10's pickled batches, DTD's images and split files, EuroSAT's class folders), read through torchvision's
own readers; a missing and a cut-off dataset are one line each while the others run; CLIP's metrics against
plain references (sklearn's average precision and ROC-AUC, 11-point AP written out, per-class mean)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script

import eval_suite  # noqa: E402
import model as model_py  # noqa: E402
import probes  # noqa: E402

ev = load_script("eval", "05_eval.py")
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def picture(c, k, size=32):
    """A class-c image: its colour plus noise (seeded by k)."""
    rng = np.random.default_rng(k)
    a = np.clip(np.array(COLOURS[c])[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255)
    return a.astype(np.uint8)


def write_cifar10(root, per_class=6):
    """cifar-10-batches-py as the download unpacks it: five training batches, a test batch, batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    k = 0

    def batch(n):
        nonlocal k
        labels = [i % 3 for i in range(n)]
        data = np.stack([picture(c, (k := k + 1)).transpose(2, 0, 1).reshape(-1) for c in labels])
        return {"batch_label": "x", "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
    for b in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{b}"), "wb") as f:
            pickle.dump(batch(per_class), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(12), f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["red", "green", "blue"] + [f"c{i}" for i in range(7)]}, f)


def write_dtd(root):
    """dtd/dtd/images/<class>/<file>.jpg and dtd/dtd/labels/{train,val,test}1.txt (class/file per line)."""
    base = os.path.join(root, "dtd", "dtd")
    lists = {"train": [], "val": [], "test": []}
    for c, cls in enumerate(["banded", "dotted", "striped"]):
        os.makedirs(os.path.join(base, "images", cls))
        for i in range(12):
            name = f"{cls}_{i:04d}.jpg"
            Image.fromarray(picture(c, 100 * c + i)).save(os.path.join(base, "images", cls, name), quality=95)
            lists["train" if i < 6 else "val" if i < 8 else "test"].append(f"{cls}/{name}")
    os.makedirs(os.path.join(base, "labels"))
    for split, rows in lists.items():
        with open(os.path.join(base, "labels", f"{split}1.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")


def write_eurosat(root):
    """eurosat/2750/<class>/<Class>_<n>.jpg: no split of its own."""
    for c, cls in enumerate(["Forest", "River", "SeaLake"]):
        os.makedirs(os.path.join(root, "eurosat", "2750", cls))
        for i in range(15):
            Image.fromarray(picture(c, 1000 + 50 * c + i)).save(
                os.path.join(root, "eurosat", "2750", cls, f"{cls}_{i + 1}.jpg"), quality=95)


def test_readers_take_the_download_layouts(tmp_path):
    root = str(tmp_path)
    write_cifar10(root)
    write_dtd(root)
    write_eurosat(root)
    cifar = eval_suite.open_dataset(eval_suite.BY_NAME["CIFAR10"], root)
    assert [len(cifar[k]) for k in ("train", "test")] == [30, 12] and cifar["val"] is None
    assert cifar["train"].labels.tolist()[:4] == [0, 1, 2, 0]
    assert np.array_equal(np.asarray(cifar["test"].image(1)), picture(1, 32))       # the pixels, as written
    dtd = eval_suite.open_dataset(eval_suite.BY_NAME["DTD"], root)
    assert [len(dtd[k]) for k in ("train", "val", "test")] == [18, 6, 12]
    euro = eval_suite.open_dataset(eval_suite.BY_NAME["EuroSAT"], root)
    assert len(euro["train"]) + len(euro["test"]) == 45 and len(euro["test"]) > 0
    # missing and cut off: one line each, naming the expected layout
    assert eval_suite.open_dataset(eval_suite.BY_NAME["Food101"], root).startswith(
        f"not found under {os.path.join(root, 'food-101')}: expected food-101/images/")
    os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_3"))
    assert eval_suite.open_dataset(eval_suite.BY_NAME["CIFAR10"], root).startswith("incomplete under")
    assert eval_suite.open_dataset(eval_suite.BY_NAME["Birdsnap"], root).startswith(
        f"not found under {os.path.join(root, 'birdsnap')}: expected birdsnap/{{images.txt,test_images.txt}}")


def test_suite_end_to_end_with_a_missing_and_a_cut_off_dataset(tmp_path):
    root = str(tmp_path / "data")
    write_cifar10(root)
    write_dtd(root)
    write_eurosat(root)
    with open(os.path.join(root, "dtd", "dtd", "labels", "test1.txt"), "a") as f:
        f.write("dotted/not_there.jpg\n")                     # a listed file that is not there: cut off
    cut = os.path.join(root, "eurosat", "2750", "River", "River_3.jpg")
    with open(cut, "r+b") as f:                                 # one image cut off: a status, not a stop
        f.truncate(40)
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=32))),
               tmp_path / "t.pt")
    out = str(tmp_path / "out")
    flags = ["--suite", "mlcd-linear", "--data-root", root, "--encoder", f"tiny={tmp_path / 't.pt'}", "--out", out,
             "--datasets", "CIFAR10,DTD,EuroSAT,Pets", "--probe-iters", "50", "--c-refine", "0"]
    rep = ev.main(flags)
    assert rep["datasets"]["Pets"]["status"].startswith("not found under")
    res = rep["encoders"]["tiny"]["results"]
    assert set(res) == {"CIFAR10", "EuroSAT"} and rep["datasets"]["DTD"]["status"].startswith("incomplete")
    for name in res:
        assert 0 <= res[name]["score"] <= 1 and res[name]["metric"] == "accuracy"
    assert res["CIFAR10"]["counts"]["test"] == 12 and res["CIFAR10"]["unreadable"] == 0
    assert res["EuroSAT"]["unreadable"] == 1 and sum(res["EuroSAT"]["counts"].values()) == 44
    md = open(os.path.join(out, "suite.md")).read()
    assert "| encoder | CIFAR10 | DTD | Pets | EuroSAT | average |" in md          # Tab. 1's column order
    assert "(published, MLCD Tab. 1; not measured here) | 98.9 | 84.6 | 95.3 | 99.1 |" in md
    assert "- EuroSAT (tiny): 1 images that could not be read were left out" in md
    assert json.load(open(os.path.join(out, "suite.json")))["encoders"]["tiny"]["results"]["CIFAR10"] == res["CIFAR10"]
    # a rerun reuses the features (keyed by the encoder's and the dataset folder's content)
    again = ev.main(flags + ["--force"])
    assert again["encoders"]["tiny"]["results"]["CIFAR10"]["score"] == res["CIFAR10"]["score"]


def test_metrics_against_plain_references():
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    scores = rng.normal(size=(200, 4)) + 2 * np.eye(4)[y] * (rng.random(200) < 0.6)[:, None]
    pred = scores.argmax(1)
    per_class = np.mean([np.sum((pred == c) & (y == c)) / np.sum(y == c) for c in range(4)])
    assert probes.suite_metric("mean_per_class", scores, y) == pytest.approx(per_class)
    assert probes.suite_metric("accuracy", scores, y) == pytest.approx(np.mean(pred == y))
    wide = np.c_[scores, rng.normal(size=(200, 4))]            # 8 classes: top-5 is not everything
    in5 = [sum(wide[i, j] > wide[i, y[i]] for j in range(8)) < 5 for i in range(200)]   # fewer than 5 above it
    ref = (np.mean(wide.argmax(1) == y) + np.mean(in5)) / 2
    assert probes.suite_metric("top1_top5_mean", wide, y) == pytest.approx(ref) and np.mean(in5) < 1
    yb = (rng.random(300) < 0.3).astype(int)
    sb = np.c_[np.zeros(300), rng.normal(size=300) + yb]
    assert probes.suite_metric("roc_auc", sb, yb) == pytest.approx(roc_auc_score(yb, sb[:, 1]))
    # 11-point interpolated AP, written out: at each recall threshold t in 0, 0.1, ..., 1 the best precision
    # among the ranks whose recall reaches t
    s, pos = rng.normal(size=50), rng.random(50) < 0.3
    order = np.argsort(-s)
    prec = [pos[order][:k + 1].sum() / (k + 1) for k in range(50)]
    rec = [pos[order][:k + 1].sum() / pos.sum() for k in range(50)]
    ref = np.mean([max([p for p, r in zip(prec, rec) if r >= t], default=0) for t in [i / 10 for i in range(11)]])
    assert probes.ap_11point(s, pos) == pytest.approx(ref)
    assert abs(probes.ap_11point(s, pos) - average_precision_score(pos, s)) < 0.1     # close to sklearn's AP
    Y = (rng.random((80, 3)) < 0.4).astype(int)
    S = rng.normal(size=(80, 3)) + Y
    assert probes.suite_metric("map11", S, Y) == pytest.approx(np.mean([probes.ap_11point(S[:, c], Y[:, c])
                                                                        for c in range(3)]))


def write_stl10(root):
    """stl10_binary: uint8 images 3 x 96 x 96 stored column-major, labels 1..10, class_names.txt."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    for split, n in (("train", 12), ("test", 9)):
        labels = np.array([i % 3 for i in range(n)])
        x = np.stack([picture(c, 7 * i + (n == 9), 96).transpose(2, 1, 0) for i, c in enumerate(labels)])
        x.tofile(os.path.join(folder, f"{split}_X.bin"))
        (labels + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
    open(os.path.join(folder, "unlabeled_X.bin"), "wb").close()
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(["airplane", "bird", "car"] + [f"c{i}" for i in range(7)]) + "\n")


def write_gtsrb(root):
    """gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv."""
    base = os.path.join(root, "gtsrb")
    rows = []
    for c in range(3):
        os.makedirs(os.path.join(base, "GTSRB", "Training", f"{c:05d}"))
        for i in range(6):
            Image.fromarray(picture(c, 500 + 10 * c + i)).save(
                os.path.join(base, "GTSRB", "Training", f"{c:05d}", f"00000_{i:05d}.ppm"))
    os.makedirs(os.path.join(base, "GTSRB", "Final_Test", "Images"))
    for i in range(9):
        Image.fromarray(picture(i % 3, 900 + i)).save(os.path.join(base, "GTSRB", "Final_Test", "Images", f"{i:05d}.ppm"))
        rows.append(f"{i:05d}.ppm;32;32;0;0;31;31;{i % 3}")
    with open(os.path.join(base, "GT-final_test.csv"), "w") as f:
        f.write("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + "\n".join(rows) + "\n")


def write_caltech101(root):
    """caltech101/101_ObjectCategories/<class>/image_0001.jpg ..., with the BACKGROUND_Google folder."""
    base = os.path.join(root, "caltech101", "101_ObjectCategories")
    for c, cls in enumerate(["BACKGROUND_Google", "accordion", "airplanes", "anchor"]):
        os.makedirs(os.path.join(base, cls))
        for i in range(10):
            Image.fromarray(picture(max(c - 1, 0), 2000 + 20 * c + i)).save(
                os.path.join(base, cls, f"image_{i + 1:04d}.jpg"), quality=95)


def test_more_readers_take_their_layouts(tmp_path):
    root = str(tmp_path)
    write_stl10(root)
    write_gtsrb(root)
    write_caltech101(root)
    stl = eval_suite.open_dataset(eval_suite.BY_NAME["STL10"], root)
    assert [len(stl[k]) for k in ("train", "test")] == [12, 9] and stl["train"].labels.tolist()[:3] == [0, 1, 2]
    assert np.array_equal(np.asarray(stl["train"].image(1)), picture(1, 7, 96))
    gtsrb = eval_suite.open_dataset(eval_suite.BY_NAME["GTSRB"], root)
    assert [len(gtsrb[k]) for k in ("train", "test")] == [18, 9] and gtsrb["test"].labels.tolist()[:3] == [0, 1, 2]
    cal = eval_suite.open_dataset(eval_suite.BY_NAME["Caltech101"], root)
    assert len(cal["train"]) == 15 and len(cal["test"]) == 15          # 3 classes of 10: 5 train, 5 test each
    assert sorted(set(cal["train"].labels.tolist())) == [0, 1, 2]       # the background folder is no class
    # STL10 cut off: its test labels missing
    os.remove(os.path.join(root, "stl10_binary", "test_y.bin"))
    assert eval_suite.open_dataset(eval_suite.BY_NAME["STL10"], root).startswith("incomplete under")


def test_attentive_probe_reads_the_patch_a_mean_token_loses():
    """The class is where a marker token sits (left or right half of the grid); each token carries its
    position, as a ViT's do. The mean token is the same for both classes (the linear probe is at chance); the
    attentive probe's query finds the marker and reads its position."""
    rng = np.random.default_rng(0)
    N, P, D = 360, 8, 32
    pos, marker = rng.normal(size=(P, D)), 3 * rng.normal(size=D)
    where = rng.integers(0, P, N)
    tokens = rng.normal(size=(N, P, D)) * 0.5 + pos
    tokens[np.arange(N), where] += marker
    labels = (where >= P // 2).astype(int)
    split = np.where(np.arange(N) < 240, 0, 2)
    split[200:240] = 1
    settings = probes.ProbeSettings(probe_iters=200, c_refine=0, seed=0)
    linear = probes.classification_probe(probes.unit(tokens.mean(1)), labels, split, settings)["linear"]["top1"]
    attentive = probes.attentive_probe(tokens, labels, split, settings)
    print(f"mean-token linear {linear:.3f}, attentive {attentive['top1']:.3f} (epoch {attentive['epoch']})")
    assert linear < 0.7 and attentive["top1"] > 0.9


def write_flowers(root):
    """flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat (labels 1..102) and setid.mat (trnid, valid, tstid)."""
    from scipy.io import savemat
    base = os.path.join(root, "flowers-102")
    os.makedirs(os.path.join(base, "jpg"))
    labels = [i % 3 + 1 for i in range(24)]
    for i, c in enumerate(labels):
        Image.fromarray(picture(c - 1, 3000 + i)).save(os.path.join(base, "jpg", f"image_{i + 1:05d}.jpg"), quality=95)
    savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([labels])})
    ids = np.arange(1, 25)
    savemat(os.path.join(base, "setid.mat"), {"trnid": ids[:12][None], "valid": ids[12:15][None],
                                              "tstid": ids[15:][None]})


def write_clevr(root):
    """clevr/CLEVR_v1.0/images/{train,val}/CLEVR_<split>_NNNNNN.png and scenes/CLEVR_<split>_scenes.json."""
    base = os.path.join(root, "clevr", "CLEVR_v1.0")
    for split, n in (("train", 12), ("val", 6)):
        os.makedirs(os.path.join(base, "images", split))
        scenes = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            Image.fromarray(picture(i % 3, 4000 + i + (split == "val") * 100)).save(os.path.join(base, "images", split, name))
            scenes.append({"image_filename": name, "objects": [{}] * (3 + i % 3)})
        os.makedirs(os.path.join(base, "scenes"), exist_ok=True)
        with open(os.path.join(base, "scenes", f"CLEVR_{split}_scenes.json"), "w") as f:
            json.dump({"scenes": scenes}, f)
    os.makedirs(os.path.join(base, "images", "test"))


def test_flowers_and_clevr_layouts(tmp_path):
    root = str(tmp_path)
    write_flowers(root)
    write_clevr(root)
    fl = eval_suite.open_dataset(eval_suite.BY_NAME["Flowers"], root)
    assert [len(fl[k]) for k in ("train", "val", "test")] == [12, 3, 9] and fl["train"].labels.tolist()[:3] == [0, 1, 2]
    assert eval_suite.BY_NAME["Flowers"].metric == "mean_per_class"
    cl = eval_suite.open_dataset(eval_suite.BY_NAME["CLEVR"], root)
    assert len(cl["train"]) == 12 and len(cl["test"]) == 6 and cl["test"].labels.tolist()[:3] == [3, 4, 5]


def write_fer2013(root):
    """fer2013/fer2013.csv as Kaggle releases it: emotion, pixels (48 x 48 grey values), Usage."""
    os.makedirs(os.path.join(root, "fer2013"))
    rows = ["emotion,pixels,Usage"]
    for i in range(30):
        face = picture(i % 3, 5000 + i, 48).mean(2).astype(np.uint8)
        usage = "Training" if i < 18 else "PublicTest" if i < 24 else "PrivateTest"
        rows.append(f"{i % 3},{' '.join(map(str, face.reshape(-1)))},{usage}")
    with open(os.path.join(root, "fer2013", "fer2013.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def write_hateful_memes(root):
    """hateful_memes/img/NNNNN.png, train.jsonl and dev_seen.jsonl (id, img, label, text)."""
    base = os.path.join(root, "hateful_memes")
    os.makedirs(os.path.join(base, "img"))
    for split, n, start in (("train", 24, 10000), ("dev_seen", 12, 20000)):
        with open(os.path.join(base, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                Image.fromarray(picture(i % 2, start + i)).save(os.path.join(base, "img", f"{start + i}.png"))
                f.write(json.dumps({"id": start + i, "img": f"img/{start + i}.png", "label": i % 2, "text": "w"}) + "\n")


def test_fer2013_and_hateful_memes_through_the_suite(tmp_path):
    root = str(tmp_path / "data")
    write_fer2013(root)
    write_hateful_memes(root)
    fer = eval_suite.open_dataset(eval_suite.BY_NAME["FER2013"], root)
    assert [len(fer[k]) for k in ("train", "val", "test")] == [18, 6, 6] and fer["test"].image(0).size == (48, 48)
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=32))),
               tmp_path / "t.pt")
    rep = ev.main(["--suite", "mlcd-linear", "--data-root", root, "--encoder", f"tiny={tmp_path / 't.pt'}",
                   "--out", str(tmp_path / "out"), "--datasets", "FER2013,HatefulMemes", "--probe-iters", "50",
                   "--c-refine", "0"])
    res = rep["encoders"]["tiny"]["results"]
    assert res["HatefulMemes"]["metric"] == "roc_auc" and 0 <= res["HatefulMemes"]["score"] <= 1
    assert res["FER2013"]["counts"] == {"train": 18, "val": 6, "test": 6}
    # Kaggle's train.csv / test.csv pair has no test labels: one line saying so
    os.rename(os.path.join(root, "fer2013", "fer2013.csv"), os.path.join(root, "fer2013", "train.csv"))
    assert "have no test labels" in eval_suite.open_dataset(eval_suite.BY_NAME["FER2013"], root)


def write_voc2007(root):
    """VOCdevkit/VOC2007: JPEGImages/NNNNNN.jpg, Annotations/NNNNNN.xml (objects, difficult flags) and
    ImageSets/Main/{train,val,test}.txt."""
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(base, sub))
    sets = {"train": [], "val": [], "test": []}
    for i in range(36):
        name = f"{i + 1:06d}"
        c = i % 3                                         # colour 0 / 1 / 2: cat / dog / cat + dog
        Image.fromarray(picture(c, 6000 + i)).save(os.path.join(base, "JPEGImages", name + ".jpg"), quality=95)
        objects = {0: [("cat", 0)], 1: [("dog", 0)], 2: [("cat", 0), ("dog", 0), ("person", 1)]}[c]
        xml = "<annotation><filename>%s.jpg</filename>%s</annotation>" % (name, "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
            f"<xmax>20</xmax><ymax>20</ymax></bndbox></object>" for n, d in objects))
        with open(os.path.join(base, "Annotations", name + ".xml"), "w") as f:
            f.write(xml)
        sets["train" if i < 18 else "val" if i < 24 else "test"].append(name)
    for split, names in sets.items():
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")


def test_voc2007_multilabel_through_the_suite(tmp_path):
    root = str(tmp_path / "data")
    write_voc2007(root)
    voc = eval_suite.open_dataset(eval_suite.BY_NAME["VOC2007"], root)
    y = voc["train"].labels
    cat, dog, person = (eval_suite.VOC_CLASSES.index(n) for n in ("cat", "dog", "person"))
    assert y.shape == (18, 20) and y[2, cat] == y[2, dog] == 1 and y[:, person].sum() == 0    # difficult: no label
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=32))),
               tmp_path / "t.pt")
    rep = ev.main(["--suite", "mlcd-linear", "--data-root", root, "--encoder", f"tiny={tmp_path / 't.pt'}",
                   "--out", str(tmp_path / "out"), "--datasets", "VOC2007", "--probe-iters", "50", "--c-refine", "0"])
    res = rep["encoders"]["tiny"]["results"]["VOC2007"]
    assert res["metric"] == "map11" and 0 <= res["score"] <= 1 and res["classes"] == 20


def write_cars(root):
    """stanford_cars: cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and
    cars_test_annos_withlabels.mat (struct arrays with fname and class, classes from 1)."""
    from scipy.io import savemat
    base = os.path.join(root, "stanford_cars")
    for sub in ("cars_train", "cars_test", "devkit"):
        os.makedirs(os.path.join(base, sub))
    for split, n, mat in (("train", 12, os.path.join("devkit", "cars_train_annos.mat")),
                          ("test", 6, "cars_test_annos_withlabels.mat")):
        rec = np.zeros(n, dtype=[("fname", "O"), ("class", "O")])
        for i in range(n):
            Image.fromarray(picture(i % 3, 7000 + i + 100 * (split == "test"))).save(
                os.path.join(base, f"cars_{split}", f"{i + 1:05d}.jpg"), quality=95)
            rec[i] = (f"{i + 1:05d}.jpg", i % 3 + 1)
        savemat(os.path.join(base, mat), {"annotations": rec})
    savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": np.array(["a", "b", "c"], dtype=object)})


def write_imagenet(root):
    """imagenet/{train,val}/<wnid>/*.JPEG."""
    for split, n in (("train", 6), ("val", 3)):
        for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
            os.makedirs(os.path.join(root, "imagenet", split, wnid))
            for i in range(n):
                Image.fromarray(picture(c, 8000 + 10 * c + i + 100 * (split == "val"))).save(
                    os.path.join(root, "imagenet", split, wnid, f"{wnid}_{i}.JPEG"), format="JPEG", quality=95)


def test_cars_and_imagenet_layouts(tmp_path):
    root = str(tmp_path)
    write_cars(root)
    write_imagenet(root)
    cars = eval_suite.open_dataset(eval_suite.BY_NAME["Cars"], root)
    assert [len(cars[k]) for k in ("train", "test")] == [12, 6] and cars["train"].labels.tolist()[:3] == [0, 1, 2]
    inet = eval_suite.open_dataset(eval_suite.BY_NAME["ImageNet"], root)
    assert [len(inet[k]) for k in ("train", "test")] == [18, 9] and inet["val"] is None
    assert eval_suite.TAB1_ORDER[-1] == "ImageNet" and eval_suite.TAB1_MLCD["ImageNet"] == 84.6


def test_pcam_h5_layout(tmp_path):
    """pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5: x (n, 96, 96, 3) uint8, y (n, 1, 1, 1)."""
    import h5py
    os.makedirs(tmp_path / "pcam")
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        with h5py.File(tmp_path / "pcam" / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = np.stack([picture(i % 2, 9000 + i, 96) for i in range(n)])
        with h5py.File(tmp_path / "pcam" / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
    pcam = eval_suite.open_dataset(eval_suite.BY_NAME["PCAM"], str(tmp_path))
    assert [len(pcam[k]) for k in ("train", "val", "test")] == [8, 4, 4] and pcam["test"].labels.tolist() == [0, 1, 0, 1]
    assert np.array_equal(np.asarray(pcam["train"].image(3)), picture(1, 9003, 96))


def test_attentive_probe_in_the_suite(tmp_path):
    """--probes attentive: every image's patch tokens stored with its suite features (a memmap read by
    batches), the attentive probe next to the linear one."""
    root = str(tmp_path / "data")
    write_eurosat(root)
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=32))),
               tmp_path / "t.pt")
    rep = ev.main(["--suite", "mlcd-linear", "--data-root", root, "--encoder", f"tiny={tmp_path / 't.pt'}",
                   "--out", str(tmp_path / "out"), "--datasets", "EuroSAT", "--probes", "attentive",
                   "--probe-iters", "50", "--c-refine", "0"])
    res = rep["encoders"]["tiny"]["results"]["EuroSAT"]
    assert 0 <= res["score"] <= 1 and 0 <= res["attentive"]["top1"] <= 1
    assert res["attentive"]["counts"]["test"] == res["counts"]["test"]
    tokens = np.load(tmp_path / "out" / "suite" / "tiny" / "EuroSAT" / "tokens.npy", mmap_mode="r")
    assert tokens.shape == (45 * 16, 64) and tokens.dtype == np.float16          # 4 x 4 patches of width 64
    assert "| tiny (attentive probe, top-1) |" in open(tmp_path / "out" / "suite.md").read()
