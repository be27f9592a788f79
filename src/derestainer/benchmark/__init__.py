"""``derestainer benchmark``: the paper's Table 1 (quality metrics) on any paired dataset, with one command.

Not to be confused with :mod:`derestainer.speed` (``derestainer bench``: images/s, memory, FLOPs).

For every model (a preset name: ``derestainer``, ``pix2pix``, ``pyramidpix2pix``, ``no_stain``, ...)
and every seed, the benchmark

1. resolves the model's config under the *same budget* (steps, batch size, resolution, seed): the base
   config (``tiny`` or ``paper``) ⊕ the model preset's differences from ``paper`` ⊕ the budget ⊕
   ``--set`` overrides (:func:`model_config`, :func:`run_config`; :mod:`.spec`);
2. trains it with the package's trainer, translates the test split, evaluates it with the package's
   metrics (SSIM/PSNR by the BCI protocol, top-k/kNN with the evaluator, stain-aware metrics;
   :mod:`.stages`);
3. writes a marker ``done.json`` holding its metrics, so that a rerun skips it (resumable; :mod:`.records`).

It then writes ``results.json`` (everything, machine-readable), ``table.md`` (Table 1 layout, mean ±
sample standard deviation over seeds, the paper's values quoted beside and marked as such;
:mod:`.stats`, :mod:`.tables`) and ``figure.png`` (paper Fig. 3 layout: one row per HER2 level; H&E,
each method, ground truth; :mod:`.figure`). :mod:`.run` ties it together.

Without ``--evaluator`` / ``--comparator`` checkpoints the benchmark trains them once itself, with
different seeds and disjoint halves of the training images (even / odd index), and records it
(:mod:`.classifiers`).
"""

from __future__ import annotations

from derestainer.benchmark.classifiers import CLASSIFIER_PLAN, ensure_classifiers
from derestainer.benchmark.figure import make_figure, pick_examples
from derestainer.benchmark.records import MARKER, TRAINED_MARKER, data_digest, file_digest, generator_params
from derestainer.benchmark.run import run_benchmark, run_one
from derestainer.benchmark.spec import (
    ALIASES,
    BenchmarkSpec,
    check_layout,
    model_config,
    needs_comparator,
    preset_delta,
    run_config,
    split_target,
)
from derestainer.benchmark.stages import flatten_metrics
from derestainer.benchmark.stats import mean_std, summarize
from derestainer.benchmark.tables import (
    EXTRA_COLUMNS,
    PAPER_TABLE1A,
    PAPER_TABLE1B,
    TABLE1_COLUMNS,
    format_report,
    markdown_table,
    paper_table,
)
from derestainer.core.errors import BenchmarkError

__all__ = [
    "ALIASES",
    "CLASSIFIER_PLAN",
    "EXTRA_COLUMNS",
    "MARKER",
    "PAPER_TABLE1A",
    "PAPER_TABLE1B",
    "TABLE1_COLUMNS",
    "TRAINED_MARKER",
    "BenchmarkError",
    "BenchmarkSpec",
    "check_layout",
    "data_digest",
    "ensure_classifiers",
    "file_digest",
    "flatten_metrics",
    "format_report",
    "generator_params",
    "make_figure",
    "markdown_table",
    "mean_std",
    "model_config",
    "needs_comparator",
    "paper_table",
    "pick_examples",
    "preset_delta",
    "run_benchmark",
    "run_config",
    "run_one",
    "split_target",
    "summarize",
]
