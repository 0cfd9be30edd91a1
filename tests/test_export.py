"""06_export_hf.py: a tiny kit checkpoint exported and loaded back with transformers alone (MLCDVisionModel and
CLIPImageProcessor, as LLaVA-NeXT's MLCD tower loads them), outputs equal to the kit's, the processor's pixels
equal to the kit's own preprocessing, the export size in the config, and refusal to write into an unrelated
folder."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import load_script

import model as model_py  # noqa: E402
import workdir  # noqa: E402
import image_io  # noqa: E402

ex = load_script("export_hf", "06_export_hf.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    enc = model_py.VisionEncoder(model_py.preset("tiny", embed_dim=16))    # with a loss head: not exported
    path = d / "tiny.pt"
    torch.save({**model_py.encoder_checkpoint(enc), "step": 7, "optimizer": {}}, path)   # as 04 saves, plus extras
    return path, enc.eval()


def photo(w=150, h=97, seed=0):
    """A non-square image with smooth shading, hard-edged shapes and a word: what photos and the demo world have."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([110 + 100 * np.sin(xx / 23), 90 + 80 * np.cos(yy / 17), 60 + 0.8 * (xx + yy)], -1)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        d.rectangle([x0, y0, x0 + 25, y0 + 20], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    d.text((10, h // 2), "export", fill=(255, 255, 255))
    return img


