"""The evaluation pipeline: pair two folders of images, run the metrics over them, write the report.

:func:`evaluate` (keyword options, as the ``derestainer evaluate`` flags) or :func:`run_evaluation`
(an :class:`EvaluateOptions`) returns an :class:`EvaluationResult`; :func:`write_report` writes
``metrics.json``, ``metrics.md``, ``per_image.csv`` and figures. The metric functions themselves are
in :mod:`derestainer.metrics`; definitions in docs/evaluation.md.

Modules: :mod:`.pairing` (file-name pairing), :mod:`.pool` (per-image worker processes),
:mod:`.features` (evaluator batching), :mod:`.summary` (aggregation), :mod:`.run` (orchestration),
:mod:`.report` (the files written).
"""

from derestainer.core.errors import EvaluationError
from derestainer.evaluation.options import EvaluateOptions
from derestainer.evaluation.pairing import Pair, Pairing, match_pairs
from derestainer.evaluation.report import summary_table, table_markdown, write_report
from derestainer.evaluation.run import EvaluationResult, evaluate, run_evaluation

__all__ = [
    "EvaluateOptions",
    "EvaluationError",
    "EvaluationResult",
    "Pair",
    "Pairing",
    "evaluate",
    "match_pairs",
    "run_evaluation",
    "summary_table",
    "table_markdown",
    "write_report",
]
