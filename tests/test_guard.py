"""core.guard: outputs never overlap inputs, one writer per output, multi-file outputs complete or marked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from derestainer.core.errors import OutputError, OutputLockedError
from derestainer.core.guard import (
    LOCK_NAME,
    lock_path,
    output_lock,
    refuse_overlap,
    unfinished_marker,
    unfinished_until_done,
)

# ---------------------------------------------------------------------------------------------- overlap


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.png").write_bytes(b"a")
    (tmp_path / "in" / "sub" / "b.png").write_bytes(b"b")
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.mark.parametrize("out_dir, recursive, refused", [
    ("in", False, True),           # the same folder: the outputs would be listed with the inputs
    ("in/sub", True, True),        # below an input folder that is listed recursively
    ("in/sub", False, False),      # below one that is not: nothing reads it
    (".", False, False),           # holding the input folder: single files are out_files' to check
    ("out", False, False),         # beside it
    ("in2", False, False),         # a name that merely starts the same
])
def test_output_folder_against_input_folder(tree: Path, out_dir: str, recursive: bool, refused: bool) -> None:
    call = lambda: refuse_overlap([tree / "in"], out_dirs=[tree / out_dir], recursive=recursive)  # noqa: E731
    if refused:
        with pytest.raises(OutputError, match="input folder"):
            call()
    else:
        call()


@pytest.mark.parametrize("own, refused", [("in", True), ("in/sub", True), (".", True), ("out", False), ("in2", False)])
def test_a_folder_the_command_owns_keeps_clear_of_every_input(tree: Path, own: str, refused: bool) -> None:
    """A run or report folder may not be, hold, or lie inside an input (file or folder)."""
    for inputs in ([tree / "in"], [tree / "in" / "sub" / "b.png"]):
        call = lambda ins=inputs: refuse_overlap(ins, own_dirs=[tree / own])  # noqa: E731
        if refused:
            with pytest.raises(OutputError, match="input"):
                call()
        else:
            call()


def test_output_file_in_a_listed_input_folder(tree: Path) -> None:
    with pytest.raises(OutputError, match="lies in the input folder"):
        refuse_overlap([tree / "in"], out_files=[tree / "in" / "new.png"])
    refuse_overlap([tree / "in"], out_files=[tree / "in" / "sub" / "new.png"])  # not listed without recursion
    with pytest.raises(OutputError, match="lies in the input folder"):
        refuse_overlap([tree / "in"], out_files=[tree / "in" / "sub" / "new.png"], recursive=True)


def test_output_files_beside_inputs_that_do_not_collide_are_allowed(tree: Path) -> None:
    """``translate-slide slides/a.svs --out .`` writes ./a.ome.tiff: nothing is overwritten, nothing refused."""
    refuse_overlap([tree / "in" / "a.png"], out_files=[tree / "a.ome.tiff", tree / "a.summary.json"],
                   out_dirs=[tree])
    with pytest.raises(OutputError, match="also an input"):
        refuse_overlap([tree / "in" / "a.png"], out_files=[tree / "in" / "a.png"], out_dirs=[tree / "in"])


def test_output_file_is_an_input_by_path_symlink_or_hard_link(tree: Path) -> None:
    src = tree / "in" / "a.png"
    with pytest.raises(OutputError, match="also an input"):
        refuse_overlap([src], out_files=[tree / "in" / "sub" / ".." / "a.png"])
    (tree / "link.png").symlink_to(src)
    with pytest.raises(OutputError, match="also an input"):
        refuse_overlap([src], out_files=[tree / "link.png"])
    os.link(src, tree / "hard.png")
    with pytest.raises(OutputError, match="also an input"):
        refuse_overlap([src], out_files=[tree / "hard.png"])
    refuse_overlap([src], out_files=[tree / "out" / "a.png"])


def test_symlinked_output_folder_pointing_at_the_inputs(tree: Path) -> None:
    (tree / "alias").symlink_to(tree / "in", target_is_directory=True)
    with pytest.raises(OutputError):
        refuse_overlap([tree / "in"], out_dirs=[tree / "alias"])


# ---------------------------------------------------------------------------------------------- locks


def test_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with output_lock(out, folder=True) as lock:
        assert lock == out / LOCK_NAME
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(OutputLockedError, match=rf"locked by PID {os.getpid()} on .* since "), \
                output_lock(out, folder=True):
            pass
    assert not (out / LOCK_NAME).exists()
    with output_lock(out, folder=True):  # free again
        pass


def test_file_lock_sits_beside_the_file(tmp_path: Path) -> None:
    target = tmp_path / "slide.ome.tiff"
    with output_lock(target, folder=False) as lock:
        assert lock == lock_path(target, folder=False) == tmp_path / ".slide.ome.tiff.lock"
        with pytest.raises(OutputLockedError), output_lock(target, folder=False):
            pass
        with output_lock(tmp_path / "other.ome.tiff", folder=False):  # another output: independent
            pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """The kernel drops a flock when its process dies: a kill -9 never blocks the next job."""
    out = tmp_path / "run"
    code = ("import sys, time; from derestainer.core.guard import output_lock\n"
            f"with output_lock({str(out)!r}, folder=True):\n    print('held', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"PID {p.pid}"), output_lock(out, folder=True):
            pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (out / LOCK_NAME).exists()  # the file is left behind by kill -9 ...
    with output_lock(out, folder=True):  # ... but not the lock
        pass


def test_failed_body_removes_a_folder_the_lock_created(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError), output_lock(out, folder=True):
        raise RuntimeError("stop")
    assert not out.exists()
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError), output_lock(out, folder=True):
        raise RuntimeError("stop")
    assert (out / "keep.txt").read_text() == "x"


def test_output_that_is_a_file_where_a_folder_is_due(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(OutputError, match="out"), output_lock(f, folder=True):
        pass
    assert f.read_text() == "x"


def test_stale_temporary_files_of_dead_writers_are_removed_under_the_lock(tmp_path: Path) -> None:
    from derestainer.core.io import atomic_path

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with atomic_path(out / "x.png") as tmp:  # a name of the scheme, re-labelled as the dead writer's
        stale = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", f"-{pid}-"))
        tmp.write_bytes(b"partial")
        os.link(tmp, stale)
    assert stale.exists() and (out / "x.png").exists()
    with output_lock(out, folder=True):
        pass
    assert not stale.exists() and (out / "x.png").read_bytes() == b"partial"


# ---------------------------------------------------------------------------------------------- unfinished


def test_record_is_removed_first_and_the_marker_stays_on_failure(tmp_path: Path) -> None:
    record = tmp_path / "summary.json"
    record.write_text("old")
    with pytest.raises(RuntimeError), unfinished_until_done(record):
        (tmp_path / "part.csv").write_text("new")
        raise RuntimeError("crash between the files")
    assert not record.exists(), "an old record beside new files would pass for a finished run"
    assert unfinished_marker(record).exists()
    with unfinished_until_done(record):
        record.write_text("new")
    assert record.read_text() == "new" and not unfinished_marker(record).exists()


def test_a_body_that_forgets_its_record_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not written"), unfinished_until_done(tmp_path / "metrics.json"):
        pass


def test_evaluation_report_interrupted_while_rewritten_is_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second report into a folder that holds a first one, crashing after its first file: the old
    metrics.json must not stand beside the new metrics.md."""
    import numpy as np

    from derestainer.core.io import write_image
    from derestainer.evaluation import EvaluateOptions, report, run_evaluation

    pred, gt, out = tmp_path / "pred", tmp_path / "gt", tmp_path / "out"
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        write_image(gt / f"{i}_test_1+.png", img)
        write_image(pred / f"{i}_test_1+.png", np.clip(img.astype(int) + 9, 0, 255).astype(np.uint8))
    result = run_evaluation(pred, gt, EvaluateOptions(workers=1, progress=False))
    report.write_report(result, out, method="first", figures=False)
    assert json.loads((out / "metrics.json").read_text())["method"] == "first"

    real = report.per_image_csv

    def crash(rows: object) -> str:
        raise OSError(28, "No space left on device", str(out / "per_image.csv"))

    monkeypatch.setattr(report, "per_image_csv", crash)
    with pytest.raises(OSError):
        report.write_report(result, out, method="second", figures=False)
    assert "second" in (out / "metrics.md").read_text()
    assert not (out / "metrics.json").exists() and unfinished_marker(out / "metrics.json").exists()
    monkeypatch.setattr(report, "per_image_csv", real)
    report.write_report(result, out, method="third", figures=False)
    assert json.loads((out / "metrics.json").read_text())["method"] == "third"
    assert not unfinished_marker(out / "metrics.json").exists()


