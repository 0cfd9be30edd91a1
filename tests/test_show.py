"""show.py draws what the stages found for one image: region boxes (with cluster labels once 03 ran) in the
right pixels, OCR lines with their text and token ids, and the same as text."""
import json
import os

import numpy as np
from PIL import Image

from conftest import load_script

mine = load_script("mine_regions", "01_mine_regions.py")
show = load_script("show", "show.py")


def test_one_image_boxes_in_the_right_pixels(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((100, 120, 3), 128, np.uint8)).save(tmp_path / "images" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 30, 60, 50], "score": 0.75}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    work = str(tmp_path / "w")
    mine.main(["--images", str(tmp_path / "images"), "--work", work, "--boxes", str(tmp_path / "boxes.json"),
               "--features", "pixels", "--min-box-side", "8", "--min-image-side", "32", "--workers", "0"])
    [png] = show.main(["--work", work, "--name", "a.png"])
    pic = np.asarray(Image.open(png).convert("RGB"))
    assert pic.shape == (100, 120, 3)
    green = np.array(show.REGION_COLOUR)
    for x, y in ((20, 60), (21, 70), (79, 60), (50, 30), (50, 79)):        # the box's four sides, x0 y0 x1 y1
        assert (pic[y, x] == green).all(), (x, y, pic[y, x])
    for x, y in ((17, 60), (50, 55), (83, 60), (50, 26), (50, 83)):        # outside and inside it: the image
        assert (pic[y, x] == 128).all(), (x, y, pic[y, x])
    text = open(png[:-4] + ".txt").read()
    assert "box [20.0, 30.0, 80.0, 80.0]  score 0.750" in text and "not run yet: ocr" in text
    assert os.path.basename(png) == "row_00000000.png"
