"""The stages of a Table-1 run that do real work: small adapters over the library.

:func:`train_generator`, :func:`translate_split`, :func:`evaluate_predictions`, :func:`write_floor` and
:func:`train_classifier` are looked up on this module when they run, so that tests can replace them
(``monkeypatch.setattr(stages, "translate_split", ...)``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from derestainer.core.config import Config
from derestainer.core.io import atomic_path, read_image
from derestainer.core.runs import list_checkpoints
from derestainer.data.datasets import BCIDataset
from derestainer.evaluation import evaluate, floors, write_report
from derestainer.inference.folders import collect_inputs, translate_files
from derestainer.inference.loading import load_model
from derestainer.training.classifier import fit_classifier
from derestainer.training.loop import train

Log = Callable[[str], None]


def train_generator(cfg: Config, run_dir: Path, log: Log) -> Path:
    """Train ``cfg`` (its ``train.out`` is ``run_dir/train``) and copy the final generator to
    ``run_dir/generator.safetensors``. An interrupted training is resumed from its last checkpoint."""
    train_dir = Path(cfg.train.out)
    resume = bool(list_checkpoints(train_dir)) if train_dir.is_dir() else False
    if resume:
        log(f"resuming the interrupted training in {train_dir}")
    elif train_dir.is_dir():
        shutil.rmtree(train_dir)  # a run killed before its first checkpoint: nothing to keep
    train(cfg, resume="latest" if resume else "new")
    with atomic_path(run_dir / "generator.safetensors") as tmp:
        shutil.copyfile(train_dir / "generator.safetensors", tmp)
    # The resumable checkpoints (discriminator, optimiser states) are not needed once the final
    # generator is out; logs, samples and the summary stay.
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)
    for pointer in ("latest", "best"):  # they pointed into checkpoints/
        (train_dir / pointer).unlink(missing_ok=True)
    return run_dir / "generator.safetensors"


def translate_split(generator: Path, he_dir: Path, out_dir: Path, batch_size: int, device: str, log: Log) -> None:
    """Translate every H&E image of ``he_dir`` into ``out_dir`` under the same file name (``.png``).

    Images are resampled to the model's training scale first (a 1024 px BCI image for a model trained
    at 512 px is translated at 512) and the result is kept at that size: the evaluation brings it to the
    ground truth's size (:mod:`derestainer.core.resample`, bicubic), as in the BCI protocol, and records it.
    """
    # fp32 so that the benchmark's numbers do not depend on whether this CPU has native bf16.
    lm = load_model(generator, device=device, precision="fp32")
    jobs = collect_inputs([he_dir], recursive=False)
    width = read_image(jobs[0].src).shape[1]
    # model px per input px = size / width  ⇔  input µm/px = model µm/px · size / width
    input_mpp = lm.mpp * lm.size / width
    translate_files(lm, jobs, out_dir, batch_size=batch_size, input_mpp=input_mpp, precision="fp32", output_size="model")


def evaluate_predictions(
    pred_dir: Path, gt_dir: Path, evaluator: Path, out_dir: Path, device: str, workers: int | None, log: Log,
    comparator: Path | None = None, method: str | None = None, bootstrap: int = 2000,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of ``pred_dir`` against ``gt_dir`` (flat dict, :func:`flatten_metrics`) and the per-image
    vectors they are statistics of (:mod:`derestainer.evaluation.uncertainty`, pairing order = ground-truth
    name order); the full report (metrics.json, metrics.md, per_image.csv, figures) is written to
    ``out_dir``. ``comparator`` (the classifier the generator was trained against, if any) only serves the
    independence warnings."""
    result = evaluate(pred_dir, gt_dir, classifier=str(evaluator), comparator=str(comparator) if comparator is not None else None,
                      device=device, workers=workers, progress=False, log=log, bootstrap=bootstrap)
    write_report(result, out_dir, method=method or pred_dir.parent.parent.name)
    vectors: dict[str, Any] = {"names": [p.name for p in result.pairs]}
    vectors.update({k: [float(x) for x in v] for k, v in result.vectors.items()})
    return flatten_metrics(result.metrics), vectors


def flatten_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a :func:`~derestainer.evaluation.evaluate` report the benchmark tabulates.

    Keys: ``n_images, ssim, psnr`` (BCI protocol means), ``top1, top3, top5, knn`` (the evaluation's
    library variant), ``top1_excl_self, knn_excl_self`` (each image's own ground truth left out of the
    library; ``*_incl_self`` when that is the chosen variant), ``self_match_rate`` (own ground truth
    is the nearest library entry), ``evaluator_accuracy`` (the evaluator's direct accuracy on generated images), ``fid, kid``
    (on the evaluator's features) and ``{dab_od, dab_fraction, h_od, h_fraction}_{pearson, mae}``
    (generated vs real, per image). Missing parts (no evaluator) are simply absent.
    """
    out: dict[str, Any] = {"n_images": m.get("n_images")}
    pix = m.get("pixel", {})
    for k in ("ssim", "psnr"):
        if isinstance(pix.get(k), dict) and pix[k].get("mean") is not None:
            out[k] = pix[k]["mean"]
    for k, a in m.get("stain", {}).items():
        if isinstance(a, dict) and "pearson_r" in a:
            out[f"{k}_pearson"] = a["pearson_r"]
            out[f"{k}_mae"] = a["mae"]
    sem = m.get("semantic")
    if sem:
        out.update(_semantic_metrics(sem))
    return out


def _semantic_metrics(sem: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("top1", "top3", "top5", "knn"):
        if k in sem:
            out[k] = sem[k]
    for variant, suffix in (("exclude_self", "excl_self"), ("include_self", "incl_self")):
        other = sem.get(variant, {})
        for k in ("top1", "knn"):
            if k in other:
                out[f"{k}_{suffix}"] = other[k]
    if "self_match_rate" in sem:
        out["self_match_rate"] = sem["self_match_rate"]
    if "direct" in sem:
        out["evaluator_accuracy"] = sem["direct"]["accuracy_generated"]
        out["evaluator_accuracy_real"] = sem["direct"]["accuracy_ground_truth"]
    dist = sem.get("distribution", {})
    if isinstance(dist.get("fid"), (int, float)):
        out["fid"] = dist["fid"]
    if isinstance(dist.get("kid"), dict) and isinstance(dist["kid"].get("mean"), (int, float)):
        out["kid"] = dist["kid"]["mean"]
    return out


def write_floor(kind: str, he_dir: Path, out_dir: Path, ihc_train_dir: Path, he_train_dir: Path) -> dict[str, Any]:
    """The floor images of ``kind`` for every H&E test image (:func:`derestainer.evaluation.floors.write_floor`)."""
    return floors.write_floor(kind, he_dir, out_dir, ihc_train_dir, he_train_dir)


def train_classifier(
    data: Path, out: Path, *, arch: str, steps: int, size: int, seed: int, subset: str, device: str, log: Log,
) -> dict[str, Any]:
    """Train a HER2 classifier on ``data``'s IHC training images; returns its metrics (accuracy, ...).

    Validation accuracy is measured on the real test IHC (reported only: the final model is kept).
    """
    _, metrics = fit_classifier(
        BCIDataset(data, "train"), arch=arch, size=size, steps=steps, seed=seed, subset=subset,
        val_data=BCIDataset(data, "test"), out=out, device=device, progress=False, log=log,
        extra_meta={"trained_by": "derestainer benchmark"},
    )
    return metrics
