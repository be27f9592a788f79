"""Guarding a user's files: outputs never overlap inputs, one writer per output, and writes fail cleanly.

Four rules every command that writes follows, before it starts any long work (docs/safety.md):

1. **No overlap** (:func:`refuse_overlap`): no output file is an input (by resolved path, or the same
   file through a hard link) or lands where the command lists its inputs; a folder a command owns
   (a run folder, a report folder) is not, holds no, and lies in no input.
2. **One writer** (:func:`output_lock`): an exclusive, non-blocking ``flock`` on a lock file —
   ``<folder>/.derestainer.lock`` for an output folder, a hidden lock file beside an output file. A
   second job gets "locked by PID N on HOST since …". The kernel drops the lock when the holder dies,
   so a killed job never leaves a lock behind (its file, if any, is taken over).
3. **Writable first**: taking the lock creates and writes the lock file, so a read-only or full
   folder is reported, naming it, before anything is computed.
4. **Complete or marked** (:func:`unfinished_until_done`): outputs made of several files keep one
   record file (a summary, ``metrics.json``, ``predictions.json``) that is written last; from the
   moment the first old file is replaced until then, the record is absent and a hidden
   ``.<record>.unfinished`` marker says that the folder holds an unfinished run.

Hand-written rather than the ``filelock`` package: that package is not a dependency, and the holder
information (PID, host, start time, command), the inode check after locking, taking over another
user's stale lock file and going on (with a warning) where a file system cannot lock are what the
messages, the docs and the tests rely on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from derestainer.core.errors import OutputError, OutputLockedError
from derestainer.core.io import clean_stale_temps, write_text

log = logging.getLogger("derestainer")

#: Lock file inside a locked output folder.
LOCK_NAME = ".derestainer.lock"


def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(p))).resolve(strict=False)


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class _Input:
    """An input path, resolved once: its absolute path, whether it is a folder, its (device, inode)."""

    def __init__(self, p: str | os.PathLike[str]) -> None:
        self.path = Path(p)
        self.abs = _abs(p)
        self.is_dir = self.path.is_dir()
        try:
            st = os.stat(self.abs)
            self.key: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            self.key = None


def _file_key(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_overlap(inputs: Iterable[str | os.PathLike[str]], *, out_files: Iterable[str | os.PathLike[str]] = (),
                   out_dirs: Iterable[str | os.PathLike[str]] = (), own_dirs: Iterable[str | os.PathLike[str]] = (),
                   recursive: bool = False) -> None:
    """Raise :class:`OutputError` when an output would overwrite an input, or sit where it is read as one.

    Args:
        inputs: input files and folders.
        out_files: files the command will write: none may be an input (by resolved path, or the same
            file through a hard link), nor lie in an input folder the command lists (directly in it, or
            anywhere below it with ``recursive``).
        out_dirs: folders the command writes named files into (``translate --out``): none may be an
            input folder, nor lie below one it lists recursively. Collisions of single files are
            ``out_files``' to find.
        own_dirs: folders the command owns whole (a run folder, a report folder): none may be, hold,
            or lie inside an input.
        recursive: input folders are listed recursively.
    """
    ins = [_Input(p) for p in inputs]
    by_key = {i.key: i for i in ins if i.key is not None and not i.is_dir}
    for o in (Path(p) for p in out_files):
        ao = _abs(o)
        key = _file_key(ao)
        twin = next((i for i in ins if ao == i.abs), None) or (by_key.get(key) if key is not None else None)
        if twin is not None:  # the same path, or the same file by another path (a hard link)
            raise OutputError(f"{o}: this output is also an input ({twin.path}); choose another output")
        for i in ins:
            if i.is_dir and (ao.parent == i.abs or (recursive and _within(ao, i.abs))):
                raise OutputError(f"{o}: this output lies in the input folder {i.path}, where it would be read as "
                                  "an input; choose an output outside the inputs")
    for d in (Path(p) for p in out_dirs):
        ad = _abs(d)
        for i in ins:
            if i.is_dir and (ad == i.abs or (recursive and _within(ad, i.abs))):
                how = "is" if ad == i.abs else "lies inside"
                raise OutputError(f"{d}: the output folder {how} the input folder {i.path}; "
                                  "choose an output folder outside the inputs")
    for d in (Path(p) for p in own_dirs):
        ad = _abs(d)
        for i in ins:
            if _within(i.abs, ad) or (i.is_dir and _within(ad, i.abs)):
                how = ("is" if ad == i.abs else "lies inside" if _within(ad, i.abs) else "holds")
                raise OutputError(f"{d}: the output folder {how} the input {i.path}; "
                                  "choose an output folder outside the inputs")


def write_error(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """The one-line error for an ``OSError`` met while writing ``path`` (read-only, full disk, ...)."""
    why = exc.strerror or str(exc)
    return OutputError(f"{path}: cannot write here ({why})")


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        mine = info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()
        return (f"locked by PID {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                f"({'this very process: an earlier job in it, e.g. a Trainer, was not closed' if mine else info.get('command')})")
    except (OSError, ValueError, AttributeError):
        return "locked by another job"


#: ``errno`` of a file system that does not lock (Lustre without ``flock``, NFSv3 without lockd, some
#: FUSE and SMB mounts): the job goes on without a lock, and says so.
NO_LOCKING = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` without waiting: True when locked, False when another process holds it."""
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


