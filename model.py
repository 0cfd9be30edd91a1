"""The MLCD / RICE vision encoder: a ViT with 2-D rotary position embedding and RICE region attention.

The global path is exactly Hugging Face transformers' `MLCDVisionModel`, the architecture of the released
`DeepGlint-AI/rice-vit-large-patch14-560` and `mlcd-vit-bigG-patch14-*` weights:

    x = [class_embedding ; conv(pixels)]            conv patch embedding, no bias, no absolute positions
    x = ln_pre(x)
    x = x + attn(ln_1(x), rope)  ;  x = x + mlp(ln_2(x))      for each block (pre-norm, exact GELU)
    last_hidden_state = x          (not normed, as HF)
    class_embedding   = ln_post(x[:, 0])

2-D RoPE (method notes 3.2): with head dim d, a patch at grid (row h, col w) gets the angles
concat(h * inv_freq, w * inv_freq) (length d/2, inv_freq = 1 / theta^(2i / (d/2))), repeated twice to
length d; the class token gets a learned `class_pos_emb` of length d/2 instead. q and k are rotated with
`q * cos + rotate_half(q) * sin` in fp32; v is not rotated.

Region attention (RICE paper Sec. 3.2, "region-aware attention in the later layers"):
    R = softmax(Q K^T / sqrt(d_k) + M) V
The last `region_blocks` blocks also carry N region queries, one per box. They start as copies of the class
token's hidden state at the input of the first region block and use the class token's rotary angles. In each
region block a query attends to itself and to the patch tokens inside its box (M = 0 there, -inf elsewhere),
with keys and values taken from the global path of the same block, so the cost is O(N x P) per block. The
region path reuses the blocks' own weights (no extra parameters, so a trained encoder exports to a plain
`MLCDVisionModel`) and only reads the global path: global outputs are identical with and without boxes.

Which patches a box sees (`box_patch_mask`): boxes are (x0, y0, x1, y1) in pixels of the input tensor,
clipped to the image. A patch is inside when its centre lies in the closed box. A box that contains no
patch centre (smaller than a patch, or thin) sees the single patch that contains the box centre, so every
valid region has at least one patch. Invalid (padding) regions see only themselves; their output is
meaningless and must be ignored through the validity mask.

Checkpoints: `load_encoder(path)` reads a Hugging Face MLCD directory (config.json + safetensors) or a kit
checkpoint (.pt with `encoder` and `encoder_config`); `save_hf(encoder, dir)` writes a directory that
`transformers.MLCDVisionModel.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ViTConfig:
    patch_size: int = 14
    width: int = 1024            # hidden size D
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 224        # default input size only; any multiple of patch_size works (RoPE, no pos-emb)
    ln_eps: float = 1e-5
    rope_theta: float = 10000.0
    region_blocks: int = 2       # R: the last R blocks also run region attention; 0 turns the region path off
    embed_dim: int = 0           # optional linear head after ln_post for the losses; 0 = none (use width)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} must be divisible by 4 for 2-D RoPE (two axes x cos/sin halves)")
        if not 0 <= self.region_blocks <= self.layers:
            raise ValueError(f"region_blocks must be in [0, {self.layers}], got {self.region_blocks}")


PRESETS = {
    # tiny: tests and the offline demo (about 0.2M parameters)
    "tiny": dict(patch_size=8, width=64, layers=4, heads=4, mlp_dim=256, image_size=64, region_blocks=1),
    "B/16": dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, image_size=224),
    "L/14": dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, image_size=224),
    # the released RICE ViT-L/14-560 (rice-vit-large-patch14-560)
    "L/14-560": dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, image_size=560),
    # the released MLCD ViT-bigG/14 (mlcd-vit-bigG-patch14-{224,336,448})
    "bigG/14": dict(patch_size=14, width=1664, layers=48, heads=16, mlp_dim=8192, image_size=336),
}


def preset(name: str, **overrides) -> ViTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor        # (B, 1+P, D), equal to HF's last_hidden_state
    class_embedding: torch.Tensor          # (B, E) ln_post(CLS) (then the optional head), HF's pooler_output
    patch_tokens: torch.Tensor             # (B, P, D) = last_hidden_state[:, 1:], row-major over the grid
    region_embeddings: torch.Tensor | None  # (B, N, E) ln_post(region query) (then the head), None without boxes


# ----------------------------------------------------------------------------------------------------------
# 2-D rotary embedding


def rope_angles(grid_h: int, grid_w: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Angles (grid_h * grid_w, head_dim / 2) for the patch tokens in row-major (conv flatten) order."""
    rope_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim))
    rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)
    return torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) in any dtype; cos/sin (T, d) fp32. Rotary maths in fp32 (also under bf16 autocast)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# region masks


