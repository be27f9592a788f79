"""Evaluate a folder of generated IHC against a folder of ground truth: pairing, the per-image pass, aggregation.

The per-image pass (read both images, resize the prediction, SSIM/PSNR, stain statistics, a small
thumbnail for the pairing check) runs in worker processes, one image pair per task. When an
evaluator classifier is given, the main process streams the resized images through it in batches
while the workers go on, so every file is read once.

Pairing is by file name (stem): a ground truth without a prediction, a prediction without a ground
truth, two files with one stem, or an unreadable file is an error naming them, never silently
skipped; ``allow_missing=True`` evaluates the common names and reports how many were left out.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import list_images, read_image
from . import pixel, stain
from .semantic import (
    SELF_MATCH_CHOICES,
    TIE_CHOICES,
    confusion_matrix,
    semantic_metrics,
)

#: BCI names end in the HER2 level: ``00000_test_1+``. Level index = position in this tuple.
_BCI_LEVELS: tuple[str, ...] = ("0", "1+", "2+", "3+")
_BCI_LEVEL_RE = re.compile(r"_(0|1\+|2\+|3\+)$")
#: Side of the grey thumbnails used by the pairing check.
THUMB_SIZE: int = 32


class EvaluationError(ValueError):
    """The evaluation cannot be done as asked (pairing, labels, image sizes); the message says what to fix."""


@dataclass(frozen=True)
class Pair:
    """One generated image and its ground truth. ``level``: HER2 level 0..3 of the ground truth, -1 unknown."""

    name: str
    pred: Path
    gt: Path
    level: int = -1


@dataclass
class Pairing:
    """Result of :func:`match_pairs`: the pairs (sorted by name) and the names left out."""

    pairs: list[Pair]
    missing: list[str] = field(default_factory=list)  # ground truths without a prediction
    extra: list[str] = field(default_factory=list)  # predictions without a ground truth


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` found: aggregate ``metrics`` (JSON-able), one row per image, warnings."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    pairs: list[Pair]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Names, levels, pairing


def parse_level(text: str) -> int:
    """``'0' '1+' '2+' '3+'`` (or ``'1' '2' '3'``, surrounding spaces ignored) → 0..3."""
    t = str(text).strip()
    if t in _BCI_LEVELS:
        return _BCI_LEVELS.index(t)
    if t in ("1", "2", "3"):
        return int(t)
    raise ValueError(f"not a HER2 level: {text!r} (expected 0, 1+, 2+ or 3+)")


def level_from_name(stem: str) -> int | None:
    """The HER2 level in a BCI file name (``00012_test_2+`` → 2), or None when the name carries none."""
    m = _BCI_LEVEL_RE.search(stem)
    return _BCI_LEVELS.index(m.group(1)) if m else None


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, int]:
    """Levels from a CSV with a header naming columns ``name`` (file name or stem) and ``level`` (0, 1+, 2+, 3+).

    Returns ``{stem: level}``. Raises :class:`EvaluationError` naming the file and row on bad content.
    """
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: no such labels file")
    out: dict[str, int] = {}
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "name" not in cols or "level" not in cols:
            raise EvaluationError(f"{p}: needs a header with columns 'name' and 'level', found {reader.fieldnames}")
        key = {c.strip().lower(): c for c in reader.fieldnames or []}
        for i, row in enumerate(reader, start=2):
            name = (row.get(key["name"]) or "").strip()
            if not name:
                continue
            try:
                level = parse_level(row.get(key["level"]) or "")
            except ValueError as exc:
                raise EvaluationError(f"{p}, line {i}: {exc}") from None
            stem = Path(name).stem if Path(name).suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp") else name
            if stem in out and out[stem] != level:
                raise EvaluationError(f"{p}, line {i}: {stem!r} is listed twice with different levels")
            out[stem] = level
    return out


def _index_folder(folder: Path, role: str, strip_suffix: str = "") -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: {role} folder does not exist")
    index: dict[str, Path] = {}
    for p in list_images(folder):
        stem = p.stem
        if strip_suffix and stem.endswith(strip_suffix):
            stem = stem[: -len(strip_suffix)]
        if stem in index:
            raise EvaluationError(f"{role} folder {folder} holds two images named {stem!r}: {index[stem].name} and {p.name}")
        index[stem] = p
    return index


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def match_pairs(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    allow_missing: bool = False,
    labels: dict[str, int] | None = None,
    pred_suffix: str = "",
) -> Pairing:
    """Pair predictions with ground truths by file stem.

    Args:
        pred_suffix: stripped from prediction stems before matching (e.g. ``_fake_B`` for pix2pix output).
        labels: ``{stem: level}`` overriding levels read from BCI names.
    Raises:
        EvaluationError: names that do not pair up (unless ``allow_missing``), duplicates, empty folders.
    """
    preds = _index_folder(Path(pred_dir), "prediction", pred_suffix)
    gts = _index_folder(Path(gt_dir), "ground-truth", "")
    if not gts:
        raise EvaluationError(f"{gt_dir}: no images in the ground-truth folder")
    if not preds:
        raise EvaluationError(f"{pred_dir}: no images in the prediction folder")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    common = sorted(set(gts) & set(preds))
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} ground-truth image(s) have no prediction in {pred_dir}: {_listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction(s) have no ground truth in {gt_dir}: {_listing(extra)}")
        hint = ""
        base_m = {_BCI_LEVEL_RE.sub("", n): n for n in missing}
        swapped = [(base_m[_BCI_LEVEL_RE.sub("", e)], e) for e in extra if _BCI_LEVEL_RE.sub("", e) in base_m]
        if swapped:
            g, pr = swapped[0]
            hint = (f"; {len(swapped)} name(s) differ only in the HER2 level suffix (e.g. ground truth {g!r}, "
                    f"prediction {pr!r}): predictions must keep the ground truth's name")
        raise EvaluationError(
            "; ".join(parts) + hint + f". Pairs are matched by file name; use --allow-missing to evaluate the {len(common)} common name(s)."
        )
    if not common:
        raise EvaluationError(f"no file names in common between {pred_dir} and {gt_dir}")
    pairs = []
    for n in common:
        lv = labels.get(n) if labels is not None else None
        if lv is None:
            lv = level_from_name(n)
        pairs.append(Pair(name=n, pred=preds[n], gt=gts[n], level=-1 if lv is None else int(lv)))
    return Pairing(pairs=pairs, missing=missing, extra=extra)


# --------------------------------------------------------------------------------------------------
# The per-image pass (runs in worker processes)


@dataclass(frozen=True)
class _Task:
    index: int
    pred: str
    gt: str
    keep_images: bool
    dab_threshold: float
    h_threshold: float


def _thumb(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).convert("L").resize((THUMB_SIZE, THUMB_SIZE), Image.BOX), dtype=np.float32).ravel()


def evaluate_pair(task: _Task) -> dict[str, Any]:
    """Metrics of one pair (module-level so that worker processes can import it)."""
    gt = read_image(task.gt)
    pred_native = read_image(task.pred)
    try:
        pred = pixel.resize_to(pred_native, gt.shape[:2])
        m = pixel.ssim(gt, pred), pixel.psnr(gt, pred)
    except ValueError as exc:
        raise EvaluationError(f"{task.pred} (ground truth {task.gt}): {exc}") from None
    sp = stain.stain_stats(pred, task.dab_threshold, task.h_threshold)
    sg = stain.stain_stats(gt, task.dab_threshold, task.h_threshold)
    out: dict[str, Any] = {
        "index": task.index, "ssim": m[0], "psnr": m[1],
        "pred_size": f"{pred_native.shape[1]}x{pred_native.shape[0]}", "gt_size": f"{gt.shape[1]}x{gt.shape[0]}",
        **{f"{k}_pred": v for k, v in sp.items()}, **{f"{k}_gt": v for k, v in sg.items()},
        "thumb_pred": _thumb(pred), "thumb_gt": _thumb(gt),
    }
    if task.keep_images:
        out["img_pred"], out["img_gt"] = pred, gt
    return out


def _iterate(tasks: list[_Task], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield evaluate_pair(t)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: the parent may hold torch (the evaluator) and its thread pools, which do not survive fork.
    ctx = multiprocessing.get_context("spawn")
    n_proc = min(workers, len(tasks))
    # At most 2 tasks per worker in flight: results may carry full-size images for the evaluator, and a
    # slow consumer (a CPU evaluator) must hold the workers back rather than let results pile up in memory.
    window = 2 * n_proc
    todo = iter(tasks)
    with ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx) as pool:
        running = set()
        try:
            for t in todo:
                running.add(pool.submit(evaluate_pair, t))
                if len(running) >= window:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in running:
                f.cancel()


# --------------------------------------------------------------------------------------------------
# The evaluator classifier


class _Embedder:
    """Streams ``uint8 [H, W, 3]`` images through the evaluator in batches; keeps logits and features.

    With no input ``size`` the images are fed at their own size, which must then be one size for all:
    ``shape`` (the first ground truth's ``(H, W)``) is required of every ground truth, whatever the
    batch it falls in, and ``names[i]`` names pair i's ground truth in the error.
    """

    def __init__(
        self, model: Any, size: int | None, device: Any, batch_size: int,
        shape: tuple[int, int] | None = None, names: Sequence[str] | None = None,
    ) -> None:
        self.model, self.size, self.device, self.batch_size = model, size, device, max(1, int(batch_size))
        self.shape, self.names = shape, names
        self.pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.features: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, index: int, pred: np.ndarray, gt: np.ndarray) -> None:
        if self.size is None and self.shape is not None and tuple(gt.shape[:2]) != tuple(self.shape):
            name = self.names[index] if self.names is not None else f"ground truth #{index}"
            first = self.names[0] if self.names is not None else "the first ground truth"
            raise EvaluationError(
                f"{name}: ground truth is {gt.shape[1]}x{gt.shape[0]} px, but {first} is "
                f"{self.shape[1]}x{self.shape[0]} px; the evaluator has no input size of its own to resize them to: "
                "give one (--classifier-size)"
            )
        self.pending.append((index, pred, gt))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        import torch

        from ..models.classifier import prepare_images

        n = len(self.pending)
        shapes = {im.shape for _, p, g in self.pending for im in (p, g)}
        with torch.no_grad():
            if len(shapes) == 1:
                batch = np.stack([p for _, p, _ in self.pending] + [g for _, _, g in self.pending])
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
                x = prepare_images(x, self.size)
            else:  # ground truths of different sizes: resize one by one, then batch
                ims = [p for _, p, _ in self.pending] + [g for _, _, g in self.pending]
                if self.size is None:
                    raise EvaluationError("ground-truth images differ in size; give the classifier input size (--classifier-size)")
                x = torch.cat([prepare_images(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(self.device), self.size) for im in ims])
            if hasattr(self.model, "forward_with_features"):
                logits, feats = self.model.forward_with_features(x)
            else:
                feats = self.model.features(x)
                logits = self.model(x)
        lg = logits.float().cpu().numpy()
        ft = feats.float().cpu().numpy()
        for j, (i, _, _) in enumerate(self.pending):
            self.logits[i] = (lg[j], lg[n + j])
            self.features[i] = (ft[j], ft[n + j])
        self.pending.clear()


def _resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_evaluator(classifier: Any, device: Any) -> tuple[Any, dict[str, Any], str]:
    if isinstance(classifier, (str, os.PathLike)):
        from ..models.classifier import load_classifier
        from ..training.checkpoint import CheckpointError

        try:
            model, meta = load_classifier(classifier, device)
        except CheckpointError as exc:
            raise EvaluationError(str(exc)) from None
        return model.eval(), dict(meta), str(classifier)
    model = classifier.to(device).eval()
    return model, {}, type(classifier).__name__


# --------------------------------------------------------------------------------------------------
# Aggregation


def _pairing_check(thumbs_pred: np.ndarray, thumbs_gt: np.ndarray) -> dict[str, Any]:
    """Is each prediction more like its own ground truth than like the others? (grey 32 px thumbnails)

    Returns the mean Pearson r of matched pairs, the mean r over all mismatched pairs, the fraction
    of predictions whose own ground truth is the most correlated, and each image's rank (1 = own
    ground truth is the best match). A file-name mix-up (contents swapped) shows as ranks > 1.
    """
    def z(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=1, keepdims=True)
        n = np.linalg.norm(a, axis=1, keepdims=True)
        return np.divide(a, n, out=np.zeros_like(a), where=n > 0)

    n = thumbs_pred.shape[0]
    r = z(thumbs_pred.astype(np.float64)) @ z(thumbs_gt.astype(np.float64)).T  # [N, N]
    own = np.diagonal(r).copy()
    rank = 1 + (r > own[:, None]).sum(axis=1)
    other = (r.sum() - own.sum()) / (n * (n - 1)) if n > 1 else float("nan")
    return {"matched_r_mean": float(own.mean()), "other_r_mean": float(other),
            "own_best_fraction": float((rank == 1).mean()), "chance": 1.0 / n, "rank": rank, "r": own}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if np.isfinite(f) else None  # JSON has no inf/NaN: null, with counts beside (n_inf)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def evaluate(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    *,
    classifier: Any = None,
    comparator: str | os.PathLike[str] | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    allow_missing: bool = False,
    pred_suffix: str = "",
    workers: int | None = None,
    self_match: str = "include",
    tie: str = "similarity",
    topk: Sequence[int] = (1, 3, 5),
    knn_k: int = 10,
    dab_threshold: float = stain.DAB_THRESHOLD,
    h_threshold: float = stain.H_THRESHOLD,
    device: str = "auto",
    batch_size: int = 16,
    classifier_size: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Evaluate generated IHC in ``pred_dir`` against the ground truth in ``gt_dir`` (see docs/evaluation.md).

    Args:
        classifier: evaluator checkpoint path (``load_classifier``) or a module with ``features(x) -> [N, D]``
            and ``forward(x) -> [N, 4]`` logits on ``[N, 3, H, W]`` in [-1, 1]; None skips the semantic metrics.
        comparator: the comparator's checkpoint, only to warn when the evaluator is not independent of it.
        labels_csv: levels (``name,level``) for images whose names do not carry them (BCI names do).
        workers: processes for the per-image pass (default: all cores).
        self_match, tie, topk, knn_k: semantic-metric options (:mod:`derestainer.metrics.semantic`).
        classifier_size: evaluator input size; default the checkpoint's ``size``, else the ground truth's.
        log: where to send warnings as they arise (e.g. ``click.echo``).
    Raises:
        EvaluationError: pairing, labels or sizes are wrong (the message names the files).
        ImageReadError: an image cannot be read (the message names it).
    """
    if self_match not in SELF_MATCH_CHOICES:
        raise EvaluationError(f"self_match must be one of {SELF_MATCH_CHOICES}, got {self_match!r}")
    if tie not in TIE_CHOICES:
        raise EvaluationError(f"tie must be one of {TIE_CHOICES}, got {tie!r}")
    t0 = time.perf_counter()
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        if log is not None:
            log(f"warning: {msg}")

    labels = read_labels_csv(labels_csv) if labels_csv is not None else None
    pairing = match_pairs(pred_dir, gt_dir, allow_missing=allow_missing, labels=labels, pred_suffix=pred_suffix)
    pairs = pairing.pairs
    if pairing.missing or pairing.extra:
        warn(f"--allow-missing: evaluating {len(pairs)} pair(s); left out {len(pairing.missing)} ground truth(s) "
             f"without prediction and {len(pairing.extra)} prediction(s) without ground truth")
    n = len(pairs)
    n_workers = int(workers) if workers else (os.cpu_count() or 1)

    model, meta, source, embedder, size = None, {}, None, None, None
    if classifier is not None:
        dev = _resolve_device(device)
        model, meta, source = _load_evaluator(classifier, dev)
        size = classifier_size if classifier_size is not None else meta.get("size")
        size = int(size) if size is not None else None
        first_shape = None
        if size is None and pairs:
            # No input size: the images go in at their own, which must be the first ground truth's for all
            # (checked per image, so the error does not depend on how the images fall into batches).
            first_shape = tuple(read_image(pairs[0].gt).shape[:2])
        embedder = _Embedder(model, size, dev, batch_size, shape=first_shape, names=[str(p.gt) for p in pairs])
        if comparator is not None:
            from ..models.classifier import independence_warnings
            from ..training.checkpoint import CheckpointError, read_meta

            try:
                for w in independence_warnings(read_meta(comparator), meta):
                    warn(f"evaluator not independent of the comparator: {w}")
            except CheckpointError as exc:
                raise EvaluationError(str(exc)) from None

    tasks = [_Task(i, str(p.pred), str(p.gt), embedder is not None, dab_threshold, h_threshold) for i, p in enumerate(pairs)]
    per: list[dict[str, Any] | None] = [None] * n
    from tqdm.auto import tqdm

    with tqdm(total=n, desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
        for res in _iterate(tasks, n_workers):
            i = res["index"]
            if embedder is not None:
                embedder.add(i, res.pop("img_pred"), res.pop("img_gt"))
            per[i] = res
            bar.update(1)
    if embedder is not None:
        embedder.flush()
    rows_raw: list[dict[str, Any]] = [r for r in per if r is not None]
    levels = np.array([p.level for p in pairs], dtype=np.int64)

    ssims = np.array([r["ssim"] for r in rows_raw])
    psnrs = np.array([r["psnr"] for r in rows_raw])
    metrics: dict[str, Any] = {
        "n_images": n,
        "left_out": {"missing_prediction": len(pairing.missing), "extra_prediction": len(pairing.extra),
                     "names_missing_prediction": pairing.missing, "names_extra_prediction": pairing.extra},
        "pixel": {"ssim": pixel.summarize(ssims), "psnr": pixel.summarize(psnrs)},
    }
    if np.isinf(psnrs).any():
        warn(f"{int(np.isinf(psnrs).sum())} prediction(s) are pixel-identical to their ground truth (PSNR inf); "
             "the PSNR mean is over the finite values")

    # Stain agreement
    stain_out: dict[str, Any] = {"thresholds_od10": {"dab": dab_threshold, "h": h_threshold}}
    # Images without a known level (-1) are left out of the per-level breakdown only (agreement skips them).
    n_unknown = int((levels < 0).sum())
    if n_unknown:
        warn(f"{n_unknown} of {n} image(s) have no known HER2 level: they count in the overall stain agreement "
             "but are missing from its per-level table")
    for k in stain.STAT_NAMES:
        g = np.array([r[f"{k}_pred"] for r in rows_raw])
        rl = np.array([r[f"{k}_gt"] for r in rows_raw])
        stain_out[k] = stain.agreement(g, rl, levels)
    metrics["stain"] = stain_out

    # Pairing check
    pc = _pairing_check(np.stack([r["thumb_pred"] for r in rows_raw]), np.stack([r["thumb_gt"] for r in rows_raw]))
    metrics["pairing_check"] = {k: pc[k] for k in ("matched_r_mean", "other_r_mean", "own_best_fraction", "chance")}
    if n >= 3 and not pc["matched_r_mean"] > pc["other_r_mean"]:
        warn(f"pairing check: predictions are no more like their own ground truth (mean r {pc['matched_r_mean']:.3f}) "
             f"than like the others (mean r {pc['other_r_mean']:.3f}); are the file names of the right images?")

    rows: list[dict[str, Any]] = []
    for i, (p, r) in enumerate(zip(pairs, rows_raw)):
        rows.append({
            "name": p.name, "level": _BCI_LEVELS[p.level] if p.level >= 0 else "",
            "ssim": r["ssim"], "psnr": r["psnr"],
            **{f"{k}_{s}": r[f"{k}_{s}"] for k in stain.STAT_NAMES for s in ("pred", "gt")},
            "pair_r": float(pc["r"][i]), "pair_rank": int(pc["rank"][i]),
            "pred_size": r["pred_size"], "gt_size": r["gt_size"],
            "pred_file": p.pred.name, "gt_file": p.gt.name,
        })

    # Semantic metrics
    if embedder is not None:
        f_pred = np.stack([embedder.features[i][0] for i in range(n)])
        f_gt = np.stack([embedder.features[i][1] for i in range(n)])
        l_pred = np.stack([embedder.logits[i][0] for i in range(n)])
        l_gt = np.stack([embedder.logits[i][1] for i in range(n)])
        n_classes = l_pred.shape[1]
        dir_pred, dir_gt = l_pred.argmax(axis=1), l_gt.argmax(axis=1)
        sem: dict[str, Any] = {
            "evaluator": {"source": source, **{k: meta.get(k) for k in ("arch", "seed", "size", "accuracy", "train_images_hash") if k in meta},
                          "input_size": size if size is not None else "ground-truth size", "feature_dim": int(f_gt.shape[1])},
            "self_match": self_match, "tie": tie,
        }
        if np.all(levels >= 0):
            if np.any(levels >= n_classes):
                raise EvaluationError(f"levels go up to {int(levels.max())} but the evaluator has {n_classes} classes")
            variants = {}
            for sm in SELF_MATCH_CHOICES:
                variants[sm] = semantic_metrics(f_pred, f_gt, levels, levels, self_index=np.arange(n), self_match=sm,
                                                ks=tuple(topk), knn_k=knn_k, tie=tie, n_classes=n_classes)
            head = variants[self_match]
            for k in [f"top{k}" for k in topk] + ["knn", "knn_k", "topk_k", "per_level"]:
                sem[k] = head[k]
            other = "exclude" if self_match == "include" else "include"
            sem[f"{other}_self"] = {k: variants[other][k] for k in [f"top{k}" for k in topk] + ["knn", "knn_k", "per_level"]}
            if head["knn_k"] < knn_k:
                warn(f"kNN uses k={head['knn_k']}: the library has too few images for k={knn_k}")
            cm_pred = confusion_matrix(levels, dir_pred, n_classes)
            cm_gt = confusion_matrix(levels, dir_gt, n_classes)
            cm_knn = confusion_matrix(levels, head["knn_pred"], n_classes)
            sem["direct"] = {
                "accuracy_generated": float(np.trace(cm_pred) / max(cm_pred.sum(), 1)),
                "accuracy_ground_truth": float(np.trace(cm_gt) / max(cm_gt.sum(), 1)),
                "confusion_generated": cm_pred, "confusion_ground_truth": cm_gt,
            }
            sem["knn_confusion"] = cm_knn
            nb, ns = head["neighbours"], head["neighbour_sims"]
            for i, row in enumerate(rows):
                row["knn_level"] = _BCI_LEVELS[int(head["knn_pred"][i])] if head["knn_pred"][i] >= 0 else ""
                row["top1_neighbour"] = pairs[int(nb[i, 0])].name if nb.shape[1] else ""
                row["top1_similarity"] = float(ns[i, 0]) if ns.shape[1] else float("nan")
        elif np.any(levels >= 0):
            unknown = [p.name for p in pairs if p.level < 0]
            raise EvaluationError(f"{len(unknown)} image(s) have no HER2 level (not in the BCI name, not in the labels CSV): "
                                  f"{_listing(unknown)}; semantic metrics need a level for every image")
        else:
            warn("no HER2 levels (names are not BCI names and no --labels CSV): top-k/kNN accuracy skipped, FID/KID computed")
        for i, row in enumerate(rows):
            row["pred_level_direct"] = _BCI_LEVELS[int(dir_pred[i])] if dir_pred[i] < 4 else str(int(dir_pred[i]))
            row["gt_level_direct"] = _BCI_LEVELS[int(dir_gt[i])] if dir_gt[i] < 4 else str(int(dir_gt[i]))
        dist: dict[str, Any] = {"features": "evaluator pooled features (not L2-normalised, not Inception)"}
        if n >= 2:
            dist["fid"] = _safe(lambda: _fid(f_pred, f_gt), warn, "FID")
            dist["kid"] = _safe(lambda: _kid(f_pred, f_gt, kid_subsets, kid_subset_size, seed), warn, "KID")
            if n <= f_gt.shape[1]:
                dist["note"] = (f"{n} images for {f_gt.shape[1]} feature dimensions: the covariance is singular and FID "
                                "is biased; compare only at equal set sizes")
        sem["distribution"] = dist
        metrics["semantic"] = sem

    elapsed = time.perf_counter() - t0
    metrics["protocol"] = {
        "resize": pixel.RESIZE_METHOD,
        "ssim": "skimage.metrics.structural_similarity(gt, pred, channel_axis=-1, data_range=255): 7x7 uniform window",
        "psnr": "skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=255); mean over finite values, n_inf counted",
        "pairing": "by file stem" + (f" after stripping {pred_suffix!r} from predictions" if pred_suffix else ""),
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
    }
    metrics["run"] = {"workers": min(n_workers, n), "seconds": elapsed, "images_per_second": n / elapsed if elapsed > 0 else None,
                      "versions": _versions()}
    metrics["warnings"] = list(warnings)
    return EvaluationResult(metrics=_jsonable(metrics), rows=rows, pairs=pairs, warnings=warnings)


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    from .fid import fid

    return fid(a, b)


def _kid(a: np.ndarray, b: np.ndarray, n_subsets: int, subset_size: int, seed: int) -> dict[str, Any]:
    from .fid import kid

    return kid(a, b, n_subsets=n_subsets, subset_size=subset_size, seed=seed)


def _safe(fn: Callable[[], Any], warn: Callable[[str], None], what: str) -> Any:
    try:
        return fn()
    except ValueError as exc:
        warn(f"{what} not computed: {exc}")
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("derestainer", "scikit-image", "numpy", "pillow", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
