"""MLCD / RICE cluster-discrimination losses over class-centre banks sharded across ranks (Partial FC style).

Notation: e the L2-normalised embedding, w_c the L2-normalised class centres, cos_c = e . w_c, s the scale
(64), m the margin (0.3), P the positive centres of a sample, N' the sampled negatives.

    MLCD paper Eq. 5:   L = log(1 + sum_{i in P} exp(-s * phi(cos_i))) + log(1 + sum_{j in N'} exp(s * cos_j))

phi puts the margin on positives only: ArcFace phi(cos) = cos(theta + m) (default, "following ArcFace"),
CosFace phi(cos) = cos - m (option). RICE's object-region loss (RICE Eq. 3) is the same with one positive, its
OCR-region loss (RICE Eq. 4) the same with up to M positives (token ids padded with -1).

Sharding and sampling (Partial FC, insightface arcface_torch): the K centres are split into contiguous
shards, one per rank (about K / world rows each). Each step every rank all-gathers the embeddings and labels
of the global batch, keeps every centre of its shard that is a positive of some sample in the global batch,
and adds floor(rho * (K_local - positives_local)) uniformly drawn other centres (rho = 0.1: about rho * K rows
take part over all ranks). Logits are built only against these active rows. The active set is shared by the
batch, so other samples' positives act as negatives of a sample, as in Partial FC.

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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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


def all_gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate x (n_r, ...) of every rank along dim 0; ranks may hold different n_r. No autograd."""
    world, _ = _world(group)
    if world == 1:
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out, sizes = all_gather_rows(x, group)
        ctx.group, ctx.sizes = group, sizes
        return out

    @staticmethod
    def backward(ctx, grad):
        world, rank = _world(ctx.group)
        if world > 1:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)   # every rank's loss touched every embedding
        start = sum(ctx.sizes[:rank])
        return grad[start: start + ctx.sizes[rank]], None


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
# the bank


class BankLoss(NamedTuple):
    loss: torch.Tensor          # scalar, mean over rows with at least one positive
    positive: torch.Tensor      # detached mean of the positive term
    negative: torch.Tensor      # detached mean of the negative term
    num_active: int             # centres of this rank's shard that took part


