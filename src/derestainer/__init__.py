"""derestainer: H&E to virtual HER2 IHC by destaining and restaining (DeReStainer) and baselines."""

__version__ = "0.1.0"

#: HER2 levels in class-index order; index 0..3, -1 when unknown.
HER2_LEVELS: tuple[str, ...] = ("0", "1+", "2+", "3+")
