"""02_extract_ocr.py: real RapidOCR on rendered words, every input accounted for, token labels, CSR layout,
byte-identical output after an interruption and with two torchrun processes. CPU only, about a minute."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import ROOT, load_script

import workdir  # noqa: E402
import chunk_engine  # noqa: E402
import image_io  # noqa: E402

SCRIPT = os.path.join(ROOT, "02_extract_ocr.py")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
ocr = load_script("extract_ocr", "02_extract_ocr.py")

# small chunks so that 11 files make 4 chunks; --max-side below region.png's width exercises the rescaling
RUN = ["--max-side", "480", "--chunk-size", "3", "--engine", "rapidocr", "--workers", "0"]
BAD = ["corrupt.jpg", "notes.txt", "truncated.png"]


def draw_word(size, word, at, font_size, mode="RGB"):
    """(image, drawn box x0 y0 x1 y1): dark text on white (or on transparent for RGBA)."""
    bg, fg = {"RGB": ("white", "black"), "L": (255, 0), "RGBA": ((0, 0, 0, 0), (0, 0, 0, 255))}[mode]
    im = Image.new(mode, size, bg)
    d = ImageDraw.Draw(im)
    font = ImageFont.truetype(FONT, font_size)
    d.text(at, word, fill=fg, font=font)
    return im, d.textbbox(at, word, font=font)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The input folder and {relative path: (word, drawn box in upright pixels)}."""
    root = tmp_path_factory.mktemp("ocr_images")
    os.makedirs(root / "sub")
    expected = {}
    # near-square sizes: RapidOCR's detector upscales the short side to 736 px, so wide images cost more
    for name, size, word, at, fs, mode in [
            ("hello.png", (240, 180), "HELLO", (20, 60), 40, "RGB"),
            ("world.jpg", (220, 200), "world", (40, 70), 36, "RGB"),
            ("sub/kit.png", (260, 220), "KIT", (80, 80), 48, "RGB"),
            ("region.png", (600, 480), "region", (150, 200), 64, "RGB"),    # > --max-side 480: downscaled
            ("gray.png", (240, 180), "photo", (40, 60), 40, "L"),
            ("rgba.png", (240, 200), "vision", (40, 70), 40, "RGBA")]:
        im, box = draw_word(size, word, at, fs, mode)
        im.save(root / name, quality=95) if name.endswith(".jpg") else im.save(root / name)
        expected[name] = (word, box)
    # EXIF orientation 6 (display = stored rotated 90 degrees clockwise): boxes must be in the upright frame
    im, box = draw_word((240, 180), "river", (50, 60), 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.transpose(Image.Transpose.ROTATE_90).save(root / "exif.jpg", quality=95, exif=exif)
    expected["exif.jpg"] = ("river", box)
    Image.new("RGB", (160, 160), "white").save(root / "blank.png")
    expected["blank.png"] = (None, None)
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "notes.txt").write_text("not an image\n")
    png = (root / "hello.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    return str(root), expected


@pytest.fixture(scope="module")
def baseline(images, tmp_path_factory):
    """One uninterrupted one-process run: (work dir, manifest)."""
    work = str(tmp_path_factory.mktemp("ocr_work") / "w")
    manifest = ocr.main(["--images", images[0], "--work", work] + RUN)
    return work, manifest


def read_all(work):
    out = {}
    for stage in ("images", "ocr"):
        folder = os.path.join(work, stage)
        for f in sorted(os.listdir(folder)):
            if f.endswith(".npy"):
                with open(os.path.join(folder, f), "rb") as fh:
                    out[f"{stage}/{f}"] = fh.read()
    return out


def lines_of(work, i):
    folder = os.path.join(work, "ocr")
    off = workdir.load(folder, "line_offsets")
    toff, tb = workdir.load(folder, "text_offsets"), workdir.load(folder, "text_bytes")
    rows = range(off[i], off[i + 1])
    return ([workdir.unpack_string(toff, tb, k) for k in rows], workdir.load(folder, "boxes")[off[i]: off[i + 1]],
            workdir.load(folder, "scores")[off[i]: off[i + 1]])


def overlap(found, drawn):
    """(IoU, share of the drawn box covered). Detected boxes are padded around the glyphs (unclip)."""
    ix = max(0.0, min(found[2], drawn[2]) - max(found[0], drawn[0]))
    iy = max(0.0, min(found[3], drawn[3]) - max(found[1], drawn[1]))
    inter, area = ix * iy, (drawn[2] - drawn[0]) * (drawn[3] - drawn[1])
    return inter / ((found[2] - found[0]) * (found[3] - found[1]) + area - inter), inter / area


def test_words_come_back_where_drawn(images, baseline):
    work, manifest = baseline
    table = image_io.read_image_table(work)
    status = workdir.load(os.path.join(work, "ocr"), "status")
    rel = {os.path.relpath(table.path(i), table.root): i for i in range(len(table))}
    for name, (word, drawn) in images[1].items():
        i = rel[name]
        texts, boxes, scores = lines_of(work, i)
        if word is None:
            assert ocr.OCR_STATUS[status[i]] == "no_text" and not texts
            continue
        assert ocr.OCR_STATUS[status[i]] == "ok", name
        hits = [k for k, t in enumerate(texts) if word.lower() in t.lower()]
        assert hits, f"{name}: {word!r} not in {texts}"
        iou, covered = max(overlap(boxes[k], drawn) for k in hits)
        assert iou > 0.25 and covered > 0.8, f"{name}: box {boxes[hits[0]]} vs drawn {drawn}: {iou:.2f} {covered:.2f}"
        assert (scores > 0.7).all()
        w, h = table.size[i]
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w).all()
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h).all()
    assert manifest["status_counts"] == {"ok": 7, "no_text": 1, "skipped": 3, "engine_error": 0, "read_error": 0,
                                         "too_thin": 0}


