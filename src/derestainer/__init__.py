"""derestainer: H&E to virtual HER2 IHC by destaining and restaining (DeReStainer) and baselines.

The layers, lowest first, are listed in CONTRIBUTING.md (and checked by ``tests/test_architecture.py``).
"""

from derestainer.core.levels import HER2_LEVELS
from derestainer.core.version import __version__

__all__ = ["HER2_LEVELS", "__version__"]