def test_export_loads_in_transformers_and_matches(checkpoint, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessor, MLCDVisionModel, pipeline
    path, enc = checkpoint
    out = tmp_path / "export"
    res = ex.main(["--checkpoint", str(path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert "head (linear 64 -> 16)" in printed and res["head_dropped"]   # embed_dim 16: said, not exported
    assert res["max_abs_diff_last_hidden_state"] <= 1e-4 and res["max_abs_diff_pooler_output"] <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mlcd" and cfg["image_size"] == 64 and cfg["patch_size"] == 8

    # the folder alone, as LLaVA-NeXT's MLCD tower loads it, and through the Auto classes and pipeline()
    hf = MLCDVisionModel.from_pretrained(str(out)).eval()
    processor = CLIPImageProcessor.from_pretrained(str(out))
    assert type(AutoModel.from_pretrained(str(out))) is MLCDVisionModel and res["auto_class"] == "MLCDVisionModel"
    assert isinstance(AutoImageProcessor.from_pretrained(str(out)), type(processor))
    img = photo()
    feats = pipeline("image-feature-extraction", model=str(out))(img, return_tensors=True)
    with torch.no_grad():
        direct = hf(**processor(img, return_tensors="pt")).last_hidden_state
    assert feats.shape == direct.shape and (feats - direct).abs().max() <= 1e-5
    assert processor.crop_size == {"height": 64, "width": 64} and processor.size == {"shortest_edge": 64}
    for h, w in [(64, 64), (48, 80)]:                 # non-square too: 2-D RoPE, no position embedding
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            ours, theirs = enc(x), hf(pixel_values=x)
            pooled = enc.ln_post(ours.last_hidden_state[:, 0])
        assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max() <= 1e-4
        assert (pooled - theirs.pooler_output).abs().max() <= 1e-4

    # the processor gives the kit's own input: image_io.resize_crop(center) + image_io.normalize. The geometry is
    # identical (short side to S, long side floored, centre crop); only the bicubic kernels differ: PIL's
    # (a = -0.5) in the kit, torchvision's antialiased one (a = -0.75) in transformers' CLIPImageProcessor.
    # Measured here: at most 1 uint8 level on about 0.1% of the values; on photos (skimage's astronaut,
    # chelsea, coffee crops) at most 4 levels, mean < 4e-4; on white noise, downscaled, up to ~20 levels.
    for img in (photo(), photo(97, 150, 1)):
        pv = processor(img, return_tensors="pt")["pixel_values"]
        pixels, _, _ = image_io.resize_crop(img, 64, crop="center")
        ref = image_io.normalize(torch.from_numpy(pixels.copy())[None])
        assert pv.shape == ref.shape == (1, 3, 64, 64)
        diff = (pv - ref).abs()
        one_level = 1 / 255 / min(image_io.IMAGE_STD)                      # 0.0150 in normalised units
        assert diff.max() <= 2 * one_level + 1e-6, diff.max()
        assert diff.mean() <= 1e-3 and (diff > 1e-6).float().mean() <= 0.01


def test_export_size_and_reexport(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "export"
    ex.main(["--checkpoint", str(path), "--out", str(out), "--image-size", "48"])
    cfg = json.loads((out / "config.json").read_text())
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert cfg["image_size"] == 48
    assert pre["size"] == {"shortest_edge": 48} and pre["crop_size"] == {"height": 48, "width": 48}
    assert pre["resample"] == 3 and pre["do_center_crop"] and pre["do_convert_rgb"]
    assert pre["image_mean"] == list(image_io.IMAGE_MEAN) and pre["image_std"] == list(image_io.IMAGE_STD)
    assert pre["rescale_factor"] == pytest.approx(1 / 255) and pre["image_processor_type"] == "CLIPImageProcessor"
    # a previous export is overwritten without --force
    res = ex.main(["--checkpoint", str(path), "--out", str(out)])
    assert res["image_size"] == 64 and json.loads((out / "config.json").read_text())["image_size"] == 64
    with pytest.raises(SystemExit, match="multiple of the patch size"):
        ex.main(["--checkpoint", str(path), "--out", str(out), "--image-size", "50"])


def test_clip_export_is_a_clip_vision_model(tmp_path):
    # arch "clip" (the MLCD paper's CLIP ViTs): a CLIPVisionModel folder with its CLIPImageProcessor, at the
    # checkpoint's size and at another (the position table resampled: a native CLIP model at that size), and an
    # HF CLIPModel folder as --checkpoint (its vision tower)
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel
    torch.manual_seed(1)
    enc = model_py.VisionEncoder(model_py.preset("clip-tiny", embed_dim=16)).eval()   # CLIP's projection: dropped
    path = tmp_path / "clip.pt"
    torch.save(model_py.encoder_checkpoint(enc), path)
    for size in (64, 96):
        out = tmp_path / f"export{size}"
        res = ex.main(["--checkpoint", str(path), "--out", str(out), "--image-size", str(size)])
        assert res["hf_class"] == "CLIPVisionModel" and res["head_dropped"]
        assert res["max_abs_diff_last_hidden_state"] <= 1e-4 and res["max_abs_diff_pooler_output"] <= 1e-4
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "clip_vision_model" and cfg["image_size"] == size
        assert cfg["hidden_act"] == "quick_gelu"
        hf = CLIPVisionModel.from_pretrained(str(out)).eval()
        assert CLIPImageProcessor.from_pretrained(str(out)).crop_size == {"height": size, "width": size}
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ours, theirs = enc(x), hf(pixel_values=x)     # the kit resamples on the fly; the export is native
        assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max() <= 1e-4
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=32)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).save_pretrained(tmp_path / "clip")
    res = ex.main(["--checkpoint", str(tmp_path / "clip"), "--out", str(tmp_path / "from_clip_model")])
    assert res["hf_class"] == res["auto_class"] == "CLIPVisionModel" and res["max_abs_diff_last_hidden_state"] <= 1e-4


def test_refuses_unrelated_folder_and_bad_checkpoint(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        ex.main(["--checkpoint", str(path), "--out", str(out)])
    assert os.listdir(out) == ["notes.txt"]
    res = ex.main(["--checkpoint", str(path), "--out", str(out), "--force"])
    assert (out / "notes.txt").read_text() == "mine" and res["other_files"] == ["notes.txt"]
    with pytest.raises(SystemExit, match="no such file"):
        ex.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e1")])
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit, match="not a kit checkpoint"):
        ex.main(["--checkpoint", str(bad), "--out", str(tmp_path / "e2")])


def test_folder_flags_that_name_a_file_are_one_line(checkpoint, tmp_path):
    path, _ = checkpoint
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="--out .*is a file, not a folder"):
        ex.main(["--checkpoint", str(path), "--out", str(f)])
    for script, flags in (("01_mine_regions.py", ["--work", str(f)]), ("03_cluster.py", ["--work", str(f)]),
                          ("04_train.py", ["--work", str(f)])):
        with pytest.raises(SystemExit, match="--work .*is a file, not a folder"):
            load_script(script[:-3], script).main(flags)


def test_broken_checkpoints_are_one_line(checkpoint, tmp_path):
    # zero bytes, cut off by a kill, random bytes, a plain tensor, a broken safetensors file: 06 (and
    # load_encoder under 04 --init-from and 05) name the file and what to do, no traceback
    path, _ = checkpoint
    data = path.read_bytes()
    bad = {"empty.pt": b"", "cut.pt": data[: len(data) // 2], "noise.pt": np.random.default_rng(0).bytes(4096)}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit, match=f"{name} is not a readable torch checkpoint.*rerun the stage"):
            ex.main(["--checkpoint", str(tmp_path / name), "--out", str(tmp_path / ("e_" + name))])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(SystemExit, match="not a kit checkpoint"):
        ex.main(["--checkpoint", str(tmp_path / "tensor.pt"), "--out", str(tmp_path / "e_tensor")])
    hf = tmp_path / "hf"
    model_py.save_hf(model_py.load_encoder(str(path)), str(hf))
    st = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(st[: len(st) // 3])
    with pytest.raises(SystemExit, match="not a readable safetensors file"):
        ex.main(["--checkpoint", str(hf), "--out", str(tmp_path / "e_hf")])
    ev = load_script("eval_broken", "05_eval.py")
    with pytest.raises(SystemExit, match="cut.pt is not a readable torch checkpoint"):
        ev.checkpoint_config(str(tmp_path / "cut.pt"))


def test_export_and_stage_files_keep_the_umask(checkpoint, tmp_path):
    """Atomic writes (a temporary file, then os.replace) keep the permissions the umask gives: a colleague reads
    the export as its neighbours (safetensors alone creates 0600)."""
    path, _ = checkpoint
    old = os.umask(0o022)
    try:
        ex.main(["--checkpoint", str(path), "--out", str(tmp_path / "export")])
        workdir.write_npy(str(tmp_path / "a.npy"), np.zeros(3, np.float32))
    finally:
        os.umask(old)
    for f in ("export/model.safetensors", "export/config.json", "export/preprocessor_config.json", "a.npy"):
        assert oct(os.stat(tmp_path / f).st_mode & 0o777) == oct(0o644), f
