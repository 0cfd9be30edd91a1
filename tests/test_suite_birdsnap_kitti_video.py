"""05 --suite mlcd-linear: Birdsnap (its release files and get_birdsnap.py's download folder), KITTI Distance
(torchvision's Kitti layout and the object devkit's mapping, split by drive as tensorflow_datasets does), and
UCF101 / Kinetics-700 on each video's middle frame (videos written with PyAV in their release layouts)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script

import eval_suite  # noqa: E402
import model as model_py  # noqa: E402

ev = load_script("eval", "05_eval.py")
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def picture(c, k, size=32):
    rng = np.random.default_rng(k)
    return np.clip(np.array(COLOURS[c])[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def write_video(path, frames, codec, fps=25, gop=4):
    """frames (n, h, w, 3) uint8 -> a video file; a short GOP so that the middle frame needs a seek."""
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size = gop
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def grey_levels(n, size=32):
    return np.stack([np.full((size, size, 3), 10 * i + 5, np.uint8) for i in range(n)])


@pytest.mark.parametrize("codec,ext", [("mpeg4", "avi"), ("libx264", "mp4"), ("libx264", "mkv")])
@pytest.mark.parametrize("n", [1, 2, 20, 21])
def test_middle_frame_is_frame_n_over_2(tmp_path, codec, ext, n):
    path = str(tmp_path / f"v.{ext}")
    write_video(path, grey_levels(n), codec)
    got = np.asarray(eval_suite.middle_frame(path), np.float64).mean()
    assert abs(got - (10 * (n // 2) + 5)) < 4          # frames are 10 grey levels apart; the codec moves one by ~1


def write_birdsnap(root, missing=("Blue_Jay/3.jpg", "Snowy_Owl/7.jpg")):
    """birdsnap/{images.txt, species.txt, test_images.txt} as released, the images under download/images/<path>
    as get_birdsnap.py saves them; the paths in `missing` listed but never downloaded."""
    base = os.path.join(root, "birdsnap")
    fields = ["url", "md5", "path", "species_id", "bb_x1", "bb_y1", "bb_x2", "bb_y2", "back_x", "back_y"]
    rows, tests = [], []
    for c, species in enumerate(["Acadian_Flycatcher", "Blue_Jay", "Snowy_Owl"]):
        for i in range(8):
            path = f"{species}/{i}.jpg"
            rows.append(["http://farm.example/x.jpg", "0" * 32, path, str(c + 1), "1", "2", "30", "31", "", ""])
            if i >= 6:
                tests.append(path)
            if path not in missing:
                os.makedirs(os.path.join(base, "download", "images", species), exist_ok=True)
                Image.fromarray(picture(c, 10 * c + i)).save(os.path.join(base, "download", "images", path),
                                                             quality=100, subsampling=0)   # near lossless
    with open(os.path.join(base, "images.txt"), "w") as f:
        f.write("\t".join(fields) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    with open(os.path.join(base, "species.txt"), "w") as f:
        f.write("id\tcommon\tscientific\tdir\n1\tAcadian Flycatcher\tEmpidonax virescens\tAcadian_Flycatcher\n"
                "2\tBlue Jay\tCyanocitta cristata\tBlue_Jay\n3\tSnowy Owl\tBubo scandiacus\tSnowy_Owl\n")
    with open(os.path.join(base, "test_images.txt"), "w") as f:
        f.write("path\n" + "\n".join(tests) + "\n")


def test_birdsnap_release_layout_and_images_never_downloaded(tmp_path):
    root = str(tmp_path)
    write_birdsnap(root)
    bs = eval_suite.open_dataset(eval_suite.BY_NAME["Birdsnap"], root)
    assert [len(bs["train"]), len(bs["test"])] == [17, 5] and bs["val"] is None       # 24 listed, 2 not there
    assert "2 of 24 images listed in images.txt are not under birdsnap/download/images" in bs["note"]
    assert sorted(set(bs["train"].labels.tolist())) == [0, 1, 2]                       # species_id 1..3 -> 0..2
    test_files = sorted(os.path.relpath(p, os.path.join(root, "birdsnap", "download", "images"))
                        for p, _ in bs["test"].dataset.items)
    assert test_files == ["Acadian_Flycatcher/6.jpg", "Acadian_Flycatcher/7.jpg", "Blue_Jay/6.jpg", "Blue_Jay/7.jpg",
                          "Snowy_Owl/6.jpg"]
    assert np.abs(np.asarray(bs["test"].image(0), float) - picture(0, 6)).mean() < 8      # that file (a JPEG)
    os.remove(os.path.join(root, "birdsnap", "test_images.txt"))
    assert eval_suite.open_dataset(eval_suite.BY_NAME["Birdsnap"], root).startswith("incomplete under")


@pytest.mark.parametrize("objects,want", [
    ([("Car", 5.0)], 0), ([("Van", 12.0)], 1), ([("Truck", 30.0)], 2), ([("Pedestrian", 3.0)], 3), ([], 3),
    ([("Car", 30.0), ("Car", 5.0)], 0), ([("Car", 8.0)], 0), ([("Car", 20.0)], 1), ([("Cyclist", 2.0), ("Van", 25)], 2),
    ([("DontCare", -1000.0)], 3)])
def test_kitti_distance_class_against_hand_labels(objects, want):
    # VTAB's closest_vehicle_distance: bins (-100, 8], (8, 20], (20, 999], and no car / van / truck
    assert eval_suite.kitti_distance_class([{"type": t, "location": [0.0, 1.0, z]} for t, z in objects]) == want


def kitti_line(kind, z):
    """One label_2 line: type truncated occluded alpha bbox(4) dimensions(3) location(3) rotation_y."""
    return f"{kind} 0.00 0 -1.57 100.0 150.0 200.0 250.0 1.50 1.60 3.90 1.00 1.70 {z:.2f} -1.50\n"


def write_kitti(root, drives=12, per_drive=3, mapping=True):
    """Kitti/raw/training/{image_2,label_2} as torchvision's download leaves them (and an empty testing/), plus
    the object devkit's mapping/train_rand.txt and train_mapping.txt: image i is line train_rand[i] (1-based) of
    train_mapping, '<date> <date>_drive_<nnnn>_sync <frame>'. The class is the closest vehicle's distance bin,
    and each image's colour shows its class."""
    base = os.path.join(root, "Kitti", "raw")
    for d in ("training/image_2", "training/label_2", "testing/image_2"):
        os.makedirs(os.path.join(base, d))
    n = drives * per_drive
    lines = [f"2011_09_26 2011_09_26_drive_{d + 1:04d}_sync {f:010d}\n" for d in range(drives)
             for f in range(per_drive)]
    perm = np.random.default_rng(5).permutation(n)            # image i <- mapping line perm[i]
    rng = np.random.default_rng(6)
    for i in range(n):
        cls = int(rng.integers(0, 4))
        vehicle = [kitti_line(["Car", "Van", "Truck"][i % 3], [4.0, 14.0, 40.0][cls])] if cls < 3 else []
        objs = [kitti_line("Pedestrian", 4.0)] + vehicle + ["DontCare -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10\n"]
        Image.fromarray(picture(cls, 3000 + i)).save(os.path.join(base, "training", "image_2", f"{i:06d}.png"))
        with open(os.path.join(base, "training", "label_2", f"{i:06d}.txt"), "w") as f:
            f.write("".join(objs))
    if mapping:
        os.makedirs(os.path.join(root, "Kitti", "devkit_object", "mapping"))
        with open(os.path.join(root, "Kitti", "devkit_object", "mapping", "train_mapping.txt"), "w") as f:
            f.write("".join(lines))
        with open(os.path.join(root, "Kitti", "devkit_object", "mapping", "train_rand.txt"), "w") as f:
            f.write(",".join(str(int(p) + 1) for p in perm) + "\n")
    return [lines[p].split()[1] for p in perm]                # drive of image i


