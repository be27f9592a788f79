"""The bad-input corpus: every command that reads a user's files, against every class of bad input.

Each case builds one bad input (or a bad combination of arguments) beside a small, good "world" (a
SynthBCI dataset, a trained tiny run, its exported model, a classifier, a slide) and runs the command
in-process. It must end with exit status 1 or 2 and one line ``Error: …`` naming the file at fault,
no traceback, every input byte-identical afterwards, and no file at a final output name.

Classes (the ``CLASSES`` table; the test at the bottom checks each one has cases): images that cannot
be read, are truncated or over the pixel limit; outputs that overlap inputs; checkpoints that are
foreign, tampered or of another kind; training states; configs; stain matrices; label CSVs; outputs
that cannot be written (read-only, full disk); outputs locked by another job; bad option values.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from derestainer.cli import main
from derestainer.core.fileformat import META_KEY

# --------------------------------------------------------------------------------------------------
# The good world every case starts from (built once per module: about 10 s on 2 cores)


@dataclass
class World:
    root: Path
    data: Path            # SynthBCI in the BCI layout (64 px)
    run: Path             # a tiny training run (4 steps, checkpoints at 2 and 4)
    model: Path           # its exported generator
    clf: Path             # a tiny HER2 classifier
    he: Path              # a folder of two H&E PNGs
    slide: Path           # a small OME-TIFF slide (0.5 µm/px)
    pred: Path            # predictions (copies of test IHC) for evaluate
    gt: Path              # the matching ground truth


def _cli(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    text = res.output + (res.stderr if res.stderr_bytes is not None and res.stderr not in res.output else "")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        text += "\nTraceback (from the test runner):\n" + "".join(traceback.format_exception(res.exception))
    return res.exit_code, text


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from derestainer.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    generate_dataset(data, 8, 4, size=64, seed=1, workers=1)
    run = root / "run"
    code, out = _cli(["train", "-c", "tiny", "--data", str(data), "--out", str(run), "--set", "train.steps=4",
                      "--set", "train.ckpt_every=2", "--set", "train.sample_every=100", "--set", "train.log_every=2",
                      "--set", "train.tensorboard=off", "--set", "train.device=cpu"])
    assert code == 0, out
    model = root / "model.safetensors"
    assert _cli(["export", "-m", str(run), "--out", str(model)])[0] == 0
    clf = root / "clf.safetensors"
    code, out = _cli(["train-classifier", "--data", str(data), "--arch", "tiny", "--size", "32", "--steps", "2",
                      "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(clf)])
    assert code == 0, out
    he = root / "he"
    he.mkdir()
    for f in sorted((data / "HE" / "test").glob("*.png"))[:2]:
        shutil.copy(f, he / f.name)
    pred, gt = root / "pred", data / "IHC" / "test"
    shutil.copytree(gt, pred)
    slide = root / "slides" / "s1.ome.tiff"
    slide.parent.mkdir()
    img = np.full((160, 192, 3), 235, np.uint8)
    img[40:120, 40:150] = (150, 80, 160)
    tifffile.imwrite(slide, img, photometric="rgb", tile=(64, 64), metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                     "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    return World(root, data, run, model, clf, he, slide, pred, gt)


# --------------------------------------------------------------------------------------------------
# Bad files


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width × height`` but whose data is a few bytes (a decompression bomb header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _truncated(src: Path, dst: Path) -> Path:
    b = src.read_bytes()
    dst.write_bytes(b[: len(b) // 2])
    return dst


def _bad_image(kind: str, folder: Path, name: str, good: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    if kind == "text":
        p.write_text("this is not an image\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        _truncated(good, p)
    elif kind == "bomb":
        _png_header_only(p, 20_000, 20_000)
    return p


def _dataset_with(world: World, tmp: Path, kind: str, split: str = "train") -> tuple[Path, Path]:
    """A copy of the world's dataset with one bad H&E image; returns ``(root, bad file)``."""
    root = tmp / "bad_data"
    shutil.copytree(world.data, root)
    victim = sorted((root / "HE" / split).glob("*.png"))[0]
    good = tmp / "good.png"
    shutil.copy(victim, good)
    victim.unlink()
    return root, _bad_image(kind, victim.parent, victim.name, good)


def _retag(src: Path, dst: Path, meta: object | None = None, raw_meta: str | None = None,
           tensors: Callable[[dict], dict] | None = None) -> Path:
    """A copy of a safetensors file with other metadata or tensors."""
    t = load_file(str(src))
    if tensors is not None:
        t = tensors(t)
    md = None if meta is None and raw_meta is None else {META_KEY: raw_meta if raw_meta is not None else json.dumps(meta)}
    save_file(t, str(dst), metadata=md)
    return dst


