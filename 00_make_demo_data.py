"""Generate the kit's offline demo world: small RGB images of coloured, textured shapes and printed words.

    python 00_make_demo_data.py --out runs/demo/data
    python 00_make_demo_data.py --out /tmp/tiny --num-images 24 --size 160 --seed 1
    python 00_make_demo_data.py --out /tmp/wds --format webdataset --shard-size 1000     # or --format sa1b

Each image has a background (flat colour, gradient or low-frequency noise) and either 2-5 objects (60%),
1-3 words (20%) or both (20%; up to 3 objects, fewer when the words leave no room); --mix changes the
shares. An object class is shape x colour x texture: 6 shapes x 6 colours x 3 textures = 108 classes,
named e.g. "red_star_stripes".
Colours are saturated and backgrounds muted (half grey), so the three factors stay visually separable.
Objects are 40-120 px at --size 224 (scaled with --size), drawn without anti-aliasing so the instance mask is
exactly the painted pixels; a later object may hide at most 15% of an earlier one. Words come from a built-in
vocabulary of 200 common English words (--vocab-size N: its first N), lower, Title or UPPER case, in DejaVu
Sans (regular or bold), 18-40 px at 224, dark on a light patch or light on a dark one; patches never touch
objects. --plain-words prints every word lower case in the regular face at 30 px (at 224): fewer ways for a
word to look (README.md, The demo, says what it changed for the tiny encoder).
A word's box (--text-box) is by default its plate, about the extent a PP-OCR detector reports for it (DB's
unclip pads a word by about 0.4 of its height on each side), so that 02's training boxes and the boxes 05
probes agree; `ink` gives the glyphs' box plus 2 px.

Outputs under --out (--format files, the default):
    images/00000.png ...   the RGB images (COCO image id = the number in the name)
    masks/00000.png ...    uint8 instance ids: 0 background, k = k-th annotation of the image in coco.json;
                           a text annotation's mask is its filled box
    coco.json              COCO detection: 108 object categories (with shape/colour/texture) + "text";
                           text annotations also carry "text", the word as printed
    ground_truth.json      for evaluation only: classes, vocabulary and per image objects and words
    manifest.json          stage "demo_data", config, counts; written last (the world is complete from then on)

--format webdataset and --format sa1b write the images into tars of --shard-size samples (the last one partial),
the way the papers' data sets ship, instead of images/; masks/, coco.json, ground_truth.json and manifest.json
stay, with a mask and a `file_name` named after the image's member in its tar (COCO image ids are unchanged):
  webdataset, as img2dataset writes it (with webdataset.TarWriter):
    shards/00000.tar ...   per sample, key = shard (5 digits) + index in shard (max(1, ceil(log10(shard size)))
                           digits), e.g. 00001002: {key}.json, {key}.png, {key}.txt (in that order);
                           .png: the very bytes --format files writes, .txt: a caption naming the objects and
                           words ("a red star with stripes, a blue ring; the word Cat"), .json: img2dataset's
                           meta: url (https://demo.invalid/00012.png), caption, key, status "success",
                           error_message null, width, height, original_width, original_height, exif null, sha256
                           of the .png bytes
    shards/00000.parquet   one row per sample, the .json's fields
    shards/00000_stats.json  img2dataset's shard stats: count, successes, failed_to_download, failed_to_resize,
                           duration, start_time, end_time (0: reruns stay byte-identical), status_dict
    masks/00000002.png ... the instance ids of sample 00000002; coco.json's file_name is "00000002.png"
  sa1b, as SA-1B ships (image n = COCO image id + 1):
    sa1b/sa_000000.tar ... sa_{n}.jpg (JPEG quality 95) and sa_{n}.json = {"image": {image_id n, width, height,
                           file_name}, "annotations": [per object (not words: SA-1B masks have no class): id (the
                           COCO annotation id), segmentation (COCO compressed RLE {size: [H, W], counts}), bbox
                           (as in coco.json), area (mask pixels), predicted_iou 1.0, stability_score 1.0,
                           point_coords [[x, y]] (the object's pixel nearest its centroid), crop_box [0, 0, W, H]]}
    masks/sa_1.png ...     the instance ids of sa_1.jpg; coco.json's file_name is "sa_1.jpg"
Tar members have fixed mtime 0, owner bigdata:bigdata (uid/gid 0) and mode 0444, so the same seed gives the same
bytes. Each shard is written under a hidden tmp name (.00000.tar.tmp, which no *.tar glob matches) and renamed
when complete, its side files before it: a kill leaves only complete shards, and a rerun keeps them.

Every image is drawn from its own generator seeded with seed * 1_000_003 + index, so a rerun, a resumed run
(images and complete shards already on disk are kept) and a run of a different length agree image by image;
the same seed gives byte-identical files (for the same Pillow, FreeType and, for the shard formats, webdataset,
pyarrow and libjpeg), whatever --workers.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from workdir import read_manifest, write_json

NUM_IMAGES, SIZE, SEED, OUT = 2000, 224, 0, "runs/demo/data"
WORKERS = min(4, os.cpu_count() or 1)                       # drawing processes; output does not depend on it
MIX = {"objects": 0.6, "text": 0.2, "both": 0.2}          # image kinds and their probabilities
VERSION = 2                                                  # bump when the drawing or the annotations change
TEXT_BOXES = ("plate", "ink")                                # what a text annotation's box covers (--text-box)
FORMATS = ("files", "webdataset", "sa1b")                    # how the images are stored (--format)
SHARD_SIZE = 1000                                            # samples per tar in the shard formats
# fixed tar headers (TarWriter's default owner and mode, epoch mtime): a rerun writes the same bytes
TAR_MTIME, TAR_OWNER, TAR_MODE = 0, "bigdata", 0o444
URL = "https://demo.invalid/{:05d}.png"                      # a webdataset sample's url: its files-format name
JPEG_QUALITY = 95                                            # sa1b's images

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
           "yellow": (245, 215, 20), "magenta": (215, 40, 215), "cyan": (20, 210, 225)}
TEXTURES = ["solid", "stripes", "dots"]
CLASSES = [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]     # category id = index + 1
TEXT_CATEGORY = len(CLASSES) + 1

OBJ_SIZE = (40, 120)          # object box side in px at SIZE 224
FONT_SIZE = (18, 40)          # font size in px at SIZE 224
PLAIN_FONT_SIZE = 30          # --plain-words: one size, lower case, regular face
MAX_HIDDEN = 0.15             # most of an object's area a later object may cover
FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"]

VOCAB = """about after again air animal apple area baby back ball basket beach bear beautiful bed before begin bell
best bird black blue boat body book bottle box boy bread bridge bright brother brown build busy cake call
camera candle car card care carry castle cat chair change cheese child city class clean clock close cloud
coffee cold color corner country cover cow cup dance dark day deep desk dinner doctor dog door dream dress
drink early earth east egg end evening face family farm fast father field fire fish flower fly food forest
friend fruit game garden gate girl glass gold good grass green ground group happy hand hat head heart heavy
help hill home horse hot house ice island key king kitchen lake lamp large leaf letter light lion little
long machine market milk money moon morning mother mountain music name night north number ocean office open
orange paper party pencil people picture plant play quiet rain river road rock room round school sea seed
ship shoe silver simple sister sky sleep small snow song south spring square star station stone story street
strong summer sun table teacher tiger time today train tree water window winter world yellow young""".split()
assert len(VOCAB) == len(set(VOCAB)) == 200 and all(w.isalpha() and 3 <= len(w) <= 10 for w in VOCAB)


def check_fonts() -> None:
    missing = [p for p in FONTS if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"error: font {missing[0]} is missing; install DejaVu (apt-get install fonts-dejavu-core)")


@functools.lru_cache(maxsize=None)
def font(path: str, px: int):
    return ImageFont.truetype(path, px)


def muted(rng) -> np.ndarray:
    """A random colour mixed half with grey: backgrounds never look like a saturated object colour."""
    return 0.5 * rng.uniform(0, 255, 3) + 0.5 * rng.uniform(60, 200)


def background(rng, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:                                    # flat
        return np.broadcast_to(muted(rng), (size, size, 3)).astype(np.float32)
    if kind == 1:                                    # linear gradient in a random direction
        a, b, t = muted(rng), muted(rng), rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        w = (np.cos(t) * xx + np.sin(t) * yy)
        w = (w - w.min()) / (w.max() - w.min())
        return (a + (b - a) * w[..., None]).astype(np.float32)
    # low-frequency colour noise (a small grid upsampled) plus fine grain
    g = int(rng.integers(3, 8))
    grid = np.stack([muted(rng) for _ in range(g * g)]).reshape(g, g, 3).astype(np.uint8)
    low = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
    return low + rng.integers(-10, 11, (size, size, 3), dtype=np.int8)


def shape_mask(shape: str, s: int, rot: float) -> np.ndarray:
    """(s, s) bool. Polygons are inscribed in the circle of radius s/2, so any rotation stays in the box."""
    im = Image.new("1", (s, s), 0)
    d = ImageDraw.Draw(im)
    R, c = (s - 1) / 2, (s - 1) / 2
    if shape in ("circle", "ring"):
        d.ellipse([0, 0, s - 1, s - 1], fill=1)
        if shape == "ring":
            h = round(0.28 * s)                      # band width: the hole stays clearly open
            d.ellipse([h, h, s - 1 - h, s - 1 - h], fill=0)
    else:
        if shape == "square":
            ang = np.pi / 4 + np.arange(4) * np.pi / 2
            pts = np.stack([np.cos(ang), np.sin(ang)], 1)
        elif shape == "triangle":
            ang = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
            pts = np.stack([np.cos(ang), np.sin(ang)], 1)
        elif shape == "star":                        # fat five-point star: inner radius 0.45 stays readable
            ang = -np.pi / 2 + np.arange(10) * np.pi / 5
            r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
            pts = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
        else:                                        # cross: arms of half-width w, corners on the circle
            w = 0.3
            L = np.sqrt(1 - w * w)
            pts = np.array([(w, L), (w, w), (L, w), (L, -w), (w, -w), (w, -L),
                            (-w, -L), (-w, -w), (-L, -w), (-L, w), (-w, w), (-w, L)])
        rm = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
        pts = c + R * pts @ rm.T
        d.polygon([tuple(p) for p in pts], fill=1)
    return np.asarray(im, dtype=bool)


def texture(rng, colour: str, tex: str, s: int) -> np.ndarray:
    """(s, s, 3) fill: the colour (slightly jittered), with dark stripes or dots of the same hue."""
    base = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255).astype(np.float32)
    fill = np.broadcast_to(base, (s, s, 3)).copy()
    if tex == "solid":
        return fill
    yy, xx = np.mgrid[0:s, 0:s]
    if tex == "stripes":                             # about five periods per object, any of 4 orientations
        period = max(6, round(s / 5))
        v = [xx, yy, xx + yy, xx - yy + s][rng.integers(4)] + rng.integers(period)
        on = (v % period) < period // 2
    else:
        step = max(7, round(s / 5))
        dy, dx = (yy + rng.integers(step)) % step - step / 2, (xx + rng.integers(step)) % step - step / 2
        on = dx * dx + dy * dy <= (0.3 * step) ** 2
    fill[on] = base * 0.35
    return fill


def plan_word(rng, size: int, reserved: np.ndarray, vocab_size: int = len(VOCAB), plain: bool = False):
    """Choose a word (from the first vocab_size words), font and patch; None when no free place was found."""
    word = VOCAB[rng.integers(vocab_size)]
    text = [word, word.title(), word.upper()][rng.choice(3, p=[0.4, 0.3, 0.3])]
    path = FONTS[rng.integers(len(FONTS))]
    px = max(14, round(rng.uniform(*FONT_SIZE) * size / 224))
    if plain:
        text, path, px = word, FONTS[0], max(14, round(PLAIN_FONT_SIZE * size / 224))
    while True:                                      # shrink until the patch fits the image
        l, t, r, b = font(path, px).getbbox(text)
        pad, margin = 2, max(3, round(0.3 * px))
        pw, ph = r - l + 2 * (pad + margin), b - t + 2 * (pad + margin)
        if pw <= size - 2 or px <= 10:
            break
        px = int(px * 0.9)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, size - pw + 1)), int(rng.integers(0, size - ph + 1))
        if not reserved[y0: y0 + ph, x0: x0 + pw].any():
            # reserve a 3 px border too: objects and other patches keep a visible gap
            reserved[max(0, y0 - 3): y0 + ph + 3, max(0, x0 - 3): x0 + pw + 3] = True
            return dict(text=text, word=word, font=font(path, px), offset=(l, t), patch=(x0, y0, pw, ph),
                        box=(x0 + margin, y0 + margin, r - l + 2 * pad, b - t + 2 * pad), pad=pad)
    return None


def draw_word(rng, img: np.ndarray, w: dict) -> None:
    x0, y0, pw, ph = w["patch"]
    light = rng.random() < 0.6                       # dark text on a light patch, or light on dark
    patch = rng.uniform(200, 250, 3) if light else rng.uniform(10, 60, 3)
    ink = rng.uniform(0, 60, 3) if light else rng.uniform(215, 255, 3)
    region = np.broadcast_to(patch, (ph, pw, 3)).astype(np.float32)
    if rng.random() < 0.5:                           # lightly textured patch: faint grain
        region = region + rng.normal(0, 5, (ph, pw, 3))
    bx, by, bw, bh = w["box"]
    tile = Image.new("L", (bw, bh), 0)
    ImageDraw.Draw(tile).text((w["pad"] - w["offset"][0], w["pad"] - w["offset"][1]), w["text"],
                              font=w["font"], fill=255)
    alpha = np.asarray(tile, np.float32)[..., None] / 255
    sub = region[by - y0: by - y0 + bh, bx - x0: bx - x0 + bw]
    region[by - y0: by - y0 + bh, bx - x0: bx - x0 + bw] = sub * (1 - alpha) + ink * alpha
    img[y0: y0 + ph, x0: x0 + pw] = region


def make_image(index: int, seed: int, size: int, vocab_size: int = len(VOCAB), mix: dict = MIX,
               plain: bool = False, text_box: str = "plate"):
    """-> (RGB uint8 (size, size, 3), instance ids uint8 (size, size), annotations in mask-id order)."""
    rng = np.random.default_rng(seed * 1_000_003 + index)
    kind = list(mix)[rng.choice(len(mix), p=list(mix.values()))]
    img = background(rng, size)
    inst = np.zeros((size, size), np.uint8)
    reserved = np.zeros((size, size), bool)
    # words are placed first so they always find room; objects then keep out of their patches
    words = []
    if kind != "objects":
        words = [w for w in (plan_word(rng, size, reserved, vocab_size, plain) for _ in range(rng.integers(1, 4))) if w]
    n_obj = 0 if kind == "text" else int(rng.integers(2, 6) if kind == "objects" else rng.integers(1, 4))
    objects, areas = [], []
    for _ in range(n_obj):
        for _ in range(30):
            cls = int(rng.integers(len(CLASSES)))
            s = max(8, round(rng.uniform(*OBJ_SIZE) * size / 224))
            m = shape_mask(CLASSES[cls][0], s, rng.uniform(-0.35, 0.35))
            x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            if (reserved[y0: y0 + s, x0: x0 + s] & m).any():
                continue
            under = np.bincount(inst[y0: y0 + s, x0: x0 + s][m], minlength=len(objects) + 1)[1:]
            if any(u > MAX_HIDDEN * a for u, a in zip(under, areas)) or under.sum() > MAX_HIDDEN * m.sum():
                continue
            fill = texture(rng, CLASSES[cls][1], CLASSES[cls][2], s)
            img[y0: y0 + s, x0: x0 + s][m] = fill[m]
            inst[y0: y0 + s, x0: x0 + s][m] = len(objects) + 1
            objects.append(cls)
            areas.append(int(m.sum()))
            break
    anns = []
    for k, cls in enumerate(objects, 1):             # boxes of what is visible after occlusion
        ys, xs = np.nonzero(inst == k)
        anns.append(dict(category_id=cls + 1, bbox=[int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                                    int(ys.max() - ys.min() + 1)], area=int(len(xs))))
    for w in words:
        draw_word(rng, img, w)
        bx, by, bw, bh = w["patch"] if text_box == "plate" else w["box"]
        inst[by: by + bh, bx: bx + bw] = len(anns) + 1
        anns.append(dict(category_id=TEXT_CATEGORY, bbox=[bx, by, bw, bh], area=bw * bh, text=w["text"],
                         word=w["word"]))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), inst, anns


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)    # fast; the world is regenerable
    return buf.getvalue()


@contextlib.contextmanager
def atomic(path: str):
    """Yield a hidden tmp name beside `path`, renamed to it when the block completes: a kill mid-write leaves
    nothing that a later stage would list (no *.png, *.tar or *.parquet glob matches .NAME.tmp)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def save_png(path: str, array: np.ndarray) -> None:
    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(png_bytes(array))


