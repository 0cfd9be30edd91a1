"""losses.py against a plain brute-force implementation of MLCD Eq. 5 / RICE Eq. 3-4, in one process and
sharded over two gloo processes."""
import math
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402


def brute_force_loss(emb, weight, labels, s=64.0, m=0.3, kind="arcface"):
    """Eq. 5 written out per sample over all K centres, float64, with Python sets for P and N."""
    emb, weight = emb.double(), weight.double()
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
    K = weight.shape[0]
    terms = []
    for i in range(emb.shape[0]):
        pos = sorted({int(c) for c in labels[i].reshape(-1).tolist() if c >= 0})
        if not pos:
            continue
        neg = [j for j in range(K) if j not in pos]
        c_pos = cos[i, pos]
        if kind == "arcface":
            theta = torch.acos(c_pos.clamp(-1 + 1e-7, 1 - 1e-7))
            phi = torch.where(c_pos > math.cos(math.pi - m), torch.cos(theta + m), c_pos - m * math.sin(math.pi - m))
        else:
            phi = c_pos - m
        terms.append(torch.log(1 + torch.exp(-s * phi).sum()) + torch.log(1 + torch.exp(s * cos[i, neg]).sum()))
    return torch.stack(terms).mean()


def make_problem(seed=0, B=8, K=40, D=12, M=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g)
    weight = torch.randn(K, D, generator=g)
    labels = torch.randint(0, K, (B, M), generator=g)
    labels[torch.rand(B, M, generator=g) < 0.3] = -1
    if M > 1:
        labels[0, 0] = labels[0, 1] = 7    # a repeated id counts once
    labels[1] = -1                         # a row with no positive
    labels[2:, 0] = labels[2:, 0].clamp(min=0)
    # pull a few embeddings onto their positive centre so positive and negative terms are both non-trivial
    emb[3] = weight[labels[3, 0].clamp(min=0)] * 2.0
    return emb, weight, labels


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("M", [1, 4])
def test_rho1_equals_brute_force(kind, M):
    emb, weight, labels = make_problem(M=M)
    bank = losses.CentreBank(weight.shape[0], weight.shape[1], rho=1.0, margin_kind=kind)
    bank.load_full_weight(weight)
    e = emb.clone().requires_grad_()
    out = bank(e, labels)
    out.loss.backward()

    e_ref, w_ref = emb.double().requires_grad_(), weight.double().requires_grad_()
    ref = brute_force_loss(e_ref, w_ref, labels, kind=kind)
    ref.backward()
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(e.grad.double(), e_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bank.weight.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-6)
    assert out.num_active == weight.shape[0]


def test_margin_formulas():
    cos = torch.linspace(-0.99, 0.99, 101)
    arc = losses.margin_positive(cos, 0.3, "arcface")
    inside = cos > math.cos(math.pi - 0.3)
    torch.testing.assert_close(arc[inside], torch.cos(torch.acos(cos[inside]) + 0.3))
    assert torch.all(arc[1:] >= arc[:-1])                       # monotonic past theta + m > pi
    torch.testing.assert_close(losses.margin_positive(cos, 0.3, "cosface"), cos - 0.3)
    with pytest.raises(ValueError):
        losses.margin_positive(cos, 0.3, "sphereface")


def test_sampling_keeps_positives_and_draws_rho_negatives():
    torch.manual_seed(0)
    K, rho = 1000, 0.1
    bank = losses.CentreBank(K, 8, rho=rho)
    labels = torch.tensor([[3, 500, -1], [999, 3, 7], [-1, -1, -1], [42, -1, -1]])
    positives = {3, 500, 999, 7, 42}
    counts = torch.zeros(K)
    for _ in range(300):
        active = bank.sample_active(labels[labels >= 0])
        assert positives <= set(active.tolist())
        assert active.numel() == len(positives) + int(rho * (K - len(positives)))
        assert torch.all(active[1:] > active[:-1])               # sorted, no repeats
        counts[active] += 1
    # negatives are uniform: each non-positive centre is drawn with probability about rho
    neg = torch.tensor([c for c in range(K) if c not in positives])
    freq = counts[neg] / 300
    assert abs(freq.mean().item() - rho) < 0.005
    assert freq.std().item() < 0.04                              # binomial std is 0.017
    # the forward uses exactly that active set
    out = bank(torch.randn(4, 8), labels)
    assert out.num_active == len(positives) + int(rho * (K - len(positives)))


def test_inactive_rows_get_no_gradient():
    torch.manual_seed(1)
    K = 500
    labels = torch.tensor([[1, 2], [300, -1]])
    dense = losses.CentreBank(K, 8, rho=0.05)
    dense(torch.randn(2, 8), labels).loss.backward()
    touched = dense.weight.grad.abs().sum(1) > 0
    assert touched[[1, 2, 300]].all()
    assert touched.sum() <= 3 + int(0.05 * (K - 3))

    sparse = losses.CentreBank(K, 8, rho=0.05, sparse_grad=True)
    out = sparse(torch.randn(2, 8), labels)
    out.loss.backward()
    grad = sparse.weight.grad.coalesce()
    assert grad.is_sparse
    assert grad.indices().shape[1] == out.num_active
    assert {1, 2, 300} <= set(grad.indices()[0].tolist())


