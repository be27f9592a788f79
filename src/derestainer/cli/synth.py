"""``derestainer synth``: write a SynthBCI dataset (synthetic paired H&E/HER2-IHC) in the BCI layout."""

from __future__ import annotations

from pathlib import Path

import click

from derestainer.cli.common import fail


@click.command(short_help="Generate synthetic paired H&E/HER2 IHC (SynthBCI).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (gets HE/{train,test}, IHC/{train,test} and synthbci.json).")
@click.option("--train", "n_train", type=click.IntRange(min=0), default=400, show_default=True,
              help="Number of training pairs.")
@click.option("--test", "n_test", type=click.IntRange(min=0), default=100, show_default=True,
              help="Number of test pairs.")
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True,
              help="Image side in pixels (about 1 µm per pixel; the field grows with the size).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Dataset seed: the same seed gives the same bytes.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes [default: min(2, CPU count)]; the output does not depend on it.")
@click.option("--displacement", type=click.Choice(["adjacent", "registered"]), default="adjacent", show_default=True,
              help="IHC offset from the H&E: adjacent (unregistered section, up to 6 px, 2°, 1.5 px warp) or "
                   "registered (at most 1 px, 0.5°, 0.5 px). The same seed draws the same tissue for both.")
@click.option("--overwrite", is_flag=True,
              help="Delete PNGs under OUT/{HE,IHC}/{train,test} that this dataset would not rewrite.")
def synth(out_dir: Path, n_train: int, n_test: int, size: int, seed: int, workers: int | None,
          displacement: str, overwrite: bool) -> None:
    """Generate SynthBCI: physically rendered pairs of H&E and HER2 IHC (levels 0, 1+, 2+, 3+).

    Files are named like BCI's, NNNNN_{split}_{level}.png, with the same name under HE/ and IHC/.
    The IHC is an adjacent section: displaced and deformed relative to the H&E (--displacement).
    """
    from derestainer.core.guard import output_lock
    from derestainer.data.synth import SynthParams, generate_dataset, stale_files, with_displacement

    if n_train + n_test == 0:
        raise fail("nothing to generate: give --train and/or --test greater than 0")
    if out_dir.exists() and not out_dir.is_dir():
        raise fail(f"{out_dir}: exists and is not a folder")
    with output_lock(out_dir, folder=True):  # two generators into one folder would mix datasets
        stale = stale_files(out_dir, n_train, n_test, seed)
        if stale and not overwrite:
            raise fail(
                f"{out_dir} already holds {len(stale)} image(s) that this dataset would not replace "
                f"(e.g. {stale[0]}); choose an empty folder or pass --overwrite to delete them"
            )
        for f in stale:
            f.unlink()
        try:
            summary = generate_dataset(out_dir, n_train, n_test, size=size, seed=seed, workers=workers,
                                       params=with_displacement(SynthParams(), displacement))
        except OSError as exc:
            raise fail(f"cannot write the dataset to {out_dir}: {exc}") from None
    counts = "; ".join(
        f"{split} " + " ".join(f"{lvl}:{n}" for lvl, n in c.items())
        for split, c in summary["counts"].items() if sum(c.values())
    )
    click.echo(
        f"wrote {summary['pairs']} pairs ({size} px, seed {seed}, {displacement}) to {out_dir} in "
        f"{summary['seconds']:.1f} s ({summary['pairs_per_s']:.1f} pairs/s); levels {counts}"
    )