def sample_key(index: int, shard_size: int) -> str:
    """img2dataset's key: the shard in 5 digits, then the index in the shard in ceil(log10(shard_size))."""
    shard, j = divmod(index, shard_size)
    return f"{shard:05d}{j:0{max(1, math.ceil(math.log10(shard_size)))}d}"


def member_stem(fmt: str, index: int, shard_size: int) -> str:
    """The name (without extension) of image `index` and its mask in the given --format."""
    return {"files": f"{index:05d}", "webdataset": sample_key(index, shard_size), "sa1b": f"sa_{index + 1}"}[fmt]


def member_name(fmt: str, index: int, shard_size: int) -> str:
    return member_stem(fmt, index, shard_size) + (".jpg" if fmt == "sa1b" else ".png")


def shard_paths(out: str, fmt: str, shard: int) -> list[str]:
    """A shard's files, the tar last: it is renamed into place last, so its presence means a complete shard."""
    if fmt == "sa1b":
        return [os.path.join(out, "sa1b", f"sa_{shard:06d}.tar")]
    base = os.path.join(out, "shards", f"{shard:05d}")
    return [base + "_stats.json", base + ".parquet", base + ".tar"]


def caption(anns: list[dict]) -> str:
    """A short alt text from the annotations: "a red star with stripes, a blue ring; the words Cat and dog"."""
    objects = []
    for a in anns:
        if a["category_id"] != TEXT_CATEGORY:
            shape, colour, tex = CLASSES[a["category_id"] - 1]
            objects.append(f"a {colour} {shape}" + ("" if tex == "solid" else f" with {tex}"))
    words = [a["text"] for a in anns if a["category_id"] == TEXT_CATEGORY]
    parts = [", ".join(objects)] if objects else []
    if words:
        listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        parts.append(("the word " if len(words) == 1 else "the words ") + listed)
    return "; ".join(parts)