def test_every_input_accounted_for(images, baseline):
    work, _ = baseline
    table = image_io.read_image_table(work)
    files = sorted(os.path.relpath(os.path.join(d, f), images[0]) for d, _, fs in os.walk(images[0]) for f in fs)
    assert sorted(os.path.relpath(table.path(i), table.root) for i in range(len(table))) == files
    status = workdir.load(os.path.join(work, "ocr"), "status")
    assert status.dtype == np.uint8 and len(status) == len(files)
    for i in range(len(table)):
        name = os.path.relpath(table.path(i), table.root)
        skipped = ocr.OCR_STATUS[status[i]] == "skipped"
        assert skipped == (table.status[i] != image_io.OK) == (name in BAD), name


def test_tokens_and_csr(baseline):
    from open_clip.tokenizer import SimpleTokenizer
    work, manifest = baseline
    folder = os.path.join(work, "ocr")
    a = {n: workdir.load(folder, n, mmap=False) for n in ("line_offsets", "boxes", "scores", "text_offsets",
                                                         "text_bytes", "token_offsets", "tokens", "status")}
    n, lines = manifest["rows"]["images"], manifest["rows"]["lines"]
    assert a["line_offsets"].dtype == a["text_offsets"].dtype == a["token_offsets"].dtype == np.int64
    assert a["boxes"].dtype == a["scores"].dtype == np.float32 and a["tokens"].dtype == np.int32
    assert a["text_bytes"].dtype == np.uint8
    assert len(a["line_offsets"]) == n + 1 and a["line_offsets"][0] == 0 and a["line_offsets"][-1] == lines
    assert (np.diff(a["line_offsets"]) >= 0).all()
    assert a["boxes"].shape == (lines, 4) and a["scores"].shape == (lines,) and lines >= 7
    assert (a["boxes"][:, 2] >= a["boxes"][:, 0]).all() and (a["boxes"][:, 3] >= a["boxes"][:, 1]).all()
    for off, flat in (("text_offsets", "text_bytes"), ("token_offsets", "tokens")):
        assert len(a[off]) == lines + 1 and a[off][0] == 0 and a[off][-1] == len(a[flat])
        assert (np.diff(a[off]) >= 0).all()
    tok = SimpleTokenizer()
    for k in range(lines):
        text = workdir.unpack_string(a["text_offsets"], a["text_bytes"], k)
        assert text == text.strip() and text
        ids = a["tokens"][a["token_offsets"][k]: a["token_offsets"][k + 1]].tolist()
        assert ids == list(dict.fromkeys(tok.encode(text)))[:10] and len(ids) == len(set(ids)) <= 10
        assert all(0 <= t < 49408 for t in ids)
    assert manifest["tokenizer"]["vocab_size"] == 49408 and manifest["tokenizer"]["max_tokens"] == 10
    assert manifest["stage"] == "ocr" and manifest["complete"] and manifest["min_score"] == 0.7
    assert manifest["rows"]["tokens"] == len(a["tokens"]) and manifest["engine"]["name"] == "rapidocr"
    assert not os.path.exists(os.path.join(folder, "chunks"))
    # the layout stage_folders.write_ocr (the OCR stand-in of tests and benchmarks) writes is this one
    import stage_folders
    assert {f[:-4]: str(np.load(os.path.join(folder, f), mmap_mode="r").dtype) for f in os.listdir(folder)
            if f.endswith(".npy")} == {k: np.dtype(v).name for k, v in stage_folders.OCR_ARRAYS.items()}
    assert stage_folders.read_ocr(work)["lines"] == lines


