"""Training: the translation trainer (:mod:`.loop`), plain-data checkpoints (:mod:`.checkpoint`,
:mod:`.state`), multi-process helpers (:mod:`.distributed`) and run logging (:mod:`.logging`).

Heavy modules are imported on first use, so that ``import derestainer.training.checkpoint`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Trainer, TrainingError, train

__all__ = ["Trainer", "TrainingError", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
