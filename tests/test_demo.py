"""The README's first command, end to end at toy size."""

from __future__ import annotations

import json

from click.testing import CliRunner

from derestainer.cli import main
from derestainer.core.fileformat import read_meta
from derestainer.core.io import read_image


def test_demo_runs_end_to_end_and_resumes(tmp_path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--train", "8", "--test", "8", "--steps", "3", "--classifier-steps", "2",
            "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "demo_summary.json").read_text())
    # Fig. 1a-style sheet, Fig. 1b-style panels, the translation sheet and the table exist and are images/text
    assert read_image(out / "pairs_per_level.png").shape[2] == 3
    panels = sorted(p.name for p in (out / "stain_separation").glob("*_panel.png"))
    assert len(panels) == 2 and panels[0].startswith("HE_") and panels[1].startswith("IHC_")
    assert read_image(out / "run" / "figure.png").shape[2] == 3
    assert "| derestainer |" in (out / "run" / "table.md").read_text()
    assert 0.0 < summary["metrics"]["ssim"] <= 1.0
    # every test image was translated, at the ground truth's size
    gens = sorted((out / "run").rglob("translated/*.png")) or sorted((out / "run").rglob("*/pred/*.png"))
    gts = sorted((out / "synthbci" / "IHC" / "test").glob("*.png"))
    assert gens, sorted(p.relative_to(out) for p in (out / "run").rglob("*.png"))
    assert {p.name for p in gens} == {p.name for p in gts}
    gt_by_name = {p.name: p for p in gts}
    for g in gens:  # at the model's working size (64 px) or the truth's (128 px): evaluate resizes the former
        assert read_image(g).shape in ((64, 64, 3), (128, 128, 3)) and read_image(gt_by_name[g.name]).shape == (128, 128, 3), g.name
    # the exported model carries SynthBCI's physical resolution at the training size (1 µm/px × 128/64)
    models = sorted((out / "run").rglob("generator.safetensors"))
    assert models and read_meta(models[0])["mpp"] == 2.0
    # a second run reuses everything (no retraining): the generator is not rewritten, the benchmark
    # skips its finished run, same summary
    mtimes = {p: p.stat().st_mtime_ns for p in models}
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 0, res2.output
    assert "done before: skipped" in res2.output
    assert {p: p.stat().st_mtime_ns for p in models} == mtimes
    assert json.loads((out / "demo_summary.json").read_text())["metrics"] == summary["metrics"]
    # a dataset made with other settings is not silently reused
    for extra in (["--seed", "1"], ["--test", "9"]):
        res3 = CliRunner().invoke(main, args + extra)
        assert res3.exit_code != 0, res3.output
        assert str(out / "synthbci") in res3.output and "another --out" in res3.output
    assert {p: p.stat().st_mtime_ns for p in models} == mtimes
