"""``derestainer benchmark``: configs under one budget, summary statistics, report, resumability, CLI."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import derestainer.benchmark as bm
from derestainer.benchmark import stages
from derestainer.core.config import load_config, preset_names
from derestainer.core.levels import level_from_name

# --------------------------------------------------------------------------------------------------
# Configs



def _classifier_file(path: Path, seed: int) -> Path:
    """A real (tiny, untrained) classifier file: given checkpoints are checked before the benchmark runs."""
    import torch

    from derestainer.models.classifier import HER2Classifier, save_classifier

    torch.manual_seed(seed)
    return save_classifier(path, HER2Classifier("tiny"), {"size": 32, "seed": seed})

def test_preset_delta_is_the_difference_from_paper() -> None:
    assert bm.preset_delta("derestainer") == {}
    assert bm.preset_delta("no_dab") == {"loss": {"dab": 0.0}}
    assert bm.preset_delta("rgb_encoder") == {"model": {"encoder_input": "rgb"}}
    d = bm.preset_delta("pix2pix")
    assert d["model"]["name"] == "pix2pix" and d["loss"]["l1"] == 100.0 and d["model"]["d_scales"] == 1


@pytest.mark.parametrize("preset", preset_names())
def test_model_config_on_paper_is_the_preset(preset: str) -> None:
    assert bm.model_config(preset, "paper") == load_config(preset)


def test_model_config_keeps_the_base_widths() -> None:
    tiny = load_config("tiny")
    for name in ("pix2pix", "pyramidpix2pix", "no_stain", "rgb_encoder"):
        cfg = bm.model_config(name, "tiny")
        assert (cfg.model.ngf, cfg.model.ndf, cfg.model.n_fusion_blocks, cfg.model.d_layers) == (
            tiny.model.ngf, tiny.model.ndf, tiny.model.n_fusion_blocks, tiny.model.d_layers)
        assert cfg.data.size == tiny.data.size
    p2p = bm.model_config("pix2pix", "tiny", ["train.lr=1e-3"])
    assert p2p.model.name == "pix2pix" and p2p.model.n_down == 2 and p2p.loss.content == 0 and p2p.train.lr == 1e-3
    assert bm.model_config("no_stain", "tiny").loss == load_config("tiny", ["loss.stain=0"]).loss
    # MODEL:section.key=value reaches that model only
    ov = ["pix2pix:model.ngf=16", "train.seed=3"]
    assert bm.model_config("pix2pix", "tiny", ov).model.ngf == 16 and bm.model_config("pix2pix", "tiny", ov).train.seed == 3
    assert bm.model_config("no_dab", "tiny", ov).model.ngf == 8 and bm.model_config("no_dab", "tiny", ov).train.seed == 3


def test_benchmark_and_speed_compose_configs_in_one_place() -> None:
    from derestainer.core.errors import ConfigError
    from derestainer.core.presets import compose_model_config
    from derestainer.speed import BenchSpec, resolve_config

    ov = ("pix2pix:model.ngf=16", "train.lr=1e-3")
    assert bm.model_config("pix2pix", "tiny", ov) == compose_model_config("pix2pix", "tiny", ov)
    assert resolve_config(BenchSpec(model="pix2pix", base="tiny", overrides=ov)) == compose_model_config("pix2pix", "tiny", ov)
    with pytest.raises(ConfigError, match="nonexistent") as err:
        compose_model_config("nonexistent")
    with pytest.raises(bm.BenchmarkError) as err2:  # the benchmark reports it as its own, same words
        bm.model_config("nonexistent")
    assert str(err2.value) == str(err.value)


def test_run_config_applies_the_budget(tmp_path: Path) -> None:
    spec = bm.BenchmarkSpec(data=tmp_path / "d", models=("pix2pix",), steps=7, out=tmp_path / "o", size=48,
                            batch_size=3, base_config="tiny")
    cfg = bm.run_config(spec, "pix2pix", 5, tmp_path / "run", comparator=tmp_path / "c.safetensors")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.size, cfg.train.seed) == (7, 3, 48, 5)
    assert cfg.data.root == str(tmp_path / "d") and cfg.train.out == str(tmp_path / "run" / "train")
    assert cfg.train.comparator == ""  # pix2pix has no L_cmp
    cfg = bm.run_config(spec, "derestainer", 5, tmp_path / "run", comparator=tmp_path / "c.safetensors")
    assert cfg.train.comparator == str(tmp_path / "c.safetensors")


def test_bad_model_and_override(tmp_path: Path) -> None:
    with pytest.raises(bm.BenchmarkError, match="nonexistent"):
        bm.model_config("nonexistent")
    with pytest.raises(bm.BenchmarkError, match="section"):
        bm.model_config("pix2pix", overrides=["lr=1"])


# --------------------------------------------------------------------------------------------------
# Statistics and the report


def test_mean_std_matches_statistics() -> None:
    vals = [0.51, 0.47, 0.6, 0.55]
    m, s = bm.mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    m1, s1 = bm.mean_std([0.3])
    assert m1 == 0.3 and math.isnan(s1)


def test_summarize_and_table() -> None:
    runs = [
        {"model": "a", "seed": 0, "metrics": {"ssim": 0.5, "psnr": 20.0, "fid": 3.0, "note": "x"}},
        {"model": "a", "seed": 1, "metrics": {"ssim": 0.6, "psnr": 22.0, "fid": 1.0}},
        {"model": "b", "seed": 0, "metrics": {"ssim": 0.7, "psnr": 18.0}},
        {"model": "b", "seed": 1, "metrics": {"ssim": 0.7, "psnr": 19.0, "fid": 1.5}},
    ]
    s = bm.summarize(runs, ["a", "b"])
    assert "note" not in s["a"]
    assert s["a"]["ssim"]["mean"] == pytest.approx(0.55) and s["a"]["ssim"]["std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    assert s["b"]["fid"]["n"] == 1
    table = bm.markdown_table(s, [("SSIM", "ssim", True), ("PSNR", "psnr", True), ("FID", "fid", False), ("top-1", "top1", True)])
    lines = table.splitlines()
    assert lines[0].startswith("| Method | SSIM ↑ | PSNR ↑ | FID ↓")
    row_a, row_b = lines[2], lines[3]
    assert "0.550 ± 0.071" in row_a and "**21.00 ± 1.41**" in row_a  # higher PSNR is better
    assert "**0.700 ± 0.000**" in row_b
    # lower FID is better (b 1.5 < a 2.0): b's cell is bold, a's is not; one value: no ±
    assert "| **1.50** |" in row_b and "| 2.00 ± 1.41 |" in row_a and "**2.00" not in row_a
    assert row_a.endswith("| – |")  # missing metric


def test_paper_table_is_quoted_and_marked() -> None:
    text = bm.paper_table()
    assert "paper" in text.lower() and "not measured here" in text
    assert "| DeReStainer (Ours) | 0.564 | 20.647 | 0.563 | 0.726 | 0.796 | 0.600 |" in text
    assert "| PyramidPix2Pix | 0.477 | 21.161 | 0.335 | 0.505 | 0.613 | 0.330 |" in text
    assert "| w/o L_DAB | 0.555 | 20.141 | 0.554 | 0.714 | 0.788 | 0.562 |" in text


def test_flatten_metrics() -> None:
    nested = {
        "n_images": 4,
        "pixel": {"ssim": {"mean": 0.4}, "psnr": {"mean": 18.5}},
        "stain": {"thresholds_od10": {"dab": 0.15}, "dab_od": {"pearson_r": 0.9, "mae": 0.01}},
        "semantic": {"top1": 0.5, "top3": 0.75, "top5": 1.0, "knn": 0.25,
                     "exclude_self": {"top1": 0.25, "knn": 0.0},
                     "direct": {"accuracy_generated": 0.5, "accuracy_ground_truth": 1.0},
                     "distribution": {"fid": 3.5, "kid": {"mean": 0.1, "std": 0.01}}},
    }
    flat = bm.flatten_metrics(nested)
    assert flat == {"n_images": 4, "ssim": 0.4, "psnr": 18.5, "dab_od_pearson": 0.9, "dab_od_mae": 0.01,
                    "top1": 0.5, "top3": 0.75, "top5": 1.0, "knn": 0.25, "top1_excl_self": 0.25, "knn_excl_self": 0.0,
                    "evaluator_accuracy": 0.5, "evaluator_accuracy_real": 1.0, "fid": 3.5, "kid": 0.1}
    assert bm.flatten_metrics({"n_images": 1, "pixel": {"ssim": {"mean": 1.0}, "psnr": {"mean": None}}}) == {"n_images": 1, "ssim": 1.0}


def test_levels_of_bci_names() -> None:
    # the benchmark reads levels with derestainer.core.levels (its figure picks one image per level)
    names = ("00001_test_0.png", "00002_test_1+.png", "3_train_3+.jpg", "x.png")
    assert [level_from_name(n) for n in names] == [0, 1, 3, None]


# --------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from derestainer.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, n_train=8, n_test=8, size=32, seed=0, workers=1)
    return root


def _spec(synth: Path, out: Path, **kw) -> bm.BenchmarkSpec:
    args = {"data": synth, "models": ("derestainer", "pix2pix"), "steps": 2, "out": out, "size": 32, "batch_size": 2,
            "seeds": (0,), "base_config": "tiny", "classifier_arch": "tiny", "classifier_steps": 8, "device": "cpu",
            "eval_workers": 1}
    args.update(kw)
    return bm.BenchmarkSpec(**args)


@pytest.fixture(scope="module")
def real_run(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The one real path: trainer, translation, evaluation and classifier training, 2 models × 1 seed."""
    out = tmp_path_factory.mktemp("bench")
    results = bm.run_benchmark(_spec(synth, out), log=lambda m: None)
    return out, results


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def boom(*a, **k):
        raise AssertionError("this stage must not run again")

    for n in names:
        monkeypatch.setattr(stages, n, boom)