def test_kitti_split_by_drive_as_tensorflow_datasets(tmp_path):
    root = str(tmp_path)
    drive_of = write_kitti(root)
    kt = eval_suite.open_dataset(eval_suite.BY_NAME["KITTI"], root)
    assert "note" not in kt and sum(len(kt[k]) for k in eval_suite.SPLITS) == 36
    frames = {k: [int(os.path.basename(kt[k].dataset.images[int(r)])[:6]) for r in kt[k].rows]   # rows index
              for k in eval_suite.SPLITS}                                                    # torchvision's listing
    drives = {k: {drive_of[f] for f in frames[k]} for k in eval_suite.SPLITS}
    # the reference: tensorflow_datasets' kitti builder draws from numpy's global generator seeded with 123
    state = np.random.get_state()
    np.random.seed(123)
    ordered = sorted(set(drive_of))
    test = set(np.random.choice(ordered, 1, replace=False))
    val = set(np.random.choice(sorted(set(ordered) - test), 1, replace=False))
    np.random.set_state(state)
    assert drives["test"] == test and drives["val"] == val and not drives["train"] & (test | val)
    assert sorted(sum(frames.values(), [])) == list(range(36))
    for k in eval_suite.SPLITS:            # each label is the one drawn for that image (its colour shows it)
        colours = [np.asarray(kt[k].image(j), float).mean((0, 1)) for j in range(len(kt[k]))]
        assert kt[k].labels.tolist() == [int(np.argmin([np.abs(m - np.array(c)).sum() for c in COLOURS]))
                                         for m in colours]
    # without the devkit's mapping: split by frame, seeded, and the report says so
    import shutil
    shutil.rmtree(os.path.join(root, "Kitti", "devkit_object"))
    kt2 = eval_suite.open_dataset(eval_suite.BY_NAME["KITTI"], root)
    assert "split by frame" in kt2["note"] and sum(len(kt2[k]) for k in eval_suite.SPLITS) == 36
    assert sorted(np.concatenate([kt2[k].rows for k in eval_suite.SPLITS]).tolist()) == list(range(36))


