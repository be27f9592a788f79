"""Shared fixtures. Tests are CPU-sized: tiny widths, 32–128 px, fixed seeds."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: Real, freely licensed images beside the repository (see its SOURCES.md); optional.
REAL_DATA = Path(os.environ.get("DERESTAINER_REAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"))


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent (set DERESTAINER_REAL_DATA)")
    return REAL_DATA


@pytest.fixture
def real_slide(real_data: Path) -> Callable[[str], Path]:
    """``real_slide(name)``: the whole slide ``slides/NAME`` of the real data folder, read with OpenSlide
    (skipped with the reason where OpenSlide or the file is absent)."""
    def get(name: str) -> Path:
        pytest.importorskip("openslide")
        path = real_data / "slides" / name
        if not path.is_file():
            pytest.skip(f"{path} is absent")
        return path

    return get


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