def render(index: int, out: str, seed: int, size: int, vocab_size: int = len(VOCAB), mix: dict = MIX,
           plain: bool = False, text_box: str = "plate", fmt: str = "files", shard_size: int = SHARD_SIZE,
           done: frozenset = frozenset()) -> tuple[list[dict], dict | None]:
    """Draw image `index`, write its PNGs (files) or its mask PNG (shard formats) unless already there; return
    its annotations and, in a shard format, what its shard needs of it (None when the shard is in `done`)."""
    # drawn even when its files are already on disk: the annotations come from the drawing
    img, inst, anns = make_image(index, seed, size, vocab_size, mix, plain, text_box)
    stem = member_stem(fmt, index, shard_size)
    for sub, array in (("images", img), ("masks", inst)) if fmt == "files" else (("masks", inst),):
        path = os.path.join(out, sub, f"{stem}.png")
        if not os.path.exists(path):
            save_png(path, array)
    if fmt == "files" or index // shard_size in done:
        return anns, None
    if fmt == "webdataset":
        return anns, dict(png=png_bytes(img))       # the same bytes as --format files' image
    from pycocotools import mask as mask_util
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    objects = []
    for k, a in enumerate(anns, 1):                 # mask id k = k-th annotation; words carry no SA-1B mask
        if a["category_id"] == TEXT_CATEGORY:
            continue
        m = inst == k
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        ys, xs = np.nonzero(m)
        # the object's pixel nearest its centroid: a point on the mask even for a ring or a star
        p = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        objects.append(dict(k=k, counts=rle["counts"].decode("ascii"), point=[int(xs[p]), int(ys[p])]))
    return anns, dict(jpg=buf.getvalue(), objects=objects)


