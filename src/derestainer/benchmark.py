"""``derestainer benchmark``: the paper's Table 1 on any paired dataset, with one command.

For every model (a preset name: ``derestainer``, ``pix2pix``, ``pyramidpix2pix``, ``no_stain``, ...)
and every seed, the benchmark

1. resolves the model's config under the *same budget* (steps, batch size, resolution, seed): the base
   config (``tiny`` or ``paper``) ⊕ the model preset's differences from ``paper`` ⊕ the budget ⊕
   ``--set`` overrides (:func:`model_config`, :func:`run_config`);
2. trains it with the package's trainer, translates the test split, evaluates it with the package's
   metrics (SSIM/PSNR by the BCI protocol, top-k/kNN with the evaluator, stain-aware metrics);
3. writes a marker ``done.json`` holding its metrics, so that a rerun skips it (resumable).

It then writes ``results.json`` (everything, machine-readable), ``table.md`` (Table 1 layout, mean ±
sample standard deviation over seeds, the paper's values quoted beside and marked as such) and
``figure.png`` (paper Fig. 3 layout: one row per HER2 level; H&E, each method, ground truth).

Without ``--evaluator`` / ``--comparator`` checkpoints the benchmark trains them once itself, with
different seeds and disjoint halves of the training images (even / odd index), and records it.

The stages that do real work (:func:`_train_generator`, :func:`_translate`, :func:`_evaluate`,
:func:`_train_classifier`) are small adapters over the library, so that tests can replace them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, from_dict, load_config, parse_override, to_dict

#: Model names that stand for a preset of another name.
ALIASES: dict[str, str] = {"derestainer": "paper"}

#: Paper's Table 1 (Wei et al., DeReStainer), on BCI, as printed: (method, SSIM, PSNR, top-1, top-3, top-5, kNN k=10).
PAPER_TABLE1A: tuple[tuple[str, float, float, float, float, float, float], ...] = (
    ("Pix2PixHD", 0.471, 19.634, 0.276, 0.480, 0.563, 0.278),
    ("PyramidPix2Pix", 0.477, 21.161, 0.335, 0.505, 0.613, 0.330),
    ("Just4Fun", 0.558, 22.929, 0.483, 0.670, 0.779, 0.490),
    ("lifangda02", 0.503, 17.865, 0.368, 0.543, 0.624, 0.353),
    ("DeReStainer (Ours)", 0.564, 20.647, 0.563, 0.726, 0.796, 0.600),
)
PAPER_TABLE1B: tuple[tuple[str, float, float, float, float, float, float], ...] = (
    ("w/o L_stain", 0.559, 20.862, 0.481, 0.696, 0.787, 0.513),
    ("w/o L_DAB", 0.555, 20.141, 0.554, 0.714, 0.788, 0.562),
    ("Full L_stain", 0.564, 20.647, 0.563, 0.726, 0.796, 0.600),
)

#: Table 1 columns: (header, metrics key, higher is better).
TABLE1_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("SSIM", "ssim", True),
    ("PSNR", "psnr", True),
    ("top-1", "top1", True),
    ("top-3", "top3", True),
    ("top-5", "top5", True),
    ("kNN (k=10)", "knn", True),
)
#: Beyond the paper: (header, metrics key, higher is better).
EXTRA_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("top-1 excl. self", "top1_excl_self", True),
    ("kNN excl. self", "knn_excl_self", True),
    ("evaluator acc.", "evaluator_accuracy", True),
    ("DAB OD r", "dab_od_pearson", True),
    ("DAB OD MAE", "dab_od_mae", False),
    ("DAB area MAE", "dab_fraction_mae", False),
    ("H OD r", "h_od_pearson", True),
    ("FID", "fid", False),
    ("KID", "kid", False),
)

MARKER = "done.json"  # a (model, seed) translated and evaluated: its record
TRAINED_MARKER = "trained.json"  # its generator trained (so a failed evaluation does not cost a retraining)
LEVEL_NAMES: tuple[str, ...] = ("0", "1+", "2+", "3+")


class BenchmarkError(ValueError):
    """Bad benchmark input (data layout, model names, stale results): a message for the user."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to benchmark and with which shared budget.

    Attributes:
        data: dataset root in the BCI layout (``HE/{train,test}``, ``IHC/{train,test}``).
        models: model names: presets (``derestainer`` = ``paper``), or YAML files.
        steps: training steps for every model.
        out: output folder (runs, classifiers, results).
        size, batch_size: training resolution and batch size for every model (None: the base config's).
        seeds: one full run per model and seed.
        base_config: preset whose widths, data and training settings every model starts from.
        comparator, evaluator: classifier checkpoints; None → trained here once.
        overrides: ``section.key=value`` applied to every model last; ``MODEL:section.key=value`` to one.
        classifier_arch, classifier_steps, classifier_size: for classifiers trained here.
        device: ``auto`` | ``cpu`` | ``cuda``.
        eval_workers: processes for the per-image evaluation (None: all cores).
    """

    data: Path
    models: tuple[str, ...]
    steps: int
    out: Path
    size: int | None = None
    batch_size: int | None = None
    seeds: tuple[int, ...] = (0,)
    base_config: str = "tiny"
    comparator: Path | None = None
    evaluator: Path | None = None
    overrides: tuple[str, ...] = ()
    classifier_arch: str = "resnet18"
    classifier_steps: int = 1000
    classifier_size: int | None = None
    device: str = "auto"
    eval_workers: int | None = None


# --------------------------------------------------------------------------------------------------
# Configs


def _flatten(d: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(s, k): v for s, sec in d.items() for k, v in sec.items()}


def preset_delta(model: str) -> dict[str, dict[str, Any]]:
    """How the preset (or YAML file) of ``model`` differs from ``paper``, as nested plain data.

    >>> preset_delta("no_dab")
    {'loss': {'dab': 0.0}}
    """
    name = ALIASES.get(model, model)
    try:
        mine = _flatten(to_dict(load_config(name)))
    except ConfigError as exc:
        raise BenchmarkError(f"model {model!r}: {exc}") from None
    ref = _flatten(to_dict(load_config("paper")))
    delta: dict[str, dict[str, Any]] = {}
    for (s, k), v in mine.items():
        if ref.get((s, k)) != v:
            delta.setdefault(s, {})[k] = v
    return delta


def model_config(model: str, base: str = "tiny", overrides: Sequence[str] = ()) -> Config:
    """The config of ``model`` at the width/data/training class of ``base``.

    ``base ⊕ (preset(model) − paper) ⊕ overrides``: e.g. ``pix2pix`` on ``tiny`` gets tiny's widths
    and image size but pix2pix's generator, losses, discriminator scales and optimiser settings.
    With ``base='paper'`` this is exactly the model's preset. An override ``MODEL:section.key=value``
    applies to that model only (e.g. ``pix2pix:model.ngf=16`` to match capacities).
    """
    try:
        d = to_dict(load_config(base))
    except ConfigError as exc:
        raise BenchmarkError(f"base config: {exc}") from None
    for s, sec in preset_delta(model).items():
        d[s].update(sec)
    for item in overrides:
        target, item = split_target(item)
        if target is not None and target != model:
            continue
        try:
            (s, k), v = parse_override(item)
        except ConfigError as exc:
            raise BenchmarkError(str(exc)) from None
        if s not in d:
            raise BenchmarkError(f"override {item!r}: unknown section {s!r}; valid: {', '.join(d)}")
        d[s][k] = v
    try:
        return from_dict(d)
    except ConfigError as exc:
        raise BenchmarkError(f"model {model!r}: {exc}") from None


def split_target(item: str) -> tuple[str | None, str]:
    """``'pix2pix:model.ngf=16'`` → ``('pix2pix', 'model.ngf=16')``; without a ``MODEL:`` prefix → ``(None, item)``."""
    key = item.split("=", 1)[0]
    if ":" in key:
        target, rest = item.split(":", 1)
        return target.strip(), rest
    return None, item


def run_config(spec: BenchmarkSpec, model: str, seed: int, run_dir: Path, comparator: Path | None) -> Config:
    """:func:`model_config` plus the shared budget, the data root, the seed and the run folder."""
    cfg = model_config(model, spec.base_config, spec.overrides)
    d = to_dict(cfg)
    d["data"]["root"] = str(spec.data)
    d["data"]["layout"] = "bci"
    if spec.size is not None:
        d["data"]["size"] = int(spec.size)
    d["train"]["steps"] = int(spec.steps)
    if spec.batch_size is not None:
        d["train"]["batch_size"] = int(spec.batch_size)
    d["train"]["seed"] = int(seed)
    d["train"]["device"] = spec.device
    d["train"]["out"] = str(run_dir / "train")
    # A benchmark wants the final model, not a history: samples and validation at the end only
    # (the test split is evaluated properly afterwards), a few checkpoints so that a killed run resumes.
    d["train"]["sample_every"] = int(spec.steps)
    d["train"]["val_every"] = int(spec.steps)
    d["train"]["ckpt_every"] = max(1, int(spec.steps) // 4)
    d["train"]["keep_last"] = 1
    d["train"]["val_max"] = 32
    d["train"]["comparator"] = str(comparator) if (comparator is not None and needs_comparator(from_dict(d))) else ""
    return from_dict(d)


def needs_comparator(cfg: Config) -> bool:
    """Whether the loss uses the comparator (``L_cmp`` with non-zero weight)."""
    return cfg.loss.content > 0 and cfg.loss.cmp > 0


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes: identifies a classifier checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def data_digest(dirs: dict[str, Path]) -> str:
    """Identity of a dataset from its files' names and sizes (cheap; independent of where it lies)."""
    from .io import list_images

    items = sorted((key, p.name, p.stat().st_size) for key, d in dirs.items() for p in list_images(d))
    return _fingerprint(items)


def generator_params(path: Path) -> int:
    """Number of learnable parameters of a saved generator (BatchNorm running statistics excluded)."""
    from .training.checkpoint import load_tensors

    tensors, _ = load_tensors(path)
    return int(sum(t.numel() for k, t in tensors.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", Path(name).stem if name.endswith((".yaml", ".yml")) else name)


# --------------------------------------------------------------------------------------------------
# Data


def level_of(name: str) -> int:
    """HER2 level from a BCI file name ``NNNNN_split_L.png`` (L in 0, 1+, 2+, 3+); -1 when absent."""
    m = re.search(r"_(0|1\+|2\+|3\+)$", Path(name).stem)
    return LEVEL_NAMES.index(m.group(1)) if m else -1


def check_layout(root: Path) -> dict[str, Path]:
    """The four BCI folders of ``root``; a clear error when one is missing or empty."""
    from .io import list_images

    dirs = {f"{k}_{s}": root / k.upper() / s for k in ("he", "ihc") for s in ("train", "test")}
    for d in dirs.values():
        if not d.is_dir():
            raise BenchmarkError(
                f"{d}: missing. The benchmark needs the BCI layout HE/{{train,test}} and IHC/{{train,test}} "
                "(make a synthetic set with `derestainer synth`)"
            )
        if not list_images(d):
            raise BenchmarkError(f"{d}: no images")
    he = {p.name for p in list_images(dirs["he_test"])}
    ihc = {p.name for p in list_images(dirs["ihc_test"])}
    if he != ihc:
        odd = sorted(he ^ ihc)[:5]
        raise BenchmarkError(f"{root}: HE/test and IHC/test do not hold the same file names (e.g. {odd})")
    return dirs


# --------------------------------------------------------------------------------------------------
# Stages (adapters over the library; tests may replace them)


def _train_generator(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Path:
    """Train ``cfg`` (its ``train.out`` is ``run_dir/train``) and copy the final generator to
    ``run_dir/generator.safetensors``. An interrupted training is resumed from its last checkpoint."""
    import shutil

    from .io import atomic_path
    from .training.loop import train
    from .training.state import list_checkpoints

    train_dir = Path(cfg.train.out)
    resume = bool(list_checkpoints(train_dir)) if train_dir.is_dir() else False
    if resume:
        log(f"resuming the interrupted training in {train_dir}")
    elif train_dir.is_dir():
        shutil.rmtree(train_dir)  # a run killed before its first checkpoint: nothing to keep
    train(cfg, resume=resume)
    with atomic_path(run_dir / "generator.safetensors") as tmp:
        shutil.copyfile(train_dir / "generator.safetensors", tmp)
    # The resumable checkpoints (discriminator, optimiser states) are not needed once the final
    # generator is out; logs, samples and the summary stay.
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)
    for pointer in ("latest", "best"):  # they pointed into checkpoints/
        (train_dir / pointer).unlink(missing_ok=True)
    return run_dir / "generator.safetensors"


def _translate(generator: Path, he_dir: Path, out_dir: Path, batch_size: int, device: str, log: Callable[[str], None]) -> None:
    """Translate every H&E image of ``he_dir`` into ``out_dir`` under the same file name (``.png``).

    Images are resampled to the model's training scale first (a 1024 px BCI image for a model trained
    at 512 px is translated at 512) and the result back to the input size, as in the BCI protocol.
    """
    from .inference.patches import collect_inputs, load_model, translate_files
    from .io import read_image

    # fp32 so that the benchmark's numbers do not depend on whether this CPU has native bf16.
    lm = load_model(generator, device=device, precision="fp32")
    jobs = collect_inputs([he_dir], recursive=False)
    width = read_image(jobs[0].src).shape[1]
    # model px per input px = size / width  ⇔  input µm/px = model µm/px · size / width
    input_mpp = lm.mpp * lm.size / width
    translate_files(lm, jobs, out_dir, batch_size=batch_size, input_mpp=input_mpp, precision="fp32")


def _evaluate(
    pred_dir: Path, gt_dir: Path, evaluator: Path, out_dir: Path, device: str, workers: int | None, log: Callable[[str], None],
    comparator: Path | None = None,
) -> dict[str, Any]:
    """Metrics of ``pred_dir`` against ``gt_dir`` (flat dict, :func:`flatten_metrics`); the full report
    (metrics.json, metrics.md, per_image.csv, figures) is written to ``out_dir``. ``comparator`` (the
    classifier the generator was trained against, if any) only serves the independence warnings."""
    from .metrics.evaluate import evaluate
    from .metrics.report import write_report

    result = evaluate(pred_dir, gt_dir, classifier=str(evaluator), comparator=str(comparator) if comparator is not None else None,
                      device=device, workers=workers, progress=False, log=log)
    write_report(result, out_dir, method=pred_dir.parent.parent.name)
    return flatten_metrics(result.metrics)


def flatten_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a :func:`derestainer.metrics.evaluate.evaluate` report the benchmark tabulates.

    Keys: ``n_images, ssim, psnr`` (BCI protocol means), ``top1, top3, top5, knn`` (library includes
    each image's own ground truth, the paper's reading), ``top1_excl_self, knn_excl_self`` (it does
    not), ``evaluator_accuracy`` (the evaluator's direct accuracy on generated images), ``fid, kid``
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
        for k in ("top1", "top3", "top5", "knn"):
            if k in sem:
                out[k] = sem[k]
        other = sem.get("exclude_self", {})
        for k in ("top1", "knn"):
            if k in other:
                out[f"{k}_excl_self"] = other[k]
        if "direct" in sem:
            out["evaluator_accuracy"] = sem["direct"]["accuracy_generated"]
            out["evaluator_accuracy_real"] = sem["direct"]["accuracy_ground_truth"]
        dist = sem.get("distribution", {})
        if isinstance(dist.get("fid"), (int, float)):
            out["fid"] = dist["fid"]
        if isinstance(dist.get("kid"), dict) and isinstance(dist["kid"].get("mean"), (int, float)):
            out["kid"] = dist["kid"]["mean"]
    return out


def _train_classifier(
    data: Path, out: Path, *, arch: str, steps: int, size: int, seed: int, subset: str, device: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train a HER2 classifier on ``data``'s IHC training images; returns its metrics (accuracy, ...).

    Validation accuracy is measured on the real test IHC (reported only: the final model is kept).
    """
    from .data.datasets import BCIDataset
    from .training.classifier import fit_classifier

    _, metrics = fit_classifier(
        BCIDataset(data, "train"), arch=arch, size=size, steps=steps, seed=seed, subset=subset,
        val_data=BCIDataset(data, "test"), out=out, device=device, progress=False, log=log,
        extra_meta={"trained_by": "derestainer benchmark"},
    )
    return metrics


# --------------------------------------------------------------------------------------------------
# The benchmark


#: How classifiers trained by the benchmark differ: seeds and disjoint halves of the training images.
CLASSIFIER_PLAN: dict[str, dict[str, Any]] = {
    "evaluator": {"seed": 1001, "subset": "even"},
    "comparator": {"seed": 2002, "subset": "odd"},
}


def ensure_classifiers(
    spec: BenchmarkSpec, need_comparator: bool, data_id: str, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Given checkpoints, or classifiers trained here once (reused on reruns with the same settings
    and data, ``data_id`` = :func:`data_digest`): ``{role: info}``."""
    out: dict[str, dict[str, Any]] = {}
    for role, given in (("evaluator", spec.evaluator), ("comparator", spec.comparator)):
        if role == "comparator" and not need_comparator:
            continue
        if given is not None:
            p = Path(given)
            if not p.is_file():
                raise BenchmarkError(f"--{role} {p}: no such file")
            out[role] = {"path": str(p), "trained_by_benchmark": False, "digest": file_digest(p)}
            continue
        plan = CLASSIFIER_PLAN[role]
        size = spec.classifier_size or spec.size or model_config("derestainer", spec.base_config).data.size
        p = spec.out / "classifiers" / f"{role}.safetensors"
        info_path = p.with_name(f"{role}.benchmark.json")
        settings = {"arch": spec.classifier_arch, "steps": spec.classifier_steps, "size": size, **plan}
        if p.is_file() and info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("settings") == settings and info.get("data") == data_id:
                log(f"{role}: reusing {p}")
                out[role] = {**info, "path": str(p), "digest": file_digest(p)}
                continue
        log(f"{role}: training a {spec.classifier_arch} HER2 classifier ({spec.classifier_steps} steps, "
            f"{size} px, seed {plan['seed']}, {plan['subset']} training images)")
        metrics = _train_classifier(spec.data, p, device=spec.device, log=log, **settings)
        info = {"trained_by_benchmark": True, "settings": settings, "data": data_id, "metrics": _jsonable(metrics)}
        from .io import write_json

        write_json(info_path, info)
        out[role] = {**info, "path": str(p), "digest": file_digest(p)}
    if "evaluator" in out and "comparator" in out and out["evaluator"]["digest"] == out["comparator"]["digest"]:
        raise BenchmarkError(
            f"the evaluator {out['evaluator']['path']} and the comparator {out['comparator']['path']} are the same "
            "classifier (identical file contents): the evaluator would score generated images with the very network "
            "the generator was trained to please. Use an evaluator trained with another seed and/or another subset "
            "of the training images"
        )
    return out


def run_one(
    spec: BenchmarkSpec, model: str, seed: int, dirs: dict[str, Path], classifiers: dict[str, dict[str, Any]],
    log: Callable[[str], None], data_id: str | None = None,
) -> dict[str, Any]:
    """Train, translate and evaluate one (model, seed), or return its finished record (resumable).

    A finished record is reused when its training fingerprint (resolved config, data, comparator)
    matches; when only the evaluator changed, or the evaluation failed after training, the saved
    generator is evaluated again without retraining (and without translating again when ``pred/``
    already holds every test image from that generator). A record made with another config is an
    error (use another ``--out`` or delete the run folder). ``data_id``: :func:`data_digest` of
    ``dirs`` when the caller has it already (computed here otherwise).
    """
    from .io import write_json

    run_dir = spec.out / "runs" / _slug(model) / f"seed{seed}"
    comparator = Path(classifiers["comparator"]["path"]) if "comparator" in classifiers else None
    cfg = run_config(spec, model, seed, run_dir, comparator)
    cfg_d = to_dict(cfg)
    # Fingerprints leave out where things are (data root, run folder, classifier paths: an output
    # folder may be moved; the device) and keep what they are (file names and sizes, classifier digests).
    comparator_digest = classifiers["comparator"]["digest"] if cfg.train.comparator else None
    portable = {**cfg_d, "data": {**cfg_d["data"], "root": ""},
                "train": {**cfg_d["train"], "out": "", "comparator": "", "device": ""}}
    if data_id is None:
        data_id = data_digest(dirs)
    train_fp = _fingerprint({"config": portable, "comparator": comparator_digest, "data": data_id})
    eval_fp = _fingerprint({"evaluator": classifiers["evaluator"]["digest"], "data": data_id})
    marker = run_dir / MARKER
    trained_marker = run_dir / TRAINED_MARKER
    gen_path = run_dir / "generator.safetensors"
    stale = (f"{run_dir}: this run was made with another configuration (budget, data, preset or comparator "
             "changed). Use another --out, or delete that run folder to train it again")
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("train_fingerprint") != train_fp:
            raise BenchmarkError(stale)
        if record.get("eval_fingerprint") == eval_fp:
            log(f"[{model} seed {seed}] done before: skipped")
            return {**record, "skipped": True}
        log(f"[{model} seed {seed}] trained before; evaluating again (the evaluator changed)")
    trained = json.loads(trained_marker.read_text()) if trained_marker.is_file() else None
    if trained is not None and trained.get("train_fingerprint") != train_fp:
        raise BenchmarkError(stale)
    reused_generator = trained is not None and gen_path.is_file()
    if reused_generator:
        train_s = float(trained["train_seconds"])
    else:
        log(f"[{model} seed {seed}] training {cfg.model.name} for {cfg.train.steps} steps "
            f"(batch {cfg.train.batch_size}, {cfg.data.size} px)")
        t0 = time.time()
        _train_generator(cfg, run_dir, log)
        if not gen_path.is_file():
            raise RuntimeError(f"training finished without writing {gen_path}")
        train_s = time.time() - t0
        write_json(trained_marker, {"train_fingerprint": train_fp, "train_seconds": round(train_s, 1)})
    t1 = time.time()
    pred_dir = run_dir / "pred"
    # Outputs are written atomically, so a present file is a whole image from this (unchanged) generator.
    if reused_generator and _pred_complete(dirs["he_test"], pred_dir):
        log(f"[{model} seed {seed}] {pred_dir} holds every test image: not translating again")
    else:
        log(f"[{model} seed {seed}] translating {dirs['he_test']}")
        _translate(gen_path, dirs["he_test"], pred_dir, cfg.train.batch_size, spec.device, log)
    log(f"[{model} seed {seed}] evaluating")
    metrics = _evaluate(pred_dir, dirs["ihc_test"], Path(classifiers["evaluator"]["path"]), run_dir / "eval", spec.device,
                        spec.eval_workers, log, comparator=comparator if cfg.train.comparator else None)
    record = {
        "model": model,
        "seed": seed,
        "generator": cfg.model.name,
        "train_fingerprint": train_fp,
        "eval_fingerprint": eval_fp,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - t1, 1),
        "generator_params": generator_params(gen_path),
        "metrics": _jsonable(metrics),
        "config": cfg_d,
        "pred_dir": str(pred_dir.relative_to(spec.out)),
    }
    write_json(marker, record)  # written last, atomically: its presence means the run is complete
    return {**record, "skipped": False}


def _pred_complete(he_dir: Path, pred_dir: Path) -> bool:
    """Whether ``pred_dir`` holds the translation of every image of ``he_dir`` (as :func:`_translate` names them)."""
    from .inference.patches import collect_inputs

    if not pred_dir.is_dir():
        return False
    return all((pred_dir / j.rel).is_file() for j in collect_inputs([he_dir], recursive=False))


def run_benchmark(spec: BenchmarkSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole benchmark and write ``results.json``, ``table.md`` and ``figure.png``.

    Returns:
        The content of ``results.json``: ``runs`` (one record per model and seed), ``summary``
        (per model and metric: mean, std, n, values), ``classifiers`` and the ``spec``.
    Raises:
        BenchmarkError: bad data layout, unknown model, duplicate names, stale results.
    """
    from .io import write_json, write_text

    if spec.steps < 1:
        raise BenchmarkError(f"--steps must be at least 1, got {spec.steps}")
    if not spec.models:
        raise BenchmarkError("no models given")
    if len(set(spec.models)) != len(spec.models):
        raise BenchmarkError(f"models listed twice: {sorted({m for m in spec.models if spec.models.count(m) > 1})}")
    if len({_slug(m) for m in spec.models}) != len(spec.models):
        raise BenchmarkError("two models map to the same run folder name; rename one YAML file")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise BenchmarkError(f"seeds must be distinct and at least one: {list(spec.seeds)}")
    for item in spec.overrides:
        target, _ = split_target(item)
        if target is not None and target not in spec.models:
            raise BenchmarkError(f"override {item!r} names model {target!r}, which is not in --models")
    dirs = check_layout(Path(spec.data))
    # Resolve every config first: a typo in the last model must not surface after an hour of training.
    cfgs = {m: model_config(m, spec.base_config, spec.overrides) for m in spec.models}
    for m, c in cfgs.items():
        _check_model(m, c)
    spec.out.mkdir(parents=True, exist_ok=True)
    data_id = data_digest(dirs)
    classifiers = ensure_classifiers(spec, any(needs_comparator(c) for c in cfgs.values()), data_id, log)

    runs = []
    for m in spec.models:
        for s in spec.seeds:
            runs.append(run_one(spec, m, s, dirs, classifiers, log, data_id=data_id))
    summary = summarize(runs, spec.models)
    results = {
        "kind": "derestainer-benchmark",
        "spec": _jsonable(spec),
        "classifiers": classifiers,
        "runs": [{k: v for k, v in r.items() if k != "skipped"} for r in runs],
        "summary": summary,
    }
    write_json(spec.out / "results.json", results)
    fig = None
    try:
        fig = make_figure(spec, dirs, spec.out / "figure.png")
    except (OSError, ValueError) as exc:  # a figure must not cost the numbers
        log(f"figure not written: {exc}")
    write_text(spec.out / "table.md", format_report(summary, spec, classifiers, figure=fig, runs=runs))
    log(f"wrote {spec.out / 'results.json'}, {spec.out / 'table.md'}" + (f", {fig}" if fig else ""))
    return results


def _check_model(model: str, cfg: Config) -> None:
    from .models.registry import list_generators

    names = list_generators()
    if cfg.model.name not in names:
        raise BenchmarkError(f"model {model!r}: generator {cfg.model.name!r} is not registered; available: {', '.join(names)}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BenchmarkSpec):
        return {k: _jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


# --------------------------------------------------------------------------------------------------
# Summary, table, figure


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value). Non-finite values are kept."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def summarize(runs: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model and numeric metric: ``{'mean', 'std', 'n', 'values'}`` over its seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in models:
        recs = [r for r in runs if r["model"] == m]
        keys: list[str] = []
        for r in recs:
            keys += [k for k, v in r["metrics"].items() if _is_number(v) and k not in keys]
        out[m] = {}
        for k in keys:
            vals = [float(r["metrics"][k]) for r in recs if _is_number(r["metrics"].get(k))]
            mu, sd = mean_std(vals)
            out[m][k] = {"mean": mu, "std": sd, "n": len(vals), "values": vals}
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(stat: dict[str, Any] | None, key: str) -> str:
    if stat is None or not stat.get("n"):
        return "–"
    digits = 2 if key in ("psnr", "fid") else 3
    mu, sd = stat["mean"], stat["std"]
    if not math.isfinite(mu):
        return str(mu)
    s = f"{mu:.{digits}f}"
    if stat["n"] > 1 and math.isfinite(sd):
        s += f" ± {sd:.{digits}f}"
    return s


def markdown_table(
    summary: dict[str, dict[str, dict[str, Any]]], columns: Sequence[tuple[str, str, bool]], label: str = "Method"
) -> str:
    """A Markdown table, one row per model, ``mean ± std``; the best mean of each column in bold."""
    models = list(summary)
    best: dict[str, float] = {}
    for _, key, higher in columns:
        means = [summary[m][key]["mean"] for m in models if key in summary[m] and math.isfinite(summary[m][key]["mean"])]
        if len(means) > 1:
            best[key] = max(means) if higher else min(means)
    lines = [
        "| " + " | ".join([label] + [h + (" ↑" if hi else " ↓") for h, _, hi in columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for m in models:
        cells = [m]
        for _, key, _hi in columns:
            stat = summary[m].get(key)
            cell = _fmt(stat, key)
            if stat and key in best and stat["n"] and stat["mean"] == best[key]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    """The paper's Table 1 (a) and (b) as Markdown, headed as the paper's numbers on BCI."""
    head = "| Method (paper, BCI) | SSIM | PSNR | top-1 | top-3 | top-5 | kNN (k=10) |\n|---|---|---|---|---|---|---|"
    rows_a = "\n".join(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |" for r in PAPER_TABLE1A)
    rows_b = "\n".join(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |" for r in PAPER_TABLE1B)
    return (
        "**The paper's numbers** (Wei et al., DeReStainer, Table 1, on the real BCI test set at 1024 px; "
        "quoted for reference, not measured here and not comparable with synthetic-data results):\n\n"
        f"(a) comparison\n\n{head}\n{rows_a}\n\n(b) ablation of the stain loss\n\n{head}\n{rows_b}\n"
    )


def format_report(
    summary: dict[str, dict[str, dict[str, Any]]], spec: BenchmarkSpec, classifiers: dict[str, dict[str, Any]],
    figure: Path | None = None, runs: Sequence[dict[str, Any]] = (),
) -> str:
    """``table.md``: the measured Table 1, the stain-aware metrics, the setup, and the paper's numbers."""
    seeds = ", ".join(str(s) for s in spec.seeds)
    size = spec.size or model_config("derestainer", spec.base_config).data.size
    batch = spec.batch_size or model_config("derestainer", spec.base_config).train.batch_size
    lines = [
        f"# Benchmark on `{Path(spec.data).name}`",
        "",
        (f"Same budget for every model: {spec.steps} steps, batch {batch}, {size} px, base config "
         f"`{spec.base_config}`, seeds {seeds}. Values are mean ± sample standard deviation over seeds "
         "(no ± with one seed); the best mean per column is in bold."),
        "",
        "## Table 1 layout",
        "",
        markdown_table(summary, TABLE1_COLUMNS),
        "",
    ]
    extra = [c for c in EXTRA_COLUMNS if any(c[1] in s for s in summary.values())]
    if extra:
        lines += ["## Stain-aware and other metrics (beyond the paper)", "", markdown_table(summary, extra), ""]
    params = {r["model"]: r.get("generator_params") for r in runs}
    if any(v for v in params.values()):
        lines += ["Generator parameters: " + ", ".join(f"{m} {v / 1e6:.3g} M" for m, v in params.items() if v) + ".", ""]
    lines += ["## Classifiers", ""]
    for role, info in classifiers.items():
        how = "trained by the benchmark" if info.get("trained_by_benchmark") else "given"
        acc = (info.get("metrics") or {}).get("accuracy")
        detail = ""
        if info.get("trained_by_benchmark"):
            st = info["settings"]
            detail = f" ({st['arch']}, {st['steps']} steps, {st['size']} px, seed {st['seed']}, {st['subset']} training images"
            detail += f", validation accuracy {acc:.3f})" if isinstance(acc, (int, float)) else ")"
        lines.append(f"- {role}: {how}{detail}, sha256 {info['digest']}…")
    lines.append("")
    if figure is not None:
        lines += [f"![one test image per HER2 level: H&E, each method, ground truth]({figure.name})", ""]
    lines += [paper_table()]
    return "\n".join(lines)


def pick_examples(he_test: Path) -> list[tuple[int, str]]:
    """One test image per HER2 level present (the first by name): ``[(level, file name), ...]``."""
    from .io import list_images

    chosen: dict[int, str] = {}
    for p in list_images(he_test):
        lv = level_of(p.name)
        if lv >= 0 and lv not in chosen:
            chosen[lv] = p.name
    if not chosen:  # no levels in the names: show the first images instead
        return [(-1, p.name) for p in list_images(he_test)[:4]]
    return sorted(chosen.items())


def make_figure(spec: BenchmarkSpec, dirs: dict[str, Path], path: Path) -> Path:
    """Fig. 3 layout: one row per HER2 level; columns H&E, each method (first seed), ground truth."""
    import numpy as np
    from PIL import Image

    from .io import read_image
    from .viz import image_grid

    def fit(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        if img.shape[:2] == hw:
            return img
        return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BICUBIC))

    seed = spec.seeds[0]
    examples = pick_examples(dirs["he_test"])
    rows = []
    for _lv, name in examples:
        gt = read_image(dirs["ihc_test"] / name)
        hw = gt.shape[:2]
        row = [fit(read_image(dirs["he_test"] / name), hw)]
        for m in spec.models:
            pred = spec.out / "runs" / _slug(m) / f"seed{seed}" / "pred" / Path(name).with_suffix(".png")
            row.append(fit(read_image(pred), hw))
        row.append(gt)
        rows.append(row)
    labels = [f"HER2 {LEVEL_NAMES[lv]}" if 0 <= lv < 4 else name for lv, name in examples]
    # About 120 k image pixels in all (48–160 px per cell, never above the images' own size) keep the
    # PNG under ~300 KB, small enough for docs/figures.
    dpi = 80
    px = min(160, rows[0][0].shape[1], max(48, int((120_000 / (len(rows) * len(rows[0]))) ** 0.5)))
    cell = px / dpi
    return image_grid(rows, path, row_labels=labels, col_labels=["H&E", *spec.models, "ground truth"],
                      cell_inches=cell, dpi=dpi)
