"""The README's first command, end to end at toy size."""

from __future__ import annotations

import json
from pathlib import Path

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
    # the margins over the floors are the benchmark's paired differences, sign flipped (model − floor)
    results = json.loads((out / "run" / "results.json").read_text())
    diffs = results["comparisons"]["differences"]
    for floor in ("floor-median", "floor-hematoxylin"):
        margins = summary["margins_over_floors"][floor]
        assert {"ssim", "psnr"} <= set(margins)  # a DAB correlation of a 3-step model may be undefined (NaN)
        for k, m in margins.items():
            d = diffs[floor][k]
            assert m["estimate"] == -d["estimate"] and (m["ci_low"], m["ci_high"]) == (-d["ci_high"], -d["ci_low"])
            assert m["clear"] == (m["ci_low"] > 0)
    assert "margin over floor-median: ssim" in res.output
    # registered pairs: the dataset says so; the comparator is the small CNN, the evaluator a ResNet-18
    made = json.loads((out / "synthbci" / "synthbci.json").read_text())
    assert made["displacement"] == "registered"
    arch = {role: json.loads((out / "run" / "classifiers" / f"{role}.benchmark.json").read_text())["settings"]["arch"]
            for role in ("evaluator", "comparator")}
    assert arch == {"evaluator": "resnet18", "comparator": "tiny"}
    # every test image was translated, at the ground truth's size
    gens = sorted((out / "run").rglob("translated/*.png")) or sorted((out / "run").rglob("*/pred/*.png"))
    gts = sorted((out / "synthbci" / "IHC" / "test").glob("*.png"))
    assert gens, sorted(p.relative_to(out) for p in (out / "run").rglob("*.png"))
    assert {p.name for p in gens} == {p.name for p in gts}
    gt_by_name = {p.name: p for p in gts}
    for g in gens:  # trained at the images' own size: prediction and truth are both 64 px
        assert read_image(g).shape == (64, 64, 3) and read_image(gt_by_name[g.name]).shape == (64, 64, 3), g.name
    # the exported model carries SynthBCI's physical resolution (about 1 µm/px, not resampled)
    models = sorted((out / "run").rglob("generator.safetensors"))
    assert models and read_meta(models[0])["mpp"] == 1.0
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


def test_an_adjacent_section_dataset_is_not_reused_as_the_registered_one(tmp_path) -> None:
    import pytest

    from derestainer.core.errors import DatasetError
    from derestainer.data.synth import generate_dataset
    from derestainer.demo import DemoSpec, _check_reusable

    data = tmp_path / "synthbci"
    generate_dataset(data, 8, 8, size=32, seed=0, workers=1)  # the default: adjacent sections
    spec = DemoSpec(out=tmp_path, n_train=8, n_test=8, image_size=32)
    with pytest.raises(DatasetError, match=r"displacement adjacent \(asked for registered\)"):
        _check_reusable(data / "synthbci.json", spec)
    _check_reusable(data / "synthbci.json", DemoSpec(out=tmp_path, n_train=8, n_test=8, image_size=32,
                                                    displacement="adjacent"))


def test_cli_defaults_are_the_demo_spec_defaults() -> None:
    from derestainer.cli.demo import demo
    from derestainer.demo import DemoSpec

    spec = DemoSpec(out=Path("x"))
    defaults = {p.name: p.default for p in demo.params}
    assert (defaults["n_train"], defaults["n_test"], defaults["steps"], defaults["classifier_steps"], defaults["seed"]) == (
        spec.n_train, spec.n_test, spec.steps, spec.classifier_steps, spec.seed)