def write_webdataset_shard(out: str, shard: int, samples: list[dict]) -> None:
    """One img2dataset shard: the stats, the parquet, then the tar (each renamed into place when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter
    stats_path, parquet_path, tar_path = shard_paths(out, "webdataset", shard)
    # img2dataset's stats; times are 0, not the clock, so that a rerun writes the same bytes
    stats = dict(count=len(samples), successes=len(samples), failed_to_download=0, failed_to_resize=0,
                 duration=0, start_time=0, end_time=0, status_dict={"success": len(samples)})
    with atomic(stats_path) as tmp, open(tmp, "w") as f:
        json.dump(stats, f, indent=4)
    # img2dataset's parquet schema: the input columns (url, caption), then the download's meta
    schema = pa.schema([(name, pa.string()) for name in ("url", "caption", "key", "status", "error_message")]
                       + [(name, pa.int32()) for name in ("width", "height", "original_width", "original_height")]
                       + [("exif", pa.string()), ("sha256", pa.string())])
    table = pa.Table.from_pylist([s["meta"] for s in samples], schema=schema)
    with atomic(parquet_path) as tmp:
        pq.write_table(table, tmp)
    with atomic(tar_path) as tmp, open(tmp, "wb") as f:
        # encoder=False: every member is already bytes; TarWriter writes them sorted: .json, .png, .txt
        with TarWriter(f, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False) as tw:
            for s in samples:
                tw.write({"__key__": s["meta"]["key"], "png": s["png"], "txt": s["meta"]["caption"].encode(),
                          "json": json.dumps(s["meta"], indent=4).encode()})     # indent 4, as img2dataset
        f.flush()
        os.fsync(f.fileno())


def write_sa1b_shard(out: str, shard: int, samples: list[dict]) -> None:
    """One SA-1B tar: sa_{n}.jpg, sa_{n}.json per image, in image order, with fixed headers."""
    import tarfile
    (tar_path,) = shard_paths(out, "sa1b", shard)
    with atomic(tar_path) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                for name, data in ((s["name"], s["jpg"]), (s["name"][:-4] + ".json", json.dumps(s["json"]).encode())):
                    ti = tarfile.TarInfo(name)     # a bare name, no "./": the member is sa_{n}.jpg itself
                    ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, TAR_MODE
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = TAR_OWNER
                    tar.addfile(ti, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())


def write_ocr_stand_in(work: str, coco_path: str, objects_as_text: bool = False) -> dict:
    """An ocr/ folder of <work> as 02_extract_ocr.py writes it, from the world's own words instead of an OCR
    engine: for tests and benchmarks of the stages after 02 (02 has its own; RapidOCR is the slow part). Lines:
    the COCO text boxes with their word; token ids: the word's letters (300 + ord, unique, at most M = 10).
    objects_as_text: without drawn words (no font), each image's first object stands in as a line."""
    import image_io
    import losses
    import stage_folders
    table = image_io.read_image_table(work)
    with open(coco_path) as f:
        coco = json.load(f)
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    words = {}
    for a in coco["annotations"]:
        if "text" in a or (objects_as_text and a["image_id"] not in words):
            words.setdefault(a["image_id"], []).append({**a, "text": a.get("text", f"w{a['category_id']}")})
    per_image = []
    for i in range(len(table)):
        name = table.name(i)
        lines = []
        for a in words.get(by_name.get(name, by_name.get(os.path.basename(name), -1)), []):
            x, y, w, h = a["bbox"]
            ids = list(dict.fromkeys(300 + ord(c) for c in a["text"].lower()))[:losses.OCR_MAX_TOKENS]
            lines.append(([x, y, x + w, y + h], a["text"], 1.0, ids))
        per_image.append(lines)
    return stage_folders.write_ocr(work, per_image, {
        "tokenizer": {"vocab_size": losses.CLIP_BPE_VOCAB, "max_tokens": losses.OCR_MAX_TOKENS},
        "note": "the world's own words (00_make_demo_data.write_ocr_stand_in)"})


