"""The probe protocol of 05_eval.py on arrays: weighted k-NN (DINO), the L2-regularised logistic-regression probe
with its C search (CLIP's protocol: C searched on a validation part of probe-train, refitted on all of it,
scored once on probe-test), multi-label mAP, OCR token recall@k, dense mIoU, and the report's columns. Every
probe takes L2-normalised features, labels, a split per row (0 train, 1 validation, 2 probe-test) and a
ProbeSettings; none reads or writes a file (05 does: the data, the encoders, extraction, t-SNE, the report).

    import probes
    s = probes.ProbeSettings(device="cpu")
    res = probes.classification_probe(probes.unit(x), labels, split, s)   # {"linear": {"top1", "C", ...}, "knn": ...}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

KNN_K = 10
KNN_TEMPERATURE = 0.07       # DINO's weighted k-NN
C_GRID = [10.0 ** e for e in range(-2, 7)]     # CLIP searched 1e-6..1e6; below 1e-2 nothing is learnt on unit features
C_REFINE = 2                 # halving rounds around the best C (half, then quarter decade)
PROBE_ITERS = 1000           # L-BFGS iterations per fit at most (CLIP's max_iter)
TOL_GRAD = 1e-4              # L-BFGS stops at this max-abs gradient of the mean loss (sklearn's tol)
RECALL_AT = 5
DENSE_MAX_PATCHES = 5_000    # training patches of the dense probe (a seeded subsample; raise it on a GPU)


@dataclass
class ProbeSettings:
    """What the probes take besides the arrays (05's --knn-k, --knn-temperature, --c-refine, --probe-iters,
    --dense-max-patches, --seed, and the device)."""
    knn_k: int = KNN_K
    knn_temperature: float = KNN_TEMPERATURE
    c_refine: int = C_REFINE
    probe_iters: int = PROBE_ITERS
    dense_max_patches: int = DENSE_MAX_PATCHES
    seed: int = 0
    device: object = "cpu"



def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_x, train_y, test_x, k: int, temperature: float, device="cpu", block: int = 4096):
    """Weighted k-NN on cosine similarity: the k most similar training rows vote with exp(cos / T).
    Labels are ints 0..C-1; returns predicted labels. Rows must be L2-normalised."""
    import torch
    tr = torch.as_tensor(train_x, device=device)
    ty = torch.as_tensor(train_y, device=device, dtype=torch.long)
    C = int(ty.max()) + 1
    k = min(k, len(tr))
    out = []
    for s in range(0, len(test_x), block):
        sims = torch.as_tensor(test_x[s: s + block], device=device) @ tr.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), C, device=device, dtype=torch.float64)
        votes.scatter_add_(1, ty[idx], torch.exp(top.double() / temperature))
        out.append(votes.argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class Linear:
    W: object                    # (d, K) torch tensor
    b: object                    # (K,)
    iters: int                   # L-BFGS iterations used (the cap: stopped before the tolerance was met)


def fit_linear(x, y, C: float, num_outputs: int, multilabel: bool = False, iters: int = PROBE_ITERS,
               tol: float = TOL_GRAD, device="cpu") -> Linear:
    """L2-regularised logistic regression with sklearn's objective 0.5 |W|^2 + C sum_i loss_i (bias not
    penalised), divided by C n: mean loss + |W|^2 / (2 C n). Softmax cross-entropy over num_outputs classes
    (y int, -1 = no class: left out) or, multilabel, the sum of per-output BCE (y multi-hot (n, num_outputs)).
    Full-batch L-BFGS (strong-Wolfe line search) from zero, stopped as sklearn stops: max-abs gradient below
    `tol` (sklearn's default 1e-4), or after `iters` iterations (CLIP: 1000)."""
    import torch
    import torch.nn.functional as F
    x = torch.as_tensor(x, device=device, dtype=torch.float32)
    y = torch.as_tensor(y, device=device)
    if not multilabel:
        keep = y >= 0
        x, y = x[keep], y[keep].long()
    n, d = x.shape
    # centred features: the same optimum (the unpenalised bias absorbs the mean, folded back below), but the
    # bias no longer couples to W along the mean direction, which L-BFGS otherwise crawls along on nearly
    # collinear features (untrained encoders)
    mu = x.mean(0) if n else torch.zeros(d, device=device)
    x = x - mu
    W = torch.zeros(d, num_outputs, device=device, requires_grad=True)
    b = torch.zeros(num_outputs, device=device, requires_grad=True)
    lam = 1.0 / (C * max(n, 1))
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, max_eval=2 * iters, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ W + b
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum") / n
        else:
            loss = F.cross_entropy(logits, y)
        loss = loss + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    if n:
        with torch.enable_grad():
            opt.step(closure)
    used = int(opt.state[W].get("n_iter", 0)) if n else 0
    W, b = W.detach(), b.detach()
    return Linear(W, b - mu @ W, used)


def linear_scores(x, m: Linear, device="cpu"):
    import torch
    return (torch.as_tensor(x, device=device, dtype=torch.float32) @ m.W + m.b).cpu().numpy()


def search_c(fit, score, grid=C_GRID, refine: int = C_REFINE) -> tuple[float, list, Linear]:
    """CLIP's search: every decade of `grid`, then `refine` rounds that halve the step around the best.
    fit(C) -> model, score(model) -> validation score (higher is better). Returns (best C, [(C, score)] in the
    order tried, the best C's model); among equal scores the smallest C (the strongest regularisation) wins."""
    tried, models = {}, {}
    for C in grid:
        models[C] = fit(C)
        tried[C] = score(models[C])

    def best():
        top = max(tried.values())
        return min(c for c, v in tried.items() if v == top)

    step = 1.0
    for _ in range(refine):
        step /= 2
        c0 = best()
        for C in (c0 / 10 ** step, c0 * 10 ** step):
            if C not in tried:
                models[C] = fit(C)
                tried[C] = score(models[C])
    c = best()
    return c, [(float(k), float(v)) for k, v in tried.items()], models[c]


def encode_labels(*arrays):
    """Labels (any hashable) -> ints 0..C-1 over the classes of arrays[0] (probe-train), -1 for a class it does
    not have (a probe-test sample of such a class always counts as wrong)."""
    classes = sorted(set(arrays[0].tolist()))
    index = {c: i for i, c in enumerate(classes)}
    return classes, [np.array([index.get(v, -1) for v in a.tolist()], np.int64) for a in arrays]


def classification_probe(x, labels, split, settings: ProbeSettings) -> dict:
    """Linear probe (CLIP protocol) and weighted k-NN, top-1 accuracy. x: L2-normalised rows; labels: ints or
    strings; split per row: 0 train, 1 validation (part of probe-train), 2 probe-test."""
    dev, iters, refine = settings.device, settings.probe_iters, settings.c_refine
    t0 = time.time()
    tr, va, te = (split == 0), (split == 1), (split == 2)
    full = tr | va
    counts = {"train": int(tr.sum()), "val": int(va.sum()), "test": int(te.sum())}
    classes, (y_full, y_tr, y_va, y_te) = encode_labels(labels[full], labels[tr], labels[va], labels[te])
    counts["classes"] = len(classes)
    counts["test_of_unseen_classes"] = int((y_te < 0).sum())
    if counts["test"] == 0 or len(classes) < 2:
        return {"skipped": "no probe-test rows" if counts["test"] == 0 else "fewer than 2 classes in probe-train",
                "counts": counts}
    res = {"counts": counts, "majority_top1": float((y_te == np.bincount(y_full).argmax()).mean())}
    # linear: C searched train -> validation, refitted on train + validation, scored once on probe-test
    if counts["val"] and len(set(y_tr.tolist())) >= 2:
        C, search, _ = search_c(
            lambda C: fit_linear(x[tr], y_tr, C, len(classes), iters=iters, device=dev),
            lambda m: float((linear_scores(x[va], m, dev).argmax(1) == y_va).mean()), refine=refine)
    else:                                               # too few images for a validation part
        C, search = 1.0, []
    final = fit_linear(x[full], y_full, C, len(classes), iters=iters, device=dev)
    res["linear"] = {"top1": float((linear_scores(x[te], final, dev).argmax(1) == y_te).mean()), "C": C,
                     "iters": final.iters, "search": search, "val_metric": "top1"}
    pred = knn_predict(x[full], y_full, x[te], settings.knn_k, settings.knn_temperature, dev)
    res["knn"] = {"top1": float((pred == y_te).mean()), "k": min(settings.knn_k, int(full.sum())),
                  "temperature": settings.knn_temperature}
    res["time_s"] = round(time.time() - t0, 3)
    return res


def mean_average_precision(scores, Y) -> tuple[float, int]:
    """(macro mean of sklearn's average precision over the columns of Y with a positive, their number)."""
    from sklearn.metrics import average_precision_score
    cols = Y.sum(0) > 0
    if not cols.any():
        return float("nan"), 0
    return float(average_precision_score(Y[:, cols], scores[:, cols], average="macro")), int(cols.sum())


def multilabel_probe(x, sets: list, split, settings: ProbeSettings) -> dict:
    """Multi-label linear probe (one BCE output per label seen in probe-train, CLIP's protocol otherwise) ->
    mAP over the labels present in probe-test. sets: per row the set of its labels (may be empty). Baseline:
    a constant score, whose average precision is the label's prevalence in probe-test."""
    dev, iters, refine = settings.device, settings.probe_iters, settings.c_refine
    t0 = time.time()
    tr, va, te = (split == 0), (split == 1), (split == 2)
    full = tr | va
    vocab = sorted({v for i in np.flatnonzero(full) for v in sets[i]}, key=str)
    index = {v: k for k, v in enumerate(vocab)}
    Y = np.zeros((len(sets), len(vocab)), np.float32)
    for i, s in enumerate(sets):
        for v in s:
            if v in index:
                Y[i, index[v]] = 1
    counts = {"train": int(tr.sum()), "val": int(va.sum()), "test": int(te.sum()), "labels": len(vocab),
              "test_labels_unseen": len({v for i in np.flatnonzero(te) for v in sets[i]} - set(vocab))}
    if counts["test"] == 0 or len(vocab) < 2:
        return {"skipped": "no probe-test rows" if counts["test"] == 0 else "fewer than 2 labels in probe-train",
                "counts": counts}
    present = Y[te].sum(0) > 0
    res = {"counts": counts, "prevalence_map": float(Y[te][:, present].mean(0).mean()) if present.any() else None}
    if counts["val"] and (Y[va].sum(0) > 0).any():
        C, search, _ = search_c(
            lambda C: fit_linear(x[tr], Y[tr], C, len(vocab), multilabel=True, iters=iters, device=dev),
            lambda m: mean_average_precision(linear_scores(x[va], m, dev), Y[va])[0], refine=refine)
    else:
        C, search = 1.0, []
    final = fit_linear(x[full], Y[full], C, len(vocab), multilabel=True, iters=iters, device=dev)
    m, scored = mean_average_precision(linear_scores(x[te], final, dev), Y[te])
    res["linear"] = {"map": m, "labels_scored": scored, "C": C, "iters": final.iters, "search": search,
                     "val_metric": "map"}
    res["time_s"] = round(time.time() - t0, 3)
    return res


def recall_at(scores, targets: list, k: int) -> float:
    """Mean over rows of |top-k outputs by score  intersect  targets| / |targets| (rows without targets left out)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    r = [len(set(t.tolist()) & set(row.tolist())) / len(t) for row, t in zip(top, targets) if len(t)]
    return float(np.mean(r)) if r else float("nan")


def ocr_probe(x, tokens: list, words: np.ndarray, split, settings: ProbeSettings) -> dict:
    """Multi-label linear probe over the token ids of probe-train -> recall@5; word k-NN accuracy."""
    dev, iters, refine = settings.device, settings.probe_iters, settings.c_refine
    t0 = time.time()
    tr, va, te = (split == 0), (split == 1), (split == 2)
    full = tr | va
    counts = {"train": int(tr.sum()), "val": int(va.sum()), "test": int(te.sum())}
    vocab = sorted({t for i in np.flatnonzero(full) for t in tokens[i]})
    index = {t: k for k, t in enumerate(vocab)}
    counts["token_ids"] = len(vocab)
    if counts["test"] == 0 or len(vocab) < 2:
        return {"skipped": "no probe-test text boxes" if counts["test"] == 0 else "fewer than 2 token ids",
                "counts": counts}
    # targets as output positions; ids never seen in probe-train become -1: they can never be recalled
    targets = [np.array([index.get(t, -1) for t in tokens[i]], np.int64) for i in range(len(tokens))]
    Y = np.zeros((len(tokens), len(vocab)), np.float32)
    for i, t in enumerate(targets):
        Y[i, t[t >= 0]] = 1
    te_targets = [targets[i] for i in np.flatnonzero(te)]
    freq = Y[full].sum(0)                              # baseline: probe-train's most frequent token ids
    res = {"counts": counts, f"frequency_recall@{RECALL_AT}": recall_at(
        np.broadcast_to(freq, (int(te.sum()), len(vocab))), te_targets, RECALL_AT)}
    if counts["val"]:
        va_targets = [targets[i] for i in np.flatnonzero(va)]
        C, search, _ = search_c(
            lambda C: fit_linear(x[tr], Y[tr], C, len(vocab), multilabel=True, iters=iters, device=dev),
            lambda m: recall_at(linear_scores(x[va], m, dev), va_targets, RECALL_AT), refine=refine)
    else:
        C, search = 1.0, []
    final = fit_linear(x[full], Y[full], C, len(vocab), multilabel=True, iters=iters, device=dev)
    res["linear"] = {f"recall@{RECALL_AT}": recall_at(linear_scores(x[te], final, dev), te_targets, RECALL_AT),
                     "C": C, "iters": final.iters, "search": search, "val_metric": f"recall@{RECALL_AT}"}
    words_seen, (y_full, y_te) = encode_labels(words[full], words[te])
    pred = knn_predict(x[full], y_full, x[te], settings.knn_k, settings.knn_temperature, dev)
    res["knn"] = {"word_top1": float((pred == y_te).mean()), "k": min(settings.knn_k, int(full.sum())),
                  "words_in_probe_train": len(words_seen), "test_words_unseen": int((y_te < 0).sum())}
    res["time_s"] = round(time.time() - t0, 3)
    return res


def miou(pred, truth, num_classes: int) -> tuple[float, int]:
    """(mean IoU over the classes present in `truth`, their number); ints in 0..num_classes-1."""
    conf = np.bincount(truth * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(1) > 0
    return float((tp[present] / union[present]).mean()), int(present.sum())


def dense_probe(tokens, labels, split, settings: ProbeSettings) -> dict:
    """A linear classifier (the same logistic regression and C search) on L2-normalised patch tokens -> mIoU
    and patch accuracy on the probe-test patches. Training patches: a seeded subsample of at most
    settings.dense_max_patches (05: --dense-max-patches) of probe-train minus validation (full-batch L-BFGS
    over every patch is the cost);
    validation and probe-test patches: all."""
    dev, iters, refine = settings.device, settings.probe_iters, settings.c_refine
    t0 = time.time()
    keep = labels >= 0
    tr, va, te = keep & (split == 0), keep & (split == 1), keep & (split == 2)
    if tr.sum() > settings.dense_max_patches:
        sub = np.zeros_like(tr)
        rng = np.random.default_rng(settings.seed)
        sub[rng.choice(np.flatnonzero(tr), settings.dense_max_patches, replace=False)] = True
        tr = sub
    counts = {"train_patches": int(tr.sum()), "val_patches": int(va.sum()), "test_patches": int(te.sum()),
              "unknown_patches": int((~keep).sum())}
    full = tr | va
    classes, (y_full, y_tr, y_va, y_te) = encode_labels(labels[full], labels[tr], labels[va], labels[te])
    counts["classes"] = len(classes)
    if counts["test_patches"] == 0 or len(classes) < 2:
        return {"skipped": "no probe-test patches" if not counts["test_patches"] else "fewer than 2 classes",
                "counts": counts}
    K = len(classes) + 1                               # one more slot: classes that probe-train never shows
    y_va, y_te = np.where(y_va < 0, K - 1, y_va), np.where(y_te < 0, K - 1, y_te)
    x = unit(tokens)
    # the searched model is kept (no refit on train + validation): the training patches are a subsample
    # anyway, and a refit on every validation patch would cost as much as the whole search
    if counts["val_patches"] and len(set(y_tr.tolist())) >= 2:
        C, search, final = search_c(
            lambda C: fit_linear(x[tr], y_tr, C, len(classes), iters=iters, device=dev),
            lambda m: miou(linear_scores(x[va], m, dev).argmax(1), y_va, K)[0], refine=refine)
    else:
        C, search = 1.0, []
        final = fit_linear(x[full], y_full, C, len(classes), iters=iters, device=dev)
    pred = linear_scores(x[te], final, dev).argmax(1)
    m, present = miou(pred, y_te, K)
    return {"counts": {**counts, "test_classes_present": present},
            "linear": {"miou": m, "patch_accuracy": float((pred == y_te).mean()), "C": C, "iters": final.iters,
                       "search": search, "val_metric": "miou"},
            "majority_miou": miou(np.full_like(y_te, np.bincount(y_full).argmax()), y_te, K)[0],
            "time_s": round(time.time() - t0, 3)}


# the report's columns: (header, probe key, metric path); 05's markdown() writes them
COLUMNS = [
    ("image linear", "image", ("linear", "top1")), ("image k-NN", "image", ("knn", "top1")),
    ("image attentive", "image_attentive", ("top1",)),
    ("image mAP", "present_classes", ("linear", "map")),
    # "image mAP (<field>)" for each category field (image_contents) goes here: markdown() inserts them
    ("count linear", "object_count", ("linear", "top1")),
    ("obj linear (region)", "objects_region", ("linear", "top1")),
    ("obj k-NN (region)", "objects_region", ("knn", "top1")),
    # "obj linear (region, <field>)" for each category field goes here, and after the pooled k-NN the same
    ("obj linear (pooled)", "objects_pooled", ("linear", "top1")),
    ("obj k-NN (pooled)", "objects_pooled", ("knn", "top1")),
    ("OCR R@5 (region)", "ocr_region", ("linear", "recall@5")),
    ("word k-NN (region)", "ocr_region", ("knn", "word_top1")),
    ("OCR R@5 (pooled)", "ocr_pooled", ("linear", "recall@5")),
    ("word k-NN (pooled)", "ocr_pooled", ("knn", "word_top1")),
    ("dense mIoU", "dense", ("linear", "miou")),
]


def metric(probes: dict, key: str, path) -> float | None:
    v = probes.get(key)
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
    return v


# ----------------------------------------------------------------------------------------------------------
# MLCD Tab. 1's suite (eval_suite.py): CLIP's metric per dataset (CLIP Tab. 9, MLCD Tab. 11)

def mean_per_class(pred, y) -> float:
    """The mean over the test classes of each class's recall (FGVC Aircraft, Oxford Pets, Caltech-101, Flowers)."""
    pred, y = np.asarray(pred), np.asarray(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def ap_11point(scores, positive) -> float:
    """VOC2007's 11-point interpolated average precision of one class: the mean over recall thresholds
    0, 0.1, ..., 1 of the best precision at a recall at least that high (0 where none reaches it)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hit = np.asarray(positive, bool)[order]
    if not hit.any():
        return float("nan")
    tp = np.cumsum(hit)
    recall, precision = tp / hit.sum(), tp / np.arange(1, len(hit) + 1)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def suite_metric(metric: str, scores, y) -> float:
    """One dataset's score on its test split from the probe's scores (n, classes) and the true labels:
    accuracy, mean_per_class, top1_top5_mean (Kinetics-700), roc_auc (Hateful Memes, binary: the positive
    class's score), map11 (VOC2007: y multi-hot (n, classes), the mean of ap_11point over the classes)."""
    scores = np.asarray(scores)
    if metric == "accuracy":
        return float((scores.argmax(1) == y).mean())
    if metric == "mean_per_class":
        return mean_per_class(scores.argmax(1), y)
    if metric == "top1_top5_mean":
        top5 = np.argsort(-scores, 1)[:, :5]
        return float(((scores.argmax(1) == y).mean() + (top5 == np.asarray(y)[:, None]).any(1).mean()) / 2)
    if metric == "roc_auc":
        from sklearn.metrics import roc_auc_score
        return float(roc_auc_score(y, scores[:, 1] - scores[:, 0]))
    if metric == "map11":
        return float(np.nanmean([ap_11point(scores[:, c], np.asarray(y)[:, c]) for c in range(scores.shape[1])]))
    raise ValueError(f"unknown metric {metric!r}")


def suite_probe(x_train, y_train, x_val, y_val, x_test, y_test, metric: str, settings: ProbeSettings) -> dict:
    """CLIP's linear probe on one dataset: C searched on (train -> val) with the dataset's metric, the model
    refitted on train + val with the best C, scored once on test. Labels are class indices 0..K-1."""
    dev, iters = settings.device, settings.probe_iters
    t0 = time.time()
    multilabel = np.ndim(y_train) == 2          # VOC2007: multi-hot rows, one BCE output per class
    K = y_train.shape[1] if multilabel else int(max(y_train.max(), y_val.max() if len(y_val) else 0,
                                                    y_test.max())) + 1
    scorable = (np.asarray(y_val).sum(0) > 0).any() if multilabel else len(set(np.asarray(y_val).tolist())) >= 2
    if len(y_val) and scorable:
        C, search, _ = search_c(
            lambda C: fit_linear(x_train, y_train, C, K, multilabel, iters=iters, device=dev),
            lambda m: suite_metric(metric, linear_scores(x_val, m, dev), y_val), refine=settings.c_refine)
    else:                                       # a validation split too small to score (one class): no search
        C, search = 1.0, []
    final = fit_linear(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), C, K, multilabel,
                       iters=iters, device=dev)
    return {"score": suite_metric(metric, linear_scores(x_test, final, dev), y_test), "metric": metric, "C": C,
            "iters": final.iters, "search": search, "classes": K,
            "counts": {"train": len(y_train), "val": len(y_val), "test": len(y_test)},
            "time_s": round(time.time() - t0, 3)}


# ----------------------------------------------------------------------------------------------------------
# attentive probe (V-JEPA's, used by OneVision-Encoder): cross-attention pooling of frozen patch tokens

ATTENTIVE_HEADS = 4          # heads of the pooling attention (at most the token width allows)
ATTENTIVE_EPOCHS = 50        # full passes over probe-train
ATTENTIVE_LR = 1e-3          # AdamW with a cosine schedule, as V-JEPA trains its probe (Bardes et al. 2024); the
                             # values are the kit's, for probe sets of hundreds to thousands of images
ATTENTIVE_WD = 0.01
ATTENTIVE_BATCH = 256


def attentive_head(dim: int, classes: int, heads: int = ATTENTIVE_HEADS):
    """One learnable query attends over the frozen tokens (multi-head cross-attention with its output
    projection), then LayerNorm and a linear classifier: V-JEPA's attentive probe without the MLP."""
    import torch
    import torch.nn as nn

    class AttentiveHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.query, std=0.02)
            self.attn = nn.MultiheadAttention(dim, heads if dim % heads == 0 else 1, batch_first=True)
            self.norm = nn.LayerNorm(dim)
            self.fc = nn.Linear(dim, classes)

        def forward(self, tokens):                       # (B, P, D) -> (B, classes)
            pooled, _ = self.attn(self.query.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
            return self.fc(self.norm(pooled[:, 0]))
    return AttentiveHead()


def attentive_probe(tokens, labels, split, settings: ProbeSettings, epochs: int = ATTENTIVE_EPOCHS) -> dict:
    """Train attentive_head on probe-train's patch tokens (N, P, D) with AdamW and cross-entropy (batches of
    ATTENTIVE_BATCH, smaller on small sets so an epoch is at least 8 steps), for `epochs` epochs on a cosine
    schedule; keep the head of the epoch with the best validation accuracy (the latest among ties), score it
    once on probe-test (top-1). The tokens stay frozen and may be a memmap (the suite's): only the rows of a
    batch are read and moved to the device. Seeded by settings.seed."""
    import copy

    import torch
    import torch.nn.functional as F
    t0 = time.time()
    tr, va, te = (split == 0), (split == 1), (split == 2)
    classes, (y_tr, y_va, y_te) = encode_labels(labels[tr], labels[va], labels[te])
    rows_tr, rows_va, rows_te = (np.flatnonzero(m) for m in (tr, va, te))

    def x(rows):                                       # the tokens of these rows, on the device
        return torch.as_tensor(np.asarray(tokens[np.asarray(rows)], np.float32), device=settings.device)

    def accuracy(head, rows, y):
        if not len(rows):
            return 0.0
        with torch.no_grad():
            pred = np.concatenate([head(x(rows[s: s + 1024])).argmax(1).cpu().numpy()
                                   for s in range(0, len(rows), 1024)])
        return float((pred == y).mean())

    torch.manual_seed(settings.seed)
    head = attentive_head(tokens.shape[2], len(classes)).to(settings.device)
    opt = torch.optim.AdamW(head.parameters(), lr=ATTENTIVE_LR, weight_decay=ATTENTIVE_WD)
    batch = min(ATTENTIVE_BATCH, max(16, len(rows_tr) // 8))     # at least 8 steps an epoch on small sets
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * -(-len(rows_tr) // batch), 1))
    g, yt = torch.Generator().manual_seed(settings.seed), torch.as_tensor(y_tr, device=settings.device)
    best, best_epoch, best_state = -1.0, epochs, None
    for epoch in range(1, epochs + 1):
        for b in torch.randperm(len(rows_tr), generator=g).split(batch):
            loss = F.cross_entropy(head(x(rows_tr[b.numpy()])), yt[b.to(settings.device)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if len(rows_va):
            acc = accuracy(head, rows_va, y_va)
            if acc >= best:
                best, best_epoch, best_state = acc, epoch, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
    return {"top1": accuracy(head, rows_te, y_te), "val_top1": best if len(rows_va) else None,
            "epoch": best_epoch, "epochs": epochs, "heads": ATTENTIVE_HEADS, "lr": ATTENTIVE_LR,
            "weight_decay": ATTENTIVE_WD, "batch": batch,
            "counts": {"train": int(tr.sum()), "val": int(va.sum()), "test": int(te.sum()), "classes": len(classes)},
            "time_s": round(time.time() - t0, 3)}
