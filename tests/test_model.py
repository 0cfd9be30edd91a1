"""model.py: exact parity with transformers' MLCDVisionModel both ways, region attention against a per-region
loop reference, and the global path unchanged by region queries."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402

transformers = pytest.importorskip("transformers")   # pinned in requirements.txt: never skipped under `make test`
from transformers import MLCDVisionConfig, MLCDVisionModel  # noqa: E402

SIZES = [(48, 48), (64, 32), (24, 56)]   # square and non-square, multiples of patch 8


def random_hf(tmp_path, heads=4, width=96):
    torch.manual_seed(0)
    cfg = MLCDVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                           num_attention_heads=heads, patch_size=8, image_size=48)
    hf = MLCDVisionModel(cfg).eval()
    with torch.no_grad():   # non-trivial norms and biases, so a mis-mapped tensor shows
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("heads,width", [(4, 96), (2, 48)])   # head dims 24 and 24/2: rope dims 12 and 12
def test_hf_to_kit_parity(tmp_path, heads, width):
    hf = random_hf(tmp_path, heads, width)
    enc = model.load_encoder(str(tmp_path)).eval()
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = hf(pixel_values=x)
            out = enc(x)
        assert out.last_hidden_state.shape == (2, 1 + (h // 8) * (w // 8), width)
        assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < 1e-4
        assert (out.class_embedding - ref.pooler_output).abs().max() < 1e-4
        torch.testing.assert_close(out.patch_tokens, out.last_hidden_state[:, 1:])


def test_kit_to_hf_parity(tmp_path):
    torch.manual_seed(1)
    enc = model.VisionEncoder(model.preset("tiny", region_blocks=2)).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_hf(enc, str(tmp_path))
    hf, info = MLCDVisionModel.from_pretrained(str(tmp_path), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = hf(pixel_values=x)
            out = enc(x)
        assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < 1e-4
        assert (out.class_embedding - ref.pooler_output).abs().max() < 1e-4
    # and back again: kit -> HF dir -> kit is the identity on weights
    again = model.load_encoder(str(tmp_path), region_blocks=2)
    for (k, a), b in zip(enc.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_rope_grid_orientation_matters(tmp_path):
    # the parity tests above would not notice a swapped (row, col) grid on square inputs only; check that a
    # swapped grid really changes non-square outputs, so those tests do guard the orientation
    random_hf(tmp_path)
    enc = model.load_encoder(str(tmp_path)).eval()
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        good = enc(x).last_hidden_state
        enc._rope_cache[(8, 4, "cpu")] = model.rope_angles(4, 8, enc.cfg.head_dim, 1e4)[
            torch.arange(32).view(4, 8).t().reshape(-1)]
        swapped = enc(x).last_hidden_state
    assert (good - swapped).abs().max() > 1e-3


def test_presets_match_hf_parameter_counts():
    for name in ["B/16", "L/14", "bigG/14"]:
        cfg = model.preset(name)
        with torch.device("meta"):
            ours = model.VisionEncoder(cfg).num_params()
            hf_cfg = {k: v for k, v in model.kit_config_to_hf(cfg).items()
                      if k not in ("architectures", "model_type", "torch_dtype")}
            theirs = sum(p.numel() for p in MLCDVisionModel(MLCDVisionConfig(**hf_cfg)).parameters())
        assert ours == theirs, name
    with torch.device("meta"):
        assert 302e6 < model.VisionEncoder(model.preset("L/14")).num_params() < 304e6   # CLIP L/14 less pos-emb and proj


def test_kit_checkpoint_roundtrip(tmp_path):
    enc = model.VisionEncoder(model.preset("tiny", embed_dim=32)).eval()
    path = tmp_path / "enc.pt"
    torch.save(model.encoder_checkpoint(enc), path)
    again = model.load_encoder(str(path)).eval()   # loads with weights_only=True inside
    x = torch.randn(1, 3, 64, 48)
    boxes = torch.tensor([[[0.0, 0.0, 30.0, 30.0]]])
    with torch.no_grad():
        a, b = enc(x, boxes), again(x, boxes)
    assert torch.equal(a.region_embeddings, b.region_embeddings) and a.class_embedding.shape == (1, 32)
    with pytest.raises(FileNotFoundError):
        model.load_encoder(str(tmp_path / "missing.pt"))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="kit checkpoint"):
        model.load_encoder(str(tmp_path / "other.pt"))


def test_bad_input_size():
    enc = model.VisionEncoder(model.preset("tiny"))
    with pytest.raises(ValueError, match="multiple of the patch"):
        enc(torch.randn(1, 3, 60, 64))


# ---------------------------------------------------------------------------------------------------------
# region attention


def test_box_patch_mask_rule():
    gh, gw, p = 4, 6, 8     # patch centres at 4, 12, 20, ... px
    boxes = torch.tensor([[
        [0, 0, 48, 32],       # whole image: every patch
        [8, 8, 24, 16],       # centres x 12, 20 and y 12: patches (1,1), (1,2)
        [9, 9, 11, 11],       # smaller than a patch, no centre inside: the patch holding its centre, (1,1)
        [40, 25, 90, 90],     # runs off the image: clipped, centres x 44, y 28 -> (3,5)
        [12, 4, 12, 4],       # degenerate box on a centre: exactly that patch (0,1)
    ]], dtype=torch.float32)
    mask = model.box_patch_mask(boxes, gh, gw, p).view(5, gh, gw)
    assert mask[0].all()
    expect = torch.zeros(gh, gw, dtype=torch.bool)
    expect[1, 1] = expect[1, 2] = True
    assert torch.equal(mask[1], expect)
    for n, (r, c) in zip([2, 3, 4], [(1, 1), (3, 5), (0, 1)]):
        assert mask[n].sum() == 1 and mask[n, r, c], n


def reference_regions(enc, x, boxes, valid):
    """Per-region loop: each query attends to itself and the patches listed for its box, written out with
    explicit softmax; the patch list comes from a plain loop over the grid (same rule as box_patch_mask)."""
    cfg = enc.cfg
    B, _, H, W = x.shape
    gh, gw, p = H // cfg.patch_size, W // cfg.patch_size, cfg.patch_size
    hidden = []
    h = torch.cat([enc.class_embedding.expand(B, 1, -1), enc.conv1(x).flatten(2).transpose(1, 2)], 1)
    if cfg.arch == "clip":       # absolute positions in the tokens, no rotation
        h = h + model.resample_positions(enc.position_embedding, gh, gw)
        cos = sin = None
    else:
        angles = torch.cat([enc.class_pos_emb, model.rope_angles(gh, gw, cfg.head_dim, cfg.rope_theta)])
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos(), angles.sin()
    h = enc.ln_pre(h)

    def rotate(t, c, s):
        return t if c is None else model.apply_rope(t, c, s)
    for blk in enc.blocks:
        hidden.append(h)
        h, _ = blk(h, cos, sin)
    first = cfg.layers - cfg.region_blocks
    out = torch.zeros(B, boxes.shape[1], cfg.width)
    for b in range(B):
        for n in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[b, n].tolist()
            x0, x1 = min(max(x0, 0), W), min(max(x1, 0), W)
            y0, y1 = min(max(y0, 0), H), min(max(y1, 0), H)
            inside = [i * gw + j for i in range(gh) for j in range(gw)
                      if x0 <= (j + 0.5) * p <= x1 and y0 <= (i + 0.5) * p <= y1]
            if not inside:
                i = min(max(int(math.floor((y0 + y1) / 2 / p)), 0), gh - 1)
                j = min(max(int(math.floor((x0 + x1) / 2 / p)), 0), gw - 1)
                inside = [i * gw + j]
            if not valid[b, n]:
                inside = []
            r = hidden[first][b, :1]                      # (1, D) the class token's state
            for li in range(first, cfg.layers):
                blk, g = enc.blocks[li], hidden[li][b:b + 1]
                _, k, v = blk.attn.split_heads(blk.ln_1(g))
                k = rotate(k, cos, sin)[0, :, 1:][:, inside]                    # (H, n_in, d)
                v = v[0, :, 1:][:, inside]
                rq, rk, rv = blk.attn.split_heads(blk.ln_1(r[None]))
                first_pos = (None, None) if cos is None else (cos[:1], sin[:1])   # the class token's angles
                rq = rotate(rq, *first_pos)[0]                                  # (H, 1, d)
                rk = rotate(rk, *first_pos)[0]
                keys, vals = torch.cat([rk, k], 1), torch.cat([rv[0], v], 1)
                att = torch.softmax(rq @ keys.transpose(1, 2) / math.sqrt(cfg.head_dim), -1)
                o = (att @ vals).transpose(0, 1).reshape(1, cfg.width)
                r = r + blk.attn.proj(o)
                r = r + blk.mlp(blk.ln_2(r))
            out[b, n] = enc.ln_post(r)[0]
    return out


@pytest.mark.parametrize("name,region_blocks", [("tiny", 1), ("tiny", 3), ("clip-tiny", 2)])
def test_region_attention_matches_loop_reference(name, region_blocks):
    torch.manual_seed(2)
    enc = model.VisionEncoder(model.preset(name, layers=3, region_blocks=region_blocks)).eval()
    x = torch.randn(2, 3, 48, 64)
    boxes = torch.tensor([[[0, 0, 64, 48], [5, 5, 30, 20], [33, 17, 35, 19], [40, 0, 64, 48]],
                          [[10, 10, 12, 40], [0, 0, 16, 16], [50, 30, 200, 200], [0, 0, 64, 48]]], dtype=torch.float32)
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    with torch.no_grad():
        out = enc(x, boxes, valid)
        ref = reference_regions(enc, x, boxes, valid)
    assert out.region_embeddings.shape == (2, 4, 64)
    torch.testing.assert_close(out.region_embeddings[valid], ref[valid], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out.region_embeddings).all()     # padding regions see only themselves: finite


def test_global_path_unchanged_by_regions():
    torch.manual_seed(3)
    enc = model.VisionEncoder(model.preset("tiny", region_blocks=2))
    x = torch.randn(2, 3, 64, 40)
    boxes = torch.rand(2, 7, 4) * 40
    boxes[..., 2:] += boxes[..., :2]
    for train in (False, True):
        enc.train(train)
        plain, with_regions = enc(x), enc(x, boxes)
        assert torch.equal(plain.last_hidden_state, with_regions.last_hidden_state)
        assert torch.equal(plain.class_embedding, with_regions.class_embedding)
        assert plain.region_embeddings is None and with_regions.region_embeddings.shape == (2, 7, 64)
    # regions are independent of each other: one region's output does not depend on the other boxes
    enc.eval()
    with torch.no_grad():
        alone = enc(x, boxes[:, :1]).region_embeddings[:, 0]
        among = enc(x, boxes).region_embeddings[:, 0]
    torch.testing.assert_close(alone, among, rtol=1e-5, atol=1e-6)
    # region_blocks=0 turns the region path off
    off = model.VisionEncoder(model.preset("tiny", region_blocks=0))
    assert off(x, boxes).region_embeddings is None


def test_region_gradients_and_checkpointing():
    torch.manual_seed(4)
    enc = model.VisionEncoder(model.preset("tiny", region_blocks=2)).train()
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[0, 0, 32, 32], [16, 16, 64, 48]]] * 2, dtype=torch.float32)

    def grads(ckpt):
        enc.zero_grad(set_to_none=True)
        enc.grad_checkpointing = ckpt
        out = enc(x, boxes)
        (out.region_embeddings.square().mean() + out.class_embedding.square().mean()).backward()
        return {k: p.grad.clone() for k, p in enc.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain["blocks.0.attn.qkv.weight"].abs().sum() > 0        # region loss reaches the early blocks
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(5)
    enc = model.VisionEncoder(model.preset("tiny")).eval()
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[0, 0, 32, 32]]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ref = enc(x, boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(x, boxes)
    assert low.last_hidden_state.dtype == torch.bfloat16
    cos = F.cosine_similarity(low.class_embedding.float(), ref.class_embedding, dim=-1)
    assert cos.min() > 0.99
    cos_r = F.cosine_similarity(low.region_embeddings.float(), ref.region_embeddings, dim=-1)
    assert cos_r.min() > 0.99


def test_inference_mode_then_training_and_bad_boxes():
    enc = model.VisionEncoder(model.preset("tiny"))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        enc(x)                                   # builds the rotary cache under inference_mode
    enc(x).class_embedding.sum().backward()      # the cached angles still work with autograd
    with pytest.raises(ValueError, match="boxes must be"):
        enc(x, torch.zeros(1, 4))
