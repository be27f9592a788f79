"""The ``derestainer`` command: one click group, every sub-command thin over the library.

Each sub-command lives in its own module here and imports heavy dependencies inside its function,
so that ``derestainer --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

import click

from derestainer.core.errors import DerestainerError
from derestainer.core.version import __version__


class _Group(click.Group):
    """The one place where a user-facing error becomes a message: ``Error: <message>``, no traceback.

    Any :class:`~derestainer.core.errors.DerestainerError` raised by a sub-command is printed as one
    line and exits with its ``exit_code``, and so is an ``OSError`` that means a read-only folder or a
    full disk (:data:`~derestainer.core.io.WRITE_ERRNOS`); anything else (a bug) keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DerestainerError as exc:
            err = click.ClickException(str(exc))
            err.exit_code = exc.exit_code
            raise err from None
        except OSError as exc:
            from derestainer.core.io import WRITE_ERRNOS  # here: `derestainer --help` imports no NumPy

            if exc.errno not in WRITE_ERRNOS:
                raise
            # a read-only folder, a full disk or quota, met after the up-front checks: the environment's
            # to fix, reported naming the file (atomic writes left no partial file at a final name)
            where = f"{exc.filename}: " if exc.filename is not None else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="derestainer")
def main() -> None:
    """H&E to virtual HER2 IHC: DeReStainer, baselines, whole-slide inference and evaluation."""


def _register() -> None:
    from derestainer.cli import (
        bench,
        benchmark,
        demo,
        evaluate,
        export,
        floor,
        separate,
        synth,
        train,
        train_classifier,
        translate,
        translate_slide,
    )

    for command in (
        demo.demo,
        synth.synth,
        separate.separate,
        train_classifier.train_classifier,
        train.train,
        export.export,
        translate.translate,
        translate_slide.translate_slide,
        evaluate.evaluate,
        floor.floor,
        benchmark.benchmark,
        bench.bench,
    ):
        main.add_command(command)


_register()
