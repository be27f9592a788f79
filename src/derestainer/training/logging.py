"""What a training run tells its user: progress bar, JSONL log, TensorBoard, sample grids.

``<run>/log.jsonl`` is always written (one JSON object per line): ``{"kind": "train", "step": …,
"time": …, <every loss term>…}`` at each logged step, ``{"kind": "val", …}`` after each validation,
and ``{"kind": "event", "event": "skipped" | "checkpoint" | "stopped" | …}`` for the rest.
TensorBoard event files go to ``<run>/tb`` when the ``tensorboard`` package is installed.
Only rank 0 writes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from derestainer.core.io import write_text
from derestainer.core.ranges import signed_to_unit
from derestainer.stain.functional import stain_channel

log = logging.getLogger("derestainer.train")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a JSONL log (a torn last line, from a killed run, is ignored)."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def purge_jsonl(path: str | os.PathLike[str], after_step: int) -> int:
    """Drop the records of steps after ``after_step`` (written by a run that was then interrupted and
    resumed from an earlier checkpoint), so that the log reads as one uninterrupted run.

    Rewrites the file atomically; returns the number of records dropped.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    keep: list[str] = []
    dropped = 0
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1  # a torn last line
            continue
        if isinstance(rec.get("step"), int) and rec["step"] > after_step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_text(p, "".join(f"{line}\n" for line in keep))
    return dropped


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": strict JSON readers reject bare NaN
    return v


class RunLogger:
    """Progress bar, JSONL log and optional TensorBoard of one run (inert on ranks other than 0).

    Args:
        run_dir: run folder.
        enabled: False on ranks other than 0.
        total: total steps (progress bar); initial: steps already done (resume).
        tensorboard: ``auto`` (if installed) | ``on`` | ``off``.
        progress: show a tqdm bar (on a terminal; otherwise each logged step is one log line).
    """

    def __init__(self, run_dir: str | os.PathLike[str], enabled: bool = True, total: int = 0, initial: int = 0,
                 tensorboard: str = "auto", progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._fh = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if initial:
            purge_jsonl(self.run_dir / "log.jsonl", after_step=initial)
        # Line-buffered append: a killed run loses at most its last line, which read_jsonl tolerates.
        self._fh = open(self.run_dir / "log.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the run)
        if tensorboard != "off":
            try:  # optional dependency, imported only when asked for
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=initial or None)
            except ImportError:
                if tensorboard == "on":
                    raise
                log.info("tensorboard is not installed: logging to log.jsonl only (pip install tensorboard)")
        if progress and sys.stderr.isatty():
            from tqdm import tqdm  # only for an interactive terminal

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to log.jsonl."""
        if self._fh is not None:
            rec = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
            self._fh.write(json.dumps(rec) + "\n")

    def scalars(self, kind: str, step: int, values: dict[str, float], **extra: Any) -> None:
        """Log ``values`` at ``step`` (JSONL + TensorBoard under ``kind/``)."""
        if not self.enabled:
            return
        self.write({"kind": kind, "step": step, **extra, **values})
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def event(self, step: int, event: str, message: str = "", level: int = logging.INFO, **fields: Any) -> None:
        """A notable event: written to the JSONL log and shown to the user."""
        if not self.enabled:
            return
        self.write({"kind": "event", "step": step, "event": event, "message": message, **fields})
        if message:
            self.echo(message, level)

    def echo(self, message: str, level: int = logging.INFO) -> None:
        """Show a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            log.log(level, message)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def postfix(self, values: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)

    def image(self, tag: str, step: int, image_hwc_uint8: Any) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


#: Columns of a sample grid, left to right.
SAMPLE_COLUMNS: tuple[str, ...] = ("H&E", "H channel", "generated", "ground truth", "DAB generated", "DAB real")


def sample_grid(he: torch.Tensor, fake: torch.Tensor, real: torch.Tensor, rgb_from_hed: Any = None,
                padding: int = 2) -> torch.Tensor:
    """One row per sample: H&E | H channel | generated | ground truth | DAB generated | DAB real.

    Args:
        he, fake, real: ``[N, 3, H, W]`` in model space ``[-1, 1]``.
        rgb_from_hed: stain matrix for the channel images (default Ruifrok).
    Returns:
        ``uint8 [H', W', 3]`` image of the grid (white padding).
    """
    from torchvision.utils import make_grid  # torchvision's import is slow; only sample grids need it

    he01, fake01, real01 = (signed_to_unit(t.detach().float().cpu()).clamp(0, 1) for t in (he, fake, real))
    cols = [he01, stain_channel(he01, "h", rgb_from_hed), fake01, real01,
            stain_channel(fake01, "dab", rgb_from_hed), stain_channel(real01, "dab", rgb_from_hed)]
    tiles = torch.stack(cols, dim=1).flatten(0, 1)  # [N*6, 3, H, W], row-major: one sample per row
    grid = make_grid(tiles, nrow=len(cols), padding=padding, pad_value=1.0)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


class LossWindow:
    """Loss sums of the steps since the last log line, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.zero = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}
        self.good, self.bad = self.zero.clone(), self.zero.clone()
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], bad: torch.Tensor, nonfinite: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add one step; returns its 0-dim float "good" flag."""
        zero = self.zero
        good = (~bad).to(zero.dtype)
        for name, v in terms.items():
            self.terms[name] = self.terms.get(name, zero) + torch.where(bad, zero, v.float())
        for name, f in nonfinite.items():
            self.nonfinite[name] = self.nonfinite.get(name, zero) + f.to(zero.dtype)
        self.good += good
        self.bad += 1.0 - good
        self.steps += 1
        return good
