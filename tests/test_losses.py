"""losses.py against a plain brute-force implementation of MLCD Eq. 5 / RICE Eq. 3-4, in one process and
sharded over two gloo processes."""
import math
import os
import sys
import tempfile

import numpy as np
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


def brute_force_sampled(emb, weight, labels, negatives, s=64.0, m=0.3):
    """Eq. 5 with a given negative set per row: negatives[i] is the list of row i's N'."""
    emb, weight = emb.double(), weight.double()
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
    terms = []
    for i in range(emb.shape[0]):
        pos = sorted({int(c) for c in labels[i].reshape(-1).tolist() if c >= 0})
        if not pos:
            continue
        c_pos = cos[i, pos]
        theta = torch.acos(c_pos.clamp(-1 + 1e-7, 1 - 1e-7))
        phi = torch.where(c_pos > math.cos(math.pi - m), torch.cos(theta + m), c_pos - m * math.sin(math.pi - m))
        terms.append(torch.log(1 + torch.exp(-s * phi).sum()) + torch.log(1 + torch.exp(s * cos[i, negatives[i]]).sum()))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("rule", losses.NEGATIVE_RULES)
def test_sampling_keeps_positives_and_draws_rho_negatives(rule):
    K, rho = 1000, 0.1
    bank = losses.CentreBank(K, 8, rho=rho, negatives=rule)
    labels = np.array([[3, 500, -1], [999, 3, 7], [-1, -1, -1], [42, -1, -1]])
    positives = {3, 500, 999, 7, 42}
    counts, rates = np.zeros(K), []
    for t in range(300):
        d = bank.draw([labels], [[4]], key=(t,))[0]
        assert positives <= set(d.active.tolist())
        assert np.all(d.active[1:] > d.active[:-1])                   # sorted, no repeats
        clean = losses.clean_labels(labels, K)                        # rows sorted, repeats dropped
        assert (d.col[clean >= 0] >= 0).all() and (d.active[d.col[clean >= 0]] == clean[clean >= 0]).all()
        if rule == "shared":
            assert len(d.active) == len(positives) + int(rho * (K - len(positives)))
        elif rule == "partial-fc":
            assert len(d.active) == max(int(rho * K), len(positives))
        negatives = d.active if d.negative is None else d.active[d.negative]
        counts[negatives] += 1
        rates.append(d.negatives_per_row()[[0, 1, 3]] / (K - np.array([2, 3, 1])))
    # negatives are uniform: each non-positive centre is a negative with probability about rho
    neg = np.array([c for c in range(K) if c not in positives])
    freq = counts[neg] / 300
    assert abs(freq.mean() - rho) < 0.005 and freq.std() < 0.04   # binomial std is 0.017
    if rule == "per-row":                                          # positives are negatives at rate rho too
        assert abs(np.mean(rates) - rho) < 0.003
        assert 0.05 < counts[sorted(positives)].mean() / 300 < 0.16
    # the forward uses exactly that active set
    torch.manual_seed(0)
    out = bank(torch.randn(4, 8), torch.from_numpy(labels))
    assert positives <= set(range(K)) and out.rows == 3
    if rule == "shared":
        assert out.num_active == len(positives) + int(rho * (K - len(positives)))


def zipf_labels(rng, rows, width, K, a=1.1):
    """Rows of `width` distinct-ish ids, Zipf over a random permutation of the K classes."""
    ranks = np.minimum(rng.zipf(a, (rows, width)) - 1, K - 1)
    return rng.permutation(K)[ranks]


@pytest.mark.parametrize("labels_kind", ["uniform", "zipf", "ocr"])
def test_per_row_rate_is_rho_at_a_32k_batch(labels_kind):
    """RICE's rho: every row sees rho of its non-positive classes, at the papers' 32K batch, whatever the label
    distribution; the shared rule does not (other rows' positives are everyone's negatives)."""
    rng = np.random.default_rng(0)
    B, rho = 32768, 0.1
    if labels_kind == "ocr":                      # text regions: up to 10 token ids of 49,408, skewed
        K = 49408
        labels = zipf_labels(rng, B, 10, K, a=1.3)
        labels[rng.random((B, 10)) < 0.4] = -1
        labels[:, 0] = np.abs(labels[:, 0])
    else:                                         # MLCD's l = 8 labels per image over K = 1M
        K = 1_000_000
        labels = rng.integers(0, K, (B, 8)) if labels_kind == "uniform" else zipf_labels(rng, B, 8, K)
    for world in (1, 4):
        rates = losses.negative_rates(labels, K, rho, "per-row", world=world, key=(world,))
        print(f"{labels_kind}, {world} shards: per-row rate mean {rates.mean():.4f}, min {rates.min():.4f}, "
              f"max {rates.max():.4f}")
        assert abs(rates.mean() - rho) < 0.01 and np.abs(rates - rho).max() < 0.01
    shared = losses.negative_rates(labels, K, rho, "shared")
    print(f"{labels_kind}: shared rule rate {shared.mean():.4f}")
    assert shared.mean() > rho + 0.02


