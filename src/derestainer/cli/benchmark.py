"""``derestainer benchmark``: train, translate and evaluate several models with one budget (Table 1, quality).

The library side is :mod:`derestainer.benchmark`; ``derestainer bench`` (speed) is another command.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from derestainer.cli.common import fail


def _int_list(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise fail(f"--{what} expects comma-separated integers, got {value!r}") from None
    if not out:
        raise fail(f"--{what} is empty")
    return out


@click.command(short_help="Compare models under one budget (Table 1).")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Dataset root in the BCI layout (HE/{train,test}, IHC/{train,test}).")
@click.option("--models", default="derestainer,pix2pix,pyramidpix2pix,no_stain,no_dab", show_default=True,
              help="Comma-separated presets (derestainer = paper) or YAML files.")
@click.option("--steps", required=True, type=click.IntRange(min=1), help="Training steps for every model.")
@click.option("--size", type=click.IntRange(min=16), default=None, help="Training resolution (default: the base config's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size (default: the base config's).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; one run per model and seed.")
@click.option("--base-config", default="tiny", show_default=True,
              help="Preset giving widths, data and training settings shared by every model (tiny or paper).")
@click.option("--comparator", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Comparator checkpoint for L_cmp (default: trained here once).")
@click.option("--evaluator", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Evaluator checkpoint for the semantic metrics (default: trained here once).")
@click.option("--classifier-arch", type=click.Choice(["resnet50", "resnet18", "tiny"]), default="resnet18",
              show_default=True, help="Architecture of classifiers trained here (the paper's is resnet50).")
@click.option("--comparator-arch", type=click.Choice(["resnet50", "resnet18", "tiny"]), default=None,
              help="Architecture of a comparator trained here.  [default: --classifier-arch]")
@click.option("--classifier-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Training steps of classifiers trained here.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--eval-workers", type=click.IntRange(min=1), default=None,
              help="Processes for the per-image evaluation (default: all cores).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Output folder.")
@click.option("--set", "overrides", multiple=True, metavar="[MODEL:]SECTION.KEY=VALUE",
              help="Config override for every model, or for one with a MODEL: prefix (repeatable), "
                   "e.g. --set train.lr=1e-4 --set pix2pix:model.ngf=16.")
@click.option("--reference", default=None,
              help="Model every other is compared with, image by image.  [default: derestainer if listed, else the first]")
@click.option("--floors/--no-floors", default=True, show_default=True,
              help="Also score the floor rows (median training colour; H&E haematoxylin without DAB): no training.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Bootstrap resamples for the confidence intervals and paired differences (0: none).")
@click.option("--parallel-evaluator/--no-parallel-evaluator", default=False, show_default=True,
              help="Train the evaluator in a second process beside the first generator training, on a quarter "
                   "of the threads (faster on CPU, where a small generator gains little from more cores).")
def benchmark(
    data: Path, models: str, steps: int, size: int | None, batch_size: int | None, seeds: str, base_config: str,
    comparator: Path | None, evaluator: Path | None, classifier_arch: str, comparator_arch: str | None,
    classifier_steps: int, device: str,
    eval_workers: int | None, out: Path, overrides: tuple[str, ...], reference: str | None, floors: bool, n_boot: int,
    parallel_evaluator: bool,
) -> None:
    """Train every model of --models with the same steps, batch, resolution and seeds, translate the
    test split, evaluate it, and write OUT/table.md (Table 1 layout: mean ± std over seeds with 95 %
    confidence intervals, the paired differences from --reference, the floor rows, the paper's numbers
    beside), OUT/figure.png (Fig. 3 layout) and OUT/results.json. Rerunning skips finished runs.
    """
    from derestainer.benchmark import BenchmarkSpec, run_benchmark

    spec = BenchmarkSpec(
        data=data,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        steps=steps,
        out=out,
        size=size,
        batch_size=batch_size,
        seeds=_int_list(seeds, "seeds"),
        base_config=base_config,
        comparator=comparator,
        evaluator=evaluator,
        overrides=overrides,
        classifier_arch=classifier_arch,
        comparator_arch=comparator_arch,
        classifier_steps=classifier_steps,
        device=device,
        eval_workers=eval_workers,
        reference=reference,
        floors=floors,
        bootstrap=n_boot,
        parallel_evaluator=parallel_evaluator,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's progress lines
    run_benchmark(spec, log=lambda msg: click.echo(msg, err=True))  # a DerestainerError: printed by the CLI group
    click.echo(str(out / "table.md"))