def _meta(path: Path) -> dict:
    from derestainer.core.fileformat import read_meta

    return read_meta(path)


def _gen_meta(world: World, change: Callable[[dict], None]) -> dict:
    m = _meta(world.model)
    change(m)
    return m


def _cfg_set(m: dict, section: str, key: str, value: object) -> None:
    m["config"][section][key] = value


def _permute_first(t: dict) -> dict:
    k = next(k for k, v in t.items() if v.ndim == 4 and v.shape[0] != v.shape[1])
    t = dict(t)
    t[k] = t[k].transpose(0, 1).contiguous()
    return t


def _half_first(t: dict) -> dict:
    k = next(k for k, v in t.items() if v.is_floating_point())
    t = dict(t)
    t[k] = t[k].half()
    return t


def _bad_checkpoint(world: World, tmp: Path, kind: str) -> Path:
    """A generator file that is bad in one way (``kind``)."""
    p = tmp / f"bad_{kind}.safetensors"
    m = world.model
    if kind == "text":
        p.write_text("not a model\n")
    elif kind == "truncated":
        _truncated(m, p)
    elif kind == "foreign":
        _retag(m, p)  # no derestainer metadata at all
    elif kind == "meta_not_json":
        _retag(m, p, raw_meta="{not json")
    elif kind == "meta_not_object":
        _retag(m, p, raw_meta="[1, 2, 3]")
    elif kind == "classifier":
        shutil.copy(world.clf, p)
    elif kind == "unknown_model":
        _retag(m, p, _gen_meta(world, lambda d: (_cfg_set(d, "model", "name", "nosuchnet"), d.update(model="nosuchnet"))))
    elif kind == "bad_encoder_input":
        _retag(m, p, _gen_meta(world, lambda d: _cfg_set(d, "model", "encoder_input", "xyz")))
    elif kind == "n_levels_0":
        _retag(m, p, _gen_meta(world, lambda d: _cfg_set(d, "model", "n_levels", 0)))
    elif kind == "size_text":
        _retag(m, p, _gen_meta(world, lambda d: d.update(size="abc")))
    elif kind in ("mpp_text", "mpp_zero", "mpp_negative"):
        v = {"mpp_text": "abc", "mpp_zero": 0, "mpp_negative": -1.0}[kind]
        _retag(m, p, _gen_meta(world, lambda d: d.update(mpp=v)))
    elif kind == "huge_width":
        _retag(m, p, _gen_meta(world, lambda d: _cfg_set(d, "model", "ngf", 4096)))
    elif kind == "permuted_shape":
        _retag(m, p, _meta(m), tensors=_permute_first)
    elif kind == "wrong_dtype":
        _retag(m, p, _meta(m), tensors=_half_first)
    return p


CHECKPOINT_KINDS = ("text", "truncated", "foreign", "meta_not_json", "meta_not_object", "classifier", "unknown_model",
                    "bad_encoder_input", "n_levels_0", "size_text", "mpp_text", "mpp_zero", "mpp_negative",
                    "huge_width", "permuted_shape", "wrong_dtype")


def _bad_run(world: World, tmp: Path, kind: str) -> tuple[Path, Path]:
    """A copy of the world's run folder with a bad training state; returns ``(run, the file at fault)``."""
    run = tmp / "bad_run"
    shutil.copytree(world.run, run)
    ckpt = run / "checkpoints" / "step-0000004"
    state = ckpt / "state.json"
    d = json.loads(state.read_text())
    if kind == "state_not_json":
        state.write_text("{oops")
    elif kind == "state_step_text":
        d["step"] = "abc"
        state.write_text(json.dumps(d))
    elif kind == "state_bad_rng":
        d["rng"] = {"torch": [1, 2, 3], "numpy": "garbage", "python": 7}
        state.write_text(json.dumps(d))
    elif kind == "latest_escapes":
        outside = tmp / "elsewhere" / "step-0000009"
        shutil.copytree(ckpt, outside)
        (run / "latest").write_text("../elsewhere/step-0000009\n")
        return run, run / "latest"
    elif kind == "optimizer_tampered":
        f = ckpt / "optim_g.safetensors"
        _retag(f, f, _meta(f), tensors=lambda t: {k: v.flatten()[:1].clone() for k, v in t.items()})
        return run, f
    return run, state


