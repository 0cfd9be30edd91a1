"""model.py arch "clip": exact parity with transformers' CLIPVisionModel both ways, for the layouts the released
MLCD CLIP folders and CLIP checkpoints use (CLIPVisionModel, CLIPVisionModelWithProjection, the vision tower of
a CLIPModel; keys with and without the `vision_model.` prefix), at the native size and at other sizes through
position resampling; the presets against transformers' parameter counts."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402

transformers = pytest.importorskip("transformers")   # pinned in requirements.txt: never skipped under `make test`
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,  # noqa: E402
                          CLIPVisionModelWithProjection)

TOL = 1e-4
NATIVE = 48                                 # image_size of the random models: a 6 x 6 grid of patch 8
OTHER_SIZES = [(64, 64), (32, 32), (40, 56)]  # larger, smaller, non-square: resampled position tables
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
              image_size=NATIVE)


def perturb(m):
    """Non-trivial norms, biases and embeddings, so a mis-mapped tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias") or "embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def compare(ours, last_hidden_state, pooled):
    assert ours.last_hidden_state.shape == last_hidden_state.shape
    assert (ours.last_hidden_state - last_hidden_state).abs().max() < TOL
    assert (ours.class_embedding - pooled).abs().max() < TOL


def check_sizes(enc, run_hf):
    """run_hf(x, interpolate) -> (last_hidden_state, pooled) of the HF model on the same input."""
    torch.manual_seed(2)
    for h, w in [(NATIVE, NATIVE)] + OTHER_SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            compare(enc(x), *run_hf(x, (h, w) != (NATIVE, NATIVE)))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_model_to_kit(tmp_path, act):
    torch.manual_seed(0)
    hf = perturb(CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act=act)))
    hf.save_pretrained(tmp_path)
    enc = model.load_encoder(str(tmp_path)).eval()
    assert (enc.cfg.arch, enc.cfg.act, enc.cfg.image_size, enc.cfg.embed_dim) == ("clip", act, NATIVE, 0)

    def run(x, interpolate):
        out = hf(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state, out.pooler_output
    check_sizes(enc, run)


def test_prefixed_keys_and_released_config(tmp_path):
    # the released folders (saved by transformers 4.x): `vision_model.` keys, a config with every field written
    torch.manual_seed(3)
    hf = perturb(CLIPVisionModel(CLIPVisionConfig(**VISION)))
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    # a config written as differences from the defaults: the kit fills in CLIPVisionConfig's defaults
    for key in ("layer_norm_eps", "hidden_act", "num_channels", "projection_dim"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    enc = model.load_encoder(str(tmp_path)).eval()
    assert enc.cfg.act == "quick_gelu"
    x = torch.randn(1, 3, NATIVE, NATIVE)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        compare(enc(x), ref.last_hidden_state, ref.pooler_output)


def test_clip_model_vision_tower_and_projection(tmp_path):
    torch.manual_seed(4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = perturb(CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=24)))
    clip.save_pretrained(tmp_path)
    tower = model.load_encoder(str(tmp_path)).eval()                 # the vision tower, as CLIPVisionModel takes it
    assert tower.cfg.embed_dim == 0

    def run_tower(x, interpolate):
        out = clip.vision_model(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state, out.pooler_output
    check_sizes(tower, run_tower)
    # and the same folder through CLIPVisionModel.from_pretrained, as LLaVA's CLIP tower loads a CLIPModel folder
    alone = CLIPVisionModel.from_pretrained(str(tmp_path)).eval()
    x = torch.randn(2, 3, NATIVE, NATIVE)
    with torch.no_grad():
        ref = alone(pixel_values=x)
        compare(tower(x), ref.last_hidden_state, ref.pooler_output)
    # with projection=True the visual projection becomes the head: class_embedding = get_image_features
    projected = model.load_encoder(str(tmp_path), projection=True).eval()
    assert projected.cfg.embed_dim == 24
    with torch.no_grad():
        out = projected(x)
        features = clip.get_image_features(pixel_values=x)
        features = getattr(features, "pooler_output", features)      # transformers 5 returns an output object
    assert (out.class_embedding - features).abs().max() < TOL
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < TOL


def test_with_projection_folder(tmp_path):
    torch.manual_seed(5)
    hf = perturb(CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=20)))
    hf.save_pretrained(tmp_path)
    enc = model.load_encoder(str(tmp_path)).eval()                   # its output is the projected embedding
    assert enc.cfg.embed_dim == 20

    def run(x, interpolate):
        out = hf(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state, out.image_embeds
    check_sizes(enc, run)


def test_kit_to_clip_vision_model(tmp_path):
    torch.manual_seed(6)
    enc = perturb(model.VisionEncoder(model.preset("clip-tiny", image_size=NATIVE, region_blocks=2)))
    model.save_hf(enc, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and config["architectures"] == ["CLIPVisionModel"]
    assert all(k.startswith("vision_model.") for k in load_file(tmp_path / "model.safetensors"))
    hf, info = CLIPVisionModel.from_pretrained(str(tmp_path), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    def run(x, interpolate):
        out = hf(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state, out.pooler_output
    check_sizes(enc, run)
    again = model.load_encoder(str(tmp_path), region_blocks=2)
    assert again.cfg == enc.cfg
    for (k, a), b in zip(enc.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_set_image_size_resamples_the_table(tmp_path):
    # loading at another size (04 --init-from --image-size, 06 --image-size) keeps the resampled table:
    # the encoder then equals HF's interpolate_pos_encoding at that size, and exports as a native model there
    torch.manual_seed(7)
    hf = perturb(CLIPVisionModel(CLIPVisionConfig(**VISION)))
    hf.save_pretrained(tmp_path / "hf")
    enc = model.load_encoder(str(tmp_path / "hf"), image_size=80).eval()
    assert enc.cfg.image_size == 80 and enc.position_embedding.shape == (1 + 10 * 10, 64)
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True)
        compare(enc(x), ref.last_hidden_state, ref.pooler_output)
    model.save_hf(enc, str(tmp_path / "at80"))
    native80 = CLIPVisionModel.from_pretrained(str(tmp_path / "at80")).eval()
    assert native80.config.image_size == 80
    with torch.no_grad():
        out = native80(pixel_values=x)                              # no interpolation needed any more
        compare(enc(x), out.last_hidden_state, out.pooler_output)
    # and a kit checkpoint loads at another size the same way
    path = tmp_path / "enc.pt"
    torch.save(model.encoder_checkpoint(model.load_encoder(str(tmp_path / "hf"))), path)
    again = model.load_encoder(str(path), image_size=80).eval()
    assert torch.equal(again.position_embedding, enc.position_embedding)


def test_positions_matter():
    # the parity tests would pass with positions ignored only if HF ignored them too: show they count
    torch.manual_seed(8)
    enc = model.VisionEncoder(model.preset("clip-tiny")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = enc(x).last_hidden_state
        enc.position_embedding.add_(torch.randn_like(enc.position_embedding))
        after = enc(x).last_hidden_state
    assert (before - after).abs().max() > 1e-2


def test_clip_presets_match_hf_parameter_counts():
    for name in ["clip-B/32", "clip-B/16", "clip-L/14", "clip-L/14-336"]:
        cfg = model.preset(name)
        assert cfg.arch == "clip" and cfg.act == "quick_gelu"
        hf_cfg = {k: v for k, v in model.kit_config_to_hf(cfg).items()
                  if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device("meta"):
            ours = model.VisionEncoder(cfg).num_params()
            theirs = sum(p.numel() for p in CLIPVisionModelWithProjection(CLIPVisionConfig(**hf_cfg)).parameters())
        assert ours == theirs, name
    with torch.device("meta"):   # OpenAI CLIP ViT-L/14-336's image tower: 304.3M with the 1024 -> 768 projection
        assert 304e6 < model.VisionEncoder(model.preset("clip-L/14-336")).num_params() < 305e6


def test_unknown_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(ValueError, match="neither an MLCD nor a CLIP"):
        model.load_encoder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        model.load_encoder(str(tmp_path))
