"""``derestainer bench`` (:mod:`derestainer.speed`) and scripts/gpu_check.sh: they run, and write what they document. No timing assertions."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from derestainer.cli import main
from derestainer.core.config import load_config
from derestainer.models.registry import create_generator
from derestainer.speed import (
    PATH_KEYS,
    RESULT_KEYS,
    SUMMARY_KEYS,
    BenchSpec,
    MemoryMeter,
    count_flops,
    forward_flops,
    run_bench,
    summarize,
    summary_table,
    time_paths,
)

ROOT = Path(__file__).resolve().parents[1]


def _check_result(res: dict, mode: str, paths: set[str]) -> None:
    assert list(res)[: len(RESULT_KEYS)] == list(RESULT_KEYS)
    assert res["mode"] == mode and set(res["paths"]) == paths
    assert res["gflops_per_image"] > 0 and res["params_m"] > 0
    for p in res["paths"].values():
        assert set(PATH_KEYS) <= set(p)
        assert len(p["seconds"]) == res["iters"] and all(s > 0 for s in p["seconds"])
        for key in ("images_per_s", "tiles_per_s", "megapixels_per_s"):
            assert set(p[key]) == set(SUMMARY_KEYS)
            assert p[key]["min"] <= p[key]["q1"] <= p[key]["median"] <= p[key]["q3"] <= p[key]["max"]
        assert p["peak_memory_mb"] > 0 and isinstance(p["options"], dict)


def test_cli_infer_compare_writes_json_and_prints_ratio(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "--model", "tiny", "--size", "32", "--batch", "2", "--quick", "--compare",
                                  "--device", "cpu", "--tile", "16", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "ratio optimized/eager:" in r.output
    res = json.loads(out.read_text())
    _check_result(res, "infer", {"eager", "optimized"})
    assert res["size"] == 32 and res["batch"] == 2 and res["tile"] == 16 and res["iters"] == 3
    for p in res["paths"].values():  # 32 px images in 16 px tiles: 4 tiles each
        np.testing.assert_allclose(p["tiles_per_s"]["median"], 4 * p["images_per_s"]["median"], rtol=1e-9)
        np.testing.assert_allclose(p["images_per_s"]["median"], float(np.median([2 / s for s in p["seconds"]])), rtol=1e-9)
    assert res["paths"]["eager"]["options"]["fold_bn"] is False
    assert res["paths"]["optimized"]["options"]["fold_bn"] is True
    ratio = res["ratios"]["optimized/eager"]
    np.testing.assert_allclose(ratio["speedup_of_medians"], np.median(res["paths"]["eager"]["seconds"])
                               / np.median(res["paths"]["optimized"]["seconds"]), rtol=1e-9)
    assert res["command"].startswith("derestainer bench --model tiny") and str(out) not in res["command"]
    # the Markdown summary has one row per path
    table = summary_table([out])
    assert table.count("\n") == 3 and "| tiny | infer | 32 | 2 | optimized |" in table


def test_train_mode_memory_and_disk_loaders(tmp_path: Path) -> None:
    spec = BenchSpec(model="pix2pix", base="tiny", size=32, batch=2, mode="train", device="cpu", warmup=1, iters=2,
                     paths=("optimized",), loader="both", workers=0, threads=1)
    res = run_bench(spec)
    _check_result(res, "train", {"optimized+memory", "optimized+disk"})
    assert res["generator"] == "pix2pix" and res["config"]["model"]["ngf"] == 8
    assert res["train_step_gflops_per_image"] > res["gflops_per_image"]  # forward + backward + D
    assert set(res["ratios"]) == {"optimized+memory/optimized+disk"}
    assert any("SynthBCI" in n for n in res["notes"])


def test_cli_train_quick_runs_the_trainer(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    r = CliRunner().invoke(main, ["bench", "--model", "tiny", "--mode", "train", "--size", "32", "--batch", "2", "--quick",
                                  "--iters", "1", "--device", "cpu", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    _check_result(res, "train", {"optimized"})
    assert "fused" not in res["paths"]["optimized"]["options"]["modconv"]  # the optimised trainer uses 'auto'


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["bench", "--model", "no_such_preset", "--quick"])
    assert r.exit_code != 0 and "no_such_preset" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["bench", "--model", "tiny", "--size", "36", "--quick", "--device", "cpu"])
    assert r.exit_code != 0 and "multiple of 8" in r.output
    r = CliRunner().invoke(main, ["bench", "--compare", "--eager", "--quick"])
    assert r.exit_code != 0


def test_device_choice_is_the_shared_rule() -> None:
    # derestainer.core.device.resolve_device decides; its DeviceError reaches the user as one line
    from derestainer.core.errors import DeviceError

    with pytest.raises(DeviceError, match="unknown device"):
        run_bench(BenchSpec(model="tiny", size=32, device="nonsense", warmup=0, iters=1))
    r = CliRunner().invoke(main, ["bench", "--model", "tiny", "--quick", "--device", "nonsense"])
    assert r.exit_code == 1 and "unknown device" in r.output and "Traceback" not in r.output


def test_forward_flops_on_meta_equal_a_real_forward() -> None:
    # FLOPs counted on a meta copy (no compute) equal those of a real forward, and scale with the pixels
    m = create_generator(load_config("tiny").model).eval()
    with torch.no_grad():
        real = count_flops(lambda: m(torch.rand(1, 3, 32, 32)))
    assert forward_flops(m, 32) == real > 0
    assert forward_flops(m, 64) == pytest.approx(4 * real, rel=0.01)
    # a lone convolution: 2·Cout·Cin·k²·H·W
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert forward_flops(conv, 8) == 2 * 5 * 3 * 9 * 8 * 8


def test_summarize_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    v = list(rng.random(9))
    s = summarize(v)
    q1, med, q3 = np.percentile(v, [25, 50, 75])  # numpy's linear method = statistics' inclusive
    assert s["median"] == pytest.approx(med) and s["q1"] == pytest.approx(q1) and s["q3"] == pytest.approx(q3)
    assert s["min"] == min(v) and s["max"] == max(v)
    assert summarize([2.0])["q1"] == 2.0 and math.isnan(summarize([])["median"])


def test_time_paths_warms_up_and_alternates() -> None:
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    firsts: list[str] = []
    t = time_paths(fns, torch.device("cpu"), warmup=2, iters=3,
                   first_warmup=lambda name, fn: (firsts.append(name), fn()))
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"] and firsts == ["a", "b", "c"]
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # order rotated every round
    assert all(len(v) == 3 for v in t.seconds.values()) and set(t.peak_mb) == set(t.first_call_s) == {"a", "b", "c"}
    assert t.memory_kind == MemoryMeter(torch.device("cpu")).kind


def test_memory_meter_sees_a_large_allocation() -> None:
    meter = MemoryMeter(torch.device("cpu"))
    if meter.kind != "cpu_peak_rss":
        pytest.skip("peak RSS cannot be reset on this platform")
    meter.reset()
    base = meter.peak_mb()
    x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    assert meter.peak_mb() >= base + 48
    del x
    meter.reset()
    assert meter.peak_mb() < base + 48


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
def test_gpu_check_script_runs_on_cpu_quick(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick"], cwd=ROOT,
                       check=False, env=env, capture_output=True, text=True, timeout=300)
    out = tmp_path / "out"
    status = (out / "status.txt").read_text()
    assert r.returncode == 0, status + r.stderr[-3000:]
    assert "FAILED" not in status and "DDP NCCL: skipped" in status
    benches = sorted(p.name for p in out.glob("bench_*.json"))
    assert benches == sorted(f"bench_{m}_{mode}.json" for m in ("derestainer", "pix2pix", "pyramidpix2pix")
                             for mode in ("infer", "train"))
    for f in out.glob("bench_*.json"):
        res = json.loads(f.read_text())
        assert res["device"] == "cpu" and res["size"] == 32 and "eager" in "".join(res["paths"])
    summary = (out / "summary.md").read_text()
    assert summary.count("| pyramidpix2pix |") == 2 + 4


@pytest.mark.gpu
def test_bench_train_and_infer_on_cuda(tmp_path: Path) -> None:
    # bf16 training steps through the trainer and the fast inference path, on CUDA
    res = run_bench(BenchSpec(model="tiny", size=64, batch=2, mode="train", device="cuda", warmup=1, iters=2,
                              paths=("eager", "optimized"), loader="both", workers=2))
    _check_result(res, "train", {"eager+memory", "eager+disk", "optimized+memory", "optimized+disk"})
    assert res["paths"]["optimized+memory"]["options"]["amp"] == "bfloat16"
    assert res["paths"]["eager+memory"]["options"]["amp"] == "off"
    assert res["paths"]["optimized+memory"]["memory_kind"] == "cuda_max_allocated"
    res = run_bench(BenchSpec(model="tiny", size=64, batch=4, device="cuda", warmup=1, iters=2, paths=("eager", "optimized")))
    _check_result(res, "infer", {"eager", "optimized"})
    assert res["paths"]["optimized"]["options"]["precision"] == "bf16"