def test_a_lock_file_left_by_another_users_killed_job_is_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stale lock file is not writable for us (another user's, 0644): it is locked read-only (flock
    needs no write access), found free, removed while held, and replaced by our own."""
    out = tmp_path / "shared"
    out.mkdir()
    stale = out / LOCK_NAME
    stale.write_text('{"pid": 1, "host": "elsewhere"}\n')
    real_open = os.open

    def theirs(path: object, flags: int, *a: object, **k: object) -> int:
        if Path(os.fspath(path)) == stale and flags & os.O_RDWR and stale.exists() and stale.stat().st_size:
            raise PermissionError(13, "Permission denied", os.fspath(path))  # type: ignore[arg-type]
        return real_open(path, flags, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", theirs)
    with output_lock(out, folder=True) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not stale.exists()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="derestainer"), output_lock(tmp_path / "o", folder=True):
        pass
    assert "does not lock files" in caplog.text and "No locks available" in caplog.text
    assert not (tmp_path / "o" / LOCK_NAME).exists()


def test_an_output_that_is_an_input_is_named_as_such_before_any_folder_rule(tree: Path) -> None:
    """``translate-slide slides/ --out slides/``: the message says the slide itself would be overwritten."""
    with pytest.raises(OutputError, match=r"also an input \(.*a\.png\)"):
        refuse_overlap([tree / "in", tree / "in" / "a.png"], out_files=[tree / "in" / "a.png"])
