"""The per-image pass of an evaluation, run in worker processes, one image pair per task.

Each task reads both images, resizes the prediction to the ground truth's size, computes SSIM/PSNR
and the stain statistics, and makes a small grey thumbnail of each for the pairing check.

Workers do not outlive the evaluation: each one exits within 0.2 s of its parent's death (it polls
its parent PID; on Linux the kernel also sends it SIGTERM), and a SIGTERM to the parent becomes a
clean stop (exit status 143) that cancels the queued pairs and terminates the workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from derestainer.core.errors import EvaluationError
from derestainer.core.io import read_image
from derestainer.metrics import pixel, stain

#: Side of the grey thumbnails used by the pairing check.
THUMB_SIZE: int = 32


@dataclass(frozen=True)
class PairTask:
    """One image pair to score: its index in the pairing, the two paths, and the stain thresholds."""

    index: int
    pred: str
    gt: str
    keep_images: bool
    dab_threshold: float
    h_threshold: float
    resize_filter: str = pixel.DEFAULT_FILTER


def _thumb(img: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(img).convert("L").resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32).ravel()


def evaluate_pair(task: PairTask) -> dict[str, Any]:
    """Metrics of one pair (module-level so that worker processes can import it)."""
    gt = read_image(task.gt)
    pred_native = read_image(task.pred)
    try:
        pred = pixel.resize_to(pred_native, gt.shape[:2], task.resize_filter)
        m = pixel.ssim(gt, pred), pixel.psnr(gt, pred)
    except ValueError as exc:
        raise EvaluationError(f"{task.pred} (ground truth {task.gt}): {exc}") from None
    sp = stain.stain_stats(pred, task.dab_threshold, task.h_threshold)
    sg = stain.stain_stats(gt, task.dab_threshold, task.h_threshold)
    out: dict[str, Any] = {
        "index": task.index, "ssim": m[0], "psnr": m[1],
        "resized": pred is not pred_native,
        "pred_size": f"{pred_native.shape[1]}x{pred_native.shape[0]}", "gt_size": f"{gt.shape[1]}x{gt.shape[0]}",
        **{f"{k}_pred": v for k, v in sp.items()}, **{f"{k}_gt": v for k, v in sg.items()},
        "thumb_pred": _thumb(pred), "thumb_gt": _thumb(gt),
    }
    if task.keep_images:
        out["img_pred"], out["img_gt"] = pred, gt
    return out


#: How often a worker checks that its parent is still there, in seconds.
PARENT_POLL_S: float = 0.2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _poll_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)  # the parent is gone (reparented): nothing will read our results


def watch_parent(parent: int, deathsig: bool) -> None:
    """Worker initializer: exit as soon as process ``parent`` dies, whatever killed it; leave Ctrl-C to it.

    On Linux with ``deathsig``, the kernel sends SIGTERM when the parent dies (``PR_SET_PDEATHSIG``;
    only when the pool was started from the parent's main thread, since the signal follows the thread
    that spawned the worker); everywhere, a daemon thread polls the parent PID every
    :data:`PARENT_POLL_S` seconds.
    """
    if deathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # died before we got here
        os._exit(1)
    # Ctrl-C reaches the whole process group: the parent handles it (and stops us), not each worker
    # with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_poll_parent, args=(parent,), name="derestainer-parent-watch", daemon=True).start()


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers (no public way to stop busy workers before Python 3.14)."""
    for p in list((pool._processes or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            p.terminate()


@contextlib.contextmanager
def _sigterm_as_exit(pool: ProcessPoolExecutor) -> Iterator[None]:
    """While the body runs, SIGTERM and Ctrl-C terminate the pool's workers at once, then SIGTERM raises
    SystemExit(143) (so that ``finally`` clauses run) instead of killing the process outright and Ctrl-C
    raises KeyboardInterrupt as usual. Only from the main thread, and only for the signals nobody else
    handles (Python's defaults)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        # The workers go now: the exception may unwind code that keeps this generator alive until exit.
        _terminate(pool)
        raise SystemExit(128 + signum)

    def on_int(signum: int, frame: object) -> None:
        _terminate(pool)  # before the interpreter's shutdown, which would wait for their queued work
        raise KeyboardInterrupt

    old: dict[signal.Signals, Any] = {}
    for sig, handler, default in ((signal.SIGTERM, on_term, signal.SIG_DFL), (signal.SIGINT, on_int, signal.default_int_handler)):
        if signal.getsignal(sig) is default:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig_back, previous in old.items():
            signal.signal(sig_back, previous)


def _abort(pool: ProcessPoolExecutor, running: set[Future[dict[str, Any]]]) -> None:
    """Stop at once: cancel what is queued, terminate the workers (their results are not wanted)."""
    for f in running:
        f.cancel()
    _terminate(pool)
    # The pool's manager thread sees the workers gone and exits; waiting for it frees the pool's queues.
    pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future[dict[str, Any]]) -> dict[str, Any]:
    """A worker's result; a pool whose workers died becomes one EvaluationError that says why it may have."""
    try:
        return future.result()
    except BrokenProcessPool:
        script = _unguarded_main()
        hint = (f"each worker imports {script} first, and it calls derestainer outside an "
                "`if __name__ == \"__main__\":` block, so the workers run it again and fail (see their error above); "
                if script else "")
        raise EvaluationError(
            "the evaluation's worker processes stopped before finishing (killed, out of memory, or failed to start); "
            f"{hint}rerun with one worker (evaluate --workers 1, benchmark --eval-workers 1, or workers=1) to score "
            "in this process") from None


_GUARD = re.compile(r"""^if\s+__name__\s*==\s*['"]__main__['"]\s*:""", re.MULTILINE)


def _unguarded_main() -> str | None:
    """The module or script that spawn re-imports in every worker, when it may run code on import: a script
    without an ``if __name__ == "__main__":`` block, or a module run with ``-m`` (not a package's ``__main__``)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name:
        return None if name.endswith("__main__") else str(name)
    path = getattr(main, "__file__", None)
    if not path:
        return None  # interactive: spawn imports nothing of it
    try:
        source = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return str(path)
    return None if _GUARD.search(source) else str(path)


def iterate_pairs(tasks: list[PairTask], workers: int) -> Iterator[dict[str, Any]]:
    """Results of :func:`evaluate_pair` for every task, in completion order, from ``workers`` processes."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield evaluate_pair(t)
        return
    # spawn, not fork: the parent may hold torch (the evaluator) and its thread pools, which do not survive fork.
    ctx = multiprocessing.get_context("spawn")
    n_proc = min(workers, len(tasks))
    # At most 2 tasks per worker in flight: results may carry full-size images for the evaluator, and a
    # slow consumer (a CPU evaluator) must hold the workers back rather than let results pile up in memory.
    window = 2 * n_proc
    main = threading.current_thread() is threading.main_thread()
    pool = ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx, initializer=watch_parent,
                               initargs=(os.getpid(), main))
    with _sigterm_as_exit(pool):
        running: set[Future[dict[str, Any]]] = set()
        finished = False
        try:
            for t in tasks:
                running.add(pool.submit(evaluate_pair, t))
                if len(running) >= window:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield _result(f)
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    yield _result(f)
            finished = True
        finally:
            if finished:
                pool.shutdown(wait=True)
            else:  # an error, SIGTERM, Ctrl-C, or the consumer stopped early
                _abort(pool, running)
