"""`translate-slide` batches: a bad slide does not stop the others, slides.csv, skip/--overwrite/--resume,
--default-mpp versus --mpp, output naming per layout, --out checks, and `translate` refusing whole slides.

Slides are tiny tiled TIFFs written with tifffile (helpers of tests/test_wsi.py); the model is its tiny
fully convolutional generator.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from derestainer.cli import main
from derestainer.core.errors import SlideError
from derestainer.inference import stream as stream_mod
from derestainer.inference.slide_jobs import (
    CSV_COLUMNS,
    output_for,
    slides_csv_path,
    whole_slide_kind,
)
from test_wsi import make_model, read_base, synth_slide, write_slide

tifffile = pytest.importorskip("tifffile")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "m.safetensors", mpp=2.0)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.tif, d.tif: good (1 µm/px); b.tif: no µm/px in its metadata; c.tif: truncated to its first bytes."""
    d = tmp_path_factory.mktemp("slides")
    write_slide(d / "a.tif", 128, 160, mpp=1.0, levels=1, tile=32, seed=0)
    write_slide(d / "b.tif", 128, 160, mpp=None, levels=1, tile=32, seed=1)
    c = write_slide(d / "c.tif", 128, 160, mpp=1.0, levels=1, tile=32, seed=2)
    c.write_bytes(c.read_bytes()[:64])
    write_slide(d / "d.tif", 128, 160, mpp=1.0, levels=1, tile=32, seed=3)
    return d


