"""The benchmark's two HER2 classifiers: the comparator (``L_cmp`` in training) and the evaluator (metrics).

Given as checkpoints, or trained here once, with different seeds and disjoint halves of the training
images (even / odd index), and reused on reruns with the same settings and data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from derestainer.benchmark import stages
from derestainer.benchmark.records import file_digest
from derestainer.benchmark.spec import BenchmarkSpec, model_config
from derestainer.core.errors import BenchmarkError, CheckpointError
from derestainer.core.io import jsonable, write_json
from derestainer.models.classifier import read_classifier_meta

#: How classifiers trained by the benchmark differ: seeds and disjoint halves of the training images.
CLASSIFIER_PLAN: dict[str, dict[str, Any]] = {
    "evaluator": {"seed": 1001, "subset": "even"},
    "comparator": {"seed": 2002, "subset": "odd"},
}


def ensure_classifiers(
    spec: BenchmarkSpec, need_comparator: bool, data_id: str, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Given checkpoints, or classifiers trained here once (reused on reruns with the same settings
    and data, ``data_id`` = :func:`~derestainer.benchmark.records.data_digest`): ``{role: info}``."""
    out: dict[str, dict[str, Any]] = {}
    for role, given in (("evaluator", spec.evaluator), ("comparator", spec.comparator)):
        if role == "comparator" and not need_comparator:
            continue
        if given is not None:
            p = Path(given)
            if not p.is_file():
                raise BenchmarkError(f"--{role} {p}: no such file")
            try:  # checked before anything is trained: a generator given here is refused at once
                read_classifier_meta(p)
            except CheckpointError as exc:
                raise BenchmarkError(f"--{role} {exc}") from None
            out[role] = {"path": str(p), "trained_by_benchmark": False, "digest": file_digest(p)}
        else:
            out[role] = _trained_here(spec, role, data_id, log)
    if "evaluator" in out and "comparator" in out and out["evaluator"]["digest"] == out["comparator"]["digest"]:
        raise BenchmarkError(
            f"the evaluator {out['evaluator']['path']} and the comparator {out['comparator']['path']} are the same "
            "classifier (identical file contents): the evaluator would score generated images with the very network "
            "the generator was trained to please. Use an evaluator trained with another seed and/or another subset "
            "of the training images"
        )
    return out


def _trained_here(spec: BenchmarkSpec, role: str, data_id: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The classifier of ``role`` trained by the benchmark: reused when its settings and data match."""
    plan = CLASSIFIER_PLAN[role]
    size = spec.classifier_size or spec.size or model_config("derestainer", spec.base_config).data.size
    p = spec.out / "classifiers" / f"{role}.safetensors"
    info_path = p.with_name(f"{role}.benchmark.json")
    arch = (spec.comparator_arch or spec.classifier_arch) if role == "comparator" else spec.classifier_arch
    settings = {"arch": arch, "steps": spec.classifier_steps, "size": size, **plan}
    if p.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings and info.get("data") == data_id:
            log(f"{role}: reusing {p}")
            return {**info, "path": str(p), "digest": file_digest(p)}
    log(f"{role}: training a {arch} HER2 classifier ({spec.classifier_steps} steps, "
        f"{size} px, seed {plan['seed']}, {plan['subset']} training images)")
    metrics = stages.train_classifier(spec.data, p, device=spec.device, log=log, **settings)
    info = {"trained_by_benchmark": True, "settings": settings, "data": data_id, "metrics": jsonable(metrics)}
    write_json(info_path, info)
    return {**info, "path": str(p), "digest": file_digest(p)}
