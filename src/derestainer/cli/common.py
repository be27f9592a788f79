"""Helpers shared by the sub-commands."""

from __future__ import annotations

import click


def fail(message: str) -> "click.ClickException":
    """A user-facing error: printed without a traceback, exit status 1."""
    return click.ClickException(message)
