"""Image reading rules, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from derestainer.core.errors import ImageReadError
from derestainer.core.io import atomic_path, list_images, read_image, write_image, write_json


def test_rgb_round_trip(tmp_path, rng) -> None:
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", img)
    assert np.array_equal(read_image(tmp_path / "a.png"), img)


def test_grayscale_replicated_and_16bit_scaled(tmp_path, rng) -> None:
    g = rng.integers(0, 256, (8, 9), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 9, 3) and all(np.array_equal(out[..., c], g) for c in range(3))
    g16 = (g.astype(np.uint16) * 257)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert np.array_equal(read_image(tmp_path / "g16.png")[..., 0], g)


def test_rgba_composited_over_white(tmp_path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.array([0, 255, 128, 64])[None, :]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = read_image(tmp_path / "t.png").astype(float)
    a = rgba[0, :, 3] / 255.0
    assert np.allclose(out[0, :, 0], np.round(200 * a + 255 * (1 - a)), atol=1)
    assert np.allclose(out[0, :, 1], np.round(255 * (1 - a)), atol=1)


def test_truncated_missing_and_garbage_name_the_file(tmp_path, rng) -> None:
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_image(tmp_path / "full.png", img)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"\x00" * 100)
    with pytest.raises(ImageReadError, match="junk.png"):
        read_image(tmp_path / "junk.png")


def test_atomic_write_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text().strip().startswith("{") and '"ok": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_image_checks_dtype_and_format(tmp_path) -> None:
    with pytest.raises(TypeError):
        write_image(tmp_path / "f.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="unknown image format"):
        write_image(tmp_path / "f.xyz", np.zeros((2, 2, 3), np.uint8))
    assert not list(tmp_path.iterdir())


def test_list_images_skips_hidden_and_other_files(tmp_path) -> None:
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.tif").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.png", "c.tif"]


def test_atomic_outputs_get_normal_permissions(tmp_path) -> None:
    import os
    import stat

    mask = os.umask(0o027)
    try:
        write_json(tmp_path / "p.json", {})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "p.json").stat().st_mode) == 0o640


def test_jsonable_is_plain_json_with_a_chosen_nonfinite_rule() -> None:
    import dataclasses
    import json
    import math

    import torch

    from derestainer.core.io import jsonable

    @dataclasses.dataclass
    class Rec:
        x: float
        where: Path

    obj = {1: (np.float32(2.5), np.int64(3), np.bool_(True), torch.tensor(1.5), torch.tensor([1, 2]),
               np.array([[1.0, np.nan]]), Rec(float("inf"), Path("a")))}
    strict = jsonable(obj, "null")
    assert strict == {"1": [2.5, 3, True, 1.5, [1, 2], [[1.0, None]], {"x": None, "where": "a"}]}
    json.dumps(strict, allow_nan=False)  # any strict parser reads it
    kept = jsonable([float("nan"), np.float64("-inf")])
    assert math.isnan(kept[0]) and kept[1] == -math.inf and type(kept[1]) is float


def test_outputs_are_0644_under_umask_022_even_when_the_writer_makes_its_own_file(tmp_path) -> None:
    """safetensors' save_file replaces the temporary file with one of its own, mode 0600."""
    import os
    import stat

    import torch

    from derestainer.core.fileformat import save_tensors

    mask = os.umask(0o022)
    try:
        save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(3)}, {"kind": "test"})
        write_image(tmp_path / "i.png", np.zeros((4, 4, 3), np.uint8))
        write_json(tmp_path / "j.json", {"a": 1})
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"w.safetensors": 0o644, "i.png": 0o644, "j.json": 0o644}


def _temp_name(final: str, pid: int) -> str:
    """A temporary name as :func:`atomic_path` makes it, for writer ``pid`` on this host."""
    from unittest import mock

    from derestainer.core import io

    with mock.patch.object(io.os, "getpid", return_value=pid):
        return io.temp_path(Path(final), ".json").name


def test_clean_stale_temps_removes_only_dead_writers_files(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from derestainer.core.io import _HOST as host
    from derestainer.core.io import clean_stale_temps

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its PID is free (a new process could take it: that would only keep its file)
    dead = tmp_path / _temp_name("a.json", child.pid)
    live = tmp_path / _temp_name("b.json", os.getpid())
    with atomic_path(tmp_path / "c.json") as in_progress:  # this process's own write, still running
        in_progress.write_text("{}")
        assert dead.name.startswith(f".a.json.{host}-{child.pid}-") and dead.name.endswith(".tmp.json")
        other_host = dead.name.replace(f".{host}-", ".0123abcd-" if host != "0123abcd" else ".89abcdef-")
        foreign = [other_host, ".a.json.tmp.json", f".a.json.{host}-{child.pid}.tmp.json", "a.json",
                   f"a.json.{host}-{child.pid}-0123456789ab.tmp.json", f".x.{host}-0-0123456789ab.tmp"]
        for name in [dead.name, live.name, *foreign]:
            (tmp_path / name).write_text("x")
        (tmp_path / "sub").mkdir()
        nested = tmp_path / "sub" / dead.name
        nested.write_text("x")
        stale_dir = tmp_path / _temp_name("d.json", child.pid)
        stale_dir.mkdir()  # not a file atomic_path makes: left alone
        assert clean_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, *foreign, "sub", stale_dir.name, "c.json"])
    assert nested.is_file()
    assert clean_stale_temps(tmp_path / "missing") == []
