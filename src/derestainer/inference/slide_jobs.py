"""Many slides: finding slide files in the inputs, one output TIFF per slide, and sharding across ranks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from derestainer.core.errors import SlideError
from derestainer.inference.slide_outputs import strip_tiff_suffixes
from derestainer.inference.slides import SLIDE_SUFFIXES

T = TypeVar("T")


def list_slides(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Slide files from files and folders (folders: files with a slide suffix, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(f for f in it if f.is_file() and not f.name.startswith(".")
                              and f.name.lower().endswith(SLIDE_SUFFIXES)))
        elif p.is_file():
            out.append(p)
        else:
            raise SlideError(f"{p}: no such slide file or folder")
    if not out:
        raise SlideError("no slides found in the inputs")
    return out


def output_for(slides: Sequence[Path], out: str | os.PathLike[str]) -> list[Path]:
    """Output TIFF per slide: ``out`` itself when it names a ``.tif(f)`` file (one slide only), else ``out/<stem>.ome.tiff``.

    Raises:
        SlideError: several slides with one file name, or two slides with the same stem.
    """
    o = Path(out)
    if o.name.lower().endswith((".tif", ".tiff")):
        if len(slides) != 1:
            raise SlideError(f"{o}: a single output file for {len(slides)} slides; give a folder as --out")
        return [o]
    paths = [o / f"{strip_tiff_suffixes(s.name)}.ome.tiff" for s in slides]
    seen: dict[Path, Path] = {}
    for s, pth in zip(slides, paths):
        if pth in seen:
            raise SlideError(f"{seen[pth]} and {s} would both be written to {pth}")
        seen[pth] = s
    return paths


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items of this rank: item ``i`` goes to rank ``i % world`` (torchrun's RANK / WORLD_SIZE)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world size {world}")
    return [x for i, x in enumerate(items) if i % world == rank]


def dist_rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun), ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


__all__ = ["dist_rank_world", "list_slides", "output_for", "shard"]
