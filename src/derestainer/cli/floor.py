"""``derestainer floor``: the floor rows of a Table 1, predictions made without any training."""

from __future__ import annotations

from pathlib import Path

import click

from derestainer.cli.common import fail


def _folders(data: Path | None, split: str, he: Path | None, ihc_train: Path | None, he_train: Path | None
             ) -> tuple[Path, Path | None, Path | None]:
    """The H&E test folder, training IHC and training H&E: explicit options win over ``--data``'s BCI layout."""
    if data is None:
        if he is None:
            raise fail("give the H&E test images with --he, or a BCI-layout root with --data")
        return he, ihc_train, he_train
    if not data.is_dir():
        raise fail(f"{data}: --data is not a folder (expected the BCI layout HE/{{train,test}}, IHC/{{train,test}})")
    resolved = {"he": he or data / "HE" / split, "ihc": ihc_train or data / "IHC" / "train",
                "he_train": he_train or data / "HE" / "train"}
    for d in resolved.values():
        if not d.is_dir():
            raise fail(f"{d}: missing; --data expects the BCI layout HE/{{train,{split}}} and IHC/train")
    return resolved["he"], resolved["ihc"], resolved["he_train"]


@click.command(short_help="Write the images of a floor row, which needs no training.")
@click.option("--kind", type=click.Choice(["median", "hematoxylin"]), required=True,
              help="median: every image the per-channel median colour of the training IHC; hematoxylin: the "
                   "H&E's own haematoxylin re-rendered as an IHC counterstain without DAB.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="BCI-layout root: --he defaults to DATA/HE/<split>, --ihc-train to DATA/IHC/train, "
                   "--he-train to DATA/HE/train.")
@click.option("--split", default="test", show_default=True, help="Split of --data whose H&E is rendered.")
@click.option("--he", "he_dir", type=click.Path(path_type=Path), default=None, help="Folder of H&E test images.")
@click.option("--ihc-train", type=click.Path(path_type=Path), default=None,
              help="Folder of training IHC (needed by median; with --he-train, scales the haematoxylin).")
@click.option("--he-train", type=click.Path(path_type=Path), default=None,
              help="Folder of training H&E: with --ihc-train, the haematoxylin is scaled by the ratio of the mean "
                   "H concentration of the training IHC to that of the training H&E.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder: <stem>.png per H&E image (the H&E's size), then floor.json.")
def floor(kind: str, data: Path | None, split: str, he_dir: Path | None, ihc_train: Path | None,
          he_train: Path | None, out_dir: Path) -> None:
    """Write the --kind floor of every H&E image into --out, named like translate's output, so that
    `derestainer evaluate --pred OUT --gt IHC/test` scores it: how much of a score needs no model.
    """
    from derestainer.evaluation.floors import write_floor

    he, ihc, he_tr = _folders(data, split, he_dir, ihc_train, he_train)
    if kind == "median" and ihc is None:
        raise fail("--kind median needs the training IHC: give --ihc-train (or --data)")
    record = write_floor(kind, he, out_dir, ihc, he_tr)  # one-line errors (EvaluationError, OutputError, ...)
    what = (f"colour {tuple(record['colour'])}" if kind == "median" else f"haematoxylin scale {record['h_scale']:.3f}")
    click.echo(f"wrote the {kind} floor of {record['n_images']} image(s) ({what}) to {out_dir}")
