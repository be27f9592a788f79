"""``derestainer bench``: speed (images/s, peak memory, GFLOPs) of a generator; eager vs fast path side by side.

The library side is :mod:`derestainer.speed`; ``derestainer benchmark`` (Table 1, quality) is another command.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from derestainer.cli.common import fail
from derestainer.core.errors import DerestainerError

if TYPE_CHECKING:
    from derestainer.speed import BenchMode, LoaderMode, PathName

QUICK_SIZE = 64


@click.command(short_help="Measure speed and memory (eager vs optimised paths).")
@click.option("--model", default="tiny", show_default=True,
              help="Preset (tiny, paper, pix2pix, pyramidpix2pix, ...), 'derestainer' (= paper) or a YAML file.")
@click.option("--base", default=None, type=click.Choice(["tiny", "paper"]),
              help="Width class: the model's differences from 'paper' laid over this preset (default: the preset as it is).")
@click.option("--size", type=click.IntRange(min=8), default=None,
              help=f"Image size in px [default: 256; {QUICK_SIZE} with --quick].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size.")
@click.option("--mode", type=click.Choice(["infer", "train"]), default="infer", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the full result as JSON (atomically).")
@click.option("--compare", is_flag=True, help="Run the plain eager fp32 path and the optimised path, alternating; print the ratio.")
@click.option("--eager", "eager_only", is_flag=True, help="Run the plain eager fp32 path only.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed calls per path [default: 2; 1 with --quick].")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Timed rounds [default: 10; 3 with --quick].")
@click.option("--quick", is_flag=True, help=f"A smoke run: 1 warm-up, 3 rounds, {QUICK_SIZE} px unless --size is given.")
@click.option("--tile", type=click.IntRange(min=8), default=None, help="Tile size for tiles/s [default: --size].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Optimised inference: bf16 autocast (auto: on CUDA only).")
@click.option("--modconv", type=click.Choice(["auto", "fused", "unfused", "keep"]), default="auto", show_default=True,
              help="Optimised inference: modulated convolution form.")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="Optimised inference: torch.compile (compile time is spent in the warm-up).")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True, help="Optimised inference: fold BatchNorm into convolutions.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True, help="Optimised inference: NHWC memory format.")
@click.option("--loader", type=click.Choice(["memory", "disk", "both"]), default="memory", show_default=True,
              help="Training: batch held in memory, read from disk by the DataLoader each step, or both alternating.")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Training: a BCI-layout folder (default: SynthBCI pairs written to a temporary folder).")
@click.option("--source-size", type=click.IntRange(min=8), default=None,
              help="Training: size of the SynthBCI images written (default --size; e.g. 1024 to resize like BCI).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Training: DataLoader workers (default: the config's).")
@click.option("--cache", is_flag=True, help="Training: keep decoded, resized pairs in memory (data.cache).")
@click.option("--comparator", default="none", show_default=True,
              help="Training: none | tiny | resnet18 | resnet50 (random init, for L_cmp's cost) | a classifier file.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads (default: as is).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Config override (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True)
def bench(model: str, base: str | None, size: int | None, batch: int, mode: BenchMode, device: str, json_out: Path | None,
          compare: bool, eager_only: bool, warmup: int | None, iters: int | None, quick: bool, tile: int | None,
          precision: str, modconv: str, compile_: bool, fold_bn: bool, channels_last: bool, loader: LoaderMode,
          data: Path | None, source_size: int | None, workers: int | None, cache: bool, comparator: str,
          threads: int | None, overrides: tuple[str, ...], seed: int) -> None:
    """Measure a generator's speed: warm-up, then median and spread of images/s (tiles/s for inference),
    peak memory, and GFLOPs per image. With --compare the plain eager fp32 path and the optimised
    path (docs/performance.md) run in the same process, alternating, and their ratio is printed.

    Examples:

        derestainer bench --model tiny --size 256 --compare

        derestainer bench --model pix2pix --base tiny --mode train --loader both --size 256 --batch 4
    """
    from derestainer.core.guard import output_lock
    from derestainer.core.io import write_json
    from derestainer.speed import BenchSpec, format_result, run_bench

    if compare and eager_only:
        raise fail("--compare already runs the eager path; use one of --compare and --eager")
    paths: tuple[PathName, ...] = ("eager", "optimized") if compare else (("eager",) if eager_only else ("optimized",))
    spec = BenchSpec(
        model=model, base=base, size=size or (QUICK_SIZE if quick else 256), batch=batch, mode=mode, device=device,
        warmup=warmup if warmup is not None else (1 if quick else 2),
        iters=iters if iters is not None else (3 if quick else 10),
        paths=paths, tile=tile,
        fast={"precision": precision, "modconv": modconv, "compile": compile_, "fold_bn": fold_bn,
              "channels_last": channels_last},
        loader=loader, data=str(data) if data else None, source_size=source_size, workers=workers, cache=cache,
        comparator=comparator, threads=threads, overrides=overrides, seed=seed,
    )
    with contextlib.ExitStack() as stack:
        if json_out is not None:  # locked (and so checked writable) before the measurement, not after it
            stack.enter_context(output_lock(json_out, folder=False))
        try:
            res = run_bench(spec, log=lambda s: click.echo(s, err=True), command=_command_line())
        except DerestainerError:
            raise  # the CLI group prints it
        except (ValueError, FileNotFoundError) as exc:  # from torch or the fast path: still the user's input
            raise fail(str(exc)) from None
        click.echo(format_result(res))
        if json_out is not None:
            write_json(json_out, res)
            click.echo(f"wrote {json_out}")


def _command_line() -> str:
    """The options given on the command line, as a command to paste (the --json target left out:
    it names a file of the machine that ran it)."""
    ctx = click.get_current_context()
    words = ["derestainer", "bench"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name == "json_out":
            continue
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if value:
                words.append(param.opts[0])
            elif param.secondary_opts:
                words.append(param.secondary_opts[0])
        elif param.multiple:
            for v in value:
                words += [param.opts[0], str(v)]
        else:
            words += [param.opts[0], str(value)]
    return " ".join(shlex.quote(w) for w in words)