def write_ucf101(root, per_class=6, codec="mpeg4"):
    """ucf101/UCF-101/<Class>/v_<Class>_gNN_cNN.avi and ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt;
    each video's frames run from another class's colour to its own at the middle, so only the middle frame
    tells the class."""
    base = os.path.join(root, "ucf101")
    classes = ["ApplyEyeMakeup", "Basketball", "YoYo"]
    train, test = [], []
    for c, cls in enumerate(classes):
        for g in range(per_class):
            name = f"{cls}/v_{cls}_g{g + 1:02d}_c01.avi"
            frames = np.stack([picture(c if i == 4 else (c + 1) % 3, 100 * c + 10 * g + i) for i in range(9)])
            write_video(os.path.join(base, "UCF-101", name), frames, codec)
            (train.append(f"{name} {c + 1}") if g < per_class - 2 else test.append(name))
    os.makedirs(os.path.join(base, "ucfTrainTestlist"))
    for fname, rows in (("classInd.txt", [f"{c + 1} {cls}" for c, cls in enumerate(classes)]),
                        ("trainlist01.txt", train), ("testlist01.txt", test)):
        with open(os.path.join(base, "ucfTrainTestlist", fname), "w") as f:
            f.write("\r\n".join(rows) + "\r\n")              # the release's lists end lines with CR LF


def write_kinetics700(root, per_class=5):
    """kinetics700/{train,val}/<class>/<youtube id>_<start>_<end>.mp4, as torchvision's Kinetics download."""
    for s, n in (("train", per_class), ("val", 2)):
        for c, cls in enumerate(["abseiling", "air drumming", "zumba"]):
            for i in range(n):
                frames = np.stack([picture(c if j == 3 else (c + 2) % 3, 7000 + 50 * c + 10 * i + j + (s == "val"))
                                   for j in range(7)])
                write_video(os.path.join(root, "kinetics700", s, cls, f"yt{c}{i}{s[0]}_{i:06d}_{i + 10:06d}.mp4"),
                            frames, "libx264")


def test_video_readers_take_the_release_layouts(tmp_path):
    root = str(tmp_path)
    write_ucf101(root)
    write_kinetics700(root)
    ucf = eval_suite.open_dataset(eval_suite.BY_NAME["UCF101"], root)
    assert [len(ucf["train"]), len(ucf["test"])] == [12, 6] and ucf["val"] is None
    assert ucf["train"].labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and ucf["test"].labels.tolist()[-1] == 2
    mean = np.asarray(ucf["test"].image(0), float).mean((0, 1))   # the middle frame has the class's own colour
    assert np.argmin([np.abs(mean - np.array(c)).sum() for c in COLOURS]) == 0
    k7 = eval_suite.open_dataset(eval_suite.BY_NAME["K700"], root)
    assert [len(k7["train"]), len(k7["test"])] == [15, 6] and k7["test"].labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert eval_suite.BY_NAME["K700"].metric == "top1_top5_mean"
    os.remove(os.path.join(root, "ucf101", "UCF-101", "YoYo", "v_YoYo_g06_c01.avi"))    # a listed video not there
    assert eval_suite.open_dataset(eval_suite.BY_NAME["UCF101"], root).startswith("incomplete under")


def test_suite_end_to_end_on_birdsnap_kitti_and_videos(tmp_path):
    root = str(tmp_path / "data")
    write_birdsnap(root)
    write_kitti(root, mapping=False)
    write_ucf101(root, per_class=5)
    write_kinetics700(root, per_class=4)
    cut = os.path.join(root, "kinetics700", "train", "zumba", "yt21t_000001_000011.mp4")
    with open(cut, "r+b") as f:                                 # a video cut off: its status, not a stop
        f.truncate(60)
    torch.save(model_py.encoder_checkpoint(model_py.VisionEncoder(model_py.preset("tiny", image_size=32))),
               tmp_path / "t.pt")
    out = str(tmp_path / "out")
    rep = ev.main(["--suite", "mlcd-linear", "--data-root", root, "--encoder", f"tiny={tmp_path / 't.pt'}",
                   "--out", out, "--datasets", "Birdsnap,KITTI,UCF101,K700,SUN397", "--probe-iters", "30",
                   "--c-refine", "0"])
    res = rep["encoders"]["tiny"]["results"]
    assert set(res) == {"Birdsnap", "KITTI", "UCF101", "K700"} and rep["datasets"]["SUN397"]["status"].startswith(
        "not found under")
    assert res["K700"]["metric"] == "top1_top5_mean" and res["K700"]["unreadable"] == 1
    assert res["UCF101"]["unreadable"] == 0 and sum(res["UCF101"]["counts"].values()) == 15
    assert all(0 <= r["score"] <= 1 for r in res.values())
    md = open(os.path.join(out, "suite.md")).read()
    assert "| encoder | Birdsnap | SUN397 | KITTI | UCF101 | K700 | average |" in md
    assert "- Birdsnap: 2 of 24 images listed in images.txt are not under" in md
    assert "- KITTI: split by frame, seeded" in md and "- K700 (tiny): 1 images that could not be read" in md
