"""The ``derestainer`` command: one click group, every sub-command thin over the library.

Each sub-command lives in its own module here and imports heavy dependencies inside its function,
so that ``derestainer --help`` stays fast.
"""

from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="derestainer")
def main() -> None:
    """H&E to virtual HER2 IHC: DeReStainer, baselines, whole-slide inference and evaluation."""


def _register() -> None:
    from . import (
        bench,
        benchmark,
        demo,
        evaluate,
        export,
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
        benchmark.benchmark,
        bench.bench,
    ):
        main.add_command(command)


_register()
