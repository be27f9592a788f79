"""Guarding a user's files: outputs never overlap inputs, one writer per output, and writes fail cleanly.

Four rules every command that writes follows, before it starts any long work:

1. **No overlap** (:func:`refuse_overlap`): an output file is never an input (by resolved path or
   :func:`os.path.samefile`, so symlinks and hard links count), an output folder never holds an input
   file, and output and input folders are never nested.
2. **One writer** (:func:`output_lock`): an exclusive ``flock`` on a lock file — ``<folder>/.derestainer.lock``
   for an output folder (a run folder, ``translate --out``, an evaluation report), ``.<name>.lock``
   beside an output file (a slide's TIFF). A second job gets "locked by PID N on HOST since …". The
   kernel drops the lock when the holder dies, so a killed job never leaves a stale lock behind.
3. **Writable first**: taking the lock creates and writes the lock file, so a read-only or full
   folder is reported, naming it, before anything is computed.
4. **Complete or marked** (:func:`unfinished_until_done`): outputs made of several files keep one
   record file (a summary, ``metrics.json``, ``predictions.json``) that is removed before the others
   are rewritten and written last; until then a hidden ``.<record>.unfinished`` marker says that the
   folder holds an unfinished run. A reader never mistakes a mix of two runs for a finished one.

Hand-written rather than the ``filelock`` package: that package is not a dependency, and the holder
information (PID, host, start time, command) and the inode check after locking are what the messages
and the tests rely on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from derestainer.core.errors import OutputError, OutputLockedError
from derestainer.core.io import clean_stale_temps, write_text

#: Lock file inside a locked output folder.
LOCK_NAME = ".derestainer.lock"

def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(p))).resolve(strict=False)


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _same(a: Path, b: Path) -> bool:
    if _abs(a) == _abs(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overlap(inputs: Iterable[str | os.PathLike[str]], *, out_files: Iterable[str | os.PathLike[str]] = (),
                   out_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Raise :class:`OutputError` when an output would overwrite, or sit among, the inputs.

    Args:
        inputs: input files and folders (a folder stands for everything under it).
        out_files: files the command will write.
        out_dirs: folders the command will write into.
    """
    ins = [Path(p) for p in inputs]
    for o in (Path(p) for p in out_files):
        for i in ins:
            if _same(o, i):
                raise OutputError(f"{o}: this output is also an input ({i}); choose another output")
            if i.is_dir() and _within(_abs(o), _abs(i)):
                raise OutputError(f"{o}: this output lies inside the input folder {i}; choose an output outside the inputs")
    for d in (Path(p) for p in out_dirs):
        ad = _abs(d)
        for i in ins:
            ai = _abs(i)
            if i.is_dir() and (_within(ad, ai) or _within(ai, ad)):
                how = "is" if ad == ai else "lies inside" if _within(ad, ai) else "contains"
                raise OutputError(f"{d}: the output folder {how} the input folder {i}; "
                                  "choose an output folder outside the inputs")
            if not i.is_dir() and _within(ai, ad):
                raise OutputError(f"{d}: the output folder holds the input {i}; choose an output folder outside the inputs")


def write_error(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """The one-line error for an ``OSError`` met while writing ``path`` (read-only, full disk, ...)."""
    why = exc.strerror or str(exc)
    return OutputError(f"{path}: cannot write here ({why})")


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return (f"locked by PID {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                f"({info.get('command')})")
    except (OSError, ValueError, AttributeError):
        return "locked by another job"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _acquire(lock: Path, target: Path) -> int:
    """Open, lock and fill in ``lock``; retry when the file was replaced between open and lock."""
    for _ in range(20):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.close(fd)
            raise OutputLockedError(f"{target}: {_holder(lock)}; wait for it to finish or choose another output")
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed it while we opened it: take the new one
    raise OutputLockedError(f"{target}: {_holder(lock)}")


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)


def _clean(folder: Path, recursive: bool) -> None:
    """Remove dead writers' temporary files in ``folder`` (and, for a locked output folder, below it)."""
    clean_stale_temps(folder)
    if recursive:
        for sub, dirs, _ in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]  # checkpoint temp folders: runs.clean_incomplete
            for d in dirs:
                clean_stale_temps(Path(sub) / d)


def lock_path(target: str | os.PathLike[str], folder: bool) -> Path:
    """The lock file of an output folder (inside it) or an output file (hidden, beside it)."""
    t = Path(target)
    return t / LOCK_NAME if folder else t.parent / f".{t.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], *, folder: bool) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder (``folder=True``) or output file while the body runs.

    Creates the folder (or the file's folder) when needed and checks that it can be written, so that
    a read-only or full disk is reported before any work. Stale temporary files of dead writers in
    that folder (and below a locked folder) are removed once the lock is held. An output folder this call created and that is
    still empty when the body fails is removed again.

    Raises:
        OutputLockedError: another job holds the lock (the message names its PID, host and start time).
        OutputError: the folder cannot be created or written.
    """
    t = Path(target)
    home = t if folder else t.parent
    created = not home.exists()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(home, exc) from None
    if not home.is_dir():
        raise OutputError(f"{home}: exists and is not a folder")
    lock = lock_path(t, folder)
    try:
        fd = _acquire(lock, t)
    except OSError as exc:
        raise write_error(home, exc) from None
    ok = False
    try:
        try:
            _write_holder(fd)
        except OSError as exc:
            raise write_error(home, exc) from None
        _clean(home, recursive=folder)
        yield lock
        ok = True
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # removed while still held, so no other job can hold an unlinked copy
        os.close(fd)
        if not ok and created:
            with contextlib.suppress(OSError):
                home.rmdir()  # only when empty


def unfinished_marker(record: str | os.PathLike[str]) -> Path:
    """The hidden marker beside ``record`` that says its multi-file output is unfinished."""
    r = Path(record)
    return r.parent / f".{r.name}.unfinished"


@contextlib.contextmanager
def unfinished_until_done(record: str | os.PathLike[str]) -> Iterator[None]:
    """Mark a multi-file output unfinished while the body rewrites it; the body writes ``record`` last.

    ``record`` (e.g. a slide's summary JSON) is removed first, so that an old record never stands beside
    new files; the marker stays if the body fails, and is removed once it succeeded.
    """
    r = Path(record)
    marker = unfinished_marker(r)
    write_text(marker, f"unfinished: {r.name} is written last; pid {os.getpid()}\n")
    with contextlib.suppress(FileNotFoundError):
        r.unlink()
    yield
    if not r.is_file():
        raise RuntimeError(f"{r}: the record of a multi-file output was not written")
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()


__all__ = ["LOCK_NAME", "lock_path", "output_lock", "refuse_overlap", "unfinished_marker",
           "unfinished_until_done", "write_error"]
