"""The paper's semantic metrics (§3.2; docs/method.md, "Evaluation") as pure NumPy functions on feature arrays.

An evaluator classifier (trained separately from the comparator) embeds every ground-truth IHC of
the test set into a *library*: L2-normalised pooled features with their HER2 levels. Each generated
image is embedded the same way and compared with the library by cosine similarity.

- **top-k accuracy** (k = 1, 3, 5): the generated image's true level is among the levels of its k
  most similar library entries.
- **kNN accuracy** (k = 10): the majority level of its 10 most similar entries is the true level.

Choices the paper leaves open, all options here, with these defaults:

- *Self-inclusion* (``self_match``): the library is "all the embedded features of ground truth IHC
  images" (paper), so the generated image's own ground truth is in it: ``'include'`` is the
  default, the reading that reproduces the paper's protocol. It rewards pixel fidelity (a copy of
  the ground truth is its own nearest neighbour); ``'exclude'`` removes each image's own ground
  truth from its library and measures only whether it looks like *other* images of its level.
  Reports give both.
- *Neighbour order*: descending cosine similarity; equal similarities keep library order (a stable
  sort), so results are deterministic.
- *kNN ties* (``tie``): when several levels share the largest vote count among the k neighbours,
  ``'similarity'`` (default) picks the level whose voters have the largest summed cosine
  similarity (equivalently the smallest summed cosine distance; still tied: the level met first
  in neighbour order), ``'nearest'`` picks the tied level met first in neighbour order (the nearest
  neighbour among the tied levels).
- *k larger than the library*: k is clipped to the number of available entries and the effective
  k is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from derestainer.core.levels import HER2_LEVELS

#: Whether a generated image's own ground truth is in its library.
SelfMatch = Literal["include", "exclude"]
#: kNN tie rule.
Tie = Literal["similarity", "nearest"]
SELF_MATCH_CHOICES: tuple[SelfMatch, ...] = get_args(SelfMatch)
TIE_CHOICES: tuple[Tie, ...] = get_args(Tie)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero). ``[N, D]`` → float64 ``[N, D]``."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {a.shape}")
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(n, eps)


def cosine_similarity(queries: np.ndarray, library: np.ndarray) -> np.ndarray:
    """Cosine similarity of every query to every library entry. ``[Q, D]``, ``[L, D]`` → ``[Q, L]`` in [-1, 1]."""
    q, lib = l2_normalize(queries), l2_normalize(library)
    if q.shape[1] != lib.shape[1]:
        raise ValueError(f"feature sizes differ: queries D={q.shape[1]}, library D={lib.shape[1]}")
    return np.clip(q @ lib.T, -1.0, 1.0)


def nearest_neighbours(
    sim: np.ndarray, k: int, self_index: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar library entries of each query.

    Args:
        sim: ``[Q, L]`` similarities.
        k: neighbours wanted; clipped to the entries available (``L``, or ``L - 1`` with exclusion).
        self_index: ``[Q]`` library index to exclude for each query (its own ground truth), or -1
            for none; ``None`` excludes nothing.
    Returns:
        ``(indices [Q, k'], similarities [Q, k'])``, most similar first; ties in library order.
    """
    s = np.array(sim, dtype=np.float64, copy=True)
    if s.ndim != 2:
        raise ValueError(f"expected similarities [Q, L], got shape {s.shape}")
    n_q, n_l = s.shape
    available = n_l
    if self_index is not None:
        idx = np.asarray(self_index, dtype=np.int64).ravel()
        if idx.size != n_q:
            raise ValueError(f"self_index needs one entry per query ({n_q}), got {idx.size}")
        rows = np.nonzero(idx >= 0)[0]
        if np.any(idx[rows] >= n_l):
            raise ValueError("self_index points outside the library")
        s[rows, idx[rows]] = -np.inf  # sorts last; never chosen while k <= L - 1
        if rows.size:
            available = n_l - 1
    k_eff = max(0, min(int(k), available))
    order = np.argsort(-s, axis=1, kind="stable")[:, :k_eff]
    return order, np.take_along_axis(s, order, axis=1)


def topk_hits(neighbour_labels: np.ndarray, true_labels: np.ndarray, k: int) -> np.ndarray:
    """Whether the true level is among the first k neighbours' levels. ``[Q, K]``, ``[Q]`` → bool ``[Q]``."""
    nl = np.asarray(neighbour_labels)
    return np.any(nl[:, :k] == np.asarray(true_labels).reshape(-1, 1), axis=1)


