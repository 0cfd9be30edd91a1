r"""Region boxes from SAM and SAM 2 without the masks: the automatic mask generator's decisions, box-only, batched.

RICE Sec. 3.1 runs SAM's automatic mask generator on LAION / COYO images and keeps candidate boxes. 01 needs each
mask's box, predicted IoU and area, never the mask itself, and the stock generators (segment_anything's
`SamAutomaticMaskGenerator`, sam2's `SAM2AutomaticMaskGenerator`) spend most of their time on masks 01 throws away:
every surviving mask is run-length encoded on the CPU, the RLE lists are deep-copied at every concatenation, and
each is decoded back to a full-size mask at the end. `BoxGenerator` drives the same model modules and the same
utilities (segment_anything.utils.amg, torchvision's batched_nms) and makes the same decisions in the same order:
  - the point grid of each crop layer (`build_all_layer_point_grids`) and the crop boxes (`generate_crop_boxes`);
  - the points decoded in batches of `points_per_batch` in grid order: the same decoder calls as the stock
    generator, so the same floats;
  - the predicted-IoU filter (iou > pred_iou_thresh), then the stability score (`calculate_stability_score`)
    filter (>= stability_score_thresh) on the logits at the crop's size;
  - the mask threshold, boxes by `batched_mask_to_box`, the crop-edge filter (`is_box_near_crop_edge`);
  - box NMS within each crop by predicted IoU, then across crops by 1 / crop area (`batched_nms`).
What it does instead: a mask that fails the IoU filter is never upsampled (its logits enter no decision); the
others are upsampled on the device in chunks of CHUNK_BYTES, reduced to their stability score, box and area
(the count of pixels above the threshold, as the stock generator's `area_from_rle`), and dropped. No RLE is built
and no mask is copied to the host: per image the host receives (n, 4) boxes, n scores and n areas.
Batching: the image encoder runs on batches of `image_batch` crops (SAM: the predictor's resize and
`Sam.preprocess` per crop, stacked; SAM 2: the predictor's own `set_image_batch`); the decoder on
`points_per_batch` points of one crop. In fp32 the boxes, scores and areas equal the stock generator's with the
same settings (tests/test_sam_boxes.py), and another `image_batch` changes no box; another `points_per_batch`
means other decoder calls (for the stock generator too), so the same masks up to float rounding (on some CPUs
a logit at the mask threshold moves an area by a pixel). `dtype=torch.bfloat16` runs
the encoder and decoder under autocast (the upsampling and thresholds stay in fp32).
Cost at scale (400M images): per image only the crops' features (SAM: 1 x 256 x 64 x 64 fp32, 4 MiB each) and
one chunk of upsampled logits live on the device; nothing grows with the dataset.

Not covered: `min_mask_region_area > 0` removes small islands and holes of each mask with OpenCV on the host
(it needs the masks themselves); `stock_generator` builds the stock generator for it, as 01 does.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

# SamAutomaticMaskGenerator's defaults (SAM 2's generator differs only in pred_iou_thresh 0.8)
POINTS_PER_SIDE, POINTS_PER_BATCH = 32, 64
PRED_IOU_THRESH, STABILITY_SCORE_THRESH, STABILITY_SCORE_OFFSET = 0.88, 0.95, 1.0
BOX_NMS_THRESH, CROP_NMS_THRESH, CROP_OVERLAP_RATIO, CROP_N_POINTS_DOWNSCALE = 0.7, 0.7, 512 / 1500, 1
CHUNK_BYTES = 1 << 30                # upsampled logits per chunk (a 1500 x 1125 crop: about 60 masks at a time)

SAM_MODELS = ("vit_h", "vit_l", "vit_b", "tiny")
TEST_MODELS = ("tiny", "tiny-sam2")  # random weights without a checkpoint: tests and timings only
# SAM 2 / 2.1 through sam2's own builder: name -> its config in the sam2 package (checkpoints: sam2.1_hiera_*.pt)
SAM2_CONFIGS = {f"sam2{v}_hiera_{s}": f"configs/sam2{v}/sam2{v}_hiera_{s}.yaml"
                for v in ("", ".1") for s in ("t", "s", "b+", "l")}
SAM2_CONFIGS["tiny-sam2"] = SAM2_CONFIGS["sam2.1_hiera_t"]     # shrunk below: random weights, tests only
SAM2_ALIASES = {name: f"sam2{v}_hiera_{s}" for v in ("", ".1")            # checkpoint and hub names too
                for long, s in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
                for name in (f"sam2{v}_hiera_{long}", f"sam2{v}-hiera-{long.replace('_', '-')}")}
TINY_SAM2 = [f"++model.{k}={v}" for k, v in {
    "image_encoder.trunk.embed_dim": 8, "image_encoder.trunk.stages": "[1,1,2,1]",
    "image_encoder.trunk.global_att_blocks": "[3]", "image_encoder.neck.backbone_channel_list": "[64,32,16,8]",
    "image_encoder.neck.d_model": 32, "image_encoder.neck.position_encoding.num_pos_feats": 32,
    "memory_attention.d_model": 32, "memory_attention.num_layers": 1, "memory_attention.layer.d_model": 32,
    "memory_attention.layer.dim_feedforward": 64, "memory_attention.layer.self_attention.embedding_dim": 32,
    "memory_attention.layer.cross_attention.embedding_dim": 32, "memory_attention.layer.cross_attention.kv_in_dim": 16,
    "memory_encoder.out_dim": 16, "memory_encoder.position_encoding.num_pos_feats": 16,
    "memory_encoder.fuser.layer.dim": 32}.items()]


def model_names():
    return list(SAM_MODELS) + list(SAM2_CONFIGS) + list(SAM2_ALIASES)


def canonical_name(name: str) -> str:
    """sam2.1_hiera_large, sam2.1-hiera-large -> sam2.1_hiera_l (the config's name); other names as they are."""
    return SAM2_ALIASES.get(name, name)


def is_sam2(name: str) -> bool:
    return name in SAM2_CONFIGS or name in SAM2_ALIASES


def build_sam(name: str, checkpoint: str | None = None, device="cpu"):
    """A SAM (segment_anything's registry: vit_h / vit_l / vit_b) or SAM 2 (sam2's `build_sam2` with the package's
    config: sam2.1_hiera_t / s / b+ / l, long names too) in eval mode on `device`, weights from `checkpoint`
    (random when None). `tiny` (a 1-block SAM) and `tiny-sam2` (a shrunk Hiera-T SAM 2) are random-weight models
    for tests. A checkpoint that is not this model's raises ValueError with one line naming the file."""
    if name not in model_names():
        raise ValueError(f"--sam-model {name}: unknown; one of {', '.join(model_names())}")
    try:
        if is_sam2(name):
            from sam2.build_sam import build_sam2
            name = canonical_name(name)
            extra = TINY_SAM2 if name == "tiny-sam2" else []
            sam = build_sam2(SAM2_CONFIGS[name], checkpoint, device="cpu", hydra_overrides_extra=extra)
        elif name == "tiny":
            sam = tiny_sam()
            if checkpoint:
                sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        else:
            from segment_anything import sam_model_registry
            sam = sam_model_registry[name](checkpoint=checkpoint)
    except Exception as e:              # pickle errors, missing or other-shaped keys, a sam2 file without "model"
        if not checkpoint:
            raise
        what = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
        raise ValueError(f"--sam-checkpoint {checkpoint}: not a {name} checkpoint ({what}); pass the checkpoint of "
                         f"--sam-model {name} (SAM: sam_vit_h_4b8939.pth for vit_h; SAM 2.1: sam2.1_hiera_large.pt "
                         "for sam2.1_hiera_l), or give the images boxes of their own with --boxes") from None
    return sam.to(device).eval()


def tiny_sam():
    """A 1-block SAM of random weights (dim 32), so the real generator path runs in tests without a download."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(depth=1, embed_dim=dim, img_size=1024, mlp_ratio=2, num_heads=2, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=[0], window_size=4,
                                      out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2), transformer_dim=dim, iou_head_depth=1,
            iou_head_hidden_dim=dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def stock_generator(sam, **settings):
    """The package's own automatic mask generator for `sam` (SAM or SAM 2) with BoxGenerator's settings."""
    settings = {k: v for k, v in settings.items() if k not in ("image_batch", "dtype", "chunk_bytes")}
    if hasattr(sam, "sam_mask_decoder"):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        return SAM2AutomaticMaskGenerator(sam, **settings)
    from segment_anything import SamAutomaticMaskGenerator
    settings.pop("mask_threshold", None)        # SAM 1 thresholds at the model's own mask_threshold
    return SamAutomaticMaskGenerator(sam, **settings)


def stock_boxes(masks):
    """The stock generator's records -> (boxes x0y0x1y1, scores, areas), in its order: what BoxGenerator returns."""
    xywh = np.array([m["bbox"] for m in masks], np.float64).reshape(-1, 4)
    return (np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            np.array([m["predicted_iou"] for m in masks], np.float32),
            np.array([m["area"] for m in masks], np.int64))


def matched_share(boxes, reference, iou=0.9):
    """Share of the reference boxes (x0y0x1y1) that have a box in `boxes` at IoU >= iou: how far bf16 moves
    fp32's boxes (1.0 when both are empty)."""
    import torchvision
    if len(reference) == 0:
        return float(len(boxes) == 0)
    if len(boxes) == 0:
        return 0.0
    ref, ours = (torch.as_tensor(np.asarray(b, np.float64)) + torch.tensor([0, 0, 1, 1])   # mask boxes end on
                 for b in (reference, boxes))                                               # their last pixel
    ious = torchvision.ops.box_iou(ref, ours)
    return float((ious.amax(1) >= iou).double().mean())


# the two model families: encode crops, decode points, upsample low-resolution logits ----------------------------


class _Sam:
    """segment_anything's Sam, as SamPredictor runs it."""

    def __init__(self, sam):
        from segment_anything.utils.transforms import ResizeLongestSide
        self.sam, self.transform = sam, ResizeLongestSide(sam.image_encoder.img_size)
        self.mask_threshold = sam.mask_threshold

    def encode(self, crops, device):
        """Features of each crop (SamPredictor.set_image: resize the long side, normalise, pad), one forward."""
        rows, sizes = [], []
        for crop in crops:
            if self.sam.image_format != "RGB":
                crop = crop[..., ::-1]
            x = torch.as_tensor(self.transform.apply_image(crop), device=device).permute(2, 0, 1).contiguous()[None]
            rows.append(self.sam.preprocess(x))
            sizes.append((tuple(x.shape[-2:]), crop.shape[:2]))
        features = self.sam.image_encoder(torch.cat(rows))
        return [{"features": features[i:i + 1], "input_size": s, "size": o} for i, (s, o) in enumerate(sizes)]

    def decode(self, state, points, device):
        """SamPredictor.predict_torch on one batch of points (pixels of the crop) without the upsampling."""
        coords = torch.as_tensor(self.transform.apply_coords(points, state["size"]), device=device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        sparse, dense = self.sam.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou = self.sam.mask_decoder(image_embeddings=state["features"],
                                             image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=True)
        return low_res.flatten(0, 1), iou.flatten(0, 1)

    def upsample(self, state, low_res):
        return self.sam.postprocess_masks(low_res[:, None].float(), state["input_size"], state["size"])[:, 0]


class _Sam2:
    """sam2's SAM2Base, as SAM2ImagePredictor runs it (its batched set_image_batch for the encoder)."""

    def __init__(self, sam, mask_threshold):
        from sam2.sam2_image_predictor import SAM2ImagePredictor
        self.predictor = SAM2ImagePredictor(sam, mask_threshold=mask_threshold)
        self.sam, self.mask_threshold = sam, mask_threshold

    def encode(self, crops, device):
        p = self.predictor
        p.set_image_batch([np.array(c) for c in crops])          # writable copies (torchvision warns otherwise)
        states = [{"image_embed": p._features["image_embed"][i:i + 1], "size": p._orig_hw[i],
                   "high_res_feats": [f[i:i + 1] for f in p._features["high_res_feats"]]} for i in range(len(crops))]
        p.reset_predictor()
        return states

    def decode(self, state, points, device):
        """SAM2AutomaticMaskGenerator._process_batch's call of SAM2ImagePredictor._predict, without the upsampling."""
        coords = self.predictor._transforms.transform_coords(
            torch.as_tensor(points, dtype=torch.float32, device=device), normalize=True, orig_hw=state["size"])
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        points = (coords[:, None, :], labels[:, None])
        sparse, dense = self.sam.sam_prompt_encoder(points=points, boxes=None, masks=None)
        low_res, iou, _, _ = self.sam.sam_mask_decoder(
            image_embeddings=state["image_embed"], image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=coords.shape[0] > 1, high_res_features=state["high_res_feats"])
        return low_res.flatten(0, 1), iou.flatten(0, 1)

    def upsample(self, state, low_res):
        return self.predictor._transforms.postprocess_masks(low_res[:, None].float(), state["size"])[:, 0]


# the generator -------------------------------------------------------------------------------------------------


class BoxGenerator:
    """SamAutomaticMaskGenerator / SAM2AutomaticMaskGenerator, box-only (module docstring). `generate(image)` and
    `generate_batch(images)` take HWC uint8 RGB arrays and give, per image, (boxes (n, 4) x0 y0 x1 y1 as
    `batched_mask_to_box` gives them, scores (n,) predicted IoU, areas (n,) mask pixels), in the stock generator's
    order. Settings as the stock generator's, plus image_batch (crops per encoder forward), dtype (torch.float32 or
    torch.bfloat16 under autocast) and chunk_bytes (upsampled logits per chunk)."""

    def __init__(self, sam, points_per_side=POINTS_PER_SIDE, points_per_batch=POINTS_PER_BATCH,
                 pred_iou_thresh=PRED_IOU_THRESH, stability_score_thresh=STABILITY_SCORE_THRESH,
                 stability_score_offset=STABILITY_SCORE_OFFSET, mask_threshold=0.0, box_nms_thresh=BOX_NMS_THRESH,
                 crop_n_layers=0, crop_nms_thresh=CROP_NMS_THRESH, crop_overlap_ratio=CROP_OVERLAP_RATIO,
                 crop_n_points_downscale_factor=CROP_N_POINTS_DOWNSCALE, image_batch=1, dtype=torch.float32,
                 chunk_bytes=CHUNK_BYTES):
        from segment_anything.utils.amg import build_all_layer_point_grids
        self.model = _Sam2(sam, mask_threshold) if hasattr(sam, "sam_mask_decoder") else _Sam(sam)
        self.device = next(sam.parameters()).device
        self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        self.points_per_batch, self.image_batch, self.chunk_bytes = points_per_batch, image_batch, chunk_bytes
        self.pred_iou_thresh, self.stability_score_thresh = pred_iou_thresh, stability_score_thresh
        self.stability_score_offset, self.box_nms_thresh = stability_score_offset, box_nms_thresh
        self.crop_n_layers, self.crop_nms_thresh, self.crop_overlap_ratio = crop_n_layers, crop_nms_thresh, \
            crop_overlap_ratio
        self.dtype = dtype

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext())

    def generate(self, image):
        return self.generate_batch([image])[0]

    @torch.no_grad()
    def generate_batch(self, images):
        from segment_anything.utils.amg import generate_crop_boxes
        crops = []                                                # (image index, crop box, layer)
        for i, image in enumerate(images):
            boxes, layers = generate_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            crops += [(i, box, layer) for box, layer in zip(boxes, layers)]
        found = [[] for _ in images]
        for s in range(0, len(crops), self.image_batch):
            part = crops[s:s + self.image_batch]
            with self.autocast():
                states = self.model.encode([images[i][y0:y1, x0:x1, :] for i, (x0, y0, x1, y1), _ in part],
                                           self.device)
            for (i, box, layer), state in zip(part, states):
                found[i].append(self.crop_boxes(state, box, layer, images[i].shape[:2]))
        return [self.across_crops(f) for f in found]

    def crop_boxes(self, state, crop_box, layer, orig_size):
        """SamAutomaticMaskGenerator._process_crop and _process_batch: (boxes, scores, areas) of one crop, on the
        device, boxes in image pixels."""
        from segment_anything.utils.amg import (batch_iterator, batched_mask_to_box, calculate_stability_score,
                                                is_box_near_crop_edge, uncrop_boxes_xyxy)
        from torchvision.ops.boxes import batched_nms
        orig_h, orig_w = orig_size
        h, w = state["size"]
        points_for_image = self.point_grids[layer] * np.array((h, w))[None, ::-1]
        thr, boxes, scores, areas = self.model.mask_threshold, [], [], []
        chunk = max(1, self.chunk_bytes // (4 * h * w + 4 * 1024 * 1024 + h * w))   # logits, SAM's 1024^2, mask
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            with self.autocast():
                low_res, iou = self.model.decode(state, points, self.device)
            iou = iou.float()
            if self.pred_iou_thresh > 0.0:                                  # the stock generator's filters, in order
                keep = iou > self.pred_iou_thresh
                low_res, iou = low_res[keep], iou[keep]
            for c in range(0, len(iou), chunk):
                logits = self.model.upsample(state, low_res[c:c + chunk])
                score = iou[c:c + chunk]
                if self.stability_score_thresh > 0.0:
                    keep = calculate_stability_score(logits, thr, self.stability_score_offset) \
                        >= self.stability_score_thresh
                    logits, score = logits[keep], score[keep]
                if len(score):                       # (an empty chunk would make the boxes float, as empty
                    masks = logits > thr             # batched_mask_to_box gives float zeros)
                    box = batched_mask_to_box(masks)
                    keep = ~is_box_near_crop_edge(box, crop_box, [0, 0, orig_w, orig_h])
                    boxes.append(box[keep]), scores.append(score[keep])
                    areas.append(masks[keep].sum((-2, -1), dtype=torch.int64))
                    del masks
                del logits
        if not boxes:
            return (torch.zeros(0, 4, dtype=torch.int64, device=self.device),
                    torch.zeros(0, device=self.device), torch.zeros(0, dtype=torch.int64, device=self.device), crop_box)
        boxes, scores, areas = torch.cat(boxes), torch.cat(scores), torch.cat(areas)
        keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes), device=self.device),
                           iou_threshold=self.box_nms_thresh)
        return uncrop_boxes_xyxy(boxes[keep], crop_box), scores[keep], areas[keep], crop_box

    def across_crops(self, per_crop):
        """SamAutomaticMaskGenerator._generate_masks: NMS across crops preferring smaller crops; to the host."""
        from torchvision.ops.boxes import batched_nms, box_area
        boxes = torch.cat([b for b, _, _, _ in per_crop])
        scores = torch.cat([s for _, s, _, _ in per_crop])
        areas = torch.cat([a for _, _, a, _ in per_crop])
        if len(per_crop) > 1:
            crop_boxes = torch.tensor([c for b, _, _, c in per_crop for _ in range(len(b))]).reshape(-1, 4)
            nms_scores = (1 / box_area(crop_boxes)).to(boxes.device)
            keep = batched_nms(boxes.float(), nms_scores, torch.zeros(len(boxes), device=boxes.device),
                               iou_threshold=self.crop_nms_thresh)
            boxes, scores, areas = boxes[keep], scores[keep], areas[keep]
        return boxes.cpu().numpy(), scores.cpu().numpy().astype(np.float32), areas.cpu().numpy()