@pytest.mark.parametrize("rule", losses.NEGATIVE_RULES)
def test_sampled_loss_equals_brute_force_on_its_negatives(rule):
    emb, weight, labels = make_problem(seed=2, B=9, K=60, D=10, M=3)
    bank = losses.CentreBank(60, 10, rho=0.3, negatives=rule)
    bank.load_full_weight(weight)
    d = bank.draw([labels.numpy()], [[9]], key=(5,))[0]
    negs = []
    for i in range(9):
        own = set(labels[i][labels[i] >= 0].tolist())
        cols = d.active if d.negative is None else d.active[d.negative]
        negs.append(sorted(set(cols.tolist()) - own))
    e = emb.clone().requires_grad_()
    out = bank(e, draw=d)
    out.loss.backward()
    e_ref, w_ref = emb.double().requires_grad_(), weight.double().requires_grad_()
    ref = brute_force_sampled(e_ref, w_ref, labels, negs)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(e.grad.double(), e_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bank.weight.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", losses.NEGATIVE_RULES)
@pytest.mark.parametrize("rho", [1.0, 0.2])
def test_micro_batches_of_one_draw_equal_the_whole_batch(rule, rho):
    """Gradient accumulation: one draw for the step, each micro-batch's row sum over the step's labelled rows:
    the summed losses and gradients are those of the whole batch in one call."""
    emb, weight, labels = make_problem(seed=4, B=10, K=50, D=8, M=3)
    bank = losses.CentreBank(50, 8, rho=rho, negatives=rule)
    bank.load_full_weight(weight)
    e = emb.clone().requires_grad_()
    whole = bank(e, draw=bank.draw([labels.numpy()], [[10]], key=(1, 2))[0])
    whole.loss.backward()
    g_e, g_w = e.grad.clone(), bank.weight.grad.clone()
    bank.weight.grad = None
    e2 = emb.clone().requires_grad_()
    parts = [labels[:4].numpy(), labels[4:].numpy()]
    draws = bank.draw(parts, [[4], [6]], key=(1, 2))
    total = 0
    for sl, d in zip((slice(0, 4), slice(4, 10)), draws):
        out = bank(e2[sl], draw=d)
        out.loss.backward()
        total = total + out.loss.detach()
    assert total.item() == pytest.approx(whole.loss.item(), rel=1e-6)
    torch.testing.assert_close(e2.grad, g_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bank.weight.grad, g_w, rtol=1e-5, atol=1e-7)


def test_inactive_rows_get_no_gradient():
    torch.manual_seed(1)
    K = 500
    labels = torch.tensor([[1, 2], [300, -1]])
    dense = losses.CentreBank(K, 8, rho=0.05)
    out = dense(torch.randn(2, 8), labels)
    out.loss.backward()
    touched = dense.weight.grad.abs().sum(1) > 0
    assert touched[[1, 2, 300]].all()
    assert touched.sum() <= out.num_active < 3 + 2 * 0.05 * K

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
    # sampled run: the draw is keyed by rank 0's seed and class-id blocks, so it equals one process's
    sampled = losses.CentreBank(weight.shape[0], weight.shape[1], rho=0.25)
    sampled.load_full_weight(weight)
    torch.manual_seed(123 + rank)                      # ranks differ; the draw takes rank 0's
    s_out = sampled(emb[lo:hi], labels[lo:hi, : widths[rank]])
    torch.save({"loss": out.loss.detach(), "grad": e.grad, "wgrad": bank.weight.grad, "start": bank.start,
                "num_local": bank.num_local, "full": full, "sampled_loss": s_out.loss.detach()},
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
    sampled = losses.CentreBank(weight.shape[0], weight.shape[1], rho=0.25)
    sampled.load_full_weight(weight)
    torch.manual_seed(123)                             # rank 0's seed in the workers
    ref_sampled = sampled(emb, labels).loss.item()

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
        assert res["sampled_loss"].item() == pytest.approx(ref_sampled, rel=1e-5)


def test_cosines_stay_fp32_under_bf16_autocast():
    emb, weight, labels = make_problem(seed=5)
    bank = losses.CentreBank(weight.shape[0], weight.shape[1], rho=1.0)
    bank.load_full_weight(weight)
    ref = bank(emb.bfloat16().float(), labels).loss       # the same bf16-rounded inputs, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bank(emb.bfloat16(), labels).loss
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=1e-6)
