"""The MLCD / RICE vision encoder: a ViT in the two architectures of the released weights, plus RICE region
attention. One config field, `arch`, picks the position scheme:

    arch "mlcd"  2-D rotary position embedding, no absolute positions: Hugging Face transformers'
                 `MLCDVisionModel`, the architecture of the released `DeepGlint-AI/rice-vit-large-patch14-560`
                 and `mlcd-vit-bigG-patch14-*` weights (exact GELU)
    arch "clip"  learned absolute position embeddings: transformers' `CLIPVisionModel`, the architecture of the
                 MLCD paper's models (MLCD App. Tab. 9: CLIP ViT-B/32, B/16, L/14) and of the released
                 `mlcd-vit-base-patch32-224` and `mlcd-vit-large-patch14-336` (QuickGELU)

    x = [class_embedding ; conv(pixels)]            conv patch embedding, no bias
    x = x + position_embedding          (clip only; resampled bicubically for another grid, as HF's
                                         interpolate_pos_encoding does)
    x = ln_pre(x)
    x = x + attn(ln_1(x), rope)  ;  x = x + mlp(ln_2(x))      for each block (pre-norm; rope: mlcd only)
    last_hidden_state = x          (not normed, as HF)
    class_embedding   = ln_post(x[:, 0])   (then the optional linear head: CLIP's visual projection, or the
                                            losses' head)

The activation (`act`) is exact GELU or QuickGELU (x * sigmoid(1.702 x), OpenAI CLIP's) in either arch.

2-D RoPE (arch "mlcd"): with head dim d, a patch at grid (row h, col w) gets the angles
concat(h * inv_freq, w * inv_freq) (length d/2, inv_freq = 1 / theta^(2i / (d/2))), repeated twice to
length d; the class token gets a learned `class_pos_emb` of length d/2 instead. q and k are rotated with
`q * cos + rotate_half(q) * sin` in fp32; v is not rotated.

Absolute positions (arch "clip"): a learned table of 1 + (S/p)^2 rows for the config's image_size S. Another
input grid (h, w) uses the table's patch rows resampled to h x w (bicubic, align_corners=False) and its class
row as it is; `set_image_size` resamples the table itself, which is what a fine-tune or an export at another
size keeps.

Region attention (RICE paper Sec. 3.2, "region-aware attention in the later layers"):
    R = softmax(Q K^T / sqrt(d_k) + M) V
The last `region_blocks` blocks also carry N region queries, one per box. They start as copies of the class
token's hidden state at the input of the first region block and take the class token's position (its rotary
angles; in arch "clip" its absolute position is already in that hidden state). In each
region block a query attends to itself and to the patch tokens inside its box (M = 0 there, -inf elsewhere),
with keys and values taken from the global path of the same block, so the cost is O(N x P) per block. The
region path reuses the blocks' own weights (no extra parameters, so a trained encoder exports to a plain
`MLCDVisionModel` or `CLIPVisionModel`) and only reads the global path: global outputs are identical with and
without boxes.

Which patches a box sees (`box_patch_mask`): boxes are (x0, y0, x1, y1) in pixels of the input tensor,
clipped to the image. A patch is inside when its centre lies in the closed box. A box that contains no
patch centre (smaller than a patch, or thin) sees the single patch that contains the box centre, so every
valid region has at least one patch. Invalid (padding) regions see only themselves; their output is
meaningless and must be ignored through the validity mask.

Checkpoints: `load_encoder(path)` reads a Hugging Face folder (config.json + safetensors: `MLCDVisionModel`,
`CLIPVisionModel`, `CLIPVisionModelWithProjection`, or the vision tower of a `CLIPModel`) or a kit checkpoint
(.pt with `encoder` and `encoder_config`); `save_hf(encoder, dir)` writes a folder that
`transformers.MLCDVisionModel` (arch "mlcd") or `transformers.CLIPVisionModel` (arch "clip") loads.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)          # OpenAI CLIP's activation (HF hidden_act "quick_gelu")


ARCHS = ("mlcd", "clip")
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}   # F.gelu: exact GELU (HF hidden_act "gelu")


# the largest released encoders are far inside these (MLCD bigG/14: 48 layers, width 1664, MLP 8192)
CONFIG_BOUNDS = {"patch_size": (1, 1024), "width": (1, 16384), "layers": (1, 256), "heads": (1, 1024),
                 "mlp_dim": (1, 131072), "image_size": (1, 16384), "region_blocks": (0, 256), "embed_dim": (0, 65536)}
CONFIG_NAMES = {"patch_size": "patch_size", "width": "hidden_size (width)", "layers": "num_hidden_layers (layers)",
                "heads": "num_attention_heads (heads)", "mlp_dim": "intermediate_size (mlp_dim)"}
MAX_PARAMS = 20_000_000_000      # ViT-22B is the largest ViT trained; 4 bytes each in fp32


@dataclass
class ViTConfig:
    patch_size: int = 14
    width: int = 1024            # hidden size D
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 224        # mlcd: the default input size only; clip: the grid of the position table
                                 # (any multiple of patch_size runs either way)
    ln_eps: float = 1e-5
    rope_theta: float = 10000.0
    region_blocks: int = 2       # R: the last R blocks also run region attention; 0 turns the region path off
    embed_dim: int = 0           # optional linear head after ln_post (CLIP's projection); 0 = none (use width)
    arch: str = "mlcd"           # "mlcd": 2-D RoPE (MLCDVisionModel); "clip": learned absolute positions
                                 # (CLIPVisionModel)
    act: str = "gelu"            # "gelu" (exact) or "quick_gelu" (x * sigmoid(1.702 x))

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        """Patches per side of image_size: the position table's grid in arch "clip"."""
        return self.image_size // self.patch_size

    def __post_init__(self):
        # sane bounds before anything is allocated: a config.json or checkpoint is input, not trusted
        for name, (low, high) in CONFIG_BOUNDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ValueError(f"{CONFIG_NAMES.get(name, name)} {v!r} is outside [{low}, {high}]: not a ViT this "
                                 "kit builds (a damaged or hostile config?)")
        if not (isinstance(self.ln_eps, (int, float)) and 0 < self.ln_eps < 1):
            raise ValueError(f"layer_norm_eps {self.ln_eps!r} must be in (0, 1)")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.arch == "clip" and (self.image_size < self.patch_size or self.image_size % self.patch_size):
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of the patch size "
                             f"{self.patch_size} (the position table's grid)")
        if self.arch == "mlcd" and self.head_dim % 4:
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
    # the MLCD paper's CLIP ViTs (App. Tab. 9: learned absolute positions, QuickGELU, projection to the embed
    # dim that feeds the classifier); the released mlcd-vit-base-patch32-224 and mlcd-vit-large-patch14-336
    # are clip-B/32 and clip-L/14-336 without the projection
    "clip-tiny": dict(patch_size=8, width=64, layers=4, heads=4, mlp_dim=256, image_size=64, region_blocks=1,
                      arch="clip", act="quick_gelu"),
    "clip-B/32": dict(patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072, image_size=224, embed_dim=512,
                      arch="clip", act="quick_gelu"),
    "clip-B/16": dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, image_size=224, embed_dim=512,
                      arch="clip", act="quick_gelu"),
    "clip-L/14": dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, image_size=224, embed_dim=768,
                      arch="clip", act="quick_gelu"),
    "clip-L/14-336": dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, image_size=336,
                          embed_dim=768, arch="clip", act="quick_gelu"),
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
# absolute positions (arch "clip")


