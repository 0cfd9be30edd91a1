"""MLCD / RICE cluster-discrimination losses over class-centre banks sharded across ranks (Partial FC style).

Notation: e the L2-normalised embedding, w_c the L2-normalised class centres, cos_c = e . w_c, s the scale
(64), m the margin (0.3), P the positive centres of a sample, N' the sampled negatives.

    MLCD paper Eq. 5:   L = log(1 + sum_{i in P} exp(-s * phi(cos_i))) + log(1 + sum_{j in N'} exp(s * cos_j))

phi puts the margin on positives only: ArcFace phi(cos) = cos(theta + m) (default, "following ArcFace"),
CosFace phi(cos) = cos - m (option). RICE's object-region loss (RICE Eq. 3) is the same with one positive, its
OCR-region loss (RICE Eq. 4) the same with up to M positives (token ids padded with -1).

Negatives (MLCD Sec. 3.2 and 4.1: |N'| = r |N|, r = 0.1; RICE Sec. 3.3: "negative cluster centers are
uniformly sampled from the full category set at rate rho = 0.1"). Three rules (`negatives=`):
  per-row     (default) every row's N' is a uniform sample of rate rho of the classes that are not its own
              positives, whatever the batch: one random set R of round(rho K) classes (drawn once per step
              and term) is shared by the batch, and a row's negatives are R minus its own positives.
              The step's positives are computed too (their columns carry the positive terms) but enter a
              row's negative sum only when they fall in R, through a column mask on the logits.
  shared      every positive of the global batch plus floor(rho * (K_local - positives_local)) random others
              per shard, shared by the batch: other rows' positives are every row's negatives, so a row sees
              more than rho of its non-positives when the batch's positives cover much of K (a 32K batch).
  partial-fc  the authors' Partial FC code: max(int(rho * K_local), positives_local) rows per shard,
              positives first, the rest random; shared by the batch like `shared`.
With rho = 1 all three use every centre. docs/choices.md, choice 3 ("Negatives"), has the measured per-row rates of the three.

Sharding (Partial FC, insightface arcface_torch): the K centres are split into contiguous shards, one per
rank (about K / world rows each). The draw is made on the host from the labels (`CentreBank.draw`), so the
step needs no device-to-host sync: which centres take part, the column of each positive and the column mask
arrive on the device as index tensors. R comes from random numbers keyed by (key, block of 65,536 class
ids), so it is the same for any number of ranks. A step of several micro-batches (gradient accumulation) draws once
for the whole step and divides every micro-batch's row sum by the step's labelled rows, so the accumulated
gradient is that of the global-batch mean.

The two log(1 + sum exp) terms are reduced across ranks (max and sum all-reduce) in `_LogOnePlusSumExp`,
whose backward needs no communication: every rank computes the same global loss, the gradient of its local
logits locally, and the all-gather's backward sums each embedding's gradient from all ranks. The resulting
embedding and centre gradients are those of the global-batch mean loss (equal to a one-process run).
Centre rows outside the active set get no gradient (zero rows, or absent with sparse_grad=True).

Labels: (B,) or (B, M) int, -1 is padding; repeated ids in a row count once. A row with no positive (all
padding, e.g. a padded region) contributes zero loss and is left out of the mean; a batch with no valid row
gives loss 0. Ids outside [-1, K) raise ValueError.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# the papers' loss settings: negatives at rate rho (RICE Sec. 3.3; MLCD Sec. 4.1's r), scale s and margin m on
# positives (RICE Sec. 4.1, "following ArcFace"); 04_train.py's defaults are these
RHO, SCALE, MARGIN = 0.1, 64.0, 0.3
IMAGE_TOPL = 8              # MLCD Sec. 4.1: l = 8 positive centres per image (03 labels them, the image term uses them)
OCR_MAX_TOKENS = 10         # RICE Tab. 5d: M = 10 token ids per text line (02 writes them, the OCR term, 05 probes)
CLIP_BPE_VOCAB = 49_408     # the OCR bank's classes: CLIP's BPE token ids (RICE Eq. 4; ClipTokens below)
NEGATIVE_RULES = ("per-row", "shared", "partial-fc")
DRAW_BLOCK = 65536          # class ids per block of random numbers: the draw does not depend on the sharding


def margin_positive(cos: torch.Tensor, m: float, kind: str) -> torch.Tensor:
    """phi(cos) for positives. ArcFace: cos(theta + m), continued linearly past theta + m > pi as in
    insightface's CombinedMarginLoss so it stays monotonic; CosFace: cos - m."""
    if kind == "cosface":
        return cos - m
    if kind == "none" or m == 0:
        return cos
    if kind != "arcface":
        raise ValueError(f"margin kind must be arcface, cosface or none, got {kind!r}")
    c = cos.clamp(-1 + 1e-7, 1 - 1e-7)          # keeps d/dcos of sin(theta) finite at |cos| = 1
    phi = c * math.cos(m) - torch.sqrt(1 - c * c) * math.sin(m)
    return torch.where(c > math.cos(math.pi - m), phi, c - m * math.sin(math.pi - m))