def _open_lock(lock: Path) -> int:
    """Open (creating) the lock file; a lock file another user's killed job left (0644, theirs) is
    opened read-only, which ``flock`` accepts."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not lock.exists():  # a read-only folder, not someone's lock file
            raise
        return os.open(lock, os.O_RDONLY)
    with contextlib.suppress(OSError):  # anyone who may write the folder may take the lock after us
        os.fchmod(fd, 0o666)
    return fd


def _acquire(lock: Path, target: Path) -> int | None:
    """Open, lock and fill in ``lock``; retry when the file was replaced between open and lock.

    Returns the locked descriptor, or None on a file system without locking (after a warning)."""
    for _ in range(20):
        fd = _open_lock(lock)
        try:
            locked = _try_lock(fd)
        except OSError as exc:
            empty = os.fstat(fd).st_size == 0  # the file we just created: not left behind
            os.close(fd)
            if exc.errno not in NO_LOCKING:
                raise
            if empty:
                with contextlib.suppress(OSError):
                    lock.unlink()
            log.warning("%s: this file system does not lock files (%s); nothing stops a second job from "
                        "writing here at the same time", target, exc.strerror)
            return None
        if not locked:
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


def _write_holder(fd: int, lock: Path) -> bool:
    """Write who holds the lock; False when the file was another user's (opened read-only): it is
    removed then, while held, for the caller to take a fresh one."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    data = (json.dumps(info) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EINVAL):  # opened read-only (another user's file): _open_lock
            raise
        lock.unlink()
        return False
    return True


def lock_path(target: str | os.PathLike[str], folder: bool) -> Path:
    """The lock file of an output folder (inside it) or an output file (hidden, beside it)."""
    t = Path(target)
    return t / LOCK_NAME if folder else t.parent / f".{t.name}.lock"


def _locked(home: Path, lock: Path, target: Path) -> int | None:
    for _ in range(3):
        try:
            fd = _acquire(lock, target)
        except OSError as exc:
            raise write_error(home, exc) from None
        if fd is None:
            return None
        try:
            if _write_holder(fd, lock):
                return fd
            os.close(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
            raise write_error(home, exc) from None
    raise OutputError(f"{lock}: cannot take over this lock file; remove it if no job is writing {target}")


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], *, folder: bool, lock: str | os.PathLike[str] | None = None
                ) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder (``folder=True``) or output file while the body runs.

    Creates the folder (or the file's folder) when needed and checks that it can be written, so that
    a read-only or full disk is reported before any work. Stale temporary files of dead writers in
    that folder are removed once the lock is held. An output folder this call created and that is
    still empty when the body fails is removed again.

    Args:
        lock: the lock file (default :func:`lock_path`), e.g. one per slide for a TIFF and its side files.
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
    lock_file = Path(lock) if lock is not None else lock_path(t, folder)
    fd = _locked(home, lock_file, t)
    ok = False
    try:
        clean_stale_temps(home)
        yield lock_file
        ok = True
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                lock_file.unlink()  # removed while still held, so no other job can hold an unlinked copy
            os.close(fd)
        if not ok and created:
            with contextlib.suppress(OSError):
                home.rmdir()  # only when empty


def unfinished_marker(record: str | os.PathLike[str]) -> Path:
    """The hidden marker beside ``record`` that says its multi-file output is unfinished."""
    r = Path(record)
    return r.parent / f".{r.name}.unfinished"


class Unfinished:
    """The state of a multi-file output being rewritten (see :func:`unfinished_until_done`)."""

    def __init__(self, record: Path) -> None:
        self.record, self.marker, self.begun = record, unfinished_marker(record), False

    def begin(self) -> None:
        """Call just before the first file at a final name is replaced: from here on the folder holds
        a mix until the record is written. Removes the old record and leaves the marker. Idempotent."""
        if self.begun:
            return
        write_text(self.marker, f"unfinished: {self.record.name} is written last; pid {os.getpid()}\n")
        with contextlib.suppress(FileNotFoundError):
            self.record.unlink()
        self.begun = True


@contextlib.contextmanager
def unfinished_until_done(record: str | os.PathLike[str], *, lazy: bool = False) -> Iterator[Unfinished]:
    """Mark a multi-file output unfinished while the body rewrites it; the body writes ``record`` last.

    ``record`` (e.g. a slide's summary JSON) is removed when the rewriting begins, so that an old record
    never stands beside new files, and the marker stays if the body fails after that. It begins at once,
    or, with ``lazy``, when the body calls :meth:`Unfinished.begin` (just before its first final write):
    a run that fails before writing anything leaves the old, complete outputs as they were.
    """
    state = Unfinished(Path(record))
    if not lazy:
        state.begin()
    yield state
    if not state.record.is_file():
        raise RuntimeError(f"{state.record}: the record of a multi-file output was not written")
    with contextlib.suppress(FileNotFoundError):
        state.marker.unlink()


__all__ = ["LOCK_NAME", "NO_LOCKING", "Unfinished", "lock_path", "output_lock", "refuse_overlap", "unfinished_marker",
           "unfinished_until_done", "write_error"]
