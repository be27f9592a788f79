"""Image and file I/O shared by every part of the package.

Two rules hold everywhere: a bad input raises :class:`ImageReadError` naming the file and what is
wrong with it, and nothing is ever half-written at a path where a good file is expected (outputs
are written under a temporary name in the same folder, flushed, then renamed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

from derestainer.core.errors import ImageReadError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB.

    Conversion rules (documented in the README): grayscale (L, I, I;16, 1) is replicated to three
    channels; RGBA and LA are composited over white, the colour of an empty slide; palette
    images are expanded; 16-bit images are scaled to 8 bits. Anything else is an error.

    Raises:
        ImageReadError: the file is missing, not an image, truncated, or empty.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()  # forces a full decode: a truncated file fails here, not later
            arr = _to_rgb(im, p)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{p}: cannot read image ({exc})") from exc
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"{p}: image is empty")
    return arr


def _to_rgb(im: Image.Image, p: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    if mode in ("L", "1"):
        a = np.asarray(im.convert("L"))
        return np.repeat(a[..., None], 3, axis=2)
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    raise ImageReadError(f"{p}: unsupported image mode {mode!r}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it.

    The temporary name keeps the final suffix (so that writers choosing a format by extension work).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sfx = final.suffix if suffix is None else suffix
    # Not tempfile.mkstemp: it creates mode 0600. O_EXCL with mode 0666 lets the kernel apply the
    # umask, so the final file gets the permissions any newly created file would get.
    for _ in range(100):
        tmp_path = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp{sfx}"
        try:
            fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{final.parent}: could not create a temporary file for {final.name}")
    os.close(fd)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_image(path: str | os.PathLike[str], image: np.ndarray, quality: int = 95) -> Path:
    """Write ``uint8 [H, W, 3]`` (or ``[H, W]``) atomically; format from the suffix."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_image expects uint8, got {arr.dtype}")
    p = Path(path)
    fmt = Image.registered_extensions().get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p}: unknown image format {p.suffix!r}")
    with atomic_path(p) as tmp:
        kwargs: dict[str, Any] = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        Image.fromarray(arr).save(tmp, format=fmt, **kwargs)
    return p


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write bytes atomically."""
    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_bytes(data)
    return p


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write JSON atomically (NaN/inf are written as in Python's json: NaN, Infinity)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (by suffix), sorted by path; hidden and temporary files skipped."""
    root = Path(folder)
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p for p in it
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def to_tensor_uint8(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` → ``uint8 [3, H, W]`` torch tensor (contiguous)."""
    import torch  # not at module level: SynthBCI workers import this module and must not import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def jsonable(obj: Any, nonfinite: Literal["keep", "null"] = "keep") -> Any:
    """``obj`` as plain JSON data: the one conversion used for every JSON file the package writes.

    Dataclass instances and dicts → dicts (keys as ``str``), tuples and lists → lists, paths → ``str``,
    NumPy/torch scalars → Python numbers or bools, arrays/tensors → nested lists; anything else is
    returned unchanged. Non-finite floats (NaN, ±inf) are kept (Python's json writes ``NaN``,
    ``Infinity``) or, with ``nonfinite="null"``, become ``None`` so that any strict JSON parser reads
    the file.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), nonfinite) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, nonfinite) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):  # np.float64 is a float too: made a plain float
        return float(obj) if nonfinite == "keep" or math.isfinite(obj) else None
    if isinstance(obj, np.ndarray) or (hasattr(obj, "tolist") and hasattr(obj, "ndim") and obj.ndim > 0):
        return jsonable(obj.tolist(), nonfinite)
    if hasattr(obj, "item") and callable(obj.item):  # NumPy and torch scalars
        try:
            return jsonable(obj.item(), nonfinite)
        except (ValueError, RuntimeError):
            return obj
    return obj
