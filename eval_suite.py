"""MLCD Tab. 1's linear-probe suite on the datasets as they sit on a user's disk (05_eval.py --suite mlcd-linear).

Each dataset is read through torchvision's own reader (`torchvision.datasets`) from --data-root, in the layout
its download leaves (`<root>/cifar-10-batches-py`, `<root>/dtd/dtd/...`, ...), with download=False. The
readers' integrity checks (md5 sums of the archives and files) exist for downloads: the suite replaces them
with a check that the files are there, so a copy re-packed or converted by a user is read as it is; a file
that is missing or cut off is one line in the report ("not found under ROOT/...: expected ..."), never a
crash, and the other datasets run.

Protocol (MLCD App. A.1.4, CLIP's): logistic regression on the frozen image features, L-BFGS (at most --probe-
iters, 1,000), the L2 weight searched on a validation split and the model refitted on train + validation, then
scored once on the test split with CLIP's metric for the dataset (CLIP Tab. 9 / MLCD Tab. 11: mean per class
for FGVC Aircraft, Oxford Pets, Caltech-101 and Flowers; accuracy elsewhere). A dataset's own validation split
is used where it defines one (DTD, Aircraft, Country211, Rendered SST2); otherwise one is carved from train,
seeded (VALIDATION_SHARE of it, as CLIP did).

Datasets without a split of their own (EuroSAT, SUN397, RESISC45) get a seeded CARVED_TEST of their images as
test; Caltech-101 the usual 30 training images per class, seeded. RESISC45 has no torchvision reader: its
class folders go through torchvision's ImageFolder.

FER2013, Hateful Memes and Birdsnap have readers of the kit's own (torchvision has none for Hateful Memes and
Birdsnap, and its FER2013 reader checks md5 sums in its constructor). KITTI is CLIP's KITTI Distance task (the
closest vehicle's distance in four classes) on torchvision's Kitti reader, split by drive as tensorflow_datasets
does. UCF101 and Kinetics-700 are probed on each video's middle frame, as CLIP did (middle_frame, PyAV).

A reader may add a note the report prints (Birdsnap's images that were never downloaded, KITTI without its
devkit's mapping).

ImageNet-1k (MLCD Tab. 4's linear probe) runs after the Tab. 1 columns, from class folders.

At the end, what 05 does with each opened dataset once it has an encoder: SuitePixels (an item's pixels, read
ahead in loader workers), probe_dataset (the probe on its splits) and markdown (suite.md, Tab. 1's order).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

VALIDATION_SHARE = 0.1       # of train, carved (seeded) where a dataset has no validation split
CARVED_TEST = 0.2            # of all images, where a dataset has no train / test split
CALTECH_TRAIN_PER_CLASS = 30  # Caltech-101: the usual protocol, 30 training images per class, the rest test

# MLCD ViT-L/14 (LAION-400M), MLCD Tab. 1, in its column order: the published row, not measured here
TAB1_ORDER = ["Food101", "CIFAR10", "CIFAR100", "Birdsnap", "SUN397", "Cars", "Aircraft", "VOC2007", "DTD",
              "Pets", "Caltech101", "Flowers", "MNIST", "FER2013", "STL10", "EuroSAT", "RESISC45", "GTSRB", "KITTI",
              "Country211", "PCAM", "UCF101", "K700", "CLEVR", "HatefulMemes", "SST2"]
TAB1_MLCD = dict(zip(TAB1_ORDER, [94.3, 98.9, 92.0, 83.4, 82.1, 94.8, 79.6, 92.5, 84.6, 95.3, 97.2, 99.3, 99.3,
                                  72.4, 99.3, 99.1, 94.7, 92.5, 78.2, 34.5, 86.0, 90.0, 68.5, 60.1, 57.9, 73.4]))
TAB1_AVERAGES = {"MLCD ViT-L/14 (LAION-400M)": 84.6, "OpenCLIP ViT-L/14 (LAION-400M)": 82.3,
                 "UNICOM ViT-L/14": 83.3, "CLIP ViT-L/14 (WIT, as reported)": 84.2}


@dataclass
class Split:
    """The images of a dataset split, read lazily: dataset[i] -> (PIL image, label)."""
    dataset: object
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def image(self, i: int):
        return self.dataset[i][0].convert("RGB")


@dataclass(frozen=True)
class Spec:
    name: str                # MLCD Tab. 1's column
    folder: str              # under --data-root, where torchvision's download puts it
    expected: str            # what the reader needs there, for the "not found" line
    metric: str              # "accuracy" or "mean_per_class" (CLIP Tab. 9)
    read: object             # read(root) -> {"train": Split, "val": Split | None, "test": Split[, "note": str]}


def _labels(ds) -> np.ndarray:
    for attr in ("targets", "_labels", "labels", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), np.int64)
    samples = ds.samples if hasattr(ds, "samples") else ds._samples        # ImageFolder-style readers
    return np.asarray([y for _, y in samples], np.int64)


def _exists_only(cls):
    """torchvision's CIFAR reader class `cls` with its md5 checks (of the batches and of the meta file)
    replaced by a check that the files are there."""
    import pickle

    def check(self):
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

    def load_meta(self):
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"{self.meta['filename']} is missing")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
    return type(cls.__name__, (cls,), {"_check_integrity": check, "_load_meta": load_meta})


def _splits(make, train: str = "train", val: str | None = None, test: str = "test"):
    out = {"train": make(train), "test": make(test), "val": make(val) if val else None}
    return {k: Split(ds, _labels(ds)) if ds is not None else None for k, ds in out.items()}


def read_cifar(root, hundred=False):
    import torchvision.datasets as tvd
    cls = _exists_only(tvd.CIFAR100 if hundred else tvd.CIFAR10)
    return _splits(lambda s: cls(root, train=s == "train", download=False))


def read_mnist(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.MNIST(root, train=s == "train", download=False))


def read_dtd(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.DTD(root, split=s, partition=1, download=False), val="val")


def read_pets(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.OxfordIIITPet(root, split=s, download=False), train="trainval")


def read_food(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.Food101(root, split=s, download=False))


def read_aircraft(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.FGVCAircraft(root, split=s, download=False), val="val")


def read_country(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.Country211(root, split=s, download=False), val="valid")


def read_sst2(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.RenderedSST2(root, split=s, download=False), val="val")


def carve(ds, test=None):
    """A dataset that defines no split: a seeded CARVED_TEST of its images (or the rows `test` marks) is the
    test split, the rest train."""
    labels = _labels(ds)
    if test is None:
        test = np.random.default_rng(0).random(len(labels)) < CARVED_TEST
    return {"train": _Subset(ds, labels, np.flatnonzero(~test)), "val": None,
            "test": _Subset(ds, labels, np.flatnonzero(test))}


def read_eurosat(root):
    import torchvision.datasets as tvd
    return carve(tvd.EuroSAT(root, download=False))


def read_sun397(root):
    import torchvision.datasets as tvd
    return carve(tvd.SUN397(root, download=False))


def read_resisc45(root):
    """NWPU-RESISC45/<class>/*.jpg (torchvision has no reader: its ImageFolder reads the class folders)."""
    import torchvision.datasets as tvd
    return carve(tvd.ImageFolder(os.path.join(root, "NWPU-RESISC45")))


def read_caltech101(root):
    """Caltech-101: CALTECH_TRAIN_PER_CLASS images of each class (seeded) train, the rest test (a class with
    fewer keeps half for test); BACKGROUND_Google is left out, as torchvision's reader does."""
    import torchvision.datasets as tvd
    ds = tvd.Caltech101(root, download=False)
    labels, rng = _labels(ds), np.random.default_rng(0)
    test = np.ones(len(labels), bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_train = CALTECH_TRAIN_PER_CLASS if len(rows) > CALTECH_TRAIN_PER_CLASS else len(rows) // 2
        test[rows[:n_train]] = False
    return carve(ds, test)


def read_stl10(root):
    import torchvision.datasets as tvd
    cls = type("STL10", (tvd.STL10,), {"_check_integrity": lambda self: all(
        os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in self.train_list[:2] + self.test_list)})
    return _splits(lambda s: cls(root, split=s, download=False))


def read_flowers(root):
    """Oxford Flowers-102: jpg/, imagelabels.mat and setid.mat (their md5 check replaced by a presence check)."""
    import torchvision.datasets as tvd
    cls = type("Flowers102", (tvd.Flowers102,), {"_check_integrity": lambda self: self._images_folder.is_dir() and all(
        (self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid"))})
    return _splits(lambda s: cls(root, split=s, download=False), val="val")


def read_clevr(root):
    """CLEVR counts (the number of objects): its test split has no scenes, so val is the test split, as in
    CLIP's CLEVR Counts."""
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.CLEVRClassification(root, split=s, download=False), test="val")


VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm")


def middle_frame(path: str):
    """The frame in the middle of a video, as a PIL image: UCF101 and Kinetics-700 are probed on it, as CLIP did
    (CLIP App. A.1). The packets are read without decoding to find the middle frame's timestamp in presentation
    order (frame n // 2 of n), then PyAV seeks to the keyframe before it and decodes up to it. torchvision's
    UCF101 and Kinetics readers decode through torchvision.io's video functions, which torchvision 0.29 no longer
    has; PyAV is the library they used."""
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        stamps = sorted(p.pts if p.pts is not None else p.dts for p in container.demux(stream)
                        if p.size and (p.pts is not None or p.dts is not None))
        if not stamps:
            raise ValueError("no video frame")
        target = stamps[len(stamps) // 2]
        container.seek(target, stream=stream, backward=True, any_frame=False)
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= target:
                return frame.to_image()
    with av.open(path) as container:                # no usable timestamps after the seek: count decoded frames
        frames = [f.to_image() for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frame decodes")
    return frames[len(frames) // 2]


class _Listed:
    """A split held as (image source, label) pairs: a file path (a video: its middle frame), or a uint8 array
    (FER2013's 48 x 48 faces)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        src, label = self.items[i]
        if isinstance(src, np.ndarray):
            return Image.fromarray(src), label
        return (middle_frame(src) if src.lower().endswith(VIDEO_EXTENSIONS) else Image.open(src)), label


def _listed(items) -> Split:
    return Split(_Listed(items), np.asarray([y for _, y in items], np.int64))


def read_fer2013(root):
    """FER2013 as Kaggle releases it: fer2013/fer2013.csv (emotion, pixels, Usage) or icml_face_data.csv;
    Training is train, PublicTest the validation split, PrivateTest the test split. torchvision's reader
    checks md5 sums inside its constructor, so the kit reads the csv itself. Kaggle's train.csv / test.csv
    pair has no test labels: it is refused with that reason."""
    import csv
    base = os.path.join(root, "fer2013")
    for name, pixels, usage in (("fer2013.csv", "pixels", "Usage"), ("icml_face_data.csv", " pixels", " Usage")):
        if os.path.isfile(os.path.join(base, name)):
            break
    else:
        raise FileNotFoundError("fer2013.csv (or icml_face_data.csv) is not there; Kaggle's train.csv / test.csv "
                                "have no test labels")
    parts = {"Training": [], "PublicTest": [], "PrivateTest": []}
    with open(os.path.join(base, name), newline="") as f:
        for row in csv.DictReader(f):
            face = np.asarray(row[pixels].split(), np.uint8).reshape(48, 48)
            parts[row[usage]].append((face, int(row["emotion"])))
    return {"train": _listed(parts["Training"]), "val": _listed(parts["PublicTest"]),
            "test": _listed(parts["PrivateTest"])}


def read_hateful_memes(root):
    """Hateful Memes as released: hateful_memes/{img/, train.jsonl, dev_seen.jsonl (or dev.jsonl)}; the
    image alone, train against dev (its test set has no labels), scored by ROC-AUC as in CLIP."""
    import json
    base = os.path.join(root, "hateful_memes")

    def split(*names):
        for name in names:
            if os.path.isfile(os.path.join(base, name)):
                with open(os.path.join(base, name)) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
                return _listed([(os.path.join(base, r["img"]), int(r["label"])) for r in rows])
        raise FileNotFoundError(f"{' or '.join(names)} is not there")
    return {"train": split("train.jsonl"), "val": None, "test": split("dev_seen.jsonl", "dev.jsonl")}


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def read_voc2007(root):
    """VOC2007 classification: VOCdevkit/VOC2007 through torchvision's VOCDetection (train, val, test image
    sets); each image's labels are the classes of its objects not marked difficult, multi-hot over the 20
    classes, scored by the 11-point mAP (probes.ap_11point)."""
    import xml.etree.ElementTree as ET

    import torchvision.datasets as tvd

    def split(image_set):
        ds = tvd.VOCDetection(root, year="2007", image_set=image_set, download=False)
        y = np.zeros((len(ds.annotations), len(VOC_CLASSES)), np.int64)
        for i, path in enumerate(ds.annotations):
            for obj in ET.parse(path).getroot().iter("object"):
                if obj.findtext("difficult", "0").strip() != "1" and obj.findtext("name") in VOC_CLASSES:
                    y[i, VOC_CLASSES.index(obj.findtext("name"))] = 1
        return Split(ds, y)
    return {"train": split("train"), "val": split("val"), "test": split("test")}


def read_cars(root):
    """Stanford Cars: stanford_cars/{cars_train,cars_test}, devkit/{cars_meta,cars_train_annos}.mat and
    cars_test_annos_withlabels.mat (the test labels, released separately), through torchvision's reader."""
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.StanfordCars(root, split=s, download=False))


def read_imagenet(root):
    """ImageNet-1k as imagenet/{train,val}/<wnid>/*.JPEG (val sorted into its class folders, as the usual
    valprep.sh does): torchvision's ImageFolder; val is the test split (ImageNet's test labels are not public)."""
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.ImageFolder(os.path.join(root, "imagenet", s)), test="val")


def read_pcam(root):
    """PatchCamelyon: pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 through torchvision's reader
    (h5py); the labels read from the y files directly."""
    import h5py
    import torchvision.datasets as tvd

    def split(s):
        ds = tvd.PCAM(root, split=s, download=False)
        with h5py.File(os.path.join(root, "pcam", ds._FILES[s]["targets"][0])) as f:
            return Split(ds, np.asarray(f["y"][:, 0, 0, 0], np.int64))
    return {"train": split("train"), "val": split("val"), "test": split("test")}


def read_gtsrb(root):
    import torchvision.datasets as tvd
    return _splits(lambda s: tvd.GTSRB(root, split=s, download=False))


def _tab_rows(path: str) -> list:
    """A tab-separated file whose first line names the fields (Birdsnap's images.txt, test_images.txt)."""
    with open(path, newline="") as f:
        names = f.readline().rstrip("\r\n").split("\t")
        return [dict(zip(names, line.rstrip("\r\n").split("\t"))) for line in f if line.strip()]


def read_birdsnap(root):
    """Birdsnap 1.1 as released (birdsnap.tgz) and fetched by its get_birdsnap.py: birdsnap/images.txt (path,
    species_id 1..500), test_images.txt (the 2,443 test paths) and the images under birdsnap/download/images/
    <path>. torchvision has no reader. Many of the Flickr images are gone, so a listed image that was not
    downloaded is left out and counted in the report (CLIP had 42,283 train / 2,149 test of 47,386 / 2,443)."""
    base = os.path.join(root, "birdsnap")
    rows = _tab_rows(os.path.join(base, "images.txt"))
    test_paths = {r["path"] for r in _tab_rows(os.path.join(base, "test_images.txt"))}
    parts, missing = {"train": [], "test": []}, 0
    for r in rows:
        path = os.path.join(base, "download", "images", r["path"])
        if not os.path.isfile(path):
            missing += 1
            continue
        parts["test" if r["path"] in test_paths else "train"].append((path, int(r["species_id"]) - 1))
    out = {"train": _listed(parts["train"]), "val": None, "test": _listed(parts["test"])}
    if missing:
        out["note"] = (f"{missing} of {len(rows)} images listed in images.txt are not under birdsnap/download/"
                       "images (not downloaded): left out")
    return out


KITTI_VEHICLES = ("Car", "Van", "Truck")
KITTI_DISTANCE_BINS = (-100.0, 8.0, 20.0, 999.0)   # metres; a frame with no vehicle counts as 1,000 m away
KITTI_SPLIT_SEED, KITTI_SPLIT_PERCENT = 123, 10


def kitti_distance_class(objects) -> int:
    """CLIP's KITTI Distance (VTAB's closest_vehicle_distance): the depth z of the closest car, van or truck
    binned at 8 m and 20 m, or 3 for a frame with no vehicle (classes: near, nearby, far, none)."""
    z = min([o["location"][2] for o in objects if o["type"] in KITTI_VEHICLES] + [1000.0])
    return int(sum(t < z for t in KITTI_DISTANCE_BINS)) - 1


def kitti_drive_split(frame_drive: dict) -> tuple:
    """{frame id: drive} -> (validation drives, test drives): KITTI_SPLIT_PERCENT of the drives each, drawn with
    numpy's seed KITTI_SPLIT_SEED from the sorted drives exactly as tensorflow_datasets' kitti builder does, so
    the splits are the ones behind CLIP's 6,770 train (train + validation) / 711 test images."""
    drives = sorted(set(frame_drive.values()))
    rng = np.random.RandomState(KITTI_SPLIT_SEED)
    n = max(1, KITTI_SPLIT_PERCENT * len(drives) // 100)
    test = set(rng.choice(drives, n, replace=False))
    val = set(rng.choice(sorted(set(drives) - test), n, replace=False))
    return val, test


def read_kitti(root):
    """KITTI's object training frames through torchvision's Kitti reader (Kitti/raw/training/{image_2,label_2};
    its testing frames have no labels), labelled with kitti_distance_class. The frames are split by drive with
    the object devkit's mapping/{train_rand,train_mapping}.txt (devkit_object.zip, found anywhere under Kitti/),
    as tensorflow_datasets does; without it, a seeded KITTI_SPLIT_PERCENT of the frames each for validation and
    test, and the report says so (frames of one drive then fall on both sides)."""
    import glob

    import torchvision.datasets as tvd
    ds = tvd.Kitti(root, train=True, download=False)
    frame = np.array([int(os.path.splitext(os.path.basename(p))[0]) for p in ds.images])
    labels = np.array([kitti_distance_class(ds._parse_target(i)) for i in range(len(ds))], np.int64)
    found = sorted(glob.glob(os.path.join(root, "Kitti", "**", "mapping", "train_rand.txt"), recursive=True))
    note = None
    if found:
        with open(found[0]) as f:
            line_of = [int(x) - 1 for x in f.read().split(",") if x.strip()]
        with open(os.path.join(os.path.dirname(found[0]), "train_mapping.txt")) as f:
            drive_of_line = [line.split()[1] for line in f if line.strip()]
        drive = {i: drive_of_line[j] for i, j in enumerate(line_of)}
        val_drives, test_drives = kitti_drive_split(drive)
        part = np.array([2 if drive[f] in test_drives else 1 if drive[f] in val_drives else 0 for f in frame])
    else:
        u = np.random.default_rng(KITTI_SPLIT_SEED).random(len(frame))[np.argsort(np.argsort(frame))]
        part = np.where(u < KITTI_SPLIT_PERCENT / 100, 2, np.where(u < 2 * KITTI_SPLIT_PERCENT / 100, 1, 0))
        note = ("split by frame, seeded: the object devkit's mapping/train_rand.txt and train_mapping.txt were not "
                "found under Kitti/ (put devkit_object.zip's mapping/ there for tensorflow_datasets' split by drive)")
    rows = [np.flatnonzero(part == k)[np.argsort(frame[part == k])] for k in range(3)]
    out = {"train": _Subset(ds, labels, rows[0]), "val": _Subset(ds, labels, rows[1]),
           "test": _Subset(ds, labels, rows[2])}
    return {**out, "note": note} if note else out


UCF101_FOLD = 1     # the first of UCF101's three official train / test splits


def read_ucf101(root):
    """UCF101 as released: ucf101/UCF-101/<Class>/v_<Class>_gNN_cNN.avi and ucf101/ucfTrainTestlist/{classInd,
    trainlist01,testlist01}.txt (the layout torchvision's UCF101 reader takes); the split lists and classInd's
    labels, each video's middle frame (middle_frame). torchvision's reader itself decodes every video's timestamps
    through torchvision.io's video functions, gone from torchvision 0.29."""
    base = os.path.join(root, "ucf101")
    lists = os.path.join(base, "ucfTrainTestlist")
    with open(os.path.join(lists, "classInd.txt")) as f:
        label = {name: int(i) - 1 for i, name in (line.split() for line in f if line.strip())}

    def split(name):
        with open(os.path.join(lists, f"{name}list{UCF101_FOLD:02d}.txt")) as f:
            paths = [line.split()[0] for line in f if line.strip()]
        return _listed([(os.path.join(base, "UCF-101", *p.split("/")), label[p.split("/")[0]]) for p in paths])
    return {"train": split("train"), "val": None, "test": split("test")}


def read_kinetics700(root):
    """Kinetics-700 in the layout torchvision's Kinetics reader (and its download) uses: kinetics700/{train,val}/
    <class>/<youtube id>_<start>_<end>.mp4; the class folders listed with torchvision's own find_classes /
    make_dataset, each clip's middle frame (middle_frame). Its test labels are not public, so val is the test
    split (CLIP did the same) and a seeded share of train the validation split; scored by the mean of top-1 and
    top-5 accuracy (CLIP Tab. 9)."""
    from torchvision.datasets.folder import find_classes, make_dataset
    base = os.path.join(root, "kinetics700")
    classes, _ = find_classes(os.path.join(base, "train"))
    index = {c: i for i, c in enumerate(classes)}

    def split(s):
        return _listed(make_dataset(os.path.join(base, s), index, extensions=VIDEO_EXTENSIONS,
                                    allow_empty=True))
    return {"train": split("train"), "val": None, "test": split("val")}


class _Subset(Split):
    def __init__(self, ds, labels, rows):
        super().__init__(ds, labels[rows])
        self.rows = rows

    def image(self, i: int):
        return self.dataset[int(self.rows[i])][0].convert("RGB")


SUITE = [
    Spec("Food101", "food-101", "food-101/images/<class>/<id>.jpg and food-101/meta/{train,test}.json",
         "accuracy", read_food),
    Spec("CIFAR10", "cifar-10-batches-py", "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
         "accuracy", read_cifar),
    Spec("CIFAR100", "cifar-100-python", "cifar-100-python/{train,test,meta}", "accuracy",
         lambda root: read_cifar(root, hundred=True)),
    Spec("Birdsnap", "birdsnap", "birdsnap/{images.txt,test_images.txt} and the images get_birdsnap.py fetched, "
         "birdsnap/download/images/<species>/*.jpg", "accuracy", read_birdsnap),
    Spec("SUN397", "SUN397", "SUN397/<letter>/<class>/sun_*.jpg and SUN397/ClassName.txt", "accuracy",
         read_sun397),
    Spec("Cars", "stanford_cars", "stanford_cars/{cars_train,cars_test,devkit/cars_meta.mat,devkit/"
         "cars_train_annos.mat,cars_test_annos_withlabels.mat}", "accuracy", read_cars),
    Spec("Aircraft", "fgvc-aircraft-2013b", "fgvc-aircraft-2013b/data/{images,images_variant_*.txt,variants.txt}",
         "mean_per_class", read_aircraft),
    Spec("VOC2007", "VOCdevkit/VOC2007", "VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{train,val,"
         "test}.txt}", "map11", read_voc2007),
    Spec("DTD", "dtd", "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,val,test}1.txt", "accuracy",
         read_dtd),
    Spec("Pets", "oxford-iiit-pet", "oxford-iiit-pet/images/*.jpg and oxford-iiit-pet/annotations/{trainval,test}.txt",
         "mean_per_class", read_pets),
    Spec("Caltech101", "caltech101", "caltech101/101_ObjectCategories/<class>/image_NNNN.jpg (with "
         "BACKGROUND_Google)", "mean_per_class", read_caltech101),
    Spec("Flowers", "flowers-102", "flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}", "mean_per_class",
         read_flowers),
    Spec("MNIST", "MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", "accuracy", read_mnist),
    Spec("FER2013", "fer2013", "fer2013/fer2013.csv (emotion, pixels, Usage) or icml_face_data.csv", "accuracy",
         read_fer2013),
    Spec("STL10", "stl10_binary", "stl10_binary/{train,test}_{X,y}.bin", "accuracy", read_stl10),
    Spec("EuroSAT", "eurosat", "eurosat/2750/<class>/*.jpg", "accuracy", read_eurosat),
    Spec("RESISC45", "NWPU-RESISC45", "NWPU-RESISC45/<class>/*.jpg", "accuracy", read_resisc45),
    Spec("GTSRB", "gtsrb", "gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm and "
         "gtsrb/GT-final_test.csv", "accuracy", read_gtsrb),
    Spec("KITTI", "Kitti", "Kitti/raw/training/{image_2,label_2} and the object devkit's mapping/{train_rand,"
         "train_mapping}.txt under Kitti/", "accuracy", read_kitti),
    Spec("Country211", "country211", "country211/{train,valid,test}/<country>/*.jpg", "accuracy", read_country),
    Spec("PCAM", "pcam", "pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5", "accuracy", read_pcam),
    Spec("UCF101", "ucf101", "ucf101/UCF-101/<Class>/*.avi and ucf101/ucfTrainTestlist/{classInd,trainlist01,"
         "testlist01}.txt", "accuracy", read_ucf101),
    Spec("K700", "kinetics700", "kinetics700/{train,val}/<class>/*.mp4", "top1_top5_mean", read_kinetics700),
    Spec("CLEVR", "clevr", "clevr/CLEVR_v1.0/images/{train,val}/*.png and clevr/CLEVR_v1.0/scenes/"
         "CLEVR_{train,val}_scenes.json", "accuracy", read_clevr),
    Spec("HatefulMemes", "hateful_memes", "hateful_memes/{img/*.png,train.jsonl,dev_seen.jsonl}", "roc_auc",
         read_hateful_memes),
    Spec("SST2", "rendered-sst2", "rendered-sst2/{train,valid,test}/{negative,positive}/*.png", "accuracy",
         read_sst2),
]
# ImageNet-1k's linear probe is MLCD Tab. 4's (84.6 for MLCD ViT-L/14), not a Tab. 1 column: after them
SUITE.append(Spec("ImageNet", "imagenet", "imagenet/{train,val}/<wnid>/*.JPEG (val in class folders)", "accuracy",
                  read_imagenet))
TAB1_ORDER.append("ImageNet")
TAB1_MLCD["ImageNet"] = 84.6
BY_NAME = {s.name: s for s in SUITE}


SPLITS = ("train", "val", "test")


def open_dataset(spec: Spec, root: str, check_files: bool = True):
    """{"train", "val", "test"} Splits of one dataset (and the reader's "note", if any), or a one-line reason
    it cannot be read. check_files: stat every file the reader listed (05 does it on rank 0 only: one pass over
    the dataset, not one per rank)."""
    where = os.path.join(root, spec.folder)
    if not os.path.exists(where):
        return f"not found under {where}: expected {spec.expected}"
    try:
        splits = spec.read(root)
    except Exception as e:             # torchvision's "Dataset not found or corrupted", a cut-off file, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return f"incomplete under {where} ({type(e).__name__}: {first}): expected {spec.expected}"
    if not len(splits["train"]) or not len(splits["test"]):
        return f"empty under {where}: expected {spec.expected}"
    missing = [p for k in SPLITS if splits[k] is not None and check_files for p in listed_files(splits[k].dataset)
               if not os.path.isfile(p)]
    if missing:
        return (f"incomplete under {where}: {len(missing)} listed files are not there (first: {missing[0]}): "
                f"expected {spec.expected}")
    return splits


def listed_files(ds) -> list:
    """The image files a torchvision reader listed (its split files, or its class folders), to check they are
    there before any feature is extracted; none for readers that hold arrays (CIFAR, MNIST)."""
    if isinstance(ds, _Listed):
        return [src for src, _ in ds.items if isinstance(src, str)]
    for attr in ("_image_files", "_images", "_samples", "samples", "images"):
        if hasattr(ds, attr):
            return [x[0] if isinstance(x, tuple) else x for x in getattr(ds, attr)]
    return []


def validation_rows(labels: np.ndarray, seed: int) -> np.ndarray:
    """(bool per train row) VALIDATION_SHARE of the train split, seeded, for the C search where a dataset
    defines no validation split."""
    return np.random.default_rng([seed, len(labels)]).random(len(labels)) < VALIDATION_SHARE


def fingerprint(root: str, spec: Spec) -> str:
    """The dataset folder's listing: names, sizes, mtimes (a copy with other bytes gets new features)."""
    h = hashlib.sha1(spec.name.encode())
    for d, dirs, files in os.walk(os.path.join(root, spec.folder)):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(d, f))
            h.update(f"{os.path.relpath(os.path.join(d, f), root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# what 05_eval.py --suite does with a dataset: its pixels ahead of the encoder, its probe, the table


class SuitePixels:
    """Item i of a dataset's train + val + test -> (the encoder's input tensor, None), or (None, the reason) when
    it cannot be read (a cut-off image, a video that does not decode): run ahead in DataLoader workers."""

    def __init__(self, splits, order, starts, preprocess):
        self.splits, self.order, self.starts, self.preprocess = splits, order, starts, preprocess

    def __call__(self, i):
        s = int(np.searchsorted(self.starts, i, "right")) - 1
        try:
            return self.preprocess.pixels(self.splits[self.order[s]].image(int(i - self.starts[s]))), None
        except Exception as e:
            return None, f"{self.order[s]}: {type(e).__name__}: {str(e)[:160]}"


def probe_dataset(x, metric, settings) -> dict:
    """The dataset's own validation split, or VALIDATION_SHARE of train carved (seeded) for the C search."""
    import probes
    y = x["labels"]
    if "val" in y:
        x_tr, y_tr, x_va, y_va = x["train"], y["train"], x["val"], y["val"]
    else:
        val = x["carved"]
        x_tr, x_va, y_tr, y_va = x["train"][~val], x["train"][val], y["train"][~val], y["train"][val]
    return probes.suite_probe(x_tr, y_tr, x_va, y_va, x["test"], y["test"], metric, settings)


def markdown(report) -> str:
    """suite.md: Tab. 1's column order, the user's encoders (measured), then the published MLCD ViT-L/14 row."""
    cols = [c for c in TAB1_ORDER if c in report["datasets"]]
    head = "| encoder | " + " | ".join(cols) + " | average |\n|---|" + "---:|" * (len(cols) + 1) + "\n"
    rows = []
    for name, enc in report["encoders"].items():
        got = [enc["results"].get(c, {}).get("score") for c in cols]
        done = [v for v in got if v is not None]
        rows.append(f"| {name} (measured) | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in got) +
                    f" | {100 * np.mean(done):.1f} over {len(done)} |" if done else f"| {name} (measured) | " +
                    " | " * len(cols) + " |")
        att = [(enc["results"].get(c, {}).get("attentive") or {}).get("top1") for c in cols]
        if any(v is not None for v in att):
            rows.append(f"| {name} (attentive probe, top-1) | " +
                        " | ".join("" if v is None else f"{100 * v:.1f}" for v in att) + " | |")
    paper = [TAB1_MLCD[c] for c in cols]
    rows.append("| MLCD ViT-L/14, LAION-400M (published, MLCD Tab. 1; not measured here) | " +
                " | ".join(f"{v:.1f}" for v in paper) + f" | {np.mean(paper):.1f} over {len(paper)} |")
    notes = [f"- {c}: {report['datasets'][c]['status']}" for c in cols if report["datasets"][c]["status"] != "ok"]
    notes += [f"- {c}: {report['datasets'][c]['note']}" for c in cols if report["datasets"][c].get("note")]
    notes += [f"- {c} ({name}): {r['unreadable']} images that could not be read were left out"
              for name, enc in report["encoders"].items() for c, r in enc["results"].items() if r.get("unreadable")]
    averages = "; ".join(f"{k} {v}" for k, v in TAB1_AVERAGES.items())
    return ("# MLCD Tab. 1 linear-probe suite\n\n" + head + "\n".join(rows) + "\n\n" +
            "CLIP's metric per dataset (accuracy; mean per class for Aircraft, Pets, Caltech-101, Flowers; 11-point "
            "mAP for VOC2007; ROC-AUC for Hateful Memes; the mean of top-1 and top-5 for Kinetics-700), in %; "
            "UCF101 and Kinetics-700 on each video's middle frame; linear probe on the image features, C searched on "
            "each dataset's validation split (or a seeded share of train), refitted on train + validation. "
            f"Published averages over all 26 columns: {averages}. ImageNet's published value is MLCD Tab. 4's "
            "linear probe."
            + ("\n\n" + "\n".join(notes) if notes else "") + "\n")
