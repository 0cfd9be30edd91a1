r"""Stage 06: export a trained encoder as a Hugging Face folder with its `CLIPImageProcessor`: an `MLCDVisionModel`
(the RoPE ViT, arch "mlcd") or a `CLIPVisionModel` (the CLIP ViT, arch "clip"), the layouts of the released
RICE / MLCD-bigG and MLCD-L/14-336 / B/32 folders.

    python 06_export_hf.py --checkpoint runs/demo/train/ckpt/latest.pt --out runs/demo/export
    python 06_export_hf.py --checkpoint runs/big/train336/ckpt/latest.pt --out exports/rice-l14-336 --image-size 336

The folder then stands alone: with transformers >= 4.52.1 (the first release with MLCDVisionModel; 4.51.3 has
none) and nothing of this kit,
    from transformers import AutoImageProcessor, AutoModel           # or MLCDVisionModel / CLIPVisionModel
    model = AutoModel.from_pretrained("runs/demo/export")
    processor = AutoImageProcessor.from_pretrained("runs/demo/export")
or pipeline("image-feature-extraction", model="runs/demo/export"). LLaVA-NeXT: docs/architectures.md.

Reads a kit checkpoint (.pt with `encoder` and `encoder_config`: 04's training checkpoints, or files written with
model.encoder_checkpoint) or a Hugging Face folder that model.load_encoder reads. Writes --out:
    model.safetensors         the weights under the released checkpoints' key names (`vision_model.` prefix)
    config.json               MLCDVisionConfig (model_type mlcd, as the released folders) or CLIPVisionConfig
                              (model_type clip_vision_model); image_size = --image-size
    preprocessor_config.json  CLIPImageProcessor: resize the short side to S (bicubic), centre-crop S x S,
                              rescale 1/255, normalise with CLIP's mean and std, convert to RGB: the settings
                              of image_io.resize_crop(crop="center") + image_io.normalize, the kit's own input
Each file is written atomically. --out must be empty, missing or a previous export (re-exporting over it is
fine); anything else is refused unless --force, which writes the three files and leaves other files alone.
--image-size S defaults to the checkpoint's image_size; any multiple of the patch size works (2-D RoPE; a
CLIP position table is resampled to S / patch per side, model.VisionEncoder.set_image_size, so the export runs
natively at S).

Not exported: the optional head (`embed_dim` > 0: a linear layer after ln_post that the losses use, CLIP's
projection in the clip presets; the released MLCD / RICE folders have none), said in the output when the
checkpoint has one. The RICE region path has no weights of its own (it reuses the last blocks), so nothing of
it is lost; the HF model simply runs the global path.

Verification, in the same run: the folder is loaded back with MLCDVisionModel / CLIPVisionModel.from_pretrained,
with AutoModel.from_pretrained (which must pick the same class), and with CLIPImageProcessor and
AutoImageProcessor.from_pretrained; a random input goes through the kit encoder and both loaded models, and the
max abs difference of last_hidden_state and pooler_output must be <= 1e-4 (fp32, CPU; a larger one is an error).
The processor's pixel_values on a non-square test image are compared with resize_crop + normalize and the
difference is reported: PIL's bicubic (the kit) and torchvision's antialiased bicubic (transformers' fast
CLIPImageProcessor) differ by about one uint8 level on most pixels that differ at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as kit  # noqa: E402
import workdir  # noqa: E402
import image_io  # noqa: E402

# defaults -------------------------------------------------------------------------------------------------
OUT = "runs/demo/export"
TOLERANCE = 1e-4            # max abs difference allowed between the kit encoder and the exported model (fp32)
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
HF_CLASS = {"mlcd": "MLCDVisionModel", "clip": "CLIPVisionModel"}      # the class that loads each arch's export
SEED = 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="kit checkpoint (.pt) or a Hugging Face MLCD / CLIP folder")
    p.add_argument("--out", default=OUT)
    p.add_argument("--image-size", type=int, help="input size S of the processor and config (default: the "
                                                  "checkpoint's image_size)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that is not an export")
    args = p.parse_args(argv)
    workdir.check_flags(args, {"image_size": "[1, 4096]"})
    return args


def preprocessor_config(size: int) -> dict:
    """CLIPImageProcessor settings equal to image_io.resize_crop(crop="center") + image_io.normalize."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,          # 3 = PIL bicubic
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(image_io.IMAGE_MEAN), "image_std": list(image_io.IMAGE_STD),
        "do_convert_rgb": True,
    }