# ----------------------------------------------------------------------------------------------------------
# communication helpers (identity when there is no process group)


def _world(group):
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_rows(x: torch.Tensor, group, sizes: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate x (n_r, ...) of every rank along dim 0; ranks may hold different n_r. No autograd.
    With `sizes` (every rank's n_r, known on the host) there is no size exchange and no host sync."""
    world, _ = _world(group)
    if world == 1:
        return x, [x.shape[0]]
    if sizes is None:
        n = torch.tensor([x.shape[0]], device=x.device)
        parts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(parts, n, group=group)
        sizes = [int(s) for s in parts]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), list(sizes)


def all_gather_host(arrays: list[np.ndarray], group) -> list[tuple[np.ndarray, list[int]]]:
    """Every rank's int64 arrays (n_r, M_i), concatenated in rank order, for each i: (array, [n_r]).
    Host memory only: `group` is a gloo group (04 makes one beside NCCL), so no device is involved."""
    world, _ = _world(group)
    arrays = [np.ascontiguousarray(a, np.int64) for a in arrays]
    if world == 1:
        return [(a, [len(a)]) for a in arrays]
    rows = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    all_rows = torch.stack(all_rows).numpy()                          # (world, arrays)
    widths = [a.shape[1] for a in arrays]
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.int64)
    longest = int((all_rows * np.asarray(widths)).sum(1).max())
    padded = torch.zeros(longest, dtype=torch.int64)
    padded[: len(flat)] = torch.from_numpy(flat)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    out = []
    cursor = [0] * world
    for i, w in enumerate(widths):
        pieces = []
        for r in range(world):
            n = int(all_rows[r, i]) * w
            pieces.append(parts[r][cursor[r]: cursor[r] + n].numpy().reshape(-1, w))
            cursor[r] += n
        out.append((np.concatenate(pieces), [int(v) for v in all_rows[:, i]]))
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        out, sizes = all_gather_rows(x, group, sizes)
        ctx.group, ctx.sizes = group, sizes
        return out

    @staticmethod
    def backward(ctx, grad):
        world, rank = _world(ctx.group)
        if world > 1:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)   # every rank's loss touched every embedding
        start = sum(ctx.sizes[:rank])
        return grad[start: start + ctx.sizes[rank]], None, None


class _LogOnePlusSumExp(torch.autograd.Function):
    """log(1 + sum_j exp(z_j)) over the last dim and over all ranks; -inf entries drop out."""

    @staticmethod
    def forward(ctx, z, group):
        world, _ = _world(group)
        m = z.amax(-1).clamp(min=0) if z.shape[-1] else z.new_zeros(z.shape[:-1])   # 0 stands for the "1 +"
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        total = torch.exp(z - m[..., None]).sum(-1)
        if world > 1:
            dist.all_reduce(total, group=group)
        out = m + torch.log(total + torch.exp(-m))
        ctx.save_for_backward(torch.exp(z - out[..., None]))   # local share of the global softmax
        return out

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        return grad[..., None] * p, None


def log_one_plus_sum_exp(z: torch.Tensor, group=None) -> torch.Tensor:
    return _LogOnePlusSumExp.apply(z, group)


# ----------------------------------------------------------------------------------------------------------
# the draw: which centres take part, on the host


def clean_labels(labels, num_classes: int) -> np.ndarray:
    """(B,) or (B, M) ids -> (B, M) int64 with repeated ids of a row set to -1; ValueError outside [-1, K)."""
    labels = np.asarray(labels, np.int64)
    labels = labels[:, None] if labels.ndim == 1 else labels
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        bad = labels[(labels < -1) | (labels >= num_classes)]
        raise ValueError(f"labels must be class ids in [0, {num_classes}) or -1 for padding; got {bad[:5].tolist()}")
    labels = -np.sort(-labels, axis=1)                                  # descending: repeats side by side
    if labels.shape[1] > 1:
        labels[:, 1:][labels[:, 1:] == labels[:, :-1]] = -1
    return labels


