"""``derestainer demo``: SynthBCI → stain panels → classifiers → tiny DeReStainer → translate → evaluate."""

from __future__ import annotations

from pathlib import Path

import click

from derestainer.cli.common import fail
from derestainer.core.errors import DerestainerError


@click.command(short_help="Run the whole pipeline on synthetic data (CPU minutes).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--train", "n_train", type=int, default=400, show_default=True, help="Synthetic training pairs.")
@click.option("--test", "n_test", type=int, default=80, show_default=True, help="Synthetic test pairs.")
@click.option("--steps", type=int, default=1000, show_default=True, help="DeReStainer training steps.")
@click.option("--classifier-steps", type=int, default=150, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def demo(out: Path, n_train: int, n_test: int, steps: int, classifier_steps: int, seed: int, device: str) -> None:
    """Generate SynthBCI, write stain-separation panels and pairs per HER2 level, train the
    comparator/evaluator and the tiny DeReStainer, translate the test split, evaluate it, and write
    a contact sheet H&E | generated IHC | real IHC per level. Rerunning reuses finished steps."""
    from derestainer.demo import DemoSpec, run_demo

    if min(n_train, n_test) < 8:
        raise fail("--train and --test need at least 8 pairs each (two per HER2 level)")
    try:
        run_demo(DemoSpec(out=out, n_train=n_train, n_test=n_test, steps=steps,
                          classifier_steps=classifier_steps, seed=seed, device=device), log=click.echo)
    except DerestainerError:
        raise  # the CLI group prints it
    except (ValueError, OSError) as exc:  # e.g. an input folder without images, a full disk: the user's to fix
        raise fail(str(exc)) from None
