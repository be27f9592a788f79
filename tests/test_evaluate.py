"""Folder evaluation: pairing (missing / extra / swapped is an error, not averaged), aggregation, reports, CLI."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.ndimage import zoom
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from derestainer.cli import main
from derestainer.core.errors import EvaluationError, ImageReadError, LabelError
from derestainer.core.io import write_image
from derestainer.core.levels import confusion_matrix, level_from_name, parse_level, read_labels_csv
from derestainer.evaluation import evaluate, match_pairs, pool, write_report
from derestainer.metrics import semantic

LEVELS = ("0", "1+", "2+", "3+")


def blobs(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    up = zoom(rng.random((cells, cells, 3)), (size / cells, size / cells, 1), order=3)
    return (np.clip(up, 0, 1) * 255).round().astype(np.uint8)


def small(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def make_folders(tmp: Path, rng: np.random.Generator, n: int = 8, gt_size: int = 64, pred_size: int = 32,
                 noise: int = 25, copy: bool = False) -> tuple[Path, Path, list[str]]:
    """BCI-style folders: gt at ``gt_size``, predictions = noisy half-size versions (or exact copies)."""
    gt_dir, pred_dir = tmp / "gt", tmp / "pred"
    names = [f"{i:05d}_test_{LEVELS[i % 4]}" for i in range(n)]
    for name in names:
        gt = blobs(rng, gt_size)
        write_image(gt_dir / f"{name}.png", gt)
        if copy:
            pred = gt
        else:
            pred = np.clip(small(gt, pred_size).astype(int) + rng.integers(-noise, noise + 1, (pred_size, pred_size, 3)), 0, 255).astype(np.uint8)
        write_image(pred_dir / f"{name}.png", pred)
    return pred_dir, gt_dir, names


class StubEvaluator(nn.Module):
    """Stand-in for the evaluator: features = per-channel mean and std, logits = a fixed linear map of them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(24, dtype=torch.float32).view(4, 6).sin())
            self.fc.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------------------------------------- names and pairing


def test_levels_from_bci_names_and_csv(tmp_path):
    assert level_from_name("00012_test_2+") == 2 and level_from_name("00000_train_0") == 0
    assert level_from_name("slide_7") is None and level_from_name("x_4+") is None
    assert [parse_level(t) for t in ("0", "1+", " 2+ ", "3")] == [0, 1, 2, 3]
    good = tmp_path / "labels.csv"
    good.write_text("name,level\na.png,3+\nb,0\n")
    assert read_labels_csv(good) == {"a": 3, "b": 0}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,level\na.png,4+\n")
    with pytest.raises(LabelError, match=r"bad\.csv:2.*4\+"):  # the one label-CSV format (core.levels)
        read_labels_csv(bad)
    (tmp_path / "nohdr.csv").write_text("a.png,1+\n")  # the header is optional
    assert read_labels_csv(tmp_path / "nohdr.csv") == {"a": 1}
    with pytest.raises(LabelError, match=r"short\.csv:2.*name,level"):
        (tmp_path / "short.csv").write_text("name,level\na.png\n")
        read_labels_csv(tmp_path / "short.csv")


def test_missing_and_extra_predictions_are_errors_naming_them(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=5)
    (pred / f"{names[1]}.png").unlink()
    write_image(pred / "stray.png", blobs(rng, 32))
    with pytest.raises(EvaluationError) as ei:
        match_pairs(pred, gt)
    msg = str(ei.value)
    assert names[1] in msg and "stray" in msg and "--allow-missing" in msg
    p = match_pairs(pred, gt, allow_missing=True)
    assert [x.name for x in p.pairs] == [n for n in names if n != names[1]]
    assert p.missing == [names[1]] and p.extra == ["stray"]
    assert [x.level for x in p.pairs] == [0, 2, 3, 0]


def test_swapped_level_suffix_is_detected_not_averaged(tmp_path, rng):
    pred, gt, _ = make_folders(tmp_path, rng, n=4)
    # A prediction written under another level's name: same index, wrong suffix.
    (pred / "00001_test_1+.png").rename(pred / "00001_test_3+.png")
    with pytest.raises(EvaluationError, match=r"differ only in the HER2 level suffix.*00001_test_1\+.*00001_test_3\+"):
        evaluate(pred, gt, workers=1, progress=False)


