"""The benchmark's two HER2 classifiers: the comparator (``L_cmp`` in training) and the evaluator (metrics).

Given as checkpoints, or trained here once, with different seeds and disjoint halves of the training
images (even / odd index), and reused on reruns with the same settings and data. With
``BenchmarkSpec.parallel_evaluator`` the evaluator, which no training needs, is trained in a second
process beside the first generator training, the cores split between them (:class:`Classifiers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from derestainer.benchmark import stages
from derestainer.benchmark.records import file_digest
from derestainer.benchmark.spec import BenchmarkSpec, model_config
from derestainer.core import errors
from derestainer.core.device import torch_threads
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
    with start_classifiers(spec, need_comparator, data_id, log, parallel=False) as found:
        return found.all()


class Classifiers:
    """The benchmark's classifiers: the comparator (and a given or reusable evaluator) at once; an
    evaluator being trained in a second process once :meth:`evaluator` has waited for it.

    While that training runs, :meth:`sharing_cores` gives this process the cores it left
    (:data:`torch.get_num_threads` minus the evaluator's)."""

    def __init__(self, ready: dict[str, dict[str, Any]], log: Callable[[str], None],
                 pending: _Background | None = None, threads_left: int | None = None):
        self._ready = dict(ready)
        self._log = log
        self._pending = pending
        self._threads_left = threads_left

    @property
    def comparator(self) -> dict[str, Any] | None:
        return self._ready.get("comparator")

    def evaluator(self) -> dict[str, Any]:
        """The evaluator's ``info``, waiting for its training when it runs in the second process."""
        if "evaluator" not in self._ready:
            if self._pending is None:
                raise RuntimeError("no evaluator was found or started")
            info, messages = self._pending.get()  # re-raises the training's error here
            for m in messages:
                self._log(m)
            self._ready["evaluator"] = info
            self._pending = None
            _check_distinct(self._ready)
        return self._ready["evaluator"]

    def all(self) -> dict[str, dict[str, Any]]:
        """``{role: info}`` for every classifier (waits for the evaluator)."""
        self.evaluator()
        return dict(self._ready)

    @contextlib.contextmanager
    def sharing_cores(self) -> Iterator[None]:
        """Work in this block runs on the threads the evaluator's training leaves, while it trains."""
        with torch_threads(self._threads_left if self._pending is not None else None):
            yield


@contextlib.contextmanager
def start_classifiers(
    spec: BenchmarkSpec, need_comparator: bool, data_id: str, log: Callable[[str], None], parallel: bool,
) -> Iterator[Classifiers]:
    """:class:`Classifiers` for the block: given, reused, or trained (the comparator here; the
    evaluator here or, with ``parallel`` and at least two threads, in a second process that is
    stopped when the block ends early)."""
    ready: dict[str, dict[str, Any]] = {}
    for role, given in (("evaluator", spec.evaluator), ("comparator", spec.comparator)):
        if given is not None and (role == "evaluator" or need_comparator):
            ready[role] = _given(role, Path(given))
    threads = torch.get_num_threads()
    background = parallel and "evaluator" not in ready and threads >= 2 and _reusable(spec, "evaluator", data_id) is None
    if not background and "evaluator" not in ready:
        ready["evaluator"] = _trained_here(spec, "evaluator", data_id, log)
    if need_comparator and "comparator" not in ready:
        ready["comparator"] = _trained_here(spec, "comparator", data_id, log)
    if not background:
        _check_distinct(ready)
        yield Classifiers(ready, log)
        return
    mine = max(1, threads // 4)
    log(f"evaluator: training in a second process ({mine} of {threads} threads) beside the generator")
    pending = _Background(spec, "evaluator", data_id, mine)
    try:
        yield Classifiers(ready, log, pending, threads_left=threads - mine)
    finally:
        pending.stop()  # nothing left to stop once the evaluator is in; else a failed benchmark stops it


class _Background:
    """The training of one planned classifier (:func:`train_planned`) in a second Python process,
    ``python -m derestainer.benchmark.worker``: a JSON job on its stdin, a JSON result on its stdout.

    A plain subprocess: multiprocessing's spawn would import the caller's main script again (a user's
    script without an ``if __name__ == "__main__":`` guard would run twice), and a fork of a process
    running torch's thread pools can hang."""

    def __init__(self, spec: BenchmarkSpec, role: str, data_id: str, threads: int):
        p, settings = _plan(spec, role)
        job = {"role": role, "data": str(spec.data), "path": str(p), "settings": settings, "device": spec.device,
               "data_id": data_id, "threads": threads, "parent": os.getpid()}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self._process = subprocess.Popen([sys.executable, "-m", "derestainer.benchmark.worker"], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(job))
        self._process.stdin.close()

    def get(self) -> tuple[dict[str, Any], list[str]]:
        """``(info, log lines)`` once the training ends; its error is raised here."""
        assert self._process.stdout is not None
        out = self._process.stdout.read()
        code = self._process.wait()
        try:
            result = json.loads(out)
        except ValueError:
            raise BenchmarkError(f"the evaluator's training process ended without a result (exit status {code}; "
                                 "its error, if any, is printed above)") from None
        if not result["ok"]:  # a user's mistake, raised here as the class it was raised as there
            cls = getattr(errors, str(result["error"]), None)
            raise (cls if isinstance(cls, type) and issubclass(cls, errors.DerestainerError) else BenchmarkError)(
                result["message"])
        return result["info"], result["log"]

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
        self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


def _given(role: str, p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise BenchmarkError(f"--{role} {p}: no such file")
    try:  # checked before anything is trained: a generator given here is refused at once
        read_classifier_meta(p)
    except CheckpointError as exc:
        raise BenchmarkError(f"--{role} {exc}") from None
    return {"path": str(p), "trained_by_benchmark": False, "digest": file_digest(p)}


def _check_distinct(out: dict[str, dict[str, Any]]) -> None:
    if "evaluator" in out and "comparator" in out and out["evaluator"]["digest"] == out["comparator"]["digest"]:
        raise BenchmarkError(
            f"the evaluator {out['evaluator']['path']} and the comparator {out['comparator']['path']} are the same "
            "classifier (identical file contents): the evaluator would score generated images with the very network "
            "the generator was trained to please. Use an evaluator trained with another seed and/or another subset "
            "of the training images"
        )


def _plan(spec: BenchmarkSpec, role: str) -> tuple[Path, dict[str, Any]]:
    """Where the benchmark keeps the classifier of ``role``, and the settings it is trained with."""
    size = spec.classifier_size or spec.size or model_config("derestainer", spec.base_config).data.size
    arch = (spec.comparator_arch or spec.classifier_arch) if role == "comparator" else spec.classifier_arch
    return spec.out / "classifiers" / f"{role}.safetensors", {"arch": arch, "steps": spec.classifier_steps,
                                                              "size": size, **CLASSIFIER_PLAN[role]}


def _reusable(spec: BenchmarkSpec, role: str, data_id: str) -> dict[str, Any] | None:
    """The ``info`` of the classifier of ``role`` trained before with today's settings and data, or None."""
    p, settings = _plan(spec, role)
    info_path = p.with_name(f"{role}.benchmark.json")
    if p.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings and info.get("data") == data_id:
            return {**info, "path": str(p), "digest": file_digest(p)}
    return None


def _trained_here(spec: BenchmarkSpec, role: str, data_id: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The classifier of ``role`` trained by the benchmark: reused when its settings and data match."""
    found = _reusable(spec, role, data_id)
    if found is not None:
        log(f"{role}: reusing {found['path']}")
        return found
    p, settings = _plan(spec, role)
    return train_planned(role, Path(spec.data), p, settings, spec.device, data_id, log)


def train_planned(role: str, data: Path, p: Path, settings: dict[str, Any], device: str, data_id: str,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Train the classifier of ``role`` with ``settings`` (:func:`_plan`) into ``p`` and record how
    (``ROLE.benchmark.json``); return its ``info``."""
    log(f"{role}: training a {settings['arch']} HER2 classifier ({settings['steps']} steps, "
        f"{settings['size']} px, seed {settings['seed']}, {settings['subset']} training images)")
    metrics = stages.train_classifier(data, p, device=device, log=log, **settings)
    info = {"trained_by_benchmark": True, "settings": settings, "data": data_id, "metrics": jsonable(metrics)}
    write_json(p.with_name(f"{role}.benchmark.json"), info)
    return {**info, "path": str(p), "digest": file_digest(p)}