def knn_vote(
    neighbour_labels: np.ndarray, neighbour_sims: np.ndarray, n_classes: int = 4, tie: Tie = "similarity"
) -> np.ndarray:
    """Majority level among each query's neighbours, ties broken by ``tie`` (module docstring).

    Args:
        neighbour_labels: ``[Q, K]`` int levels, most similar first.
        neighbour_sims: ``[Q, K]`` their cosine similarities.
    Returns:
        ``[Q]`` int64 predicted levels (-1 for a query without neighbours).
    """
    if tie not in TIE_CHOICES:
        raise ValueError(f"unknown tie rule {tie!r}; choose one of {', '.join(TIE_CHOICES)}")
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    sims = np.asarray(neighbour_sims, dtype=np.float64)
    n_q, k = labels.shape
    out = np.full(n_q, -1, dtype=np.int64)
    if k == 0:
        return out
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"neighbour levels must lie in 0..{n_classes - 1}")
    onehot = labels[..., None] == np.arange(n_classes)  # [Q, K, C]
    counts = onehot.sum(axis=1)  # [Q, C]
    # Rank (0 = nearest) at which each level first appears; K when absent.
    first = np.where(onehot.any(axis=1), onehot.argmax(axis=1), k)
    tied = counts == counts.max(axis=1, keepdims=True)
    if tie == "similarity":
        summed = (onehot * sims[..., None]).sum(axis=1)
        best = np.where(tied, summed, -np.inf)
        # np.isclose, not ==: sums of the same similarities in another order may differ in the last bit.
        tied = tied & np.isclose(best, best.max(axis=1, keepdims=True), rtol=0.0, atol=1e-12)
    out[:] = np.where(tied, first, k + 1).argmin(axis=1)
    return out


def semantic_metrics(
    query_features: np.ndarray,
    library_features: np.ndarray,
    library_labels: Sequence[int] | np.ndarray,
    query_labels: Sequence[int] | np.ndarray,
    self_index: Sequence[int] | np.ndarray | None = None,
    self_match: SelfMatch = "include",
    ks: Sequence[int] = (1, 3, 5),
    knn_k: int = 10,
    tie: Tie = "similarity",
    n_classes: int = 4,
) -> dict[str, Any]:
    """Top-k and kNN HER2 accuracy of generated images against a ground-truth feature library.

    Args:
        query_features: ``[Q, D]`` features of the generated images (normalised here).
        library_features: ``[L, D]`` features of the ground-truth images (normalised here).
        library_labels: ``[L]`` their levels (0..n_classes-1).
        query_labels: ``[Q]`` true level of each generated image.
        self_index: ``[Q]`` library index of each query's own ground truth (-1: not in the library);
            used only with ``self_match='exclude'``.
    Returns:
        ``{'top1': ..., 'top3': ..., 'top5': ..., 'knn': ..., 'knn_k': k used, 'topk_k': {'top5': k used},
        'n': Q, 'self_match', 'tie', 'per_level': {'0': {'n', 'top1', ..., 'knn'}, ...},
        'knn_pred': [Q] levels, 'hits': {'top1': [Q] bool, ..., 'knn': [Q] bool} (each query's hit, for
        confidence intervals), 'neighbours': [Q, max k] library indices, 'neighbour_sims': same}``.
    """
    if self_match not in SELF_MATCH_CHOICES:
        raise ValueError(f"unknown self_match {self_match!r}; choose one of {', '.join(SELF_MATCH_CHOICES)}")
    lib_y = np.asarray(library_labels, dtype=np.int64).ravel()
    q_y = np.asarray(query_labels, dtype=np.int64).ravel()
    lib_f, q_f = np.asarray(library_features), np.asarray(query_features)
    if lib_f.shape[0] != lib_y.size or q_f.shape[0] != q_y.size:
        raise ValueError("one label per feature row is needed (library and queries)")
    if np.any(lib_y < 0) or np.any(lib_y >= n_classes) or np.any(q_y < 0) or np.any(q_y >= n_classes):
        raise ValueError(f"semantic metrics need every level known and in 0..{n_classes - 1}")
    if self_match == "exclude" and self_index is None:
        raise ValueError("self_match='exclude' needs self_index (each query's own library entry)")
    k_max = max(max(ks), knn_k)
    idx, sims = nearest_neighbours(
        cosine_similarity(q_f, lib_f), k_max, self_index if self_match == "exclude" else None
    )
    n_labels = lib_y[idx]  # [Q, k']
    k_avail = idx.shape[1]
    out: dict[str, Any] = {"n": int(q_y.size), "self_match": self_match, "tie": tie}
    hits: dict[str, np.ndarray] = {}
    topk_used: dict[str, int] = {}
    for k in ks:
        hits[f"top{k}"] = topk_hits(n_labels, q_y, k)
        topk_used[f"top{k}"] = min(k, k_avail)
    k_knn = min(knn_k, k_avail)
    knn_pred = knn_vote(n_labels[:, :k_knn], sims[:, :k_knn], n_classes=n_classes, tie=tie)
    hits["knn"] = knn_pred == q_y
    for name, h in hits.items():
        out[name] = float(h.mean()) if h.size else float("nan")
    out["knn_k"] = k_knn
    out["topk_k"] = topk_used
    per: dict[str, dict[str, float | int]] = {}
    for c in range(n_classes):
        m = q_y == c
        if m.any():
            name = HER2_LEVELS[c] if c < len(HER2_LEVELS) else str(c)
            per[name] = {"n": int(m.sum()), **{k: float(h[m].mean()) for k, h in hits.items()}}
    out["per_level"] = per
    out["knn_pred"] = knn_pred
    out["hits"] = hits
    out["neighbours"] = idx
    out["neighbour_sims"] = sims
    return out