def test_end_to_end_writes_table_figure_json(real_run: tuple[Path, dict]) -> None:
    out, results = real_run
    assert [(r["model"], r["seed"]) for r in results["runs"]] == [
        ("derestainer", 0), ("pix2pix", 0), ("floor-median", 0), ("floor-hematoxylin", 0)]
    floors = [r for r in results["runs"] if r.get("floor")]
    for r in floors:  # floors: no training, evaluated like a model, shown in the table
        assert r["generator_params"] == 0 and r["metrics"]["n_images"] == 8
        assert len(r["per_image"]["ssim"]) == 8 and (out / "floors" / r["floor"]["kind"] / "done.json").is_file()
    from derestainer.core.io import read_image

    one = read_image(sorted((out / "floors" / "median" / "pred").glob("*.png"))[0])
    assert (one == np.asarray(floors[0]["floor"]["colour"], dtype=np.uint8)).all()
    c = results["comparisons"]
    assert c["reference"] == "derestainer" and set(c["differences"]) == {"pix2pix", "floor-median", "floor-hematoxylin"}
    d = c["differences"]["pix2pix"]["ssim"]
    assert d["ci_low"] <= d["estimate"] <= d["ci_high"]
    assert d["estimate"] == pytest.approx(results["runs"][1]["metrics"]["ssim"] - results["runs"][0]["metrics"]["ssim"])
    for r in results["runs"][:2]:
        m = r["metrics"]
        assert m["n_images"] == 8 and -1 <= m["ssim"] <= 1 and math.isfinite(m["psnr"])
        assert 0 <= m["top1"] <= m["top3"] <= m["top5"] <= 1 and 0 <= m["knn"] <= 1
        assert r["config"]["train"]["steps"] == 2 and r["config"]["data"]["size"] == 32
        assert (out / "runs" / r["model"] / "seed0" / "done.json").is_file()
    assert results["runs"][1]["config"]["model"]["name"] == "pix2pix"
    # classifiers trained here: different seeds and disjoint training images, recorded
    ev, cmp = results["classifiers"]["evaluator"], results["classifiers"]["comparator"]
    assert ev["trained_by_benchmark"] and cmp["trained_by_benchmark"]
    assert ev["settings"]["seed"] != cmp["settings"]["seed"]
    assert {ev["settings"]["subset"], cmp["settings"]["subset"]} == {"even", "odd"}
    from derestainer.core.fileformat import read_meta

    assert read_meta(ev["path"])["train_images_hash"] != read_meta(cmp["path"])["train_images_hash"]
    # only DeReStainer uses the comparator
    assert results["runs"][0]["config"]["train"]["comparator"] == cmp["path"]
    assert results["runs"][1]["config"]["train"]["comparator"] == ""

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"]["pix2pix"]["ssim"]["mean"] == pytest.approx(results["runs"][1]["metrics"]["ssim"])
    table = (out / "table.md").read_text()
    assert "| derestainer |" in table and "| pix2pix |" in table and "The paper's numbers" in table
    assert "| floor-median (no training) |" in table and "smallest detectable Δ" in table
    assert "Paired differences from `derestainer`" in table
    assert f"{results['runs'][1]['metrics']['ssim']:.3f}" in table
    from derestainer.models.registry import create_generator

    g = create_generator(bm.model_config("pix2pix", "tiny").model)
    assert results["runs"][1]["generator_params"] == sum(p.numel() for p in g.parameters())

    fig = read_image(out / "figure.png")
    assert fig.ndim == 3 and fig.shape[0] > fig.shape[1] / 2  # 4 rows (levels) × 4 columns
    assert (out / "figure.png").stat().st_size < 300_000