class CentreBank(nn.Module):
    """K class centres of dimension D, sharded over the ranks of `group`, with the MLCD / RICE loss.

    bank = CentreBank(1_000_000, 1024)          # object clusters (RICE Eq. 3, MLCD Eq. 5)
    bank = CentreBank(49_408, 1024)             # OCR tokens (RICE Eq. 4)
    out = bank(embeddings, labels)             # embeddings (b, D) of this rank, labels (b,) or (b, M)
    out.loss.backward()
    """

    def __init__(self, num_classes: int, dim: int, rho: float = 0.1, scale: float = 64.0, margin: float = 0.3,
                 margin_kind: str = "arcface", group=None, sparse_grad: bool = False, init_std: float = 0.01):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes}, {dim}")
        if not 0 < rho <= 1:
            raise ValueError(f"rho (negative sampling rate) must be in (0, 1], got {rho}")
        margin_positive(torch.zeros(1), margin, margin_kind)   # validates margin_kind early
        self.num_classes, self.dim, self.rho = num_classes, dim, rho
        self.scale, self.margin, self.margin_kind, self.sparse_grad = scale, margin, margin_kind, sparse_grad
        self.group = group if group is not None else (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world, rank = _world(self.group)
        base, extra = divmod(num_classes, world)
        self.num_local = base + (rank < extra)
        self.start = rank * base + min(rank, extra)
        self.weight = nn.Parameter(torch.normal(0, init_std, (self.num_local, dim)))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, dim={self.dim}, shard=[{self.start}, {self.start + self.num_local}), "
                f"rho={self.rho}, scale={self.scale}, margin={self.margin} ({self.margin_kind})")

    # -- checkpoint helpers: banks are saved whole so a run can resume on another number of ranks --
    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """(K, D) on every rank (collective: every rank must call it)."""
        return all_gather_rows(self.weight.detach(), self.group)[0]

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(f"bank weight of shape {tuple(weight.shape)} does not fit K={self.num_classes}, D={self.dim}")
        self.weight.copy_(weight[self.start: self.start + self.num_local])

    # -- sampling --
    def sample_active(self, positives_local: torch.Tensor) -> torch.Tensor:
        """Sorted local row ids: every positive of the global batch in this shard plus
        floor(rho * (K_local - #positives)) uniform negatives (RICE Sec. 3.3, MLCD |N'| = r |N|)."""
        device = self.weight.device
        if self.rho >= 1:
            return torch.arange(self.num_local, device=device)
        pos = torch.unique(positives_local)
        num_neg = int(self.rho * (self.num_local - pos.numel()))
        score = torch.rand(self.num_local, device=device)
        score[pos] = 2.0                                   # positives always win the top-k
        return torch.topk(score, pos.numel() + num_neg, sorted=False).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> BankLoss:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (batch, {self.dim}), got {tuple(embeddings.shape)}")
        labels = labels.to(embeddings.device).long()
        if labels.dim() == 1:
            labels = labels[:, None]
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{labels.shape[0]} label rows for {embeddings.shape[0]} embeddings")
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            bad = labels[(labels < -1) | (labels >= self.num_classes)]
            raise ValueError(f"labels must be class ids in [0, {self.num_classes}) or -1 for padding; "
                             f"got {bad[:5].tolist()}")
        world, _ = _world(self.group)
        if world > 1:   # ranks may carry different M: pad to the widest
            width = torch.tensor([labels.shape[1]], device=labels.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
            labels = F.pad(labels, (0, int(width) - labels.shape[1]), value=-1)
        # repeated ids in a row count once
        labels = labels.sort(dim=1, descending=True).values
        labels[:, 1:] = labels[:, 1:].masked_fill(labels[:, 1:] == labels[:, :-1], -1)

        emb = _AllGatherWithGrad.apply(embeddings, self.group)            # (B, D) global batch
        labels = all_gather_rows(labels, self.group)[0]                   # (B, M)
        valid_row = (labels >= 0).any(1)

        local = labels - self.start
        in_shard = (labels >= 0) & (local >= 0) & (local < self.num_local)
        active = self.sample_active(local[in_shard])                      # (k,) sorted local ids
        k = active.numel()
        col = torch.searchsorted(active, local.clamp(0, max(self.num_local - 1, 0)))  # (B, M) column in logits
        in_shard &= col < k

        if self.sparse_grad:
            w = F.embedding(active, self.weight, sparse=True)
        else:
            w = self.weight[active]
        # cosines in fp32 even under bf16 autocast: at s = 64 a bf16 cosine would move logits by ~0.25
        with torch.autocast(emb.device.type, enabled=False):
            cos = F.normalize(emb.float(), dim=1) @ F.normalize(w.float(), dim=1).t()   # (B, k)

        # positive term: log(1 + sum_{i in P} exp(-s * phi(cos_i)))
        if k:
            cos_pos = cos.gather(1, col.clamp(max=k - 1))
        else:
            cos_pos = cos.new_zeros(labels.shape)
        z_pos = (-self.scale * margin_positive(cos_pos, self.margin, self.margin_kind)).masked_fill(~in_shard, -math.inf)
        pos_term = log_one_plus_sum_exp(z_pos, self.group)
        # negative term: log(1 + sum_{j in N'} exp(s * cos_j)), N' = active centres that are not this row's positives
        rows, slots = in_shard.nonzero(as_tuple=True)
        z_neg = (self.scale * cos).index_put((rows, col[rows, slots]), cos.new_tensor(-math.inf))
        neg_term = log_one_plus_sum_exp(z_neg, self.group)

        n_valid = valid_row.sum().clamp(min=1)
        weight = valid_row.float()
        loss = ((pos_term + neg_term) * weight).sum() / n_valid
        return BankLoss(loss, (pos_term.detach() * weight).sum() / n_valid,
                        (neg_term.detach() * weight).sum() / n_valid, k)