def box_patch_mask(boxes: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> torch.Tensor:
    """(B, N, 4) boxes x0, y0, x1, y1 in input pixels -> (B, N, grid_h * grid_w) bool, True = patch inside.

    Rule (module docstring): patch centre inside the closed box; a box with no patch centre inside sees the
    patch that holds its centre. Vectorised over boxes: no Python loop over regions.
    """
    boxes = boxes.float()
    x0 = boxes[..., 0].clamp(0, grid_w * patch)
    y0 = boxes[..., 1].clamp(0, grid_h * patch)
    x1 = boxes[..., 2].clamp(0, grid_w * patch)
    y1 = boxes[..., 3].clamp(0, grid_h * patch)
    cx = (torch.arange(grid_w, device=boxes.device, dtype=torch.float32) + 0.5) * patch
    cy = (torch.arange(grid_h, device=boxes.device, dtype=torch.float32) + 0.5) * patch
    in_x = (cx >= x0[..., None]) & (cx <= x1[..., None])                    # (B, N, W)
    in_y = (cy >= y0[..., None]) & (cy <= y1[..., None])                    # (B, N, H)
    mask = (in_y[..., :, None] & in_x[..., None, :]).flatten(-2)            # (B, N, H*W)
    # fallback: the patch holding the box centre
    col = ((x0 + x1) / 2 / patch).floor().long().clamp(0, grid_w - 1)
    row = ((y0 + y1) / 2 / patch).floor().long().clamp(0, grid_h - 1)
    centre = F.one_hot(row * grid_w + col, grid_h * grid_w).bool()
    empty = ~mask.any(-1, keepdim=True)
    return mask | (centre & empty)


# ----------------------------------------------------------------------------------------------------------
# blocks


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)   # fused q, k, v (HF keeps them as q_proj/k_proj/v_proj)
        self.proj = nn.Linear(cfg.width, cfg.width)      # HF out_proj

    def split_heads(self, x: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v                                    # each (B, H, T, d)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, T, H * d))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))             # exact GELU (HF hidden_act "gelu")


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, regions=None, region_cos=None, region_sin=None, region_mask=None):
        """x (B, T, D) global tokens; regions (B, N, D) region queries or None; region_mask (B, 1, N, N+P)."""
        q, k, v = self.attn.split_heads(self.ln_1(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # global path: plain full attention, flash / memory-efficient kernels on GPU
        x_out = x + self.attn.merge_heads(F.scaled_dot_product_attention(q, k, v))
        x_out = x_out + self.mlp(self.ln_2(x_out))
        if regions is None:
            return x_out, None
        # region path, RICE Sec. 3.2: R = softmax(Q K^T / sqrt(d) + M) V. Keys/values are the region's own
        # (so it can attend to itself) followed by the patch tokens of the global path (class token dropped);
        # the boolean mask M allows self plus the patches inside the box.
        rq, rk, rv = self.attn.split_heads(self.ln_1(regions))
        rq, rk = apply_rope(rq, region_cos, region_sin), apply_rope(rk, region_cos, region_sin)
        keys = torch.cat([rk, k[:, :, 1:]], dim=2)
        values = torch.cat([rv, v[:, :, 1:]], dim=2)
        r_out = regions + self.attn.merge_heads(F.scaled_dot_product_attention(rq, keys, values, attn_mask=region_mask))
        r_out = r_out + self.mlp(self.ln_2(r_out))
        return x_out, r_out


# ----------------------------------------------------------------------------------------------------------
# encoder


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.conv1 = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(D ** -0.5 * torch.randn(D))
        self.class_pos_emb = nn.Parameter(torch.randn(1, cfg.head_dim // 2) * (cfg.head_dim // 2) ** -0.5)
        self.ln_pre = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.ln_post = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.head = nn.Linear(D, cfg.embed_dim, bias=False) if cfg.embed_dim else nn.Identity()
        self.grad_checkpointing = False
        self._rope_cache: dict = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # the HF MLCD initialisation (method notes 3.3)
        D, L, std = self.cfg.width, self.cfg.layers, 0.02
        nn.init.normal_(self.conv1.weight, std=std)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=D ** -0.5 * (2 * L) ** -0.5)
            nn.init.normal_(blk.attn.proj.weight, std=D ** -0.5)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * D) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=D ** -0.5 * (2 * L) ** -0.5)
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                nn.init.zeros_(lin.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def patch_rope(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        key = (grid_h, grid_w, str(device))
        if key not in self._rope_cache:
            with torch.inference_mode(False):   # a normal tensor even when first built under inference_mode
                self._rope_cache[key] = rope_angles(grid_h, grid_w, self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor | None = None,
                box_valid: torch.Tensor | None = None) -> EncoderOutput:
        """pixel_values (B, 3, H, W), H and W multiples of the patch size; boxes (B, N, 4) pixels x0 y0 x1 y1
        in the input's coordinates; box_valid (B, N) bool (default: all valid)."""
        cfg = self.cfg
        B, _, H, W = pixel_values.shape
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {cfg.patch_size}")
        gh, gw = H // cfg.patch_size, W // cfg.patch_size
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)   # (B, P, D)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, -1), x], dim=1)
        x = self.ln_pre(x)

        angles = torch.cat([self.class_pos_emb.float(), self.patch_rope(gh, gw, x.device)], dim=0)
        angles = torch.cat([angles, angles], dim=-1)                                          # (1+P, d)
        cos, sin = angles.cos(), angles.sin()

        use_regions = boxes is not None and cfg.region_blocks > 0 and boxes.shape[1] > 0
        first_region_block = cfg.layers - cfg.region_blocks
        regions = region_mask = None
        if use_regions:
            N = boxes.shape[1]
            if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be (batch={B}, N, 4), got {tuple(boxes.shape)}")
            if box_valid is None:
                box_valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
            inside = box_patch_mask(boxes.to(x.device), gh, gw, cfg.patch_size) & box_valid.to(x.device, torch.bool)[..., None]
            self_mask = torch.eye(N, dtype=torch.bool, device=x.device).expand(B, N, N)
            region_mask = torch.cat([self_mask, inside], dim=-1)[:, None]                     # (B, 1, N, N+P)
            region_cos, region_sin = cos[:1], sin[:1]          # the class token's angles

        for i, blk in enumerate(self.blocks):
            if use_regions and i == first_region_block:
                regions = x[:, :1].expand(B, boxes.shape[1], -1)   # queries start from the class token
            args = (x, cos, sin) if regions is None else (x, cos, sin, regions, region_cos, region_sin, region_mask)
            if self.grad_checkpointing and self.training:
                x, regions = checkpoint(blk, *args, use_reentrant=False)
            else:
                x, regions = blk(*args)

        class_embedding = self.head(self.ln_post(x[:, 0]))
        region_embeddings = self.head(self.ln_post(regions)) if regions is not None else None
        return EncoderOutput(x, class_embedding, x[:, 1:], region_embeddings)


# ----------------------------------------------------------------------------------------------------------
# checkpoints: Hugging Face MLCDVisionModel <-> kit

HF_PREFIX = "vision_model."   # the released checkpoints' key prefix; transformers 5 also loads it


def kit_to_hf_state_dict(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            continue   # the optional loss head is not part of MLCDVisionModel
        parts = k.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            p = f"encoder.layers.{i}."
            if rest.startswith("attn.qkv."):
                q, kk, vv = v.chunk(3, dim=0)
                kind = rest.split(".")[-1]
                out[p + f"self_attn.q_proj.{kind}"] = q
                out[p + f"self_attn.k_proj.{kind}"] = kk
                out[p + f"self_attn.v_proj.{kind}"] = vv
                continue
            rest = (rest.replace("attn.proj.", "self_attn.out_proj.").replace("ln_1.", "layer_norm1.")
                    .replace("ln_2.", "layer_norm2."))
            out[p + rest] = v
        else:
            name = {"conv1.weight": "embeddings.patch_embedding.weight",
                    "class_embedding": "embeddings.class_embedding"}.get(k)
            if name is None:
                name = k.replace("ln_pre.", "pre_layrnorm.").replace("ln_post.", "post_layernorm.")
            out[name] = v
    return {HF_PREFIX + k: v.contiguous() for k, v in out.items()}


def hf_to_kit_state_dict(sd: dict, layers: int) -> dict:
    sd = {k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k: v for k, v in sd.items()}
    out = {
        "conv1.weight": sd.pop("embeddings.patch_embedding.weight"),
        "class_embedding": sd.pop("embeddings.class_embedding"),
        "class_pos_emb": sd.pop("class_pos_emb"),
    }
    # CLIP's "pre_layrnorm" typo is the released name; accept the corrected spelling too
    for src, dst in (("pre_layrnorm", "ln_pre"), ("pre_layernorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd.pop(p + f"self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")], dim=0)
            out[f"blocks.{i}.attn.proj.{kind}"] = sd.pop(p + f"self_attn.out_proj.{kind}")
            out[f"blocks.{i}.ln_1.{kind}"] = sd.pop(p + f"layer_norm1.{kind}")
            out[f"blocks.{i}.ln_2.{kind}"] = sd.pop(p + f"layer_norm2.{kind}")
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd.pop(p + f"mlp.fc1.{kind}")
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd.pop(p + f"mlp.fc2.{kind}")
    leftover = [k for k in sd if not k.endswith(("position_ids", "inv_freq"))]
    if leftover:
        raise ValueError(f"unexpected keys in the MLCD checkpoint: {leftover[:8]}")
    return out


def hf_config_to_kit(hf: dict, **overrides) -> ViTConfig:
    hf = hf.get("vision_config", hf)
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"expected an MLCD config with hidden_act 'gelu', got {hf.get('hidden_act')!r} "
                         "(CLIP-format checkpoints with absolute positions are not this architecture)")
    size = hf.get("image_size", 224)
    rope = hf.get("rope_parameters") or {}
    return ViTConfig(**{
        "patch_size": int(hf["patch_size"]), "width": hf["hidden_size"], "layers": hf["num_hidden_layers"],
        "heads": hf["num_attention_heads"], "mlp_dim": hf["intermediate_size"],
        "image_size": int(size[0] if isinstance(size, (list, tuple)) else size),
        "ln_eps": hf.get("layer_norm_eps", 1e-5), "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        **overrides})


def kit_config_to_hf(cfg: ViTConfig) -> dict:
    return {
        "architectures": ["MLCDVisionModel"], "model_type": "mlcd_vision_model",
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_groups": 1, "num_channels": 3,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_act": "gelu",
        "layer_norm_eps": cfg.ln_eps, "attention_dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "axial"},
        "torch_dtype": "float32",
    }


def _read_hf_weights(path: str) -> dict:
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(path, name)))
        return sd
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        return torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has config.json but no model.safetensors(.index.json) or pytorch_model.bin")


def load_encoder(path: str, **overrides) -> VisionEncoder:
    """A Hugging Face MLCDVisionModel directory or a kit checkpoint file -> VisionEncoder (fp32, CPU).

    overrides change non-weight settings, e.g. region_blocks=4 on top of the released RICE weights."""
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.exists(cfg_file):
            raise FileNotFoundError(f"{path} is a directory without config.json: not a Hugging Face model dir")
        with open(cfg_file) as f:
            cfg = hf_config_to_kit(json.load(f), **overrides)
        sd = hf_to_kit_state_dict(_read_hf_weights(path), cfg.layers)
    elif os.path.isfile(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if "encoder" not in ckpt or "encoder_config" not in ckpt:
            raise ValueError(f"{path} is not a kit checkpoint (needs 'encoder' and 'encoder_config' keys, "
                             f"has {sorted(ckpt)[:8]})")
        cfg = ViTConfig(**{**ckpt["encoder_config"], **overrides})
        sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["encoder"].items()}
    else:
        raise FileNotFoundError(f"no encoder at {path}")
    enc = VisionEncoder(cfg)
    missing, unexpected = enc.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return enc


def encoder_checkpoint(encoder: VisionEncoder) -> dict:
    """The kit's encoder checkpoint: a plain dict that loads with torch.load(weights_only=True)."""
    return {"encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
            "encoder_config": asdict(encoder.cfg)}


def save_hf(encoder: VisionEncoder, out_dir: str) -> None:
    """Write `out_dir` so that transformers.MLCDVisionModel.from_pretrained(out_dir) loads the encoder."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = kit_to_hf_state_dict({k: v.detach().cpu().float() for k, v in encoder.state_dict().items()})
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(kit_config_to_hf(encoder.cfg), f, indent=2)
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))


def flops_per_image(cfg: ViTConfig, height: int, width: int, num_regions: int = 0) -> float:
    """Training FLOPs per image (forward + backward): 6 x matmul params x tokens plus attention, the nanoGPT /
    PaLM-appendix count (12 x layers x width x T^2 for the T x T score and value matmuls, fwd + bwd)."""
    T = 1 + (height // cfg.patch_size) * (width // cfg.patch_size)
    P = T - 1
    block_params = 4 * cfg.width ** 2 + 2 * cfg.width * cfg.mlp_dim
    dense = 6 * (block_params * cfg.layers * T + 3 * cfg.patch_size ** 2 * cfg.width * P)
    attn = 12 * cfg.layers * cfg.width * T * T
    R = cfg.region_blocks if num_regions else 0
    region = 6 * block_params * R * num_regions + 12 * R * cfg.width * num_regions * (num_regions + P)
    return float(dense + attn + region)