def resample_positions(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1 + n * n, D) position table -> (1 + grid_h * grid_w, D): the class row as it is, the n x n patch rows
    resampled bicubically (align_corners=False), as transformers' CLIPVisionEmbeddings.interpolate_pos_encoding
    does; the table itself when the grid is its own."""
    n = math.isqrt(table.shape[0] - 1)
    if n * n != table.shape[0] - 1:
        raise ValueError(f"a position table of {table.shape[0]} rows is not 1 + a square grid")
    if (grid_h, grid_w) == (n, n):
        return table
    D = table.shape[1]
    patch = table[1:].reshape(1, n, n, D).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(grid_h * grid_w, D)], dim=0)


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
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, regions=None, region_cos=None, region_sin=None, region_mask=None):
        """x (B, T, D) global tokens; cos/sin (T, d) rotary tables or None (arch "clip": positions are in x);
        regions (B, N, D) region queries or None; region_mask (B, 1, N, N+P)."""
        q, k, v = self.attn.split_heads(self.ln_1(x))
        if cos is not None:
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
        if region_cos is not None:
            rq, rk = apply_rope(rq, region_cos, region_sin), apply_rope(rk, region_cos, region_sin)
        keys = torch.cat([rk, k[:, :, 1:]], dim=2)
        values = torch.cat([rv, v[:, :, 1:]], dim=2)
        r_out = regions + self.attn.merge_heads(F.scaled_dot_product_attention(rq, keys, values, attn_mask=region_mask))
        r_out = r_out + self.mlp(self.ln_2(r_out))
        return x_out, r_out


# ----------------------------------------------------------------------------------------------------------
# encoder


def config_from_dict(d) -> ViTConfig:
    """A kit checkpoint's encoder_config -> ViTConfig, with one ValueError for unknown or out-of-bounds fields."""
    names = {f.name for f in fields(ViTConfig)}
    if not isinstance(d, dict) or set(d) - names:
        raise ValueError(f"encoder_config has fields a ViTConfig does not: "
                         f"{sorted(set(d) - names)[:5] if isinstance(d, dict) else type(d).__name__}")
    return ViTConfig(**d)


