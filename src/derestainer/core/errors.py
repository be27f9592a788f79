"""Every user-facing error of derestainer, in one place.

All derive from :class:`DerestainerError`; the command line turns any of them into one line
``Error: <message>`` and an exit status, and shows a traceback only for anything else (a bug).
Each also derives from the built-in type it has always been, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DerestainerError(Exception):
    """Base of every error caused by a user's input, files or environment (not by a bug)."""

    #: Exit status the command line uses for this error.
    exit_code: int = 1


class ConfigError(DerestainerError, ValueError):
    """A configuration file, preset or ``--set`` override is malformed or names an unknown key."""


class ImageReadError(DerestainerError, ValueError):
    """An input image is missing, unreadable, truncated or of an unsupported mode."""


class CheckpointError(DerestainerError, ValueError):
    """A model or checkpoint file is missing, corrupt, or belongs to another kind of model."""


class DatasetError(DerestainerError, ValueError):
    """A dataset's folders, file names, labels or pairs do not fit what the loader expects."""


class PairSizeError(DatasetError):
    """The H&E and IHC images of a pair have different sizes."""


class LabelError(DatasetError):
    """A HER2 level (in a file name or a label CSV) is not one of 0, 1+, 2+, 3+ (or unknown)."""


class ClassifierDataError(DerestainerError, ValueError):
    """The data given to classifier training cannot train a HER2 classifier (e.g. no known levels)."""


class TrainingError(DerestainerError, RuntimeError):
    """Training cannot start or continue (bad resume target, too many non-finite steps, ...)."""


class EvaluationError(DerestainerError, ValueError):
    """Predictions and ground truth cannot be evaluated as given (missing pairs, bad labels, ...)."""


class SlideError(DerestainerError, ValueError):
    """A whole slide cannot be read or translated as asked (unknown resolution, bad output, ...)."""


class BenchmarkError(DerestainerError, ValueError):
    """A Table-1 benchmark cannot run as specified (unknown model, changed budget on resume, ...)."""


class BenchError(DerestainerError, ValueError):
    """A speed measurement cannot run as specified (unknown model, unavailable device, ...)."""


class DeviceError(DerestainerError, ValueError):
    """The device asked for is not available on this machine."""


class OutputError(DerestainerError):
    """An output cannot be written as asked: it would overwrite or sit among the inputs, its folder is
    read-only or full, or another job is writing it."""


class OutputLockedError(OutputError):
    """Another running job holds the lock of this output (a run folder, an output folder, a slide)."""