def test_duplicate_stems_and_suffix_stripping(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=2)
    write_image(pred / f"{names[0]}.jpg", blobs(rng, 32))
    with pytest.raises(EvaluationError, match="two images named"):
        match_pairs(pred, gt)
    (pred / f"{names[0]}.jpg").unlink()
    for n in names:
        (pred / f"{n}.png").rename(pred / f"{n}_fake_B.png")
    assert len(match_pairs(pred, gt, pred_suffix="_fake_B").pairs) == 2


def test_unreadable_prediction_is_an_error_naming_it(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=3)
    (pred / f"{names[2]}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageReadError, match=names[2].replace("+", r"\+")):
        evaluate(pred, gt, workers=1, progress=False)


def test_swapped_contents_trip_the_pairing_check(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=6, noise=5)
    ok = evaluate(pred, gt, workers=1, progress=False)
    assert ok.metrics["pairing_check"]["own_best_fraction"] == 1.0
    assert not any("pairing check" in w for w in ok.warnings)
    # Rotate the file names: every prediction now sits under another image's name.
    tmp = [pred / f"{n}.tmp" for n in names]
    for n, t in zip(names, tmp):
        (pred / f"{n}.png").rename(t)
    for i, t in enumerate(tmp):
        t.rename(pred / f"{names[(i + 1) % len(names)]}.png")
    bad = evaluate(pred, gt, workers=1, progress=False)
    assert any("pairing check" in w for w in bad.warnings)
    assert all(r["pair_rank"] > 1 for r in bad.rows)


# ---------------------------------------------------------------------------------------------- values


def test_pixel_values_equal_scikit_image_after_bicubic_resize(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=4)
    res = evaluate(pred, gt, workers=1, progress=False)
    ssims, psnrs = [], []
    for n, row in zip(names, res.rows):
        g = np.asarray(Image.open(gt / f"{n}.png").convert("RGB"))
        p = np.asarray(Image.open(pred / f"{n}.png").convert("RGB").resize((64, 64), Image.BICUBIC))
        ssims.append(structural_similarity(g, p, channel_axis=-1, data_range=255))
        psnrs.append(peak_signal_noise_ratio(g, p, data_range=255))
        assert row["name"] == n and row["ssim"] == pytest.approx(ssims[-1], abs=1e-12)
        assert row["psnr"] == pytest.approx(psnrs[-1], abs=1e-12)
        assert row["pred_size"] == "32x32" and row["gt_size"] == "64x64"
    assert res.metrics["pixel"]["ssim"]["mean"] == pytest.approx(np.mean(ssims))
    assert res.metrics["pixel"]["psnr"]["mean"] == pytest.approx(np.mean(psnrs))
    assert res.metrics["n_images"] == 4


def test_parallel_workers_give_the_same_numbers(tmp_path, rng):
    pred, gt, _ = make_folders(tmp_path, rng, n=4)
    one = evaluate(pred, gt, workers=1, progress=False)
    two = evaluate(pred, gt, workers=2, progress=False)
    assert [r["name"] for r in one.rows] == [r["name"] for r in two.rows]
    for a, b in zip(one.rows, two.rows):
        assert a["ssim"] == b["ssim"] and a["psnr"] == b["psnr"] and a["dab_od_pred"] == b["dab_od_pred"]


def test_identical_images_inf_psnr_and_perfect_semantics(tmp_path, rng):
    pred, gt, _ = make_folders(tmp_path, rng, n=8, copy=True)
    res = evaluate(pred, gt, classifier=StubEvaluator(), device="cpu", workers=1, progress=False, batch_size=3)
    m = res.metrics
    assert m["pixel"]["psnr"]["n_inf"] == 8 and m["pixel"]["psnr"]["mean"] is None
    assert m["pixel"]["ssim"]["mean"] == pytest.approx(1.0)
    assert any("PSNR inf" in w for w in res.warnings)
    sem = m["semantic"]
    assert sem["top1"] == 1.0 and sem["self_match"] == "include"  # each copy finds its own ground truth
    assert sem["direct"]["confusion_generated"] == sem["direct"]["confusion_ground_truth"]
    assert sem["distribution"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert sem["knn_k"] == 8  # clipped to the library
    assert m["stain"]["dab_od"]["pearson_r"] == pytest.approx(1.0) and m["stain"]["dab_od"]["mae"] == 0.0
    text = json.dumps(m, allow_nan=False)  # strict JSON: no inf/NaN anywhere
    assert "Infinity" not in text


def test_semantic_metrics_end_to_end_equal_the_pure_function(tmp_path, rng):
    from derestainer.models.classifier import prepare_images

    pred, gt, names = make_folders(tmp_path, rng, n=8, noise=60)
    model = StubEvaluator()
    res = evaluate(pred, gt, classifier=model, classifier_size=16, device="cpu", workers=1, progress=False,
                   self_match="exclude", knn_k=3)

    def feats(paths, up):
        ims = []
        for p in paths:
            im = Image.open(p).convert("RGB")
            ims.append(np.asarray(im.resize((64, 64), Image.BICUBIC) if up else im))
        x = prepare_images(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2), 16)
        return model.features(x).numpy()

    f_gt = feats([gt / f"{n}.png" for n in names], False)
    f_pred = feats([pred / f"{n}.png" for n in names], True)
    y = np.arange(8) % 4
    ref = semantic.semantic_metrics(f_pred, f_gt, y, y, self_index=np.arange(8), self_match="exclude", knn_k=3)
    inc = semantic.semantic_metrics(f_pred, f_gt, y, y, self_match="include", knn_k=3)
    sem = res.metrics["semantic"]
    for k in ("top1", "top3", "top5", "knn"):
        assert sem[k] == pytest.approx(ref[k]), k
        assert sem["include_self"][k] == pytest.approx(inc[k]), k
    logits = model(prepare_images(torch.from_numpy(np.stack([np.asarray(Image.open(gt / f"{n}.png").convert("RGB")) for n in names])).permute(0, 3, 1, 2), 16))
    cm = confusion_matrix(y, logits.argmax(1).numpy())
    assert sem["direct"]["confusion_ground_truth"] == cm.tolist()


def test_unknown_levels_skip_accuracy_but_keep_fid(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=4)
    for d in (pred, gt):
        for i, n in enumerate(names):
            (d / f"{n}.png").rename(d / f"img{i}.png")
    res = evaluate(pred, gt, classifier=StubEvaluator(), device="cpu", workers=1, progress=False)
    assert "top1" not in res.metrics["semantic"] and res.metrics["semantic"]["distribution"]["fid"] is not None
    labels = tmp_path / "labels.csv"
    labels.write_text("name,level\n" + "".join(f"img{i}.png,{LEVELS[i % 4]}\n" for i in range(3)))
    with pytest.raises(EvaluationError, match="img3"):  # a partial labelling is an error, not a smaller average
        evaluate(pred, gt, classifier=StubEvaluator(), labels_csv=labels, device="cpu", workers=1, progress=False)
    labels.write_text("name,level\n" + "".join(f"img{i}.png,{LEVELS[i % 4]}\n" for i in range(4)))
    res = evaluate(pred, gt, classifier=StubEvaluator(), labels_csv=labels, device="cpu", workers=1, progress=False)
    assert res.metrics["semantic"]["top1"] is not None and [r["level"] for r in res.rows] == list(LEVELS)


def test_ground_truths_of_different_sizes_need_a_classifier_size_whatever_the_batching(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=6)
    odd = gt / f"{names[4]}.png"
    write_image(odd, blobs(rng, 48))  # one ground truth of another size
    for batch_size in (1, 2, 16):  # alone in its batch, with one other pair, all in one batch
        with pytest.raises(EvaluationError, match="--classifier-size") as err:
            evaluate(pred, gt, classifier=StubEvaluator(), device="cpu", workers=1, progress=False, batch_size=batch_size)
        assert str(odd) in str(err.value) and "48x48" in str(err.value)
    res = evaluate(pred, gt, classifier=StubEvaluator(), classifier_size=16, device="cpu", workers=1, progress=False,
                   batch_size=2)
    assert res.metrics["semantic"]["distribution"]["fid"] is not None


def test_images_without_level_only_leave_the_per_level_stain_table(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=8)
    for d in (pred, gt):
        for i in (0, 5):
            (d / f"{names[i]}.png").rename(d / f"img{i}.png")
    seen: list[str] = []
    res = evaluate(pred, gt, device="cpu", workers=1, progress=False, log=seen.append)
    for k, a in res.metrics["stain"].items():
        if isinstance(a, dict) and "per_level" in a:
            assert sum(v["n"] for v in a["per_level"].values()) == 6, k
    assert any("2 of 8" in w and "per-level" in w for w in res.warnings), res.warnings
    assert any("2 of 8" in w for w in seen)


def test_report_files(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=5)
    res = evaluate(pred, gt, classifier=StubEvaluator(), device="cpu", workers=1, progress=False)
    written = write_report(res, tmp_path / "out", method="stub")
    assert {p.name for p in written} == {"metrics.json", "metrics.md", "per_image.csv", "cases_ssim.png", "confusion.png"}
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| Method | SSIM | PSNR | Top-1 | Top-3 | Top-5 | kNN (k=5) |" in md and "| stub |" in md
    with open(tmp_path / "out" / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == names and float(rows[0]["ssim"]) == pytest.approx(res.rows[0]["ssim"], rel=1e-5)
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_writes_all_outputs(tmp_path, rng):
    from derestainer.models.classifier import HER2Classifier, save_classifier

    pred, gt, _ = make_folders(tmp_path, rng, n=6)
    torch.manual_seed(0)
    ckpt = save_classifier(tmp_path / "evaluator.safetensors", HER2Classifier(arch="tiny").eval(), {"size": 32, "seed": 1})
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--classifier", str(ckpt),
                                  "--out", str(out), "--workers", "1", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for f in ("metrics.json", "metrics.md", "per_image.csv", "cases_ssim.png", "confusion.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert m["n_images"] == 6 and m["semantic"]["evaluator"]["input_size"] == 32
    assert 0.0 <= m["semantic"]["top1"] <= m["semantic"]["top3"] <= m["semantic"]["top5"] <= 1.0
    assert "| Method | SSIM |" in r.output


def test_cli_errors_are_clean(tmp_path, rng):
    pred, gt, names = make_folders(tmp_path, rng, n=3)
    (gt / f"{names[0]}.png").unlink()
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--quiet", "--workers", "1"])
    assert r.exit_code == 1 and names[0] in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--quiet", "--workers", "1",
                                  "--allow-missing", "--out", str(tmp_path / "o"), "--no-figures"])
    assert r.exit_code == 0, r.output
    assert "left out 0 ground truth(s) without prediction and 1 prediction(s)" in r.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["left_out"]["extra_prediction"] == 1
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--classifier", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 1 and "nope.safetensors" in r.output


# --------------------------------------------------------------------------------------------------
# Worker processes do not outlive a killed evaluation

_POOL_SCRIPT = """
import signal, sys, time
# as in a terminal: a job started in the background (e.g. CI under `cmd &`) inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
from derestainer.evaluation.pool import PairTask, iterate_pairs

def main():
    folder = sys.argv[1]
    tasks = [PairTask(i, f"{folder}/p{i % 2}.png", f"{folder}/g{i % 2}.png", False, 0.15, 0.15) for i in range(40)]
    it = iterate_pairs(tasks, 2)
    next(it)
    print("ready", flush=True)
    time.sleep(600)  # the pool stays up, its workers idle, until the test kills this process

if __name__ == "__main__":
    main()
"""


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` that are multiprocessing spawn workers (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmd:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (PID 1 of a container may never reap it)


def _poll(predicate: Callable[[], bool], deadline_s: float = 20.0) -> bool:
    """Poll until ``predicate`` holds: a generous deadline on correctness, not a timing assertion."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_workers_exit_when_the_evaluation_is_killed(tmp_path: Path, rng: np.random.Generator, sig: str) -> None:
    """SIGKILL: the workers notice their parent is gone; SIGTERM (exit 143) and Ctrl-C: the parent stops them."""
    for k in range(2):
        write_image(tmp_path / f"g{k}.png", blobs(rng, 32))
        write_image(tmp_path / f"p{k}.png", blobs(rng, 32))
    (tmp_path / "run.py").write_text(_POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        found: set[int] = set()

        def two_workers() -> bool:
            found.update(_children(proc.pid))
            return len(found) >= 2

        assert _poll(two_workers), found
        workers = sorted(found)
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(60)
        assert code == {"SIGKILL": -signal.SIGKILL, "SIGTERM": 128 + signal.SIGTERM, "SIGINT": -signal.SIGINT}[sig]
        assert _poll(lambda: not any(_alive(w) for w in workers)), [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_POOL_CALL = """\
folder = sys.argv[1]
tasks = [PairTask(i, f"{folder}/p{i % 2}.png", f"{folder}/g{i % 2}.png", False, 0.15, 0.15) for i in range(4)]
try:
    print(len(list(iterate_pairs(tasks, 2))), flush=True)
except EvaluationError as exc:
    print("EvaluationError:", exc, flush=True)
"""
_POOL_IMPORTS = """\
import sys
from derestainer.core.errors import EvaluationError
from derestainer.evaluation.pool import PairTask, iterate_pairs
"""


def test_a_script_without_a_main_guard_gets_one_clear_error(tmp_path: Path, rng: np.random.Generator) -> None:
    """spawn re-imports the calling script in every worker; without `if __name__ == "__main__":` the workers
    fail on start. The caller gets an EvaluationError naming the script and the fix, not BrokenProcessPool."""
    for k in range(2):
        write_image(tmp_path / f"g{k}.png", blobs(rng, 32))
        write_image(tmp_path / f"p{k}.png", blobs(rng, 32))
    unguarded, guarded = tmp_path / "unguarded.py", tmp_path / "guarded.py"
    unguarded.write_text(_POOL_IMPORTS + _POOL_CALL)
    guarded.write_text(_POOL_IMPORTS + 'if __name__ == "__main__":\n' + textwrap.indent(_POOL_CALL, "    "))
    r = subprocess.run([sys.executable, str(unguarded), str(tmp_path)], capture_output=True, text=True, timeout=300)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("EvaluationError:"), (r.stdout, r.stderr[-2000:])
    assert str(unguarded) in last and '__name__ == "__main__"' in last and "--workers 1" in last
    r = subprocess.run([sys.executable, str(guarded), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "4", (r.stdout, r.stderr[-2000:])


def _main_module(file: str | None = None, spec: str | None = None) -> types.ModuleType:
    m = types.ModuleType("__main__")
    m.__spec__ = types.SimpleNamespace(name=spec) if spec else None  # type: ignore[assignment]
    if file:
        m.__file__ = file
    return m


def test_the_hint_names_only_a_main_that_runs_code_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guarded script, a package's __main__ and an interactive session get no hint; an unguarded script
    and a module run with -m do."""
    bare, guarded = tmp_path / "bare.py", tmp_path / "guarded.py"
    bare.write_text("run()\n")
    guarded.write_text("def run(): ...\n\nif __name__ == '__main__':\n    run()\n")
    cases = ((_main_module(str(bare)), str(bare)), (_main_module(str(guarded)), None),
             (_main_module(spec="tools.score"), "tools.score"), (_main_module(spec="derestainer.__main__"), None),
             (_main_module(), None))
    for module, expected in cases:
        monkeypatch.setitem(sys.modules, "__main__", module)
        assert pool._unguarded_main() == expected


def test_flat_predictions_are_left_out_of_the_pairing_check(tmp_path, rng):
    """A floor image (one colour) correlates with nothing: no mix-up warning, and it does not drag
    the matched mean of the other predictions down."""
    pred, gt, names = make_folders(tmp_path, rng, n=6, noise=5)
    ref = evaluate(pred, gt, workers=1, progress=False).metrics["pairing_check"]
    write_image(pred / f"{names[0]}.png", np.full((32, 32, 3), 200, np.uint8))
    one = evaluate(pred, gt, workers=1, progress=False)
    pc = one.metrics["pairing_check"]
    assert pc["flat_predictions"] == 1 and ref["flat_predictions"] == 0
    assert not any("pairing check" in w for w in one.warnings)
    assert pc["matched_r_mean"] > pc["other_r_mean"]
    for n in names:
        write_image(pred / f"{n}.png", np.full((32, 32, 3), 200, np.uint8))
    flat = evaluate(pred, gt, workers=1, progress=False)
    assert flat.metrics["pairing_check"]["flat_predictions"] == 6
    assert not any("pairing check" in w for w in flat.warnings)