def parse_args(argv):
    import workdir
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--num-images", type=int, default=NUM_IMAGES)
    ap.add_argument("--size", type=int, default=SIZE, help="image side in px (at least 128)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--workers", type=int, default=WORKERS, help="processes (the output does not depend on it)")
    ap.add_argument("--vocab-size", type=int, default=len(VOCAB),
                    help="words drawn from the first N of the vocabulary (fewer words: more examples of each)")
    ap.add_argument("--mix", default=",".join(str(v) for v in MIX.values()), metavar="OBJECTS,TEXT,BOTH",
                    help="shares of images with objects only, words only, and both (default %(default)s)")
    ap.add_argument("--plain-words", action="store_true",
                    help=f"every word lower case, regular face, {PLAIN_FONT_SIZE} px at 224")
    ap.add_argument("--text-box", default="plate", choices=TEXT_BOXES,
                    help="a word's box: its plate (the extent a PP-OCR detector reports) or its ink plus 2 px")
    # checked below rather than by argparse's choices, so that the refusal names the flag in its SystemExit
    ap.add_argument("--format", default="files", metavar="|".join(FORMATS),
                    help="loose PNGs (files), img2dataset shards (webdataset) or SA-1B tars (sa1b); default files")
    ap.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                    help="samples per tar in the shard formats (default %(default)s)")
    args = ap.parse_args(argv)
    if args.format not in FORMATS:
        raise SystemExit(f"error: --format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.shard_size < 1:
        raise SystemExit(f"error: --shard-size must be at least 1, got {args.shard_size}")
    if args.num_images < 1 or args.workers < 1:
        raise SystemExit(f"error: --num-images and --workers must be at least 1, got {args.num_images} and "
                         f"{args.workers}")
    try:
        shares = [float(v) for v in args.mix.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise SystemExit(f"error: --mix takes three shares OBJECTS,TEXT,BOTH that sum to 1, got {args.mix!r}")
    args.mix = dict(zip(MIX, shares))
    if not 128 <= args.size <= 4096:
        raise SystemExit("error: --size must be in [128, 4096] (the largest words need 128 px; a demo image needs "
                         "no more than 4096)")
    if args.seed < 0:
        raise SystemExit(f"error: --seed must be >= 0, got {args.seed}")
    if args.mix["text"] or args.mix["both"]:    # an objects-only world (--mix 1,0,0) draws no word
        check_fonts()
    if not 1 <= args.vocab_size <= len(VOCAB):
        raise SystemExit(f"error: --vocab-size must be in [1, {len(VOCAB)}]")
    return args


def world_config(args) -> dict:
    """What the world's bytes depend on (its manifest's config): a folder holding another world is refused."""
    config = dict(num_images=args.num_images, size=args.size, seed=args.seed, mix=args.mix, text_box=args.text_box,
                  version=VERSION)
    if args.vocab_size != len(VOCAB):
        config["vocab_size"] = args.vocab_size
    if args.plain_words:
        config["plain_words"] = True
    if args.format != "files":                       # files: the config as before, so existing worlds stay valid
        config.update(format=args.format, shard_size=args.shard_size)
    return config


def main(argv=None):
    args = parse_args(argv)
    config, fmt, shard_size = world_config(args), args.format, args.shard_size
    m = read_manifest(args.out)
    if m and m.get("config") != config:
        raise SystemExit(f"error: {args.out} holds a demo world with another config ({m.get('config')}); "
                         "use another --out or delete it")
    if m and m.get("complete"):
        print(f"{args.out}: demo world already complete ({m['counts']['images']} images), nothing to do")
        return
    shard_dir = {"files": "images", "webdataset": "shards", "sa1b": "sa1b"}[fmt]
    for sub in (shard_dir, "masks"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    n_shards = -(-args.num_images // shard_size)
    # shards whose files are all there are complete (the tar, renamed into place last, is the mark): kept
    done = frozenset() if fmt == "files" else frozenset(
        s for s in range(n_shards) if all(os.path.exists(p) for p in shard_paths(args.out, fmt, s)))
    # an incomplete manifest first: a later run with another config cannot mix its images with these
    write_json(os.path.join(args.out, "manifest.json"), dict(stage="demo_data", config=config, complete=False))
    categories = [dict(id=i + 1, name=f"{c}_{s}_{t}", supercategory="object", shape=s, colour=c, texture=t)
                  for i, (s, c, t) in enumerate(CLASSES)]
    categories.append(dict(id=TEXT_CATEGORY, name="text", supercategory="text"))
    images, annotations, gt_images, kinds = draw_world(args, categories, done)
    counts = write_annotations(args, categories, images, annotations, gt_images, kinds)
    if fmt != "files":
        counts["shards"] = n_shards
    # written last and without a timestamp: its presence marks the world complete, and reruns stay identical
    write_json(os.path.join(args.out, "manifest.json"), dict(stage="demo_data", config=config, complete=True,
                                                             counts=counts))
    print(f"{args.out}: {counts['images']} images, {counts['objects']} objects in {len(CLASSES)} classes, "
          f"{counts['text_boxes']} words; kinds {counts['image_kinds']}"
          + ("" if fmt == "files" else f"; {n_shards} {fmt} shards of {shard_size} in {shard_dir}/"))


def draw_world(args, categories, done):
    """Every image drawn (render, in worker processes), its annotations and ground truth recorded, and the
    shards cut and written here in image order. Each image has its own seed, so workers change nothing but the
    speed; imap keeps the order. Returns (COCO images, COCO annotations, ground-truth images, kind counts)."""
    from tqdm import tqdm
    fmt, shard_size = args.format, args.shard_size
    images, annotations, gt_images, kinds = [], [], [], Counter()
    job = functools.partial(render, out=args.out, seed=args.seed, size=args.size, vocab_size=args.vocab_size,
                            mix=args.mix, plain=args.plain_words, text_box=args.text_box, fmt=fmt,
                            shard_size=shard_size, done=done)
    write_shard = {"webdataset": write_webdataset_shard, "sa1b": write_sa1b_shard}.get(fmt)
    pending = []                                     # the current shard's samples, written when it is full
    with multiprocessing.Pool(args.workers) if args.workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(job, range(args.num_images), 16) if pool else map(job, range(args.num_images))
        for i, (anns, drawn) in enumerate(tqdm(results, total=args.num_images, desc="demo world", unit="img")):
            name = member_name(fmt, i, shard_size)
            images.append(dict(id=i, file_name=name, width=args.size, height=args.size))
            first_id = len(annotations) + 1          # COCO id of the image's mask id 1
            gt = record_image(i, name, anns, categories, annotations)
            gt_images.append(gt)
            kinds["both" if gt["objects"] and gt["texts"] else "objects" if gt["objects"] else "text"] += 1
            if drawn is None:                        # files, or a shard that is already complete
                continue
            pending.append(shard_sample(i, name, anns, drawn, first_id, args))
            if (i + 1) % shard_size == 0 or i + 1 == args.num_images:
                write_shard(args.out, i // shard_size, pending)
                pending = []
    return images, annotations, gt_images, kinds


def record_image(i, name, anns, categories, annotations) -> dict:
    """Image i's COCO annotations (appended to `annotations`) and its ground-truth entry."""
    gt = dict(id=i, file_name=name, objects=[], texts=[])
    for a in anns:
        ann = dict(id=len(annotations) + 1, image_id=i, category_id=a["category_id"], bbox=a["bbox"],
                   area=a["area"], iscrowd=0)
        annotations.append(ann if "text" not in a else {**ann, "text": a["text"]})
        if a["category_id"] == TEXT_CATEGORY:
            gt["texts"].append(dict(bbox=a["bbox"], text=a["text"], word=a["word"]))
        else:
            c = categories[a["category_id"] - 1]
            gt["objects"].append(dict(bbox=a["bbox"], category_id=c["id"], name=c["name"],
                                      shape=c["shape"], colour=c["colour"], texture=c["texture"]))
    return gt


def shard_sample(i, name, anns, drawn, first_id, args) -> dict:
    """Image i as a sample of its shard: img2dataset's png + json (webdataset), or SA-1B's jpg + json with
    the objects' masks as COCO RLE (sa1b)."""
    if args.format == "webdataset":
        S = args.size
        return dict(png=drawn["png"], meta=dict(
            url=URL.format(i), caption=caption(anns), key=sample_key(i, args.shard_size), status="success",
            error_message=None, width=S, height=S, original_width=S, original_height=S, exif=None,
            sha256=hashlib.sha256(drawn["png"]).hexdigest()))
    n, S = i + 1, args.size
    return dict(name=name, jpg=drawn["jpg"], json=dict(
        image=dict(image_id=n, width=S, height=S, file_name=name),
        annotations=[dict(id=first_id + o["k"] - 1, segmentation=dict(size=[S, S], counts=o["counts"]),
                          bbox=anns[o["k"] - 1]["bbox"], area=anns[o["k"] - 1]["area"], predicted_iou=1.0,
                          stability_score=1.0, point_coords=[o["point"]], crop_box=[0, 0, S, S])
                     for o in drawn["objects"]]))


def write_annotations(args, categories, images, annotations, gt_images, kinds) -> dict:
    """coco.json and ground_truth.json; returns the world's counts."""
    write_json(os.path.join(args.out, "coco.json"),
               dict(images=images, annotations=annotations, categories=categories))
    classes = [{k: c[k] for k in ("id", "name", "shape", "colour", "texture")} for c in categories[:-1]]
    write_json(os.path.join(args.out, "ground_truth.json"),
               dict(classes=classes, vocabulary=VOCAB[: args.vocab_size], images=gt_images))
    per_class = Counter(a["category_id"] for a in annotations)
    return dict(images=len(images), objects=sum(len(g["objects"]) for g in gt_images),
                text_boxes=sum(len(g["texts"]) for g in gt_images), image_kinds=dict(sorted(kinds.items())),
                classes=len(CLASSES), per_class={c["name"]: per_class[c["id"]] for c in categories[:-1]})


if __name__ == "__main__":
    sys.exit(main())