def run(model: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Result:
    args = ["translate-slide", "-m", str(model), *map(str, inputs), "--out", str(out), "--tile", "32", "--overlap",
            "8", "--quiet", "--device", "cpu", "--workers", "1", "--precision", "fp32", *extra]
    return CliRunner(env=env).invoke(main, args)


def rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        assert tuple(r.fieldnames or ()) == CSV_COLUMNS
        return {Path(row["slide"]).name: row for row in r}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def summary(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.summary.json").read_text())


def errors(res: Result) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.startswith("Error:")]


def test_a_bad_slide_is_reported_and_the_batch_goes_on(model: Path, batch: Path, tmp_path: Path) -> None:
    before = digest(batch)
    out = tmp_path / "out"
    res = run(model, out, batch)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.output.splitlines()
    # one line per failing slide, naming it (and, for the missing µm/px, both options)
    b_line = [ln for ln in lines if ln.startswith("slide 2 of 4: ") and "failed" in ln]
    assert len(b_line) == 1 and str(batch / "b.tif") in b_line[0]
    assert "--default-mpp" in b_line[0] and "--slide-mpp X for every slide" in b_line[0]
    c_line = [ln for ln in lines if ln.startswith("slide 3 of 4: ") and "failed" in ln]
    assert len(c_line) == 1 and str(batch / "c.tif") in c_line[0]
    assert any(ln.startswith("slide 4 of 4: ") and "d.ome.tiff" in ln for ln in lines)
    assert errors(res) == [f"Error: 2 of 4 slides failed (b.tif, c.tif); see {out / 'slides.csv'}"]
    for stem in ("a", "d"):
        assert (out / f"{stem}.ome.tiff").is_file() and (out / f"{stem}.summary.json").is_file()
    assert not list(out.glob("b.*")) and not list(out.glob("c.*"))
    table = rows(out / "slides.csv")
    assert list(table) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert [r["status"] for r in table.values()] == ["done", "failed", "failed", "done"]
    for stem in ("a", "d"):
        r, s = table[f"{stem}.tif"], summary(out, stem)
        assert r["call"] == s["predicted_level"] and r["call"] in s["levels"]
        assert float(r["tissue_mm2"]) == pytest.approx(s["tissue_area_mm2"], abs=1e-4) and float(r["tissue_mm2"]) > 0
        assert r["output"] == str(out / f"{stem}.ome.tiff") and r["error"] == "" and float(r["seconds"]) >= 0
        assert float(r["mpp"]) == pytest.approx(1.0) and r["mpp_source"] not in ("", "--mpp", "--default-mpp")
    assert "--default-mpp" in table["b.tif"]["error"] and str(batch / "c.tif") in table["c.tif"]["error"]
    assert table["b.tif"]["call"] == table["b.tif"]["tissue_mm2"] == "" and table["b.tif"]["output"] == str(out / "b.ome.tiff")
    assert digest(batch) == before  # inputs untouched


def test_rerun_skips_finished_slides_and_overwrite_redoes_them(model: Path, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = (batch / "a.tif", batch / "d.tif")
    assert run(model, out, *good).exit_code == 0
    first = digest(out)
    res = run(model, out, *good)
    assert res.exit_code == 0, res.output
    assert f"slide 1 of 2: {batch / 'a.tif'}: done before, skipped (use --overwrite)" in res.output.splitlines()
    assert digest(out) == {**first, "slides.csv": digest(out)["slides.csv"]}  # outputs untouched
    table = rows(out / "slides.csv")
    assert [r["status"] for r in table.values()] == ["skipped", "skipped"]
    assert table["a.tif"]["call"] == summary(out, "a")["predicted_level"]  # from the earlier summary
    assert table["a.tif"]["seconds"] == ""

    tiff = out / "a.ome.tiff"
    inode, pixels = tiff.stat().st_ino, read_base(tiff)
    res = run(model, out, *good, extra=("--overwrite",))
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in rows(out / "slides.csv").values()] == ["done", "done"]
    assert tiff.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    np.testing.assert_array_equal(read_base(tiff), pixels)  # deterministic: the same result
    assert not list(out.glob(".*.unfinished")) and not list(out.glob(".*.work"))


def test_default_mpp_fills_only_missing_and_mpp_overrides_every_slide(model: Path, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    a, b = batch / "a.tif", batch / "b.tif"
    res = run(model, out, a, b, extra=("--default-mpp", "0.5"))
    assert res.exit_code == 0, res.output
    sa, sb = summary(out, "a"), summary(out, "b")
    assert sa["slide_mpp"] == pytest.approx(1.0) and sa["mpp_source"] not in ("--mpp", "--default-mpp")  # its own
    assert sa["model_size"] == [80, 64]
    assert sb["slide_mpp"] == 0.5 and sb["mpp_source"] == "--default-mpp" and sb["model_size"] == [40, 32]
    table = rows(out / "slides.csv")
    assert table["b.tif"]["mpp"] == "0.5" and table["b.tif"]["mpp_source"] == "--default-mpp"

    res = run(model, out, a, b, extra=("--mpp", "0.5", "--default-mpp", "4", "--overwrite"))
    assert res.exit_code == 0, res.output
    for stem in ("a", "b"):
        s = summary(out, stem)
        assert s["slide_mpp"] == 0.5 and s["mpp_source"] == "--mpp" and s["model_size"] == [40, 32]
    helptext = " ".join(CliRunner().invoke(main, ["translate-slide", "--help"]).output.split())
    assert "EVERY slide" in helptext and "--default-mpp" in helptext
    res = run(model, tmp_path / "o2", a, b, extra=("--default-mpp", "0"))
    assert res.exit_code == 1 and errors(res) == ["Error: --default-mpp must be positive, got 0.0"]


def test_a_batch_of_one_fails_as_a_single_slide_run(model: Path, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(model, out, batch / "b.tif")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(errors(res)) == 1 and "b.tif" in errors(res)[0] and "--default-mpp" in errors(res)[0]
    assert not out.exists() or not any(out.iterdir())  # a failed run leaves nothing
    res = run(model, out, batch / "b.tif", batch / "c.tif")  # every slide fails: no record either
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert errors(res) == ["Error: 2 of 2 slides failed (b.tif, c.tif); see the lines above"]
    assert not out.exists() or not any(out.iterdir())
    one = tmp_path / "one" / "x.ome.tiff"
    res = run(model, one, batch / "a.tif")
    assert res.exit_code == 0, res.output
    assert one.is_file()
    assert sorted(p.name for p in one.parent.glob("*.csv")) == ["x.tiles.csv"]  # no batch record for one file


def test_a_bug_on_one_slide_is_shown_recorded_and_resume_continues(
        model: Path, batch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    a, d = write_slide(tmp_path / "tall.tif", 192, 128, mpp=1.0, levels=1, tile=32), batch / "d.tif"
    real = stream_mod.infer_tiles
    calls = {"n": 0}

    def crashing(*args: object, **kw: object) -> object:  # the third tile row of the tall slide fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated bug")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(stream_mod, "infer_tiles", crashing)
    extra = ("--all-tiles", "--batch-size", "4")  # one batch per row of tiles
    res = run(model, out, a, d, extra=extra)
    assert res.exit_code == 1
    assert "Traceback" in res.output and "RuntimeError: simulated bug" in res.output  # a bug keeps its traceback
    assert errors(res) == [f"Error: 1 of 2 slides failed (tall.tif), 1 by an internal error (a bug: traceback above; "
                           f"please report it); see {out / 'slides.csv'}"]
    table = rows(out / "slides.csv")
    assert table["tall.tif"]["status"] == "failed"
    assert table["tall.tif"]["error"].startswith("RuntimeError: simulated bug")
    assert table["d.tif"]["status"] == "done"
    assert (out / ".tall.work").is_dir() and not (out / "tall.ome.tiff").exists()

    monkeypatch.setattr(stream_mod, "infer_tiles", real)
    res = run(model, out, a, d, extra=(*extra, "--resume"))
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in rows(out / "slides.csv").values()] == ["done", "skipped"]
    assert summary(out, "tall")["resumed"] is True
    assert not (out / ".tall.work").exists()


def test_torchrun_ranks_write_their_own_record(model: Path, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ("--default-mpp", "1")
    res = run(model, out, batch, extra=extra, env={"RANK": "1", "WORLD_SIZE": "2"})  # b and d
    assert res.exit_code == 0, res.output
    assert f"rank 1: slide 1 of 2: {batch / 'b.tif'}" in res.output.splitlines()
    assert (out / "b.ome.tiff").is_file() and (out / "d.ome.tiff").is_file() and not (out / "a.ome.tiff").exists()
    res = run(model, out, batch, extra=extra, env={"RANK": "0", "WORLD_SIZE": "2"})  # a and c (truncated)
    assert res.exit_code == 1 and errors(res) == [
        f"Error: rank 0: 1 of 2 slides failed (c.tif); see {out / 'slides.rank0.csv'}"]
    assert not (out / "slides.csv").exists()
    assert {n: r["status"] for n, r in rows(out / "slides.rank1.csv").items()} == {"b.tif": "done", "d.tif": "done"}
    assert {n: r["status"] for n, r in rows(out / "slides.rank0.csv").items()} == {"a.tif": "done", "c.tif": "failed"}


def test_openslide_layout_is_named_tiff_in_folder_mode(model: Path, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(model, out, batch / "a.tif", batch / "d.tif", extra=("--layout", "openslide"))
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir() if p.is_file()}
    assert {"a.heatmap.png", "a.summary.json", "a.tiff", "a.tiles.csv", "d.tiff", "slides.csv"} <= names
    assert "a.ome.tiff" not in names and "d.ome.tiff" not in names
    assert summary(out, "a")["output"] == str(out / "a.tiff")
    with tifffile.TiffFile(out / "a.tiff") as tf:
        assert not tf.is_ome
    res = run(model, out, batch / "a.tif", batch / "d.tif", extra=("--layout", "openslide"))
    assert "done before, skipped" in res.output and res.exit_code == 0
    assert output_for([Path("x/s.svs")], out, "openslide") == [out / "s.tiff"]
    assert output_for([Path("x/s.ome.tiff")], out, "ome") == [out / "s.ome.tiff"]


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.JPEG", "x.svs"])
def test_out_with_another_file_suffix_is_refused(model: Path, batch: Path, tmp_path: Path, name: str) -> None:
    res = run(model, tmp_path / name, batch / "a.tif")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(errors(res)) == 1 and name in errors(res)[0] and ".tif/.tiff" in errors(res)[0]
    assert not (tmp_path / name).exists()


def test_out_checks_in_output_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SlideError, match="not a folder"):
        output_for([Path("s.svs")], tmp_path / "notes.txt")
    (tmp_path / "dir.png").mkdir()  # an existing folder is the folder the user means
    assert output_for([Path("s.svs")], tmp_path / "dir.png") == [tmp_path / "dir.png" / "s.ome.tiff"]
    assert output_for([Path("s.svs")], tmp_path / "run.v2") == [tmp_path / "run.v2" / "s.ome.tiff"]
    assert slides_csv_path(tmp_path) == tmp_path / "slides.csv"
    # a.svs's probability map would be a.her2.svs's virtual IHC
    with pytest.raises(SlideError, match=r"a\.svs and .*a\.her2\.svs would both be written to .*a\.her2\.ome\.tiff"):
        output_for([Path("a.svs"), Path("b/a.her2.svs")], tmp_path / "o")
    assert slides_csv_path(tmp_path, 2, 4) == tmp_path / "slides.rank2.csv"


def test_translate_refuses_whole_slides(model: Path, tmp_path: Path) -> None:
    svs = tmp_path / "x.svs"
    svs.write_bytes(b"II*\x00" + b"\x00" * 60)  # by suffix: never decoded as one image
    pyramid = write_slide(tmp_path / "p.tif", 96, 128, mpp=1.0, levels=2, tile=32)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, synth_slide(32, 32), photometric="rgb")
    assert whole_slide_kind(svs) and whole_slide_kind(pyramid) and whole_slide_kind(flat) is None
    assert whole_slide_kind(tmp_path / "y.png") is None
    for bad in (svs, pyramid):
        out = tmp_path / f"out_{bad.stem}"
        res = CliRunner().invoke(main, ["translate", str(bad), "-m", str(model), "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert len(errors(res)) == 1 and bad.name in errors(res)[0] and "translate-slide" in errors(res)[0]
        assert not out.exists()
    png = tmp_path / "ok.png"
    Image.fromarray(np.asarray(synth_slide(32, 32))).save(png)
    res = CliRunner().invoke(main, ["translate", str(png), str(flat), "-m", str(model), "--out", str(tmp_path / "o"),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