def _bad_config(tmp: Path, kind: str) -> Path:
    p = tmp / f"{kind}.yaml"
    text = {
        "yaml_syntax": "model: [unclosed\n",
        "not_mapping": "- a\n- b\n",
        "unknown_section": "extends: tiny\nmodle:\n  ngf: 8\n",
        "unknown_key": "extends: tiny\nmodel:\n  ngff: 8\n",
        "wrong_type": "extends: tiny\ntrain:\n  lr: fast\n",
        "extends_missing": "extends: no_such_base.yaml\n",
        "extends_cycle": "extends: extends_cycle_b.yaml\n",
    }[kind]
    p.write_text(text)
    if kind == "extends_cycle":
        (tmp / "extends_cycle_b.yaml").write_text(f"extends: {p.name}\n")
    return p


def _stain_file(tmp: Path, kind: str) -> Path:
    p = tmp / f"stain_{kind}.npy"
    if kind == "pickle":
        import pickle

        p.write_bytes(pickle.dumps({"not": "a matrix"}))
    elif kind == "singular":
        np.save(p, np.ones((3, 3)))
    elif kind == "nan":
        m = np.eye(3)
        m[0, 0] = np.nan
        np.save(p, m)
    return p


# --------------------------------------------------------------------------------------------------
# Outputs that cannot be written