def test_bad_labels():
    bank = losses.CentreBank(10, 4, rho=1.0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        bank(torch.randn(2, 4), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="padding"):
        bank(torch.randn(2, 4), torch.tensor([[1, -2], [3, 4]]))
    with pytest.raises(ValueError, match="label rows"):
        bank(torch.randn(3, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        losses.CentreBank(10, 4, rho=0.0)

    # all padding: documented zero loss, zero (finite) gradients, never NaN
    e = torch.randn(3, 4, requires_grad=True)
    out = bank(e, torch.full((3, 2), -1))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.all(e.grad == 0) and torch.all(bank.weight.grad == 0)

    # padded rows do not change the loss of the others
    e = torch.randn(3, 4)
    labels = torch.tensor([[1, 2], [-1, -1], [5, -1]])
    full = bank(e, labels).loss
    kept = bank(e[[0, 2]], labels[[0, 2]]).loss
    assert full.item() == pytest.approx(kept.item(), rel=1e-6)


def test_saturated_logits_stay_finite():
    # embeddings exactly on their centres (cos = 1) and on the opposite pole (cos = -1)
    bank = losses.CentreBank(6, 4, rho=1.0)
    w = bank.weight.detach()
    e = torch.stack([w[0] * 3, -w[1], w[2] + w[3]]).requires_grad_()
    out = bank(e, torch.tensor([[0], [1], [2]]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(e.grad).all() and torch.isfinite(bank.weight.grad).all()


# ---------------------------------------------------------------------------------------------------------
# two gloo processes == one process


def _two_rank_worker(rank, world, init_file, emb, weight, labels, splits, widths, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(123 + rank)
    bank = losses.CentreBank(weight.shape[0], weight.shape[1], rho=1.0)
    bank.load_full_weight(weight)
    lo, hi = splits[rank], splits[rank + 1]
    e = emb[lo:hi].clone().requires_grad_()
    out = bank(e, labels[lo:hi, : widths[rank]])     # ranks carry different batch sizes and label widths
    out.loss.backward()
    full = bank.full_weight()
    # sampled run: every rank keeps its own positives and about rho of its shard
    sampled = losses.CentreBank(weight.shape[0], weight.shape[1], rho=0.25)
    s_out = sampled(emb[lo:hi], labels[lo:hi, : widths[rank]])
    local = labels - sampled.start
    mine = {int(c) for c in local[(labels >= 0) & (local >= 0) & (local < sampled.num_local)].tolist()}
    torch.save({"loss": out.loss.detach(), "grad": e.grad, "wgrad": bank.weight.grad, "start": bank.start,
                "num_local": bank.num_local, "full": full, "sampled_active": s_out.num_active,
                "sampled_expected": len(mine) + int(0.25 * (sampled.num_local - len(mine))),
                "sampled_loss": s_out.loss.detach()},
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process():
    emb, weight, labels = make_problem(seed=3, B=7, K=41, D=10, M=4)
    labels[5:, 3] = -1                                 # rank 1's extra label column is padding anyway
    splits, widths = [0, 5, 7], [4, 3]
    bank = losses.CentreBank(weight.shape[0], weight.shape[1], rho=1.0)
    bank.load_full_weight(weight)
    e = emb.clone().requires_grad_()
    ref = bank(e, labels)
    ref.loss.backward()

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_two_rank_worker, args=(2, os.path.join(tmp, "init"), emb, weight, labels, splits, widths, tmp),
                 nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]

    assert results[0]["num_local"] + results[1]["num_local"] == weight.shape[0]
    for r, res in enumerate(results):
        assert res["loss"].item() == pytest.approx(ref.loss.item(), rel=1e-5)
        torch.testing.assert_close(res["grad"], e.grad[splits[r]:splits[r + 1]], rtol=1e-4, atol=1e-6)
        sl = slice(res["start"], res["start"] + res["num_local"])
        torch.testing.assert_close(res["wgrad"], bank.weight.grad[sl], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["full"], weight)
        assert res["sampled_active"] == res["sampled_expected"]
        assert torch.isfinite(res["sampled_loss"])


def test_cosines_stay_fp32_under_bf16_autocast():
    emb, weight, labels = make_problem(seed=5)
    bank = losses.CentreBank(weight.shape[0], weight.shape[1], rho=1.0)
    bank.load_full_weight(weight)
    ref = bank(emb.bfloat16().float(), labels).loss       # the same bf16-rounded inputs, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bank(emb.bfloat16(), labels).loss
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=1e-6)
