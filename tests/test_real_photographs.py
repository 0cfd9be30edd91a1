"""Real photographs through the stages: the pictures that scikit-image, scikit-learn and matplotlib install
(astronaut, camera, chelsea, coffee, the two motorcycle views, page, text, china, flower, grace_hopper, ...),
copied as files into one folder with a README that is not an image. The image table, 01 with the real embedder
(--features efficientnet-lite0) on boxes written here, 02 with RapidOCR and 03 run on it, and the checks are the
ones a person would make: the two motorcycle views are each other's nearest neighbour, 02 reads the printed
lines of scikit-image's `page`, and every file is accounted for."""
import difflib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

mine = load_script("mine_regions", "01_mine_regions.py")
ocr = load_script("extract_ocr", "02_extract_ocr.py")
cl = load_script("cluster", "03_cluster.py")

# the printed lines of scikit-image's page.png, as a person reads them
PAGE_LINES = ["Region-based segmentation", "Let us first determine markers of the coins and the",
              "background. These markers are pixels that we can label",
              "unambiguously as either object or background. Here,",
              "the markers are found at the two extreme parts of the", "histogram of grey values:"]


@pytest.fixture(scope="module")
def photographs(tmp_path_factory):
    import matplotlib.cbook
    import skimage.data
    import sklearn.datasets
    folder = tmp_path_factory.mktemp("photographs") / "images"
    os.makedirs(folder)
    for f in sorted(os.listdir(skimage.data.data_dir)):
        if f.lower().endswith((".png", ".jpg", ".gif", ".tif")):
            shutil.copy(os.path.join(skimage.data.data_dir, f), folder / f)
    for path in sklearn.datasets.load_sample_images().filenames:
        shutil.copy(path, folder / os.path.basename(path))
    shutil.copy(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), folder / "grace_hopper.jpg")
    (folder / "README.txt").write_text("not an image\n")
    # COCO boxes: the central 80% of each picture and its left half
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    for i, f in enumerate(sorted(os.listdir(folder))):
        try:
            with Image.open(folder / f) as im:
                w, h = im.size
        except Exception:
            continue
        coco["images"].append({"id": i, "file_name": f, "width": w, "height": h})
        for j, box in enumerate([[0.1 * w, 0.1 * h, 0.8 * w, 0.8 * h], [0, 0, 0.5 * w, h]]):
            coco["annotations"].append({"id": 10 * i + j, "image_id": i, "category_id": 1, "bbox": box})
    with open(folder.parent / "boxes.json", "w") as f:
        json.dump(coco, f)
    return folder


def identified(path) -> bool:
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


def test_photographs_through_the_stages(photographs, tmp_path):
    files = sorted(os.listdir(photographs))
    work = str(tmp_path / "w")
    m1 = mine.main(["--images", str(photographs), "--work", work, "--boxes", str(photographs.parent / "boxes.json"),
                    "--features", "efficientnet-lite0", "--min-box-side", "8", "--min-image-side", "64",
                    "--workers", "0"])
    table = json.load(open(os.path.join(work, "images", "manifest.json")))
    # every file is a row of the image table with a status; not images: the README, and any file Pillow cannot
    # identify (scikit-image's multipage_rgb.tif in its release)
    assert table["rows"] == len(files) and sum(table["status_counts"].values()) == len(files)
    assert table["status_counts"].get("not_image", 0) == len([f for f in files if not identified(photographs / f)])
    assert sum(m1["status_counts"].values()) == len(files) and m1["status_counts"]["ok"] >= len(files) - 4
    import image_io
    t = image_io.read_image_table(work)
    names = [t.name(i) for i in range(len(t))]
    feats = np.load(os.path.join(work, "regions", "image_features.npy")).astype(np.float32)
    status = np.load(os.path.join(work, "regions", "status.npy"))
    sims = feats @ feats.T
    sims[np.arange(len(sims)), np.arange(len(sims))] = -2
    sims[:, status != 0] = -2
    left, right = names.index("motorcycle_left.png"), names.index("motorcycle_right.png")
    assert sims[left].argmax() == right and sims[right].argmax() == left
    # 02: RapidOCR reads the page's printed lines
    m2 = ocr.main(["--work", work, "--max-side", "480", "--engine", "rapidocr", "--workers", "0"])
    assert sum(m2["status_counts"].values()) == len(files)
    folder = os.path.join(work, "ocr")
    offsets = np.load(os.path.join(folder, "line_offsets.npy"))
    text_offsets = np.load(os.path.join(folder, "text_offsets.npy"))
    text_bytes = np.load(os.path.join(folder, "text_bytes.npy"))
    page = names.index("page.png")
    read = [bytes(text_bytes[text_offsets[k]: text_offsets[k + 1]]).decode() for k in range(offsets[page],
                                                                                          offsets[page + 1])]
    matched = [line for line in PAGE_LINES
               if max((difflib.SequenceMatcher(None, line.lower(), r.lower()).ratio() for r in read), default=0) > 0.8]
    assert len(matched) >= 5, read
    # 03 labels every region and every image that has a feature
    cl.main(["--work", work, "--k", "6"])
    labels = np.load(os.path.join(work, "clusters", "region_labels.npy"))
    assert len(labels) == m1["rows"]["boxes"] and labels.min() >= 0 and labels.max() < 6
    image_labels = np.load(os.path.join(work, "clusters", "image_labels.npy"))
    assert len(image_labels) == len(files) and (image_labels[status == 0] >= 0).all()