def _make_unwritable(folder: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """Make ``folder`` refuse writes with ``err`` (EACCES: read-only; ENOSPC: full).

    As a normal user a read-only folder is a real ``chmod 555``; as root (who may write anyway) and for
    a full disk, the system calls that create or write files under ``folder`` fail as the kernel would.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if err == errno.EACCES and os.geteuid() != 0:
        folder.chmod(0o555)
        return
    base = str(folder.resolve())

    def under(p: object) -> bool:
        try:
            return os.path.abspath(os.fspath(p)).startswith(base)  # type: ignore[arg-type]
        except TypeError:
            return False

    real_open, real_mkdir, real_bopen = os.open, os.mkdir, open

    def fake_open(path: object, flags: int, *a: object, **k: object) -> int:
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), os.fspath(path))  # type: ignore[arg-type]
        return real_open(path, flags, *a, **k)  # type: ignore[arg-type]

    def fake_mkdir(path: object, *a: object, **k: object) -> None:
        if under(path):
            raise OSError(err, os.strerror(err), os.fspath(path))  # type: ignore[arg-type]
        real_mkdir(path, *a, **k)  # type: ignore[arg-type]

    def fake_bopen(path: object, mode: str = "r", *a: object, **k: object) -> object:
        if under(path) and any(c in mode for c in "wax+"):
            raise OSError(err, os.strerror(err), os.fspath(path))  # type: ignore[arg-type]
        return real_bopen(path, mode, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr("builtins.open", fake_bopen)


# --------------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    """One command × one bad input: ``build`` makes it and returns ``(argv, file the message must name,
    outputs that must not exist afterwards)``."""

    cls: str
    id: str
    build: Callable[[World, Path, pytest.MonkeyPatch], tuple[list[str], Path, list[Path]]]
    may_create: tuple[str, ...] = field(default=())  # relative paths a failed run may leave (e.g. a resumable run)


CASES: list[Case] = []


def case(cls: str, id: str, *, may_create: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        CASES.append(Case(cls, id, fn, may_create))
        return fn
    return deco


def _tr(world: World, out: Path, *inputs: Path, model: Path | None = None) -> list[str]:
    return ["translate", *map(str, inputs), "-m", str(model or world.model), "--out", str(out), "--device", "cpu"]


def _ts(world: World, out: Path, *slides: Path, model: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return ["translate-slide", *map(str, slides), "-m", str(model or world.model), "--out", str(out), "--tile", "64",
            "--overlap", "16", "--device", "cpu", "--quiet", *extra]


def _ev(world: World, out: Path, pred: Path | None = None, *extra: str) -> list[str]:
    return ["evaluate", "--pred", str(pred or world.pred), "--gt", str(world.gt), "--out", str(out),
            "--workers", "1", "--device", "cpu", "--no-figures", "--quiet", *extra]


def _train(world: World, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["train", "-c", "tiny", "--data", str(data or world.data), "--out", str(out), "--set", "train.steps=2",
            "--set", "train.tensorboard=off", "--set", "train.device=cpu", *extra]


def _tc(world: World, out: Path, *extra: str, data: Path | None = None, arch: str = "tiny") -> list[str]:
    return ["train-classifier", "--data", str(data or world.data), "--arch", arch, "--size", "32", "--steps", "1",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out), *extra]


# Images -------------------------------------------------------------------------------------------
for _kind in ("text", "empty", "truncated", "bomb"):
    def _mk(kind: str) -> None:
        @case("image", f"translate-{kind}")
        def _t(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _bad_image(kind, t / "in", "x.png", w.he / sorted(os.listdir(w.he))[0])
            return _tr(w, t / "out", bad), bad, [t / "out" / "x.png", t / "out" / "predictions.json"]

        @case("image", f"evaluate-{kind}")
        def _e(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            pred = t / "pred"
            shutil.copytree(w.pred, pred)
            victim = sorted(pred.glob("*.png"))[0]
            good = t / "good.png"
            shutil.move(victim, good)
            bad = _bad_image(kind, pred, victim.name, good)
            return _ev(w, t / "out", pred), bad, [t / "out" / "metrics.json"]

        @case("image", f"separate-{kind}")
        def _s(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _bad_image(kind, t / "in", "x.png", w.he / sorted(os.listdir(w.he))[0])
            return ["separate", str(bad), "--out", str(t / "out")], bad, [t / "out"]

        @case("image", f"train-{kind}", may_create=("run",) if kind == "truncated" else ())
        def _r(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            root, bad = _dataset_with(w, t, kind)
            return _train(w, t / "run", data=root), bad, [t / "run" / "generator.safetensors"]

        @case("image", f"train-classifier-{kind}")
        def _c(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            root = t / "bad_data"
            shutil.copytree(w.data, root)
            victim = sorted((root / "IHC" / "train").glob("*.png"))[0]
            good = t / "good.png"
            shutil.move(victim, good)
            bad = _bad_image(kind, victim.parent, victim.name, good)
            return _tc(w, t / "c.safetensors", data=root), bad, [t / "c.safetensors", t / "c.json"]

        @case("image", f"translate-slide-{kind}")
        def _w(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _bad_image(kind, t / "in", "s.png", w.he / sorted(os.listdir(w.he))[0])
            return _ts(w, t / "out", bad, extra=("--mpp", "0.5")), bad, [t / "out" / "s.ome.tiff"]
    _mk(_kind)


@case("image", "translate-slide-not-a-slide")
def _not_slide(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    bad = t / "x.svs"
    bad.write_text("not a slide")
    return _ts(w, t / "out", bad), bad, [t / "out" / "x.ome.tiff"]


# Outputs that overlap inputs ---------------------------------------------------------------------
@case("overlap", "translate-out-is-input-folder")
def _o1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    src = t / "he"
    shutil.copytree(w.he, src)
    return _tr(w, src, src), src, [src / "predictions.json"]


@case("overlap", "translate-out-holds-input-file")
def _o2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    src = t / "he"
    shutil.copytree(w.he, src)
    f = sorted(src.glob("*.png"))[0]
    return _tr(w, src, f), f, [src / "predictions.json"]


@case("overlap", "translate-out-inside-input-folder")
def _o3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    src = t / "he"
    shutil.copytree(w.he, src)
    return _tr(w, src / "virtual", src), src, [src / "virtual"]


@case("overlap", "translate-slide-out-is-slide-folder")
def _o4(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    d = t / "slides"
    shutil.copytree(w.slide.parent, d)
    return _ts(w, d, d), d, [d / "s1.summary.json"]


@case("overlap", "translate-slide-out-is-the-slide")
def _o5(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    f = t / "s1.ome.tiff"
    shutil.copy(w.slide, f)
    return _ts(w, f, f), f, [t / "s1.summary.json"]


@case("overlap", "evaluate-out-is-pred")
def _o6(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    pred = t / "pred"
    shutil.copytree(w.pred, pred)
    return _ev(w, pred, pred), pred, [pred / "metrics.json"]


@case("overlap", "evaluate-out-is-gt")
def _o7(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _ev(w, w.gt), w.gt, [w.gt / "metrics.json"]


@case("overlap", "export-out-is-checkpoint")
def _o8(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    f = t / "m.safetensors"
    shutil.copy(w.model, f)
    return ["export", "-m", str(f), "--out", str(f), "--mpp", "2.0"], f, []


@case("overlap", "separate-output-is-another-input")
def _o9(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    src = t / "he"
    src.mkdir()
    first = sorted(w.he.glob("*.png"))[0]
    shutil.copy(first, src / "x.png")
    shutil.copy(first, src / "x_H.png")  # what separating x.png into src would overwrite
    return ["separate", str(src / "x.png"), str(src / "x_H.png"), "--out", str(src)], src / "x_H.png", \
        [src / "x_panel.png"]


@case("overlap", "train-out-is-data")
def _o10(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    d = t / "data"
    shutil.copytree(w.data, d)
    return _train(w, d, data=d), d, [d / "config.yaml"]


@case("overlap", "train-classifier-out-is-levels-csv")
def _o11(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    csv = t / "levels.safetensors"
    csv.write_text("name,level\n")
    return (_tc(w, csv, "--layout", "folders", "--he-dir", "HE/{split}", "--ihc-dir", "IHC/{split}",
                "--levels", str(csv)), csv, [t / "levels.json"])


@case("overlap", "benchmark-out-is-data")
def _o12(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    d = t / "data"
    shutil.copytree(w.data, d)
    return (["benchmark", "--data", str(d), "--models", "derestainer", "--steps", "1", "--seeds", "0",
             "--base-config", "tiny", "--out", str(d), "--device", "cpu"], d, [d / "results.json"])


# Checkpoints ----------------------------------------------------------------------------------------
for _kind in CHECKPOINT_KINDS:
    def _mkc(kind: str) -> None:
        @case("checkpoint", f"translate-{kind}")
        def _t(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _bad_checkpoint(w, t, kind)
            return _tr(w, t / "out", w.he, model=bad), bad, [t / "out"]

        @case("checkpoint", f"export-{kind}")
        def _x(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _bad_checkpoint(w, t, kind)
            return ["export", "-m", str(bad), "--out", str(t / "e.safetensors")], bad, [t / "e.safetensors"]

        if kind in ("text", "meta_not_json", "unknown_model", "mpp_negative", "huge_width", "permuted_shape"):
            @case("checkpoint", f"translate-slide-{kind}")
            def _w(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
                bad = _bad_checkpoint(w, t, kind)
                return _ts(w, t / "out", w.slide, model=bad), bad, [t / "out" / "s1.ome.tiff", t / "out" / ".s1.work"]
    _mkc(_kind)


@case("checkpoint", "evaluate-classifier-is-a-generator")
def _c1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _ev(w, t / "out", None, "--classifier", str(w.model)), w.model, [t / "out" / "metrics.json"]


@case("checkpoint", "evaluate-comparator-is-a-generator")
def _c2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return (_ev(w, t / "out", None, "--classifier", str(w.clf), "--comparator", str(w.model)), w.model,
            [t / "out" / "metrics.json"])


@case("checkpoint", "train-classifier-pretrained-pickle")
def _c3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    import torch

    pth = t / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, pth)
    return _tc(w, t / "c.safetensors", "--pretrained", str(pth), arch="resnet18"), pth, [t / "c.safetensors"]


# Training states ----------------------------------------------------------------------------------------
for _kind in ("state_not_json", "state_step_text", "state_bad_rng", "latest_escapes", "optimizer_tampered"):
    def _mks(kind: str) -> None:
        @case("state", f"train-resume-{kind}")
        def _r(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            run, bad = _bad_run(w, t, kind)
            return (["train", "--out", str(run), "--resume", "--set", "train.steps=6", "--set", "train.device=cpu",
                     "--set", "train.tensorboard=off"], bad, [run / "checkpoints" / "step-0000006"])
    _mks(_kind)


# Configs ----------------------------------------------------------------------------------------
for _kind in ("yaml_syntax", "not_mapping", "unknown_section", "unknown_key", "wrong_type", "extends_missing",
              "extends_cycle"):
    def _mkf(kind: str) -> None:
        @case("config", f"train-config-{kind}")
        def _r(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _bad_config(t, kind)
            named = t / "no_such_base.yaml" if kind == "extends_missing" else bad
            argv = _train(w, t / "run")
            argv[argv.index("tiny")] = str(bad)
            return argv, named, [t / "run"]
    _mkf(_kind)


@case("config", "train-set-unknown-key")
def _f1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _train(w, t / "run", "--set", "train.stepz=3"), Path("train.stepz"), [t / "run"]


@case("config", "train-set-bad-value")
def _f2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _train(w, t / "run", "--set", "train.amp=sometimes"), Path("sometimes"), [t / "run"]


# Stain matrices -------------------------------------------------------------------------------------
for _kind in ("pickle", "singular", "nan"):
    def _mkm(kind: str) -> None:
        @case("stain-matrix", f"train-stain-{kind}")
        def _r(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
            bad = _stain_file(t, kind)
            return _train(w, t / "run", "--set", f"model.stain_matrix={bad}"), bad, [t / "run"]
    _mkm(_kind)


# Label CSVs -------------------------------------------------------------------------------------
@case("labels", "evaluate-labels-unknown-level")
def _l1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    csv = t / "labels.csv"
    names = sorted(p.stem for p in w.gt.glob("*.png"))
    csv.write_text("name,level\n" + "".join(f"{n},{'4+' if i == 0 else '1+'}\n" for i, n in enumerate(names)))
    return _ev(w, t / "out", None, "--labels", str(csv)), csv, [t / "out" / "metrics.json"]


@case("labels", "train-classifier-levels-malformed")
def _l2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    csv = t / "levels.csv"
    csv.write_text("name;level\n\x00\x01garbage\n")
    return (_tc(w, t / "c.safetensors", "--layout", "folders", "--he-dir", "HE/{split}", "--ihc-dir", "IHC/{split}",
                "--levels", str(csv)), csv, [t / "c.safetensors"])


# Outputs that cannot be written ----------------------------------------------------------------------
def _unwritable_cases(err: int, name: str) -> None:
    builders: dict[str, Callable[[World, Path], tuple[list[str], list[Path]]]] = {
        "translate": lambda w, o: (_tr(w, o, w.he), [o / "predictions.json"]),
        "translate-slide": lambda w, o: (_ts(w, o, w.slide), [o / "s1.ome.tiff"]),
        "evaluate": lambda w, o: (_ev(w, o), [o / "metrics.json"]),
        "export": lambda w, o: (["export", "-m", str(w.model), "--out", str(o / "e.safetensors")], [o / "e.safetensors"]),
        "train": lambda w, o: (_train(w, o), [o / "config.yaml"]),
        "train-classifier": lambda w, o: (_tc(w, o / "c.safetensors"), [o / "c.safetensors"]),
        "separate": lambda w, o: (["separate", str(sorted(w.he.glob("*.png"))[0]), "--out", str(o)], []),
        "synth": lambda w, o: (["synth", "--out", str(o), "--train", "1", "--test", "0", "--size", "32"], []),
        "benchmark": lambda w, o: (_bench(w, o), [o / "results.json"]),
        "demo": lambda w, o: (["demo", "--out", str(o), "--steps", "1"], []),
        "bench": lambda w, o: (_speed("--json", str(o / "b.json")), [o / "b.json"]),
    }
    for cmd, build in builders.items():
        def _mku(cmd: str, build: Callable[[World, Path], tuple[list[str], list[Path]]]) -> None:
            @case(name, f"{cmd}-{name}")
            def _u(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
                o = t / "out"
                argv, outs = build(w, o)
                _make_unwritable(o, mp, err)
                return argv, o, outs
        _mku(cmd, build)


_unwritable_cases(errno.EACCES, "read-only")
_unwritable_cases(errno.ENOSPC, "disk-full")


# Pairs and HER2 labels ------------------------------------------------------------------------------
def _data_copy(w: World, t: Path) -> Path:
    root = t / "bad_data"
    shutil.copytree(w.data, root)
    return root


@case("pairs", "train-pair-of-two-sizes")
def _p1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    root = _data_copy(w, t)
    ihc = sorted((root / "IHC" / "train").glob("*.png"))[0]
    Image.open(ihc).resize((48, 48)).save(ihc)
    return _train(w, t / "run", data=root), ihc, [t / "run"]


@case("pairs", "train-he-without-ihc")
def _p2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    root = _data_copy(w, t)
    lonely = sorted((root / "HE" / "train").glob("*.png"))[0]
    (root / "IHC" / "train" / lonely.name).unlink()
    return _train(w, t / "run", data=root), Path(lonely.name), [t / "run"]


@case("pairs", "evaluate-missing-prediction")
def _p3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    pred = t / "pred"
    shutil.copytree(w.pred, pred)
    gone = sorted(pred.glob("*.png"))[0]
    gone.unlink()
    return _ev(w, t / "out", pred), Path(gone.stem), [t / "out"]


@case("pairs", "train-classifier-unknown-her2-level")
def _p4(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    root = _data_copy(w, t)
    for sub in ("HE", "IHC"):
        f = sorted((root / sub / "train").glob("*.png"))[0]
        f.rename(f.with_name(f.name.rsplit("_", 1)[0] + "_4+.png"))
    bad = sorted((root / "IHC" / "train").glob("*_4+.png"))[0]
    return _tc(w, t / "c.safetensors", data=root), Path(bad.name), [t / "c.safetensors"]


@case("labels", "train-levels-csv-unknown-level")
def _l3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    csv = t / "levels.csv"
    names = sorted(p.stem for p in (w.data / "HE" / "train").glob("*.png"))
    csv.write_text("name,level\n" + "".join(f"{n},{'5+' if i == 0 else '0'}\n" for i, n in enumerate(names)))
    return (_train(w, t / "run", "--set", "data.layout=folders", "--set", "data.he_dir=HE/{split}",
                   "--set", "data.ihc_dir=IHC/{split}", "--set", f"data.levels={csv}"), csv, [t / "run"])


# Configs and checkpoints given to the benchmark and to training ----------------------------------------
def _bench(w: World, out: Path, *extra: str) -> list[str]:
    return ["benchmark", "--data", str(w.data), "--models", "derestainer", "--steps", "1", "--seeds", "0",
            "--base-config", "tiny", "--out", str(out), "--device", "cpu", *extra]


@case("config", "benchmark-base-config-malformed")
def _b1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    bad = _bad_config(t, "unknown_key")
    argv = _bench(w, t / "out")
    argv[argv.index("tiny")] = str(bad)
    return argv, bad, [t / "out"]


@case("config", "benchmark-set-unknown-key")
def _b2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _bench(w, t / "out", "--set", "model.ngff=3"), Path("ngff"), [t / "out"]


@case("checkpoint", "benchmark-evaluator-is-a-generator")
def _b3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _bench(w, t / "out", "--evaluator", str(w.model)), w.model, [t / "out" / "results.json"]


@case("checkpoint", "train-comparator-is-a-generator")
def _b4(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _train(w, t / "run", "--set", f"train.comparator={w.model}"), w.model, [t / "run"]


# The speed benchmark ------------------------------------------------------------------------------------
def _speed(*extra: str) -> list[str]:
    return ["bench", "--model", "tiny", "--quick", "--size", "32", "--device", "cpu", *extra]


@case("config", "bench-model-yaml-malformed")
def _s1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    bad = _bad_config(t, "wrong_type")
    argv = _speed()
    argv[argv.index("tiny")] = str(bad)
    return argv, bad, []


@case("config", "bench-set-unknown-key")
def _s2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _speed("--set", "model.ngff=3"), Path("ngff"), []


# A disk that fills up after the up-front checks (the lock was taken, work has begun) ------------------
def _full_on_write(mp: pytest.MonkeyPatch) -> None:
    """Image and safetensors writes fail as on a full disk (the lock file, written first, still fits)."""
    from safetensors import SafetensorError

    def full_image(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(fp))  # type: ignore[arg-type]

    def full_tensors(*a: object, **k: object) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    mp.setattr(Image.Image, "save", full_image)
    mp.setattr("derestainer.core.fileformat.save_file", full_tensors)


@case("disk-full", "translate-disk-fills-while-writing", may_create=("out/.predictions.json.unfinished",))
def _d1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    _full_on_write(mp)
    first = sorted(w.he.glob("*.png"))[0]
    return _tr(w, t / "out", w.he), t / "out" / first.name, [t / "out" / first.name, t / "out" / "predictions.json"]


@case("disk-full", "export-disk-fills-while-writing")
def _d2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    _full_on_write(mp)
    out = t / "e.safetensors"
    return ["export", "-m", str(w.model), "--out", str(out)], out, [out]


@case("disk-full", "train-disk-fills-at-the-first-checkpoint", may_create=("run",))
def _d3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    _full_on_write(mp)
    return (_train(w, t / "run", "--set", "train.ckpt_every=1", "--set", "train.sample_every=0"),
            Path("generator.safetensors"), [t / "run" / "generator.safetensors", t / "run" / "latest"])


# Bad option values -------------------------------------------------------------------------------------
@case("option", "translate-slide-mpp-negative")
def _v1(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _ts(w, t / "out", w.slide, extra=("--mpp", "-1")), Path("--mpp"), [t / "out"]


@case("option", "export-mpp-zero")
def _v2(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return ["export", "-m", str(w.model), "--out", str(t / "e.safetensors"), "--mpp", "0"], Path("--mpp"), \
        [t / "e.safetensors"]


@case("option", "translate-missing-input")
def _v3(w: World, t: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], Path, list[Path]]:
    return _tr(w, t / "out", t / "nope.png"), t / "nope.png", [t / "out"]


# --------------------------------------------------------------------------------------------------
# The test


def _snapshot(*roots: Path) -> dict[Path, str]:
    out = {}
    for r in roots:
        for p in r.rglob("*"):
            if p.is_file():
                out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("c", CASES, ids=[f"{c.cls}:{c.id}" for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(c: Case, world: World, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    argv, named, outputs = c.build(world, tmp_path, monkeypatch)
    before = _snapshot(world.root, tmp_path)
    code, text = _cli(argv)
    monkeypatch.undo()  # an unwritable folder is writable again for the checks
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "Traceback" not in text, text
    assert code in (1, 2), f"exit {code}: {text}"
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, text
    assert str(named.name) in errors[0], f"the message does not name {named.name}: {errors[0]}"
    after = _snapshot(world.root, tmp_path)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"inputs changed or vanished: {changed}"
    new = [p for p in after if p not in before
           and not any(p.is_relative_to(tmp_path / m) for m in c.may_create)]
    assert not new, f"new files after a failed run: {new}"
    for o in outputs:
        assert not o.exists() or o in before, f"{o} exists after a failed run"


# Two writers on one output ----------------------------------------------------------------------------
#: (command, builder → (argv, the locked output, folder?)); the test holds the lock as "another job".
LOCKED: dict[str, Callable[[World, Path], tuple[list[str], Path, bool]]] = {
    "train": lambda w, t: (_train(w, t / "run"), t / "run", True),
    "translate": lambda w, t: (_tr(w, t / "out", w.he), t / "out", True),
    "translate-slide": lambda w, t: (_ts(w, t / "out" / "v.ome.tiff", w.slide), t / "out" / "v.ome.tiff", False),
    "evaluate": lambda w, t: (_ev(w, t / "out"), t / "out", True),
    "separate": lambda w, t: (["separate", str(sorted(w.he.glob("*.png"))[0]), "--out", str(t / "out")], t / "out", True),
    "synth": lambda w, t: (["synth", "--out", str(t / "out"), "--train", "1", "--test", "0", "--size", "32"], t / "out", True),
    "train-classifier": lambda w, t: (_tc(w, t / "c.safetensors"), t / "c.safetensors", False),
    "benchmark": lambda w, t: (["benchmark", "--data", str(w.data), "--models", "derestainer", "--steps", "1",
                                "--seeds", "0", "--base-config", "tiny", "--out", str(t / "out"), "--device", "cpu"],
                               t / "out", True),
    "demo": lambda w, t: (["demo", "--out", str(t / "out"), "--steps", "1"], t / "out", True),
    "bench": lambda w, t: (_speed("--json", str(t / "b.json")), t / "b.json", False),
}


@pytest.mark.parametrize("command", sorted(LOCKED))
def test_a_second_writer_is_refused_naming_the_holder(command: str, world: World, tmp_path: Path) -> None:
    from derestainer.core.guard import output_lock  # here: the corpus also runs against older versions

    argv, target, folder = LOCKED[command](world, tmp_path)
    # a slide's TIFF and side files share one lock, named by their stem (.v.lock)
    lock = target.parent / ".v.lock" if command == "translate-slide" else None
    with output_lock(target, folder=folder, lock=lock):
        before = _snapshot(world.root, tmp_path)
        code, text = _cli(argv)
        after = _snapshot(world.root, tmp_path)
    assert "Traceback" not in text, text
    assert code == 1, text
    assert f"locked by PID {os.getpid()}" in text and target.name in text, text
    assert after == before, "the refused job wrote or changed files"


def test_two_real_training_processes_on_one_run_folder(world: World, tmp_path: Path) -> None:
    """A second ``train`` into a run folder that another process is training in exits 1, naming that
    process, whatever the two processes' speeds (the first trains until the test stops it)."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "derestainer", *_train(world, run)]
    argv[argv.index("train.steps=2")] = "train.steps=1000000"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = run / ".derestainer.lock"
    try:
        deadline = time.monotonic() + 600  # a correctness bound, not a speed one
        while first.poll() is None and time.monotonic() < deadline:
            if lock.is_file() and str(first.pid) in lock.read_text():
                break
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[0]
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"locked by PID {first.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr
        assert first.poll() is None, "the refused job stopped the first one"
    finally:
        first.kill()
        first.communicate()
    assert not (run / "config.yaml").is_file() or "1000000" in (run / "config.yaml").read_text()


CLASSES = ("image", "overlap", "checkpoint", "state", "config", "stain-matrix", "labels", "pairs", "read-only",
           "disk-full", "option")


def test_every_class_has_cases_for_the_commands_that_read_user_files() -> None:
    """Each class is tried; every command that reads user files appears in the corpus."""
    assert {c.cls for c in CASES} == set(CLASSES)
    commands = {c.id.split("-")[0] if not c.id.startswith(("translate-slide", "train-classifier"))
                else "-".join(c.id.split("-")[:2]) for c in CASES}
    assert {"translate", "translate-slide", "evaluate", "export", "train", "train-classifier", "separate",
            "synth", "benchmark", "demo", "bench"} <= commands