# a test and benchmark model whose masks vary with the prompt --------------------------------------------------


class PromptBlobDecoder(torch.nn.Module):
    """Wraps a SAM or SAM 2 mask decoder of random weights (it still runs: the cost and its logits' texture are
    kept) and adds a smooth field that depends on the prompt and the image: random weights alone give nearly the
    same mask for every point (one or two distinct boxes per image), so an equality test or a timing would see
    none of the filters, boxes and NMS that real weights exercise. The point is located from the prompt
    encoder's random Fourier features (the kernel between the point's features and each location's); the field
    is the cosine similarity of the image features at each location to those at the point, fading with the
    distance from it, so points on one object give nearly the same masks (which NMS then merges) and points on
    different objects different ones. The three masks are the field's level sets at three levels (a part, the
    object, the object with its surroundings); a mask's predicted IoU is the mean similarity inside it and its
    sharpness varies with the point, so the IoU and stability filters keep some masks and drop others. For tests
    and benchmarks only (`vary_with_prompt`)."""

    def __init__(self, decoder, label_embedding, sharpness=90.0, levels=(0.75, 0.55, 0.35), reach=0.35):
        super().__init__()
        self.decoder, self.sharpness, self.reach = decoder, sharpness, reach
        self.register_buffer("levels", torch.tensor(levels))
        self.register_buffer("label", label_embedding.detach().clone().reshape(-1))

    def __getattr__(self, name):                # SAM 2 reads the decoder's own layers (conv_s0, conv_s1)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.decoder, name)

    def forward(self, **kw):
        out = self.decoder(**kw)
        masks, iou = out[0], out[1]
        pe = kw["image_pe"][0].float()
        point = kw["sparse_prompt_embeddings"][:, 0].float() - self.label          # the point's Fourier features
        c, h, w = pe.shape
        kernel = torch.einsum("bc,chw->bhw", point, pe) / (c / 2)         # 1 at the point, ~0 far from it
        where = torch.softmax(kernel.flatten(1) * 50, -1)                                   # (B, hw)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        grid = torch.stack([ys.flatten(), xs.flatten()], 1).to(pe.device)                  # (hw, 2)
        dist2 = ((grid[None] - (where @ grid)[:, None]) ** 2).sum(-1).view(-1, h, w)       # (B, h, w)
        feats = kw["image_embeddings"][:1].float().flatten(2)[0]
        feats = F.normalize(feats - feats.mean(1, keepdim=True), dim=0)                     # (C, hw)
        similar = (F.normalize(where @ feats.T, dim=-1) @ feats).view(-1, h, w)            # (B, h, w)
        field = similar * torch.exp(-dist2 / (2 * self.reach ** 2))
        levels = self.levels[:masks.shape[1]] if masks.shape[1] > 1 else self.levels[1:2]
        inside = (field[:, None] > levels[None, :, None, None]).float()
        mean_similar = (inside * similar[:, None]).sum((-2, -1)) / inside.sum((-2, -1)).clamp(min=1)
        sharp = self.sharpness * (0.5 + where.amax(-1) / where.amax(-1).max())                 # varies per point
        logits = sharp[:, None, None, None] * (field[:, None] - levels[None, :, None, None])
        logits = F.interpolate(logits, masks.shape[-2:], mode="bilinear", align_corners=False)
        return (logits + 0.1 * masks.float()).to(masks.dtype), \
            (0.45 + 0.55 * mean_similar.clamp(0, 1) + 0.01 * iou.float()).to(iou.dtype), *out[2:]


def vary_with_prompt(sam):
    """`sam` (SAM or SAM 2) with its mask decoder wrapped in PromptBlobDecoder, in place; returned."""
    if hasattr(sam, "sam_mask_decoder"):
        label = sam.sam_prompt_encoder.point_embeddings[1].weight
        sam.sam_mask_decoder = PromptBlobDecoder(sam.sam_mask_decoder, label)
    else:
        sam.mask_decoder = PromptBlobDecoder(sam.mask_decoder, sam.prompt_encoder.point_embeddings[1].weight)
    return sam