def test_complete_stage_is_reused(images, baseline, capsys):
    work, manifest = baseline
    again = ocr.main(["--images", images[0], "--work", work] + RUN)
    assert again["finished"] == manifest["finished"]
    assert "is complete" in capsys.readouterr().out
    # the one rule of every stage: other settings that change the lines are refused naming them; settings
    # that change no byte are not; other images are refused by the image table
    with pytest.raises(SystemExit, match=r"^error: .*ocr holds OCR lines made with other settings \(--min-score "
                                         r"0.7 -> 0.5, --max-tokens 10 -> 4\): rerun with --force"):
        ocr.main(["--images", images[0], "--work", work] + RUN + ["--min-score", "0.5", "--max-tokens", "4"])
    assert ocr.main(["--work", work] + RUN[:-1] + ["1", "--chunk-size", "5", "--engine", "auto"]) == again
    other = os.path.join(os.path.dirname(work), "other_images")
    shutil.copytree(images[0], other)
    os.remove(os.path.join(other, "hello.png"))
    with pytest.raises(SystemExit, match=r"was built from other images .*the same --images"):
        ocr.main(["--images", other, "--work", work] + RUN)


def test_interrupted_run_resumes_byte_identical(images, baseline, tmp_path, monkeypatch, capsys):
    work = str(tmp_path / "w")
    real = chunk_engine.run_chunks

    def killed_after_two_chunks(folder, num_items, chunk_size, process, desc, key, **kw):
        if desc != "ocr":
            return real(folder, num_items, chunk_size, process, desc, key, **kw)
        calls = []

        def dies(start, end):
            if len(calls) == 2:
                raise KeyboardInterrupt     # as if the job were killed while working on its third chunk
            calls.append(start)
            return process(start, end)
        return real(folder, num_items, chunk_size, dies, desc, key)

    monkeypatch.setattr(chunk_engine, "run_chunks", killed_after_two_chunks)
    with pytest.raises(SystemExit, match="^interrupted"):      # Ctrl-C: one line (workdir.stage_main)
        ocr.main(["--images", images[0], "--work", work] + RUN)
    assert chunk_engine.done_chunks(os.path.join(work, "ocr")) == {0, 1}
    assert workdir.read_manifest(os.path.join(work, "ocr")) is None
    monkeypatch.setattr(chunk_engine, "run_chunks", real)
    capsys.readouterr()
    ocr.main(["--work", work] + RUN)        # --images is optional once the image table exists
    assert "ocr: 2 of 4 chunks already done" in capsys.readouterr().out
    assert read_all(work) == read_all(baseline[0])


