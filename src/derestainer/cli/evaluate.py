"""``derestainer evaluate``: BCI-protocol SSIM/PSNR, the paper's semantic metrics, stain agreement, FID/KID."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from derestainer.cli.common import fail

if TYPE_CHECKING:
    from derestainer.metrics.semantic import SelfMatch, Tie


@click.command(short_help="Score generated IHC vs ground truth (Table 1 and more).")
@click.option("--pred", "pred_dir", required=True, type=click.Path(path_type=Path), help="Folder of generated IHC images.")
@click.option("--gt", "gt_dir", required=True, type=click.Path(path_type=Path), help="Folder of ground-truth IHC images (same file names).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="Evaluator checkpoint (train-classifier; NOT the comparator) for top-k/kNN, direct accuracy and FID/KID.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report folder (metrics.json, metrics.md, per_image.csv, figures). Default: <pred>/../eval_<pred name>.")
@click.option("--allow-missing", is_flag=True, help="Evaluate the common file names only, and say how many were left out.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes for the per-image pass.  [default: all cores]")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), default=None,
              help="CSV with columns name,level (0, 1+, 2+, 3+) for ground truth whose names do not carry the level.")
@click.option("--pred-suffix", default="", help="Suffix stripped from prediction names before matching (e.g. _fake_B).")
@click.option("--self-match", type=click.Choice(["include", "exclude"]), default="include", show_default=True,
              help="Whether each image's own ground truth is in its semantic library (both are reported).")
@click.option("--tie", type=click.Choice(["similarity", "nearest"]), default="similarity", show_default=True,
              help="kNN tie rule: largest summed similarity, or the nearest neighbour among the tied levels.")
@click.option("--knn-k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours of the kNN vote.")
@click.option("--comparator", type=click.Path(path_type=Path), default=None,
              help="The comparator's checkpoint, only to warn if the evaluator is not independent of it.")
@click.option("--classifier-size", type=click.IntRange(min=8), default=None,
              help="Evaluator input size in px.  [default: the checkpoint's training size]")
@click.option("--device", default="auto", show_default=True, help="Device of the evaluator: auto, cpu, cuda, cuda:1 …")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Evaluator batch size.")
@click.option("--resize-filter", type=click.Choice(["bicubic", "bilinear", "lanczos", "box", "nearest"]), default="bicubic",
              show_default=True, help="PIL filter that brings a prediction of another size to its ground truth's (the protocol: bicubic).")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Bootstrap resamples of the images for the 95 %% confidence intervals (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and of KID's subsets.")
@click.option("--name", "method", default=None, help="Method name in the table.  [default: the prediction folder's name]")
@click.option("--no-figures", is_flag=True, help="Skip the PNG figures.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(pred_dir: Path, gt_dir: Path, classifier: Path | None, out_dir: Path | None, allow_missing: bool,
             workers: int | None, labels_csv: Path | None, pred_suffix: str, self_match: SelfMatch, tie: Tie, knn_k: int,
             comparator: Path | None, classifier_size: int | None, device: str, batch_size: int, resize_filter: str,
             n_boot: int, seed: int, method: str | None, no_figures: bool, quiet: bool) -> None:
    """Evaluate generated IHC in --pred against the ground truth in --gt, paired by file name.

    SSIM and PSNR follow the BCI protocol (prediction resized bicubically to the ground truth's size,
    scikit-image, 7x7 window); with --classifier, the paper's top-k (k = 1, 3, 5) and kNN (k = 10)
    HER2 accuracy against a library of ground-truth features, the evaluator's direct accuracy and
    FID/KID on its features. Every number comes with a 95 % bootstrap confidence interval over the
    images. Every definition: docs/evaluation.md.
    """
    from derestainer.core.guard import output_lock, refuse_overlap
    from derestainer.evaluation import EvaluateOptions, run_evaluation, summary_table, write_report
    from derestainer.evaluation.report import REPORT_FILES

    if classifier is not None and not classifier.is_file():
        raise fail(f"{classifier}: no such classifier checkpoint")
    opts = EvaluateOptions(
        classifier=classifier, comparator=comparator, labels_csv=labels_csv, allow_missing=allow_missing,
        pred_suffix=pred_suffix, workers=workers, self_match=self_match, tie=tie, knn_k=knn_k, device=device,
        batch_size=batch_size, classifier_size=classifier_size, resize_filter=resize_filter, bootstrap=n_boot, seed=seed,
        progress=not quiet,
        log=lambda m: click.echo(m, err=True),
    )
    name = method or pred_dir.resolve().name
    out = out_dir if out_dir is not None else pred_dir.resolve().parent / f"eval_{pred_dir.resolve().name}"
    refuse_overlap([pred_dir, gt_dir], own_dirs=[out])  # the report folder is the command's own
    refuse_overlap([p for p in (classifier, comparator, labels_csv) if p is not None],
                   out_files=[out / f for f in REPORT_FILES])
    with output_lock(out, folder=True):  # taken first: a read-only --out fails before the long pass
        result = run_evaluation(pred_dir, gt_dir, opts)
        written = write_report(result, out, method=name, figures=not no_figures)
    click.echo(summary_table(result.metrics, name), nl=False)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")
