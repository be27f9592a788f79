"""What makes a Table-1 benchmark resumable: markers, fingerprints and digests of what a run was made from.

A (model, seed) run folder holds ``trained.json`` once its generator is trained and ``done.json``
once it is translated and evaluated. Each records fingerprints of what the result depends on (the
portable resolved config, the data's file names and sizes, the classifiers' file digests), so that a
rerun skips finished work and refuses results made with another configuration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from derestainer.core.config import from_dict, to_dict
from derestainer.core.errors import ConfigError
from derestainer.core.fileformat import load_tensors
from derestainer.core.io import file_sha256, list_images
from derestainer.inference.folders import collect_inputs

#: Version of the evaluation protocol a record was made with; part of the evaluation fingerprint, so that
#: records of an older protocol are evaluated again (not retrained). 2: predictions kept at the model's size
#: and resized by the evaluation (bicubic), per-image vectors kept for the paired comparisons.
EVAL_PROTOCOL = 2

MARKER = "done.json"  # a (model, seed) translated and evaluated: its record
TRAINED_MARKER = "trained.json"  # its generator trained (so a failed evaluation does not cost a retraining)


def fingerprint(obj: Any) -> str:
    """SHA-256 (first 16 hex digits) of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes: identifies a classifier checkpoint."""
    return file_sha256(path)[:16]


def data_digest(dirs: dict[str, Path]) -> str:
    """Identity of a dataset from its files' names and sizes (cheap; independent of where it lies)."""
    items = sorted((key, p.name, p.stat().st_size) for key, d in dirs.items() for p in list_images(d))
    return fingerprint(items)


def _portable(cfg_d: dict[str, Any]) -> dict[str, Any]:
    """The config without where things are (data root, run folder, comparator path, device)."""
    return {**cfg_d, "data": {**cfg_d["data"], "root": ""},
            "train": {**cfg_d["train"], "out": "", "comparator": "", "device": ""}}


def run_fingerprints(cfg_d: dict[str, Any], comparator_digest: str | None, evaluator_digest: str,
                     data_id: str) -> tuple[str, str]:
    """``(train, eval)`` fingerprints of one run from its resolved config (:func:`~derestainer.core.config.to_dict`).

    They leave out where things are (data root, run folder, classifier paths: an output folder may be
    moved; the device) and keep what they are (the whole config, file names and sizes, classifier digests).
    """
    train_fp = fingerprint({"config": _portable(cfg_d), "comparator": comparator_digest, "data": data_id})
    eval_fp = fingerprint({"evaluator": evaluator_digest, "data": data_id, "protocol": EVAL_PROTOCOL})
    return train_fp, eval_fp


def adoptable(stored: Any, fingerprint_then: Any, cfg_d: dict[str, Any], comparator_digest: str | None,
              data_id: str) -> bool:
    """Whether a run recorded by an earlier version, with config ``stored`` and train fingerprint
    ``fingerprint_then``, was made with today's configuration ``cfg_d``.

    True when ``stored`` is the config that fingerprint was computed from (the hash matches: it was not
    edited) and, with the options added since filled in at their defaults, equals ``cfg_d`` key for key.
    A default changed since is not filled in (``stored`` has the key), so it shows as a difference.
    """
    if not isinstance(stored, dict) or not isinstance(stored.get("data"), dict) or not isinstance(stored.get("train"), dict):
        return False
    if fingerprint_then != run_fingerprints(stored, comparator_digest, "", data_id)[0]:
        return False
    try:
        filled = to_dict(from_dict(stored))
    except ConfigError:
        return False
    return _portable(filled) == _portable(cfg_d)


def generator_params(path: Path) -> int:
    """Number of learnable parameters of a saved generator (BatchNorm running statistics excluded)."""
    tensors, _ = load_tensors(path)
    return int(sum(t.numel() for k, t in tensors.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))))


def pred_complete(he_dir: Path, pred_dir: Path) -> bool:
    """Whether ``pred_dir`` holds the translation of every image of ``he_dir`` (as the translate stage names
    them), made as the translate stage makes them now (``predictions.json → output``: at the model's size)."""
    record = pred_dir / "predictions.json"
    if not record.is_file():
        return False
    try:
        output = json.loads(record.read_text()).get("output") or {}
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(output, dict) or output.get("output_size") != "model":
        return False
    return all((pred_dir / j.rel).is_file() for j in collect_inputs([he_dir], recursive=False))