def test_stale_chunks_are_discarded(tmp_path):
    folder = str(tmp_path)
    chunk = chunk_engine.chunk_path(folder, 0)
    chunk_engine.prepare_chunks(folder, {"min_score": 0.7})
    os.makedirs(os.path.dirname(chunk), exist_ok=True)
    np.savez(chunk, x=np.zeros(1))
    chunk_engine.prepare_chunks(folder, {"min_score": 0.7})     # same settings: kept
    assert os.path.exists(chunk)
    chunk_engine.prepare_chunks(folder, {"min_score": 0.5})     # other settings: discarded
    assert not os.path.exists(chunk)


def test_score_filter_scaling_and_engine_errors(images, tmp_path, monkeypatch):
    """A stub engine through the whole path: strict > min_score, empty text dropped, boxes scaled back from
    the downscaled engine input, an exception recorded as engine_error for that image only."""
    seen = []

    def fake_engine(args):
        def run(bgr):
            seen.append(bgr.shape)
            if bgr.shape[:2] == (167, 200):                 # rgba.png, downscaled: the engine fails on it
                raise RuntimeError("boom")
            h, w = bgr.shape[:2]
            quad = np.array([[1, 2], [w - 1, 2], [w - 1, h // 2], [1, h // 2]], np.float32)
            return [(quad, " Keep me ", 0.71), (quad, "at threshold", 0.7), (quad, "   ", 0.99),
                    (np.array([0, 0, w, h], np.float32), "box form", 0.9)]
        return run, {"name": "fake"}

    monkeypatch.setattr(ocr, "rapidocr_engine", fake_engine)
    work = str(tmp_path / "w")
    m = ocr.main(["--images", images[0], "--work", work, "--max-side", "200", "--chunk-size", "4"])
    assert m["status_counts"] == {"ok": 7, "no_text": 0, "skipped": 3, "engine_error": 1, "read_error": 0,
                                  "too_thin": 0}
    assert m["lines_found"] == 7 * 3 and m["rows"]["lines"] == 7 * 2 and m["lines_dropped_score"] == 7
    assert all(max(s[:2]) <= 200 for s in seen)
    table = image_io.read_image_table(work)
    for i in range(len(table)):
        texts, boxes, scores = lines_of(work, i)
        if not texts:
            continue
        assert texts == ["Keep me", "box form"] and scores.tolist() == pytest.approx([0.71, 0.9])
        w, h = (int(v) for v in table.size[i])
        s = min(1.0, 200 / max(w, h))
        ws, hs = max(1, round(w * s)), max(1, round(h * s))                      # what the engine saw
        assert boxes[1].tolist() == pytest.approx([0, 0, w, h], abs=1e-3)       # full image, original pixels
        assert boxes[0].tolist() == pytest.approx([w / ws, 2 * h / hs, (ws - 1) * w / ws, (hs // 2) * h / hs],
                                                  abs=1e-3)


def test_paddle_engine_call_and_mapping(monkeypatch):
    """paddleocr is not installed here: a stand-in with the 3.x API checks the call and that its results map to
    the same (box, text, score) lines as RapidOCR's (real PaddleOCR is untested in this environment)."""
    import importlib.machinery
    import importlib.metadata
    import types
    made = {}

    class PaddleOCR:
        def __init__(self, **kw):
            made.update(kw)

        def predict(self, bgr):
            made["input"] = bgr
            return [{"rec_polys": [np.array([[10, 20], [60, 20], [60, 40], [10, 40]], np.int16)],
                     "rec_texts": [" Paddle "], "rec_scores": [0.93]}]

    paddleocr = types.ModuleType("paddleocr")
    paddleocr.PaddleOCR = PaddleOCR
    paddleocr.__spec__ = importlib.machinery.ModuleSpec("paddleocr", None)
    paddle = types.ModuleType("paddle")
    paddle.__version__ = "stand-in"
    paddle.device = types.SimpleNamespace(is_compiled_with_cuda=lambda: False)
    monkeypatch.setitem(sys.modules, "paddleocr", paddleocr)
    monkeypatch.setitem(sys.modules, "paddle", paddle)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "stand-in")
    args = ocr.parse_args(["--det-model-dir", ROOT, "--rec-model-dir", ROOT, "--lang", "en"])
    assert args.engine == "paddle"                          # auto: paddleocr is importable
    engine, info = ocr.paddle_engine(args)
    assert made == {"lang": "en", "text_detection_model_dir": ROOT, "text_recognition_model_dir": ROOT,
                    "use_doc_orientation_classify": False, "use_doc_unwarping": False,
                    "use_textline_orientation": False, "device": "cpu"}
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    lines = ocr.read_lines(engine, image, 100)             # downscaled 2x for the engine
    assert made["input"].shape == (50, 100, 3) and made["input"][0, 0].tolist() == [0, 0, 255]      # BGR
    assert lines == [([20.0, 40.0, 120.0, 80.0], "Paddle", pytest.approx(0.93))]
    assert info["name"] == "paddleocr" and info["device"] == "cpu"


def test_two_processes_byte_identical(images, baseline, tmp_path):
    work = str(tmp_path / "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           "--images", images[0], "--work", work] + RUN
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ocr: images by status" in r.stdout
    assert read_all(work) == read_all(baseline[0])


def test_loader_workers_byte_identical(images, baseline, tmp_path):
    # decoding and resizing in two DataLoader worker processes ahead of the engine: the same bytes as the
    # baseline's in-process loop (--workers 0)
    assert baseline[1]["config"]["workers"] == 0
    work = str(tmp_path / "w")
    ocr.main(["--images", images[0], "--work", work, *RUN[:-2], "--workers", "2"])
    assert read_all(work) == read_all(baseline[0])


def test_thin_banners_get_a_status_not_the_engine(tmp_path):
    # a 2000 x 2 PNG would make RapidOCR's detector take a 735,000 x 736 input (its short side scaled up to
    # 736): more than 20 GB. Such images get too_thin before they are decoded; the run completes, and an
    # ordinary image beside them is read as before
    root = tmp_path / "imgs"
    root.mkdir()
    for w, h in ((2000, 2), (20000, 20), (2, 4000)):
        Image.new("RGB", (w, h), "white").save(root / f"banner_{w}x{h}.png")
    draw_word((240, 160), "hello", (20, 60), 40)[0].save(root / "word.png")
    m = ocr.main(["--images", str(root), "--work", str(tmp_path / "w"), "--engine", "rapidocr", "--workers", "0"])
    assert m["status_counts"]["too_thin"] == 3 and m["status_counts"]["ok"] == 1
    assert ocr.det_input_pixels(2000, 2, m["engine"]["resize"]) > 5e8
    assert ocr.det_input_pixels(640, 480, m["engine"]["resize"]) < ocr.MAX_ENGINE_PIXELS


def test_names_that_are_not_utf8_and_list_files_in_latin1_or_with_a_bom(tmp_path):
    # a file name in Latin-1 (bytes that are not UTF-8) is a row like any other and is read; a list file in
    # Latin-1, or in UTF-8 with a byte-order mark, names the same files
    root = tmp_path / "imgs"
    root.mkdir()
    draw_word((240, 160), "hello", (20, 60), 40)[0].save(root / "plain.png")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:
        f.write((root / "plain.png").read_bytes())
    m = ocr.main(["--images", str(root), "--work", str(tmp_path / "w"), "--engine", "rapidocr", "--workers", "0"])
    assert m["status_counts"]["ok"] == 2
    table = image_io.read_image_table(str(tmp_path / "w"))
    names = sorted(os.fsencode(table.name(i)) for i in range(len(table)))
    assert names == [b"caf\xe9.png", b"plain.png"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(os.fsencode(root) + b"/caf\xe9.png\n" + os.fsencode(root) + b"/plain.png\n")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + os.fsencode(root) + b"/plain.png\n")
    for listing, ok in ((latin1, 2), (bom, 1)):
        m = ocr.main(["--images", str(listing), "--work", str(tmp_path / listing.stem), "--engine", "rapidocr",
                      "--workers", "0"])
        assert m["status_counts"]["ok"] == ok, (listing, m["status_counts"])