def class_scores(start: int, stop: int, key) -> np.ndarray:
    """Uniform [0, 1) numbers for class ids [start, stop), from generators keyed by (key, block): the same
    number for a class whatever the shard that holds it."""
    out = np.empty(stop - start, np.float64)
    for b in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1 if stop > start else 0):
        lo = b * DRAW_BLOCK
        u = np.random.default_rng([*key, b]).random(DRAW_BLOCK)
        s, e = max(start, lo), min(stop, lo + DRAW_BLOCK)
        out[s - start: e - start] = u[s - lo: e - lo]
    return out


def random_classes(num_classes: int, rho: float, key, start: int = 0, num_local: int | None = None) -> np.ndarray:
    """R for the per-row rule: the round(rho K) classes of smallest score (a uniform sample of that size, the
    same for any sharding), as local ids of the shard [start, start + num_local). Every rank scores all K
    classes: 1M random numbers and one partition per term and step (about 20 ms on one core at K = 1M)."""
    num_local = num_classes - start if num_local is None else num_local
    n = min(num_classes, max(1, round(rho * num_classes)))
    picked = np.argpartition(class_scores(0, num_classes, key), n - 1)[:n] if n < num_classes else np.arange(n)
    picked = picked[(picked >= start) & (picked < start + num_local)] - start
    return np.sort(picked)


class Draw(NamedTuple):
    """One micro-batch's sample on one rank (host arrays; `CentreBank.forward` moves them to the device)."""
    sizes: list            # rows of every rank in the global micro-batch (the all-gather's split)
    active: np.ndarray     # (k,) sorted local centre ids that take part
    col: np.ndarray        # (B, M) column in `active` of each positive this shard holds, -1 elsewhere
    negative: np.ndarray | None   # (k,) bool: the column is a negative of every row but its own positives;
                                  # None: every active column is (shared, partial-fc, rho = 1)
    valid: np.ndarray      # (B,) bool: rows with at least one positive
    denominator: int       # labelled rows of the whole step: all ranks, all micro-batches

    def negatives_per_row(self) -> np.ndarray:
        """(B,) this shard's negatives of each row: sum over the ranks, divide by K - |P_i|: the row's rate."""
        mine = self.col >= 0
        if self.negative is None:
            return len(self.active) - mine.sum(1)
        own = mine & self.negative[np.maximum(self.col, 0)]
        return int(self.negative.sum()) - own.sum(1)


def draw(labels: list, sizes: list, num_classes: int, start: int, num_local: int, rho: float, rule: str,
         key) -> list[Draw]:
    """The sample of one step for one shard [start, start + num_local): labels[a] are micro-batch a's global
    rows (all ranks, rank order; already `clean_labels`), sizes[a] their split over the ranks."""
    if rule not in NEGATIVE_RULES:
        raise ValueError(f"negatives must be one of {NEGATIVE_RULES}, got {rule!r}")
    denominator = sum(int((lab >= 0).any(1).sum()) for lab in labels)
    local = [lab - start for lab in labels]
    mine = [(lab >= 0) & (loc >= 0) & (loc < num_local) for lab, loc in zip(labels, local)]
    if rho >= 1:
        actives = [np.arange(num_local)] * len(labels)
    elif rule == "per-row":
        random_set = np.zeros(num_local, bool)                                  # R: round(rho K) classes
        random_set[random_classes(num_classes, rho, key, start, num_local)] = True
        actives = [np.union1d(np.flatnonzero(random_set), loc[m]) for loc, m in zip(local, mine)]
    else:       # shared, partial-fc: one active set for the whole step, from all its positives
        pos = np.unique(np.concatenate([loc[m] for loc, m in zip(local, mine)]))
        want = (int(rho * (num_local - len(pos))) if rule == "shared" else
                max(0, int(rho * num_local) - len(pos)))
        score = class_scores(start, start + num_local, key)
        score[pos] = np.inf
        others = np.argpartition(score, want)[:want] if 0 < want < num_local else np.flatnonzero(np.isfinite(score))[:want]
        actives = [np.union1d(pos, others)] * len(labels)
    out = []
    for lab, loc, m, active in zip(labels, local, mine, actives):
        col = np.where(m, np.searchsorted(active, np.clip(loc, 0, None)), -1)
        neg = random_set[active] if rho < 1 and rule == "per-row" else None
        out.append(Draw(list(sizes[len(out)]), active, col, neg, (lab >= 0).any(1), denominator))
    return out