def param_count(cfg: ViTConfig) -> int:
    """Parameters of VisionEncoder(cfg), from the config alone (equal to num_params; tests/test_model.py)."""
    D, M, L = cfg.width, cfg.mlp_dim, cfg.layers
    block = 4 * D * D + 4 * D + 2 * D * M + M + D + 4 * D
    head = 2 * D + (D * cfg.embed_dim if cfg.embed_dim else 0)
    table = (1 + cfg.grid ** 2) * D if cfg.arch == "clip" else cfg.head_dim // 2
    return 3 * cfg.patch_size ** 2 * D + D + table + 2 * D + L * block + head


def check_memory(cfg: ViTConfig) -> None:
    """Refuse a config whose fp32 weights exceed MAX_PARAMS or this machine's memory, before allocating."""
    n = param_count(cfg)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n > MAX_PARAMS or 4 * n > total:
        raise ValueError(f"the config describes {n / 1e9:.1f}B parameters ({4 * n / 2 ** 30:.0f} GiB in fp32; this "
                         f"machine has {total / 2 ** 30:.0f} GiB): not a ViT this kit builds (a damaged or hostile "
                         "config?)")


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        check_memory(cfg)
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.conv1 = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(D ** -0.5 * torch.randn(D))
        if cfg.arch == "clip":    # HF CLIPVisionEmbeddings.position_embedding, one row per token
            self.position_embedding = nn.Parameter(0.02 * torch.randn(1 + cfg.grid ** 2, D))
        else:
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
        # the HF MLCD / CLIP initialisation (the two are the same; CLIP adds its position table)
        D, L, std = self.cfg.width, self.cfg.layers, 0.02
        nn.init.normal_(self.conv1.weight, std=std)
        if self.cfg.arch == "clip":
            nn.init.normal_(self.position_embedding, std=std)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=D ** -0.5 * (2 * L) ** -0.5)
            nn.init.normal_(blk.attn.proj.weight, std=D ** -0.5)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * D) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=D ** -0.5 * (2 * L) ** -0.5)
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                nn.init.zeros_(lin.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def absolute_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1 + grid_h * grid_w, D): the table, its patch rows resampled when the grid is not the table's."""
        return resample_positions(self.position_embedding, grid_h, grid_w)

    @torch.no_grad()
    def set_image_size(self, image_size: int) -> None:
        """Make image_size the encoder's own size. arch "clip": the position table is resampled to the new
        grid (what fine-tuning or exporting at another resolution keeps); arch "mlcd": only the config."""
        cfg = self.cfg.__class__(**{**asdict(self.cfg), "image_size": int(image_size)})
        if cfg.arch == "clip" and cfg.grid != self.cfg.grid:
            table = resample_positions(self.position_embedding.detach(), cfg.grid, cfg.grid)
            grad = self.position_embedding.requires_grad
            self.position_embedding = nn.Parameter(table.contiguous(), requires_grad=grad)
        self.cfg = cfg

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
        cos = sin = None
        if cfg.arch == "clip":                               # CLIPVisionEmbeddings: tokens + positions
            x = x + self.absolute_positions(gh, gw).to(x.dtype)
        x = self.ln_pre(x)

        if cfg.arch == "mlcd":
            angles = torch.cat([self.class_pos_emb.float(), self.patch_rope(gh, gw, x.device)], dim=0)
            angles = torch.cat([angles, angles], dim=-1)                                      # (1+P, d)
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
            # the class token's rotary angles (clip: its position is already in its hidden state)
            region_cos, region_sin = (cos[:1], sin[:1]) if cos is not None else (None, None)

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
# checkpoints: Hugging Face MLCDVisionModel / CLIPVisionModel <-> kit

