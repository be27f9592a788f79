"""Helpers shared by the sub-commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def fail(message: str) -> click.ClickException:
    """A user-facing error: printed without a traceback, exit status 1."""
    return click.ClickException(message)


def inference_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--precision`` and ``--fast/--plain``, shared by the commands that run a generator."""
    fn = click.option(
        "--fast/--plain", default=True, show_default=True,
        help="Fast path: BatchNorm folded into convolutions, channels_last, inference mode "
             "(docs/performance.md); --plain runs the model as trained.")(fn)
    return click.option(
        "--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
        help="auto = bf16 on CUDA and on CPUs with native bf16 (outputs within ±2 grey levels of fp32), "
             "else fp32.")(fn)