def negative_rates(labels, num_classes: int, rho: float, rule: str = "per-row", world: int = 1, key=(0,)):
    """(B,) share of each row's non-positive classes that are its negatives, over `world` shards: the
    quantity RICE's rho = 0.1 sets (docs/choices.md, choice 3)."""
    labels = clean_labels(labels, num_classes)
    negatives = np.zeros(len(labels), np.int64)
    base, extra = divmod(num_classes, world)
    for r in range(world):
        start, num_local = r * base + min(r, extra), base + (r < extra)
        negatives += draw([labels], [[len(labels)]], num_classes, start, num_local, rho, rule, key)[0].negatives_per_row()
    return negatives / (num_classes - (labels >= 0).sum(1))


# ----------------------------------------------------------------------------------------------------------
# the bank


class BankLoss(NamedTuple):
    loss: torch.Tensor          # scalar: sum over this call's rows / the step's labelled rows
    positive: torch.Tensor      # detached, the positive term's share of `loss`
    negative: torch.Tensor      # detached, the negative term's share
    num_active: int             # centres of this rank's shard that took part
    rows: int                   # labelled rows of the global batch in this call


def _on(device, a: np.ndarray) -> torch.Tensor:
    """A host array on the device without a sync (a copy from pageable memory does not wait on kernels)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


class CentreBank(nn.Module):
    """K class centres of dimension D, sharded over the ranks of `group`, with the MLCD / RICE loss.

    bank = CentreBank(1_000_000, 1024)          # object clusters (RICE Eq. 3, MLCD Eq. 5)
    bank = CentreBank(49_408, 1024)             # OCR tokens (RICE Eq. 4)
    out = bank(embeddings, labels)             # embeddings (b, D) of this rank, labels (b,) or (b, M)
    out.loss.backward()

    A step of several micro-batches (04_train.py): draws = bank.draw(global_labels, sizes, key), one Draw per
    micro-batch, then bank(embeddings_a, draw=draws[a]) for each; the losses add up to the step's mean.
    """

    def __init__(self, num_classes: int, dim: int, rho: float = RHO, scale: float = SCALE, margin: float = MARGIN,
                 margin_kind: str = "arcface", group=None, sparse_grad: bool = False, init_std: float = 0.01,
                 negatives: str = "per-row"):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes}, {dim}")
        if not 0 < rho <= 1:
            raise ValueError(f"rho (negative sampling rate) must be in (0, 1], got {rho}")
        if negatives not in NEGATIVE_RULES:
            raise ValueError(f"negatives must be one of {NEGATIVE_RULES}, got {negatives!r}")
        margin_positive(torch.zeros(1), margin, margin_kind)   # validates margin_kind early
        self.num_classes, self.dim, self.rho, self.negatives = num_classes, dim, rho, negatives
        self.scale, self.margin, self.margin_kind, self.sparse_grad = scale, margin, margin_kind, sparse_grad
        self.group = group if group is not None else (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world, rank = _world(self.group)
        base, extra = divmod(num_classes, world)
        self.num_local = base + (rank < extra)
        self.start = rank * base + min(rank, extra)
        self.weight = nn.Parameter(torch.normal(0, init_std, (self.num_local, dim)))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, dim={self.dim}, shard=[{self.start}, {self.start + self.num_local}), "
                f"rho={self.rho} ({self.negatives}), scale={self.scale}, margin={self.margin} ({self.margin_kind})")

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """(K, D) on every rank (collective; for tests and small banks: 04 saves shards)."""
        return all_gather_rows(self.weight.detach(), self.group)[0]

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(f"bank weight of shape {tuple(weight.shape)} does not fit K={self.num_classes}, D={self.dim}")
        self.weight.copy_(weight[self.start: self.start + self.num_local])

    def draw(self, labels: list, sizes: list, key) -> list[Draw]:
        """This shard's sample for a step whose micro-batches have the global label rows labels[a] (host)."""
        labels = [clean_labels(lab, self.num_classes) for lab in labels]
        return draw(labels, sizes, self.num_classes, self.start, self.num_local, self.rho, self.negatives, key)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None, draw: Draw | None = None) -> BankLoss:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (batch, {self.dim}), got {tuple(embeddings.shape)}")
        if draw is None:       # one call is one step: gather the labels and draw here (this path syncs)
            draw = self._draw_one_step(embeddings, labels)
        elif len(draw.valid) != sum(draw.sizes):
            raise ValueError(f"a draw of {len(draw.valid)} rows for a global batch of {sum(draw.sizes)}")
        device, k = embeddings.device, len(draw.active)
        emb = _AllGatherWithGrad.apply(embeddings, self.group, draw.sizes)      # (B, D) global batch
        active = _on(device, draw.active)
        w = F.embedding(active, self.weight, sparse=True) if self.sparse_grad else self.weight[active]
        # cosines in fp32 even under bf16 autocast: at s = 64 a bf16 cosine would move logits by ~0.25
        with torch.autocast(device.type, enabled=False):
            cos = F.normalize(emb.float(), dim=1) @ F.normalize(w.float(), dim=1).t()   # (B, k)

        # positive term: log(1 + sum_{i in P} exp(-s * phi(cos_i)))
        col = _on(device, np.maximum(draw.col, 0))
        mine = _on(device, draw.col >= 0)
        cos_pos = cos.gather(1, col) if k else cos.new_zeros(col.shape)
        z_pos = (-self.scale * margin_positive(cos_pos, self.margin, self.margin_kind)).masked_fill(~mine, -math.inf)
        pos_term = log_one_plus_sum_exp(z_pos, self.group)
        # negative term: log(1 + sum_{j in N'} exp(s * cos_j)), N' = the row's negative columns
        z_neg = self.scale * cos
        if draw.negative is not None:
            z_neg = z_neg.masked_fill(~_on(device, draw.negative), -math.inf)
        rows, slots = np.nonzero(draw.col >= 0)
        # (new_full, not new_tensor: a tensor made from a host value is a copy that waits for the device)
        z_neg = z_neg.index_put((_on(device, rows), _on(device, draw.col[rows, slots])), cos.new_full((), -math.inf))
        neg_term = log_one_plus_sum_exp(z_neg, self.group)

        valid = _on(device, draw.valid).float()
        den = max(draw.denominator, 1)
        return BankLoss(((pos_term + neg_term) * valid).sum() / den, (pos_term.detach() * valid).sum() / den,
                        (neg_term.detach() * valid).sum() / den, k, int(draw.valid.sum()))

    def _draw_one_step(self, embeddings, labels) -> Draw:
        if labels is None:
            raise ValueError("pass labels, or a draw from CentreBank.draw")
        labels = labels.to(embeddings.device).long()
        labels = labels[:, None] if labels.dim() == 1 else labels
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{labels.shape[0]} label rows for {embeddings.shape[0]} embeddings")
        world, _ = _world(self.group)
        if world > 1:   # ranks may carry different M: pad to the widest
            width = torch.tensor([labels.shape[1]], device=labels.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
            labels = F.pad(labels, (0, int(width) - labels.shape[1]), value=-1)
        labels, sizes = all_gather_rows(labels, self.group)
        key = torch.randint(0, 2 ** 62, (2,)).tolist()      # from torch's seed: the same on every rank that set it
        if world > 1:
            key = all_gather_rows(torch.tensor([key], device=embeddings.device), self.group)[0][0].tolist()
        return self.draw([labels.cpu().numpy()], [sizes], key)[0]


class ClipTokens:
    """RICE Sec. 3.1: labels = tokenizer(text), the OCR term's classes (Eq. 4). open_clip's CLIP BPE (its
    vocabulary file ships in the wheel): lower-cased, whitespace-cleaned, no start/end tokens; unique ids in
    order of first appearance, at most M (02 labels the lines with it, 05 probes with the same ids)."""
    name = "open_clip.tokenizer.SimpleTokenizer (CLIP BPE, bpe_simple_vocab_16e6)"

    def __init__(self, max_tokens: int = OCR_MAX_TOKENS):
        from open_clip.tokenizer import SimpleTokenizer
        self.tok = SimpleTokenizer()
        self.vocab_size = int(self.tok.vocab_size)
        self.max_tokens = max_tokens
        self._fresh_cache = dict(self.tok.cache)

    def __call__(self, text: str) -> list[int]:
        if len(self.tok.cache) > 200_000:       # its BPE cache grows with every new word: bound it on web text
            self.tok.cache = dict(self._fresh_cache)
        return list(dict.fromkeys(self.tok.encode(text)))[: self.max_tokens]