def test_rerun_skips_finished_runs(real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out0, first = real_run
    out = tmp_path / "bench"
    shutil.copytree(out0, out)
    _forbid(monkeypatch, "train_generator", "translate_split", "evaluate_predictions", "train_classifier")
    again = bm.run_benchmark(_spec(synth, out), log=lambda m: None)
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in first["runs"]]


def test_comparator_arch_trains_its_own_architecture(
    real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real run's evaluator (tiny) is reused; only the comparator, now asked for as a resnet18, is retrained.
    out = tmp_path / "bench"
    shutil.copytree(real_run[0], out)
    trained: list[tuple[str, str]] = []
    real = stages.train_classifier

    def record(data, path, **kw):
        trained.append((Path(path).stem, kw["arch"]))
        return real(data, path, **kw)

    monkeypatch.setattr(stages, "train_classifier", record)
    _forbid(monkeypatch, "train_generator", "translate_split", "evaluate_predictions")
    with pytest.raises(bm.BenchmarkError, match="another configuration"):  # the runs trained with the old one
        bm.run_benchmark(_spec(synth, out, comparator_arch="resnet18"), log=lambda m: None)
    assert trained == [("comparator", "resnet18")]
    made = json.loads((out / "classifiers" / "comparator.benchmark.json").read_text())
    assert made["settings"]["arch"] == "resnet18"
    assert json.loads((out / "classifiers" / "evaluator.benchmark.json").read_text())["settings"]["arch"] == "tiny"


@pytest.fixture
def two_threads():
    """torch on two threads for the test (conftest gives one on a one-core machine), as the parallel
    evaluator needs."""
    from derestainer.core.device import torch_threads

    with torch_threads(2):
        yield


def test_parallel_evaluator_trains_beside_the_generator(
    real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_threads: None
) -> None:
    # The real run again without its evaluator and its pix2pix run: the evaluator is trained in a second
    # process while pix2pix trains on the thread it leaves; the derestainer run is evaluated again, not retrained.
    import torch
    from safetensors import safe_open

    from derestainer.benchmark.spec import run_dir

    out = tmp_path / "bench"
    shutil.copytree(real_run[0], out)
    for f in (out / "classifiers").glob("evaluator.*"):
        f.unlink()
    spec = _spec(synth, out, models=("pix2pix", "derestainer"), parallel_evaluator=True)
    shutil.rmtree(run_dir(spec, "pix2pix", 0))
    threads: list[int] = []
    real = stages.train_generator

    def counting(cfg, folder, log):
        threads.append(torch.get_num_threads())
        return real(cfg, folder, log)

    monkeypatch.setattr(stages, "train_generator", counting)
    logs: list[str] = []
    res = bm.run_benchmark(spec, log=logs.append)
    assert threads == [1] and torch.get_num_threads() == 2  # pix2pix only, on the thread left; restored after
    assert any("second process (1 of 2 threads)" in m for m in logs)
    assert any("trained beside the generator" in m for m in logs)
    assert "[derestainer seed 0] trained before; evaluating again (the evaluator changed)" in logs
    assert {r["model"] for r in res["runs"] if "ssim" in r["metrics"] and "top1" in r["metrics"]} >= {"pix2pix", "derestainer"}
    # the second process trains the very classifier this one would on one thread
    torch.set_num_threads(1)
    stages.train_classifier(synth, tmp_path / "here.safetensors", arch="tiny", steps=8, size=32, seed=1001,
                            subset="even", device="cpu", log=lambda _: None)
    torch.set_num_threads(2)
    here, there = safe_open(tmp_path / "here.safetensors", "pt"), safe_open(res["classifiers"]["evaluator"]["path"], "pt")
    assert sorted(here.keys()) == sorted(there.keys())
    assert all(torch.equal(here.get_tensor(k), there.get_tensor(k)) for k in sorted(here.keys()))
    # a rerun finds the evaluator: no second process
    logs.clear()
    _forbid(monkeypatch, "train_generator", "translate_split", "evaluate_predictions", "train_classifier")
    bm.run_benchmark(spec, log=logs.append)
    assert not any("second process" in m for m in logs) and any(m.startswith("evaluator: reusing") for m in logs)


def test_parallel_evaluator_failures_reach_the_benchmark(synth: Path, tmp_path: Path, two_threads: None) -> None:
    import torch

    from derestainer.benchmark.classifiers import start_classifiers
    from derestainer.core.errors import ImageReadError

    data = tmp_path / "data"  # every training IHC truncated: the second process cannot read them
    shutil.copytree(synth, data)
    for f in (data / "IHC" / "train").iterdir():
        f.write_bytes(f.read_bytes()[:40])
    bad = _spec(data, tmp_path / "a")
    with start_classifiers(bad, False, "data", lambda m: None, parallel=True) as found:
        with found.sharing_cores():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ImageReadError, match=r"IHC/train/\S+\.png"):  # the user's error, raised here as itself
            found.evaluator()
    long = _spec(synth, tmp_path / "b", classifier_steps=10**6)
    with start_classifiers(long, False, "data", lambda m: None, parallel=True) as found:
        found._pending._process.kill()  # dies without a result
        with pytest.raises(bm.BenchmarkError, match="ended without a result"):
            found.evaluator()
    with pytest.raises(KeyboardInterrupt), start_classifiers(long, False, "data", lambda m: None, parallel=True) as found:
        child = found._pending._process
        raise KeyboardInterrupt  # an interrupted benchmark stops its evaluator's training
    assert child.returncode is not None and not (tmp_path / "b" / "classifiers" / "evaluator.safetensors").exists()


