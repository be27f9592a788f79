"""``python -m derestainer.benchmark.worker``: one classifier's training for a benchmark, in its own process.

:mod:`.classifiers` starts it to train the evaluator beside the first generator training
(``BenchmarkSpec.parallel_evaluator``). Its stdin is one JSON job (``role``, ``data``, ``path``,
``settings``, ``device``, ``data_id``, ``threads``, ``parent``: the benchmark's PID); its stdout one
JSON result: ``{"ok": true, "info": ..., "log": [...]}``, or ``{"ok": false, "error": <a
derestainer error class name>, "message": ...}`` for a user's mistake (a bug's traceback goes to
stderr, exit status 1). Ctrl-C is left to the benchmark, which stops this process; it exits by
itself when the benchmark's process dies.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from derestainer.benchmark.classifiers import train_planned
from derestainer.core.errors import DerestainerError
from derestainer.evaluation.pool import watch_parent


def main() -> int:
    job = json.loads(sys.stdin.read())
    watch_parent(int(job["parent"]), deathsig=True)
    torch.set_num_threads(int(job["threads"]))
    t0 = time.monotonic()
    log: list[str] = []
    try:
        info = train_planned(job["role"], Path(job["data"]), Path(job["path"]), job["settings"], job["device"],
                             job["data_id"], log.append)
    except DerestainerError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    else:
        log.append(f"{job['role']}: trained beside the generator in {time.monotonic() - t0:.0f} s")
        result = {"ok": True, "info": info, "log": log}
    sys.stdout.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
