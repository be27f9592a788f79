"""Image and file I/O shared by every part of the package.

Two rules hold everywhere: a bad input raises :class:`ImageReadError` naming the file and what is
wrong with it, and nothing is ever half-written at a path where a good file is expected (outputs
are written under a temporary name in the same folder, flushed, then renamed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

from derestainer.core.errors import ConfigError, ImageReadError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


#: Largest image (width × height) that :func:`read_image` decodes: Pillow's decompression-bomb limit
#: (about 89 megapixels, 9459² px). A bigger file is almost always a whole slide (``translate-slide``
#: streams those) or a crafted file; ``DERESTAINER_MAX_IMAGE_PIXELS`` raises the limit.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485


def env_limit(name: str, default: int) -> int:
    """A positive whole number from the environment variable ``name`` (``default`` when unset).

    Raises:
        ConfigError: the variable is set to anything else (naming it).
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: expected a positive whole number")
    return value

_PIL_LIMIT = threading.Lock()
#: ``errno`` values that mean "this place cannot be written" (a user's environment, not a bug): a
#: read-only folder or file system, a full disk or quota, a file too large, a path through a file.
WRITE_ERRNOS: frozenset[int] = frozenset(
    e for e in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", None),
                errno.EFBIG, errno.ENOTDIR, errno.EEXIST, errno.EISDIR) if e is not None)
_MODES = ("I;16", "I;16B", "I;16L", "I", "P", "RGBA", "LA", "PA", "L", "1", "RGB", "CMYK", "YCbCr", "LAB", "HSV")


def _check_header(im: Image.Image, p: Path, max_pixels: int | None) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReadError(f"{p}: image is empty ({w}×{h} px)")
    limit = env_limit("DERESTAINER_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS) if max_pixels is None else max_pixels
    if w * h > limit:
        raise ImageReadError(
            f"{p}: {w}×{h} px is over the limit of {limit:,} pixels for one image "
            "(a whole slide? use `derestainer translate-slide`; or set DERESTAINER_MAX_IMAGE_PIXELS)")
    if im.mode not in _MODES:
        raise ImageReadError(f"{p}: unsupported image mode {im.mode!r}")


def _open(p: Path, max_pixels: int | None = None) -> Image.Image:
    """``Image.open`` with every way a file can fail to be an image mapped to :class:`ImageReadError`."""
    if not p.is_file():
        raise ImageReadError(f"{p}: no such image file")
    try:
        with warnings.catch_warnings():  # over the limit is refused below, with the file's name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _PIL_LIMIT:  # Pillow's global guard off (our own limit is checked below), thread-safely
                old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    im = Image.open(p)
                finally:
                    Image.MAX_IMAGE_PIXELS = old
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{p}: image is over the pixel limit ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{p}: cannot read image ({exc})") from None
    try:
        _check_header(im, p, max_pixels)
    except ImageReadError:
        im.close()
        raise
    return im


def check_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> tuple[int, int]:
    """Check an image's header without decoding it (exists, is an image, size, mode, pixel limit).

    Returns:
        ``(width, height)``.
    Raises:
        ImageReadError: naming the file and what is wrong with it.
    """
    with _open(Path(path), max_pixels) as im:
        return im.size


def check_images(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[int, int]]:
    """:func:`check_image` for every path: a bad file is reported before any work starts. Returns their ``(width, height)``."""
    return [check_image(p) for p in paths]


def read_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB.

    Conversion rules (documented in the README): grayscale (L, I, I;16, 1) is replicated to three
    channels; RGBA and LA are composited over white, the colour of an empty slide; palette
    images are expanded; 16-bit images are scaled to 8 bits. Anything else is an error.

    Args:
        max_pixels: the largest width × height decoded (default :data:`MAX_IMAGE_PIXELS`).
    Raises:
        ImageReadError: the file is missing, not an image, truncated, empty, or over the pixel limit.
    """
    p = Path(path)
    with _open(p, max_pixels) as im:
        try:
            im.load()  # forces a full decode: a truncated file fails here, not later
            arr = _to_rgb(im, p)
        except ImageReadError:
            raise
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            raise ImageReadError(f"{p}: cannot read image ({exc})") from None
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


#: Host of this process in temporary names (hashed: short, and any host name is a safe file name).
def _pid_space() -> str:
    """The host and PID namespace this process's PIDs mean something in (containers may share a host name)."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{ns}"


_HOST = hashlib.sha256(_pid_space().encode()).hexdigest()[:8]
#: ``.{name}.{host}-{pid}-{random}.tmp{suffix}``: what :func:`atomic_path` writes and :func:`clean_stale_temps` removes.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{12}\.tmp.*", re.S)


def temp_path(final: Path, suffix: str) -> Path:
    """A fresh temporary name beside ``final``, naming the writer (host and PID) so that it can be cleaned up."""
    return final.parent / f".{final.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(6)}.tmp{suffix}"


def _named(exc: OSError, final: Path) -> OSError:
    """A full disk or a read-only folder met while writing ``final``: the same error, naming ``final``
    (not the temporary file, which no longer exists); any other error unchanged."""
    if exc.errno in WRITE_ERRNOS:
        return OSError(exc.errno, exc.strerror, str(final))
    return exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it.

    The temporary name keeps the final suffix (so that writers choosing a format by extension work)
    and names its writer (see :func:`clean_stale_temps`). The final file gets the mode any newly
    created file gets (0666 less the umask), even when the writer replaced the temporary file with
    one of its own (safetensors' ``save_file`` creates it 0600).
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _named(exc, final) from None
    sfx = final.suffix if suffix is None else suffix
    # Not tempfile.mkstemp: it creates mode 0600. O_EXCL with mode 0666 lets the kernel apply the
    # umask; the mode it gave is read back (no os.umask call: that would not be thread-safe).
    for _ in range(100):
        tmp_path = temp_path(final, sfx)
        try:
            fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _named(exc, final) from None
    else:
        raise FileExistsError(f"{final.parent}: could not create a temporary file for {final.name}")
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if exc.filename not in (None, str(tmp_path), os.fspath(tmp_path)):
            raise  # about another file (e.g. a source the writer reads): reported as it is
        raise _named(exc, final) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host); a process of another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` (not below it) when its writer died.

    Only regular files named by :func:`temp_path` whose writer ran on this host and is no longer
    alive are removed; everything else is left alone, including temporary files of live processes,
    of other hosts, and anything else. Not on Windows (where no signal 0 probes a process): nothing.

    Returns:
        The files removed, sorted.
    """
    if os.name != "posix":
        return []
    try:
        entries = sorted(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[Path] = []
    for p in entries:
        m = _TEMP_NAME.fullmatch(p.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: left alone
            if stat.S_ISREG(p.lstat().st_mode):
                p.unlink()
                removed.append(p)
    return removed


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