def test_parallel_evaluator_needs_two_threads(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from derestainer.benchmark.classifiers import start_classifiers

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    trained: list[str] = []

    def fake(data, path, **kw):
        trained.append(Path(path).stem)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(Path(path).stem.encode())
        return {}

    monkeypatch.setattr(stages, "train_classifier", fake)
    with start_classifiers(_spec(synth, tmp_path, parallel_evaluator=True), True, "data", lambda m: None,
                           parallel=True) as found:
        assert found._pending is None and trained == ["evaluator", "comparator"]


def test_runs_recorded_before_an_option_existed_are_kept(
    real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run recorded by an earlier version: its config lacks options added since (at their defaults). It is the
    # same configuration, so it is kept, not retrained.
    from derestainer.benchmark.records import MARKER, TRAINED_MARKER, data_digest, run_fingerprints

    out = tmp_path / "bench"
    shutil.copytree(real_run[0], out)
    folder = out / "runs" / "pix2pix" / "seed0"
    record = json.loads((folder / MARKER).read_text())
    old = json.loads(json.dumps(record["config"]))
    del old["loss"]["fm"], old["train"]["ema"]  # options that did not exist yet
    data_id = data_digest(bm.check_layout(synth))
    legacy = run_fingerprints(old, None, "", data_id)[0]

    def write(config: dict, fp: str) -> None:
        (folder / MARKER).write_text(json.dumps({**record, "config": config, "train_fingerprint": fp}))
        (folder / TRAINED_MARKER).write_text(json.dumps({"train_fingerprint": fp, "train_seconds": 1.0}))

    write(old, legacy)
    _forbid(monkeypatch, "train_generator", "translate_split", "evaluate_predictions", "train_classifier")
    logs: list[str] = []
    again = bm.run_benchmark(_spec(synth, out), log=logs.append)
    assert again["runs"][1]["metrics"] == real_run[1]["runs"][1]["metrics"]
    assert any("earlier version with the same configuration" in m for m in logs)
    assert json.loads((folder / MARKER).read_text())["train_fingerprint"] == record["train_fingerprint"]  # re-stamped

    # refused: a stored value that differs from today's (e.g. a default changed since), and an edited record
    changed = {**old, "train": {**old["train"], "lr": 1.0}}
    for config, fp in ((changed, run_fingerprints(changed, None, "", data_id)[0]), (changed, legacy)):
        write(config, fp)
        with pytest.raises(bm.BenchmarkError, match="another configuration"):
            bm.run_benchmark(_spec(synth, out), log=lambda m: None)

    # trained but not evaluated by the earlier version: trained.json only, its config in the training summary
    write(old, legacy)
    (folder / MARKER).unlink()
    summary = folder / "train" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "config": old}))
    monkeypatch.undo()
    _forbid(monkeypatch, "train_generator", "train_classifier")
    bm.run_benchmark(_spec(synth, out), log=lambda m: None)
    assert json.loads((folder / TRAINED_MARKER).read_text())["train_fingerprint"] == record["train_fingerprint"]