HF_PREFIX = "vision_model."   # the released checkpoints' key prefix; transformers 5 also loads it
HF_MODEL_TYPES = {"mlcd": "mlcd", "mlcd_vision_model": "mlcd", "clip": "clip", "clip_vision_model": "clip"}
# what a config.json leaves out is its config class's default (save_pretrained can write only the differences)
HF_DEFAULTS = {
    "mlcd": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                 image_size=336, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, num_channels=3),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
                 projection_dim=512),
}
NOT_VISION = ("text_model.", "text_projection.", "logit_scale")   # a CLIPModel's text tower and logit scale


def kit_to_hf_state_dict(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            continue   # the optional head is not part of MLCDVisionModel / CLIPVisionModel
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
                    "class_embedding": "embeddings.class_embedding",
                    "position_embedding": "embeddings.position_embedding.weight"}.get(k)
            if name is None:
                name = k.replace("ln_pre.", "pre_layrnorm.").replace("ln_post.", "post_layernorm.")
            out[name] = v
    return {HF_PREFIX + k: v.contiguous() for k, v in out.items()}


def hf_to_kit_state_dict(sd: dict, cfg: ViTConfig) -> dict:
    """HF weights (with or without the `vision_model.` prefix; a CLIPModel's text tower is dropped) -> kit."""
    projection = sd.get("visual_projection.weight")
    sd = {k.removeprefix(HF_PREFIX): v for k, v in sd.items()
          if not k.startswith(NOT_VISION) and k != "visual_projection.weight"}

    def take(name):
        if name not in sd:
            raise ValueError(f"the weights have no {name!r} (a {cfg.arch.upper()} vision tower of {cfg.layers} "
                             f"layers was expected from config.json)")
        return sd.pop(name)

    out = {"conv1.weight": take("embeddings.patch_embedding.weight"),
           "class_embedding": take("embeddings.class_embedding")}
    if cfg.arch == "clip":
        out["position_embedding"] = take("embeddings.position_embedding.weight")
    else:
        out["class_pos_emb"] = take("class_pos_emb")
    if cfg.embed_dim:
        if projection is None:
            raise ValueError("the weights have no 'visual_projection.weight' to take as the projection head")
        out["head.weight"] = projection
    # CLIP's "pre_layrnorm" typo is the released name; accept the corrected spelling too
    for src, dst in (("pre_layrnorm", "ln_pre"), ("pre_layernorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [take(p + f"self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")], dim=0)
            out[f"blocks.{i}.attn.proj.{kind}"] = take(p + f"self_attn.out_proj.{kind}")
            out[f"blocks.{i}.ln_1.{kind}"] = take(p + f"layer_norm1.{kind}")
            out[f"blocks.{i}.ln_2.{kind}"] = take(p + f"layer_norm2.{kind}")
            out[f"blocks.{i}.mlp.fc1.{kind}"] = take(p + f"mlp.fc1.{kind}")
            out[f"blocks.{i}.mlp.fc2.{kind}"] = take(p + f"mlp.fc2.{kind}")
    leftover = [k for k in sd if not k.endswith(("position_ids", "inv_freq"))]
    if leftover:
        raise ValueError(f"unexpected keys in the {cfg.arch.upper()} checkpoint: {leftover[:8]}")
    return out


def hf_arch(hf: dict) -> str:
    """"mlcd" or "clip" for a config.json: a vision config, or a CLIPModel's (its vision_config)."""
    for model_type in ((hf.get("vision_config") or {}).get("model_type"), hf.get("model_type")):
        if model_type in HF_MODEL_TYPES:
            return HF_MODEL_TYPES[model_type]
    names = " ".join(hf.get("architectures") or [])
    for key, arch in (("MLCD", "mlcd"), ("CLIP", "clip")):
        if key in names:
            return arch
    raise ValueError(f"config.json has model_type {hf.get('model_type')!r} and architectures {names or 'none'}: "
                     "neither an MLCD nor a CLIP vision model (the kit reads MLCDVisionModel, CLIPVisionModel, "
                     "CLIPVisionModelWithProjection and CLIPModel folders)")


def hf_config_to_kit(hf: dict, projection: bool | None = None, **overrides) -> ViTConfig:
    """config.json -> ViTConfig. projection: take CLIP's visual projection as the head (embed_dim =
    projection_dim); by default only for CLIPVisionModelWithProjection folders, whose output is the projected
    embedding. A CLIPModel's vision tower is taken without it, as CLIPVisionModel.from_pretrained takes it."""
    try:
        return _hf_config_to_kit(hf, projection, **overrides)
    except (TypeError, KeyError, AttributeError) as e:      # a field missing or of the wrong type
        raise ValueError(f"config.json is not a usable vision config ({type(e).__name__}: {e})") from None


def _hf_config_to_kit(hf: dict, projection: bool | None = None, **overrides) -> ViTConfig:
    arch = hf_arch(hf)
    vision = {**HF_DEFAULTS[arch], **(hf.get("vision_config") or hf)}
    if vision["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"hidden_act {vision['hidden_act']!r} is not one the kit implements ({sorted(ACTIVATIONS)})")
    if vision["num_channels"] != 3:
        raise ValueError(f"num_channels {vision['num_channels']}: the kit's encoders take RGB (3)")
    if projection is None:
        projection = "CLIPVisionModelWithProjection" in (hf.get("architectures") or [])
    embed_dim = 0
    if projection:
        if arch != "clip":
            raise ValueError("only CLIP folders carry a visual projection")
        embed_dim = int(hf.get("projection_dim", 512) if "vision_config" in hf else vision["projection_dim"])
    size = vision["image_size"]
    if isinstance(size, (list, tuple)):
        if arch == "clip" and size[0] != size[-1]:
            raise ValueError(f"image_size {size}: a CLIP position table is square")
        size = size[0]
    rope = vision.get("rope_parameters") or {}
    return ViTConfig(**{
        "patch_size": int(vision["patch_size"]), "width": vision["hidden_size"], "layers": vision["num_hidden_layers"],
        "heads": vision["num_attention_heads"], "mlp_dim": vision["intermediate_size"], "image_size": int(size),
        "ln_eps": vision["layer_norm_eps"], "rope_theta": rope.get("rope_theta", vision.get("rope_theta", 10000.0)),
        "arch": arch, "act": vision["hidden_act"], "embed_dim": embed_dim, **overrides})


def kit_config_to_hf(cfg: ViTConfig) -> dict:
    """ViTConfig -> the config.json of MLCDVisionModel (arch "mlcd") or CLIPVisionModel (arch "clip")."""
    common = {
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_channels": 3, "image_size": cfg.image_size,
        "patch_size": cfg.patch_size, "hidden_act": cfg.act, "layer_norm_eps": cfg.ln_eps, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "torch_dtype": "float32"}
    if cfg.arch == "clip":
        # projection_dim is read only by the ...WithProjection classes; the export carries no projection
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **common,
                "projection_dim": cfg.embed_dim or cfg.width}
    # "mlcd", as the released folders say: transformers' Auto classes and pipeline() know it (4.52.1 on; its
    # MLCDVisionConfig.model_type, "mlcd_vision_model", is not registered in every release); both are read back
    return {"architectures": ["MLCDVisionModel"], "model_type": "mlcd", **common,
            "num_key_value_groups": 1, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "axial"}}


def read_checkpoint(path: str, **kw):
    """torch.load(weights_only=True) with one clear ValueError for a file that is not a whole checkpoint (zero
    bytes, cut off by a kill or a full disk, another kind of file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:
        first = str(e).strip().split(". ")[0][:160]          # the first sentence: torch's advice is for pickles
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {first}): it is "
                         "empty, cut off or another kind of file; rerun the stage that wrote it") from None


def _read_hf_weights(path: str) -> dict:
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(_safetensors(os.path.join(path, name), load_file))
        return sd
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return _safetensors(os.path.join(path, "model.safetensors"), load_file)
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        return read_checkpoint(os.path.join(path, "pytorch_model.bin"))
    raise FileNotFoundError(f"{path} has config.json but no model.safetensors(.index.json) or pytorch_model.bin")


def _safetensors(path: str, load_file) -> dict:
    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:160]}): it is "
                         "empty, cut off or another kind of file; download or export it again") from None


def read_encoder_config(path: str) -> ViTConfig:
    """The ViTConfig of a kit checkpoint or a Hugging Face MLCD / CLIP folder, without building the model (a
    ValueError naming the file for anything else)."""
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.exists(cfg_file):
            raise ValueError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        try:
            with open(cfg_file) as f:
                return hf_config_to_kit(json.load(f))
        except (OSError, ValueError) as e:
            raise ValueError(f"{cfg_file}: {e}") from None
    if not os.path.isfile(path):
        raise ValueError(f"no encoder at {path}")
    ckpt = read_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or "encoder_config" not in ckpt:
        raise ValueError(f"{path} is not a kit checkpoint (no encoder_config)")
    try:
        return config_from_dict(ckpt["encoder_config"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_encoder(path: str, projection: bool | None = None, **overrides) -> VisionEncoder:
    """A Hugging Face folder (MLCDVisionModel, CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel) or a
    kit checkpoint file -> VisionEncoder (fp32, CPU).

    overrides change non-weight settings, e.g. region_blocks=4 on top of the released RICE weights;
    image_size=S also resamples a CLIP position table to S (set_image_size). projection: HF CLIP folders only
    (hf_config_to_kit)."""
    image_size = overrides.pop("image_size", None)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.exists(cfg_file):
            raise FileNotFoundError(f"{path} is a directory without config.json: not a Hugging Face model dir")
        with open(cfg_file) as f:
            cfg = hf_config_to_kit(json.load(f), projection, **overrides)
        sd = hf_to_kit_state_dict(_read_hf_weights(path), cfg)
    elif os.path.isfile(path):
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict) or "encoder" not in ckpt or "encoder_config" not in ckpt:
            raise ValueError(f"{path} is not a kit checkpoint (needs 'encoder' and 'encoder_config' keys, "
                             f"has {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})")
        cfg = config_from_dict({**ckpt["encoder_config"], **overrides})
        sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["encoder"].items()}
    else:
        raise FileNotFoundError(f"no encoder at {path}")
    enc = VisionEncoder(cfg)
    try:
        missing, unexpected = enc.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    except (RuntimeError, AttributeError) as e:     # tensors of other shapes, or values that are no tensors
        raise ValueError(f"{path}: the weights do not fit its config ({str(e).splitlines()[0][:200]})") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if image_size:
        enc.set_image_size(image_size)
    return enc


def encoder_checkpoint(encoder: VisionEncoder) -> dict:
    """The kit's encoder checkpoint: a plain dict that loads with torch.load(weights_only=True)."""
    return {"encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
            "encoder_config": asdict(encoder.cfg)}


def save_hf(encoder: VisionEncoder, out_dir: str) -> None:
    """Write `out_dir` so that transformers.MLCDVisionModel.from_pretrained(out_dir) (arch "mlcd") or
    transformers.CLIPVisionModel.from_pretrained(out_dir) (arch "clip") loads the encoder."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = kit_to_hf_state_dict({k: v.detach().cpu().float() for k, v in encoder.state_dict().items()})
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)      # safetensors creates 0600; the export is read by others as its neighbours are
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(kit_config_to_hf(encoder.cfg), f, indent=2)
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))


# dense datasheet peaks (TFLOP/s) by CUDA device-name substring: bf16 tensor cores, fp32 matmuls on TF32 tensor
# cores, and plain fp32 (TF32 off). 04 trains fp32 with TF32 on; bench/bench_encoder.py measures fp32 with it off.
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
               "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
               "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}}


def peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool) -> tuple[float, str] | None:
    """(the device's peak TFLOP/s for this dtype, which entry) from PEAK_TFLOPS, or None for an unknown device:
    the denominator of MFU."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            kind = "bf16" if dtype == torch.bfloat16 else ("tf32" if tf32 else "fp32")
            return peaks[kind], f"{key} {kind} dense datasheet peak"
    return None


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
