"""Orchestration of a Table-1 benchmark: every model and seed under one budget, resumable.

:func:`run_benchmark` checks the inputs and resolves every config first, gets the classifiers, runs
each (model, seed) with :func:`run_one` (or reuses its record), then writes ``results.json``,
``table.md`` and ``figure.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from derestainer.benchmark import stages
from derestainer.benchmark.classifiers import Classifiers, start_classifiers
from derestainer.benchmark.figure import make_figure
from derestainer.benchmark.records import (
    EVAL_PROTOCOL,
    MARKER,
    TRAINED_MARKER,
    adoptable,
    data_digest,
    fingerprint,
    generator_params,
    pred_complete,
    run_fingerprints,
)
from derestainer.benchmark.spec import (
    BenchmarkSpec,
    check_layout,
    model_config,
    needs_comparator,
    run_config,
    run_dir,
    slug,
    split_target,
)
from derestainer.benchmark.stats import comparisons, summarize
from derestainer.benchmark.tables import format_report
from derestainer.core.config import Config, to_dict
from derestainer.core.errors import BenchmarkError
from derestainer.core.guard import output_lock, refuse_overlap, unfinished_until_done
from derestainer.core.io import jsonable, write_json, write_text
from derestainer.evaluation.floors import FLOOR_KINDS, FLOOR_VERSION
from derestainer.models.registry import list_generators

Log = Callable[[str], None]


def run_one(
    spec: BenchmarkSpec, model: str, seed: int, dirs: dict[str, Path],
    classifiers: Classifiers | dict[str, dict[str, Any]], log: Log, data_id: str | None = None,
) -> dict[str, Any]:
    """Train, translate and evaluate one (model, seed), or return its finished record (resumable).

    A finished record is reused when its training fingerprint (resolved config, data, comparator)
    matches; when only the evaluator changed, or the evaluation failed after training, the saved
    generator is evaluated again without retraining (and without translating again when ``pred/``
    already holds every test image from that generator). A record made with another config is an
    error (use another ``--out`` or delete the run folder). ``classifiers``: ``{role: info}`` or
    :class:`~derestainer.benchmark.classifiers.Classifiers` (an evaluator still training is waited for
    once the generator is trained and its test split translated). ``data_id``:
    :func:`~derestainer.benchmark.records.data_digest` of ``dirs`` when the caller has it already
    (computed here otherwise).
    """
    found = classifiers if isinstance(classifiers, Classifiers) else Classifiers(classifiers, log)
    folder = run_dir(spec, model, seed)
    comparator = Path(found.comparator["path"]) if found.comparator else None
    cfg = run_config(spec, model, seed, folder, comparator)
    cfg_d = to_dict(cfg)
    comparator_digest = _comparator_digest(found, cfg)
    data_id = data_id if data_id is not None else data_digest(dirs)
    train_fp = run_fingerprints(cfg_d, comparator_digest, "", data_id)[0]

    def eval_fp() -> str:
        return run_fingerprints(cfg_d, comparator_digest, found.evaluator()["digest"], data_id)[1]

    tag = f"[{model} seed {seed}]"
    marker = folder / MARKER

    def adopt(stored: Any, fp_then: Any) -> bool:
        return adoptable(stored, fp_then, cfg_d, comparator_digest, data_id)

    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("train_fingerprint") != train_fp and adopt(record.get("config"), record.get("train_fingerprint")):
            record = _adopt(folder, record, train_fp, tag, log)
        _check_fresh(record, train_fp, folder)
        if record.get("eval_fingerprint") == eval_fp():
            log(f"{tag} done before: skipped")
            return {**record, "skipped": True}
        log(f"{tag} trained before; evaluating again (the evaluator changed)")
    with found.sharing_cores():
        gen_path, train_s, reused = _trained_generator(cfg, folder, train_fp, tag, log, adopt)
        t1 = time.time()
        pred_dir = folder / "pred"
        # Outputs are written atomically, so a present file is a whole image from this (unchanged) generator.
        if reused and pred_complete(dirs["he_test"], pred_dir):
            log(f"{tag} {pred_dir} holds every test image: not translating again")
        else:
            log(f"{tag} translating {dirs['he_test']}")
            stages.translate_split(gen_path, dirs["he_test"], pred_dir, cfg.train.batch_size, spec.device, log)
    evaluator = Path(found.evaluator()["path"])
    log(f"{tag} evaluating")
    metrics, vectors = stages.evaluate_predictions(
        pred_dir, dirs["ihc_test"], evaluator, folder / "eval", spec.device,
        spec.eval_workers, log, comparator=comparator if cfg.train.comparator else None, bootstrap=spec.bootstrap)
    record = {
        "model": model,
        "seed": seed,
        "generator": cfg.model.name,
        "train_fingerprint": train_fp,
        "eval_fingerprint": eval_fp(),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - t1, 1),
        "generator_params": generator_params(gen_path),
        "metrics": jsonable(metrics),
        "per_image": jsonable(vectors),
        "config": cfg_d,
        "terms_off": _terms_off(folder),
        "pred_dir": str(pred_dir.relative_to(spec.out)),
    }
    write_json(marker, record)  # written last, atomically: its presence means the run is complete
    return {**record, "skipped": False}


def _comparator_digest(found: Classifiers, cfg: Config) -> str | None:
    """The digest of the comparator ``cfg`` trains against (None when it uses none)."""
    if not cfg.train.comparator:
        return None
    if found.comparator is None:
        raise RuntimeError("a model with L_cmp is run without a comparator")
    return str(found.comparator["digest"])


def _summary_config(folder: Path) -> Any:
    """The resolved config in the run's training summary (``train/summary.json``), or None."""
    try:
        return json.loads((folder / "train" / "summary.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _terms_off(folder: Path) -> dict[str, str]:
    """The terms its preset asks for that the training could not compute (e.g. the VGG loss without
    weights, L_cmp without a comparator), from the training summary."""
    path = folder / "train" / "summary.json"
    try:
        off = json.loads(path.read_text()).get("terms_off", {})
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in off.items()} if isinstance(off, dict) else {}


def floor_name(kind: str) -> str:
    """The row name of a floor in the tables (cannot clash with a preset or a YAML file's slug)."""
    return f"floor-{kind}"


def run_floor(spec: BenchmarkSpec, kind: str, dirs: dict[str, Path], classifiers: dict[str, dict[str, Any]],
              log: Log, data_id: str) -> dict[str, Any]:
    """Write and evaluate one floor (no training), or return its finished record."""
    folder = spec.out / "floors" / kind
    eval_fp = fingerprint({"floor": kind, "evaluator": classifiers["evaluator"]["digest"], "data": data_id,
                           "protocol": EVAL_PROTOCOL, "recipe": FLOOR_VERSION})
    marker = folder / MARKER
    tag = f"[{floor_name(kind)}]"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("eval_fingerprint") == eval_fp:
            log(f"{tag} done before: skipped")
            return {**record, "skipped": True}
    log(f"{tag} writing the floor images and evaluating them")
    t0 = time.time()
    floor = stages.write_floor(kind, dirs["he_test"], folder / "pred", dirs["ihc_train"], dirs["he_train"])
    metrics, vectors = stages.evaluate_predictions(
        folder / "pred", dirs["ihc_test"], Path(classifiers["evaluator"]["path"]), folder / "eval", spec.device,
        spec.eval_workers, log, method=floor_name(kind), bootstrap=spec.bootstrap)
    record = {"model": floor_name(kind), "seed": 0, "floor": jsonable(floor), "eval_fingerprint": eval_fp,
              "train_seconds": 0.0, "eval_seconds": round(time.time() - t0, 1), "generator_params": 0,
              "metrics": jsonable(metrics), "per_image": jsonable(vectors),
              "pred_dir": str((folder / "pred").relative_to(spec.out))}
    write_json(marker, record)
    return {**record, "skipped": False}


def _adopt(folder: Path, record: dict[str, Any], train_fp: str, tag: str, log: Log) -> dict[str, Any]:
    """Re-stamp a finished run whose legacy fingerprint was made from today's configuration
    (:func:`~derestainer.benchmark.records.adoptable`) with today's fingerprint; returns the record."""
    log(f"{tag} recorded by an earlier version with the same configuration: kept")
    record = {**record, "train_fingerprint": train_fp}
    write_json(folder / MARKER, record)
    trained = folder / TRAINED_MARKER
    if trained.is_file():
        write_json(trained, {**json.loads(trained.read_text()), "train_fingerprint": train_fp})
    return record


def _check_fresh(record: dict[str, Any] | None, train_fp: str, folder: Path) -> None:
    """A run folder made with another configuration is an error, never silently reused."""
    if record is not None and record.get("train_fingerprint") != train_fp:
        raise BenchmarkError(
            f"{folder}: this run was made with another configuration (budget, data, preset or comparator "
            "changed). Use another --out, or delete that run folder to train it again")


def _trained_generator(cfg: Config, folder: Path, train_fp: str, tag: str, log: Log,
                       adopt: Callable[[Any, Any], bool]) -> tuple[Path, float, bool]:
    """``(generator file, training seconds, reused)``: the generator trained before with this
    configuration (``trained.json``; one an earlier version recorded is adopted by ``adopt`` with the
    config it holds or, for older records, the training summary's), or trained now."""
    trained_marker = folder / TRAINED_MARKER
    gen_path = folder / "generator.safetensors"
    trained = json.loads(trained_marker.read_text()) if trained_marker.is_file() else None
    if trained is not None and trained.get("train_fingerprint") != train_fp:
        stored = trained.get("config") or _summary_config(folder)
        if adopt(stored, trained.get("train_fingerprint")):
            log(f"{tag} trained by an earlier version with the same configuration: kept")
            trained = {**trained, "train_fingerprint": train_fp}
            write_json(trained_marker, trained)
    _check_fresh(trained, train_fp, folder)
    if trained is not None and gen_path.is_file():
        return gen_path, float(trained["train_seconds"]), True
    log(f"{tag} training {cfg.model.name} for {cfg.train.steps} steps "
        f"(batch {cfg.train.batch_size}, {cfg.data.size} px)")
    t0 = time.time()
    stages.train_generator(cfg, folder, log)
    if not gen_path.is_file():
        raise RuntimeError(f"training finished without writing {gen_path}")
    train_s = time.time() - t0
    write_json(trained_marker, {"train_fingerprint": train_fp, "train_seconds": round(train_s, 1),
                                "config": to_dict(cfg)})
    return gen_path, train_s, False


def _check_spec(spec: BenchmarkSpec) -> None:
    if spec.steps < 1:
        raise BenchmarkError(f"--steps must be at least 1, got {spec.steps}")
    if not spec.models:
        raise BenchmarkError("no models given")
    if len(set(spec.models)) != len(spec.models):
        raise BenchmarkError(f"models listed twice: {sorted({m for m in spec.models if spec.models.count(m) > 1})}")
    if len({slug(m) for m in spec.models}) != len(spec.models):
        raise BenchmarkError("two models map to the same run folder name; rename one YAML file")
    if spec.reference is not None and spec.reference not in spec.models:
        raise BenchmarkError(f"--reference {spec.reference!r} is not in --models")
    if spec.bootstrap < 0 or spec.bootstrap == 1:
        raise BenchmarkError(f"--bootstrap must be 0 (none) or at least 2, got {spec.bootstrap}")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise BenchmarkError(f"seeds must be distinct and at least one: {list(spec.seeds)}")
    for item in spec.overrides:
        target, _ = split_target(item)
        if target is not None and target not in spec.models:
            raise BenchmarkError(f"override {item!r} names model {target!r}, which is not in --models")


def _check_model(model: str, cfg: Config) -> None:
    names = list_generators()
    if cfg.model.name not in names:
        raise BenchmarkError(f"model {model!r}: generator {cfg.model.name!r} is not registered; available: {', '.join(names)}")


def run_benchmark(spec: BenchmarkSpec, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the whole benchmark and write ``results.json``, ``table.md`` and ``figure.png``.

    Returns:
        The content of ``results.json``: ``runs`` (one record per model and seed), ``summary``
        (per model and metric: mean, std, n, values), ``classifiers`` and the ``spec``.
    Raises:
        BenchmarkError: bad data layout, unknown model, duplicate names, stale results.
    """
    _check_spec(spec)
    dirs = check_layout(Path(spec.data))
    # Resolve every config first: a typo in the last model must not surface after an hour of training.
    cfgs = {m: model_config(m, spec.base_config, spec.overrides) for m in spec.models}
    for m, c in cfgs.items():
        _check_model(m, c)
    # the dataset must not hold the output (its images would be listed with the runs'); a --comparator
    # or --evaluator may be one an earlier benchmark trained into OUT/classifiers (given ones are only read)
    refuse_overlap([spec.data], own_dirs=[spec.out])
    with output_lock(spec.out, folder=True):  # one benchmark per folder: two would interleave their runs
        return _run_all(spec, dirs, cfgs, log)


def _run_all(spec: BenchmarkSpec, dirs: Any, cfgs: dict[str, Config], log: Log) -> dict[str, Any]:
    data_id = data_digest(dirs)
    need_comparator = any(needs_comparator(c) for c in cfgs.values())
    with start_classifiers(spec, need_comparator, data_id, log, parallel=spec.parallel_evaluator) as found:
        runs = [run_one(spec, m, s, dirs, found, log, data_id=data_id) for m in spec.models for s in spec.seeds]
        classifiers = found.all()
    floors = [floor_name(k) for k in FLOOR_KINDS] if spec.floors else []
    runs += [run_floor(spec, k, dirs, classifiers, log, data_id) for k in FLOOR_KINDS if spec.floors]
    rows = [*spec.models, *floors]
    summary = summarize(runs, rows)
    compared = (comparisons(runs, rows, spec.reference_model, b=spec.bootstrap, floors=floors)
                if spec.bootstrap else None)
    results = {
        "kind": "derestainer-benchmark",
        "spec": jsonable(spec),
        "classifiers": classifiers,
        "runs": [{k: v for k, v in r.items() if k != "skipped"} for r in runs],
        "summary": summary,
        "comparisons": jsonable(compared),
    }
    with unfinished_until_done(spec.out / "results.json"):  # results.json last: the record of a whole table
        fig = None
        try:
            fig = make_figure(spec, dirs, spec.out / "figure.png")
        except (OSError, ValueError) as exc:  # a figure must not cost the numbers
            log(f"figure not written: {exc}")
        write_text(spec.out / "table.md", format_report(summary, spec, classifiers, figure=fig, runs=runs,
                                                        comparisons=compared))
        write_json(spec.out / "results.json", results)
    log(f"wrote {spec.out / 'results.json'}, {spec.out / 'table.md'}" + (f", {fig}" if fig else ""))
    return results