def test_changed_budget_is_refused(real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bench"
    shutil.copytree(real_run[0], out)
    _forbid(monkeypatch, "train_generator", "translate_split", "evaluate_predictions")
    with pytest.raises(bm.BenchmarkError, match="another configuration"):
        bm.run_benchmark(_spec(synth, out, steps=3), log=lambda m: None)


def test_new_evaluator_reevaluates_without_retraining(
    real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench"
    shutil.copytree(real_run[0], out)
    first = real_run[1]
    # pred/ is complete and the generator unchanged: not translated again either
    _forbid(monkeypatch, "train_generator", "train_classifier", "translate_split")
    # another evaluator: the benchmark's comparator (a different classifier) given as --evaluator
    other = out / "classifiers" / "comparator.safetensors"
    res = bm.run_benchmark(_spec(synth, out, models=("pix2pix",), evaluator=other), log=lambda m: None)
    (run,) = [r for r in res["runs"] if not r.get("floor")]
    assert run["train_seconds"] == first["runs"][1]["train_seconds"]
    assert run["metrics"]["ssim"] == pytest.approx(first["runs"][1]["metrics"]["ssim"])  # same images
    assert res["classifiers"]["evaluator"] == {"path": str(other), "trained_by_benchmark": False,
                                               "digest": bm.file_digest(other)}


def test_failed_evaluation_does_not_cost_a_retraining(
    real_run: tuple[Path, dict], synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench"
    shutil.copytree(real_run[0], out)
    (out / "runs" / "pix2pix" / "seed0" / "done.json").unlink()  # as if evaluation had crashed
    assert not (out / "runs" / "pix2pix" / "seed0" / "train" / "checkpoints").exists()  # pruned after training
    _forbid(monkeypatch, "train_generator", "train_classifier")
    # pred/ lacks one image (as if translation had crashed): translated again, once
    pred = sorted((out / "runs" / "pix2pix" / "seed0" / "pred").glob("*.png"))
    assert len(pred) == 8
    pred[0].unlink()
    calls: list[Path] = []
    real_translate = stages.translate_split

    def counting_translate(generator, he_dir, out_dir, *a, **k):
        calls.append(out_dir)
        return real_translate(generator, he_dir, out_dir, *a, **k)

    monkeypatch.setattr(stages, "translate_split", counting_translate)
    res = bm.run_benchmark(_spec(synth, out, models=("pix2pix",)), log=lambda m: None)
    assert len(calls) == 1 and pred[0].is_file()
    assert res["runs"][0]["metrics"] == real_run[1]["runs"][1]["metrics"]


def test_seeds_give_mean_and_std(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stubbed stages: 3 seeds of one model; the table shows mean ± sample std of the per-seed values."""
    import torch

    from derestainer.models.files import save_generator
    from derestainer.models.registry import create_generator

    def fake_train(cfg, run_dir, log):
        torch.manual_seed(cfg.train.seed)
        return save_generator(run_dir / "generator.safetensors", create_generator(cfg.model), cfg)

    def fake_translate(generator, he_dir, out_dir, batch_size, device, log):
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in he_dir.iterdir():
            shutil.copy(p, out_dir / p.name)

    def fake_eval(pred_dir, gt_dir, evaluator, out_dir, device, workers, log, comparator=None, method=None, bootstrap=2000):
        seed = int(pred_dir.parent.name.removeprefix("seed"))
        return {"ssim": 0.5 + 0.1 * seed, "psnr": 20.0, "top1": 0.25}, {}

    monkeypatch.setattr(stages, "train_generator", fake_train)
    monkeypatch.setattr(stages, "translate_split", fake_translate)
    monkeypatch.setattr(stages, "evaluate_predictions", fake_eval)
    ev = _classifier_file(tmp_path / "ev.safetensors", seed=1)  # only read when the evaluate stage is stubbed
    res = bm.run_benchmark(_spec(synth, tmp_path / "o", models=("pyramidpix2pix",), seeds=(0, 1, 2), evaluator=ev,
                                 floors=False), log=lambda m: None)
    s = res["summary"]["pyramidpix2pix"]["ssim"]
    assert s["values"] == pytest.approx([0.5, 0.6, 0.7]) and s["std"] == pytest.approx(0.1)
    assert "0.600 ± 0.100" in (tmp_path / "o" / "table.md").read_text()
    assert "comparator" not in res["classifiers"]  # pix2pix-type models need none


def _stub_stages(monkeypatch: pytest.MonkeyPatch, evals: list[dict]) -> None:
    import torch

    from derestainer.models.files import save_generator
    from derestainer.models.registry import create_generator

    def fake_train(cfg, run_dir, log):
        torch.manual_seed(cfg.train.seed)
        return save_generator(run_dir / "generator.safetensors", create_generator(cfg.model), cfg)

    def fake_translate(generator, he_dir, out_dir, batch_size, device, log):
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in he_dir.iterdir():
            shutil.copy(p, out_dir / p.name)

    def fake_eval(pred_dir, gt_dir, evaluator, out_dir, device, workers, log, comparator=None, method=None, bootstrap=2000):
        evals.append({"model": pred_dir.parent.parent.name, "evaluator": evaluator, "comparator": comparator})
        return {"ssim": 0.5}, {}

    monkeypatch.setattr(stages, "train_generator", fake_train)
    monkeypatch.setattr(stages, "translate_split", fake_translate)
    monkeypatch.setattr(stages, "evaluate_predictions", fake_eval)


def test_evaluation_gets_the_comparator_for_independence_checks(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_evaluate = stages.evaluate_predictions
    evals: list[dict] = []
    _stub_stages(monkeypatch, evals)
    ev = _classifier_file(tmp_path / "ev.safetensors", seed=1)
    cmp = _classifier_file(tmp_path / "cmp.safetensors", seed=2)
    bm.run_benchmark(_spec(synth, tmp_path / "o", evaluator=ev, comparator=cmp), log=lambda m: None)
    by_model = {e["model"]: e for e in evals}
    assert by_model["derestainer"]["comparator"] == cmp  # trained against it: checked for independence
    assert by_model["pix2pix"]["comparator"] is None  # no comparator in its training

    # the evaluate stage hands it on to evaluate(), where independence_warnings runs
    from types import SimpleNamespace

    seen: dict = {}
    monkeypatch.setattr(stages, "evaluate", lambda *a, **k: seen.update(k) or SimpleNamespace(metrics={"n_images": 1}, vectors={}, pairs=[]))
    monkeypatch.setattr(stages, "write_report", lambda *a, **k: None)
    real_evaluate(tmp_path, tmp_path, ev, tmp_path / "eval", "cpu", 1, lambda m: None, comparator=cmp)
    assert seen["comparator"] == str(cmp) and seen["classifier"] == str(ev)
    real_evaluate(tmp_path, tmp_path, ev, tmp_path / "eval", "cpu", 1, lambda m: None)
    assert seen["comparator"] is None


def test_same_evaluator_and_comparator_is_refused(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "train_generator", "translate_split", "evaluate_predictions", "train_classifier")
    ev, cmp = _classifier_file(tmp_path / "ev.safetensors", seed=1), tmp_path / "copy_of_ev.safetensors"
    cmp.write_bytes(ev.read_bytes())  # another file, same bytes
    with pytest.raises(bm.BenchmarkError, match="same classifier") as err:
        bm.run_benchmark(_spec(synth, tmp_path / "o", evaluator=ev, comparator=cmp), log=lambda m: None)
    msg = str(err.value)
    assert str(ev) in msg and str(cmp) in msg and "another seed" in msg
    assert not (tmp_path / "o" / "runs").exists()


def test_input_validation(synth: Path, tmp_path: Path) -> None:
    with pytest.raises(bm.BenchmarkError, match="missing"):
        bm.run_benchmark(_spec(tmp_path, tmp_path / "o"))
    with pytest.raises(bm.BenchmarkError, match="twice"):
        bm.run_benchmark(_spec(synth, tmp_path / "o", models=("pix2pix", "pix2pix")))
    with pytest.raises(bm.BenchmarkError, match="nope"):
        bm.run_benchmark(_spec(synth, tmp_path / "o", models=("pix2pix", "nope")))
    with pytest.raises(bm.BenchmarkError, match="no such file"):
        bm.run_benchmark(_spec(synth, tmp_path / "o", evaluator=tmp_path / "missing.safetensors"))
    with pytest.raises(bm.BenchmarkError, match="not in --models"):
        bm.run_benchmark(_spec(synth, tmp_path / "o", models=("pix2pix",), overrides=("pix2pixhd:model.ngf=4",)))
    assert not (tmp_path / "o" / "runs").exists()  # nothing trained before the inputs were checked


def test_cli(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derestainer.cli import main

    seen = {}

    def fake_run(spec, log=print):
        seen["spec"] = spec
        return {}

    monkeypatch.setattr(bm, "run_benchmark", fake_run)
    r = CliRunner().invoke(main, ["benchmark", "--data", str(synth), "--models", "derestainer, pix2pix", "--steps", "5",
                                  "--seeds", "0,1", "--size", "48", "--out", str(tmp_path / "o"), "--set", "train.lr=1e-3"])
    assert r.exit_code == 0, r.output
    spec = seen["spec"]
    assert spec.models == ("derestainer", "pix2pix") and spec.seeds == (0, 1) and spec.size == 48
    assert spec.overrides == ("train.lr=1e-3",) and spec.steps == 5
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["benchmark", "--data", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "BCI layout" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["benchmark", "--data", str(synth), "--steps", "1", "--seeds", "a", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "comma-separated integers" in r.output