def is_previous_export(folder: str) -> bool:
    """Only this script's files (or their tmp leftovers from a killed run), and an MLCD or CLIP config."""
    names = [f for f in os.listdir(folder) if not f.endswith(".tmp") and ".tmp." not in f]
    if not set(names) <= set(EXPORT_FILES) or "config.json" not in names:
        return False
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type") in ("mlcd", "mlcd_vision_model", "clip_vision_model")
    except (OSError, ValueError):
        return False


def test_image(seed: int = SEED):
    """A non-square RGB image with smooth shading and sharp edges, for the preprocessing comparison."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    w, h = 157, 101
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (xx + yy) / 2 + 60], -1)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        d.ellipse([x0, y0, x0 + int(rng.integers(10, 30)), y0 + int(rng.integers(10, 30))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def verify(encoder, out: str, size: int) -> dict:
    """Load `out` with transformers alone and compare it with the kit encoder on the same input."""
    import torch
    import transformers
    from transformers import CLIPImageProcessor
    hf = getattr(transformers, HF_CLASS[encoder.cfg.arch]).from_pretrained(out).eval()
    auto = transformers.AutoModel.from_pretrained(out).eval()
    if type(auto) is not type(hf):
        raise SystemExit(f"error: AutoModel loads {out} as {type(auto).__name__}, not {type(hf).__name__}")
    processor = CLIPImageProcessor.from_pretrained(out)
    auto_processor = transformers.AutoImageProcessor.from_pretrained(out)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 3, size, size, generator=g)
    diff_hidden = diff_pooled = 0.0
    with torch.no_grad():
        ours = encoder.eval()(x)
        # HF's pooler_output is ln_post(CLS); the kit's class_embedding adds the loss head when there is one
        pooled = encoder.ln_post(ours.last_hidden_state[:, 0])
        for loaded in (hf, auto):
            theirs = loaded(pixel_values=x)
            diff_hidden = max(diff_hidden, (ours.last_hidden_state - theirs.last_hidden_state).abs().max().item())
            diff_pooled = max(diff_pooled, (pooled - theirs.pooler_output).abs().max().item())

    img = test_image()
    pv = processor(img, return_tensors="pt")["pixel_values"]
    auto_pv = auto_processor(img, return_tensors="pt")["pixel_values"]
    if tuple(auto_pv.shape) != tuple(pv.shape):
        raise SystemExit(f"error: AutoImageProcessor ({type(auto_processor).__name__}) from {out} gives "
                         f"pixel_values {tuple(auto_pv.shape)}, CLIPImageProcessor {tuple(pv.shape)}")
    pixels, _, _ = image_io.resize_crop(img, size, crop="center")
    ref = image_io.normalize(torch.from_numpy(pixels.copy())[None])
    if tuple(pv.shape) != tuple(ref.shape):
        raise SystemExit(f"error: CLIPImageProcessor from {out} gives pixel_values {tuple(pv.shape)}, expected "
                         f"{tuple(ref.shape)}")
    d = (pv - ref).abs()
    levels = (d * torch.tensor(image_io.IMAGE_STD).view(1, 3, 1, 1) * 255).round()   # in uint8 steps
    return {"max_abs_diff_last_hidden_state": diff_hidden, "max_abs_diff_pooler_output": diff_pooled,
            "tolerance": TOLERANCE, "hf_class": type(hf).__name__, "auto_class": type(auto).__name__,
            "processor_class": type(processor).__name__, "auto_processor_class": type(auto_processor).__name__,
            "preprocess_test_image": list(img.size),
            "preprocess_max_abs_diff": d.max().item(), "preprocess_mean_abs_diff": d.mean().item(),
            "auto_preprocess_max_abs_diff": (auto_pv - ref).abs().max().item(),
            "preprocess_max_uint8_levels": int(levels.max().item()),
            "preprocess_share_of_values_differing": float((levels > 0).float().mean().item())}


def main(argv=None):
    args = parse_args(argv)
    workdir.check_folder_flag(args.out, "--out")
    t0 = time.time()
    if not os.path.exists(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file or folder")
    try:
        encoder = kit.load_encoder(args.checkpoint)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise SystemExit(f"error: cannot load an encoder from {args.checkpoint}: {e}")
    cfg = encoder.cfg
    size = args.image_size or cfg.image_size
    if size < cfg.patch_size or size % cfg.patch_size:
        raise SystemExit(f"error: --image-size {size} must be a positive multiple of the patch size {cfg.patch_size}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not is_previous_export(args.out) and not args.force:
        found = sorted(os.listdir(args.out))
        raise SystemExit(f"error: {args.out} is not empty and holds no previous export (it has "
                         f"{', '.join(found[:5])}{', ...' if len(found) > 5 else ''}); use another --out, or --force "
                         "to write the export's files into it")
    os.makedirs(args.out, exist_ok=True)
    others = sorted(set(os.listdir(args.out)) - set(EXPORT_FILES))

    # the config carries the export size: LLaVA-style towers read image_size (and patch_size) from it; a CLIP
    # position table is resampled to it
    encoder.set_image_size(size)
    kit.save_hf(encoder, args.out)                                   # model.safetensors + config.json, atomic
    workdir.write_json(os.path.join(args.out, "preprocessor_config.json"), preprocessor_config(size))
    t_write = time.time() - t0

    check = verify(encoder, args.out, size)
    worst = max(check["max_abs_diff_last_hidden_state"], check["max_abs_diff_pooler_output"])
    if not worst <= TOLERANCE:
        raise SystemExit(f"error: the exported model disagrees with the kit encoder: max abs difference "
                         f"{worst:.3g} > {TOLERANCE:g} (last_hidden_state "
                         f"{check['max_abs_diff_last_hidden_state']:.3g}, pooler_output "
                         f"{check['max_abs_diff_pooler_output']:.3g})")
    say_exported(args, encoder, size, others, check, time.time() - t0)
    return {"checkpoint": args.checkpoint, "out": args.out, "image_size": size, "files": list(EXPORT_FILES),
            "head_dropped": bool(cfg.embed_dim), "other_files": others, "write_s": round(t_write, 2),
            "elapsed_s": round(time.time() - t0, 2), **check}


def say_exported(args, encoder, size, others, check, elapsed):
    """What was exported, what was left out, and how the export was verified."""
    cfg = encoder.cfg
    params = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("head."))
    print(f"exported {args.checkpoint} -> {args.out}: {HF_CLASS[cfg.arch]}, {params / 1e6:.2f}M parameters, width "
          f"{cfg.width}, {cfg.layers} layers, patch {cfg.patch_size}, image size {size}; "
          f"{', '.join(EXPORT_FILES)}")
    if cfg.embed_dim:
        print(f"note: the checkpoint's head (linear {cfg.width} -> {cfg.embed_dim}) is not part of "
              f"{HF_CLASS[cfg.arch]} and was not exported; pooler_output is ln_post(CLS), width "
              f"{cfg.width}")
    if others:
        print(f"note: {args.out} also holds files this export did not write: {', '.join(others[:8])}")
    print(f"verified with transformers: {check['hf_class']}.from_pretrained and {check['processor_class']}"
          f".from_pretrained; max abs difference to the kit encoder: last_hidden_state "
          f"{check['max_abs_diff_last_hidden_state']:.2e}, pooler_output {check['max_abs_diff_pooler_output']:.2e} "
          f"(tolerance {TOLERANCE:g}); preprocessing vs resize_crop + normalize on a "
          f"{check['preprocess_test_image'][0]}x{check['preprocess_test_image'][1]} image: max "
          f"{check['preprocess_max_abs_diff']:.4f} ({check['preprocess_max_uint8_levels']} uint8 levels), "
          f"{100 * check['preprocess_share_of_values_differing']:.2f}% of values differ; "
          f"{elapsed:.1f} s")


if __name__ == "__main__":
    main()
