"""Every file a user hands over (generator, classifier, run checkpoint, state.json, optimizer state,
pointer, ImageNet weights, stain matrix) is checked before use: a tampered file is a one-line
CheckpointError / ConfigError that names the file, never a traceback or a large allocation.

Each test builds a tiny good file, tampers one thing in it and checks the error type and message.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from derestainer.core.config import load_config, replace
from derestainer.core.errors import CheckpointError, ConfigError
from derestainer.core.fileformat import META_KEY, load_tensors, read_meta, save_tensors
from derestainer.core.runs import LATEST, find_checkpoint, resolve_generator_file
from derestainer.models import files as files_mod
from derestainer.models.classifier import (
    HER2Classifier,
    independence_warnings,
    load_classifier,
    load_comparator,
    read_classifier_meta,
    save_classifier,
)
from derestainer.models.destainer import load_stain_matrix
from derestainer.models.discriminator import build_discriminator
from derestainer.models.files import load_generator, save_generator
from derestainer.models.generator import build_generator
from derestainer.models.registry import create_generator
from derestainer.training.plaindata import load_optimizer, rng_state, set_rng_state
from derestainer.training.resume import resume_target
from derestainer.training.state import TrainState, load_checkpoint, read_state, save_checkpoint

Meta = dict[str, Any]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_cfg(name: str = "derestainer"):
    return replace(load_config("tiny"), model={"name": name}, data={"size": 32})


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    g = create_generator(cfg.model)
    g(torch.rand(2, 3, 32, 32) * 2 - 1)  # BatchNorm statistics away from their initial values
    return save_generator(tmp_path_factory.mktemp("gen") / "g.safetensors", g, cfg)


@pytest.fixture(scope="module")
def cls_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = HER2Classifier("tiny")
    return save_classifier(tmp_path_factory.mktemp("cls") / "c.safetensors", m, {"size": 32, "seed": 1})


def _rewrite(src: Path, dst: Path, meta: Callable[[Meta], Any] | None = None,
             tensors: Callable[[dict[str, torch.Tensor]], None] | None = None, raw: str | None = None) -> Path:
    """Copy ``src`` to ``dst`` with its metadata and/or tensors changed in place (or raw metadata text)."""
    t = load_file(str(src))
    m = read_meta(src)
    if meta is not None:
        m = meta(m) or m
    if tensors is not None:
        tensors(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(dst), metadata={META_KEY: raw if raw is not None else json.dumps(m)})
    return dst


def _set(path: str, value: Any) -> Callable[[Meta], None]:
    """A metadata edit: ``'config.model.ngf'`` ← ``value`` (``...`` deletes the key)."""
    *parents, last = path.split(".")

    def edit(m: Meta) -> None:
        d = m
        for k in parents:
            d = d[k]
        if value is ...:
            del d[last]
        else:
            d[last] = value

    return edit


# --------------------------------------------------------------------------------------------------
# 1. The metadata entry itself


@pytest.mark.parametrize("raw,match", [
    ("{not json", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),  # deeper than the JSON parser recurses
    ("[1, 2]", "JSON list, expected an object"),
    ('"generator"', "JSON str, expected an object"),
    ("null", "JSON NoneType, expected an object"),
])
@pytest.mark.parametrize("loader", ["generator", "classifier"])
def test_metadata_that_is_not_a_json_object(gen_file: Path, cls_file: Path, tmp_path: Path, raw: str, match: str, loader: str) -> None:
    src = gen_file if loader == "generator" else cls_file
    bad = _rewrite(src, tmp_path / "bad.safetensors", raw=raw)
    load = load_generator if loader == "generator" else load_classifier
    with pytest.raises(CheckpointError, match=rf"^{bad}: .*{match}"):
        load(bad)


def test_unexpected_tensor_dtype_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "f8.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(p), metadata={META_KEY: json.dumps({"kind": "generator"})})
    with pytest.raises(CheckpointError, match=rf"^{p}: tensor 'w' has dtype F8_E4M3, which derestainer never writes"):
        load_tensors(p)


# --------------------------------------------------------------------------------------------------
# 2. Generator files: metadata, then tensors against the model built on the meta device


GENERATOR_META_CASES = [
    ("kind", "classifier", "this is a classifier checkpoint, expected a generator checkpoint"),
    ("kind", ["x"], "this is a unknown checkpoint"),
    ("format", 99, "file format 99"),
    ("format", "1", "file format '1'"),
    ("config", "abc", "no config object"),
    ("config", ..., "no config object"),
    ("config.model.name", "nope", "model 'nope' is not a generator"),
    ("config.model.name", "", "model.name: expected a model name"),
    ("config.model.encoder_input", "lab", "encoder_input: expected one of h, rgb, h\\+rgb"),
    ("config.model.n_levels", 0, "n_levels: expected at least 2"),
    ("config.model.ngf", -1, "model.ngf: expected an integer ≥ 1"),
    ("config.model.ngf", True, "model.ngf: expected an integer"),
    ("config.model.ndf", 0, "model.ndf: expected an integer ≥ 1"),
    ("config.model.n_fusion_blocks", 10**6, "model.n_fusion_blocks=1000000, but the file holds"),
    ("config.model.n_down", 10**9, "model.n_down=1000000000, but the file holds"),
    ("config.model.norm", "instance", "cannot be built from its config"),
    ("config.model.wat", 1, "unknown config key"),
    ("config.data.mpp", "abc", "data.mpp: expected a number"),
    ("config.data.mpp", 0, "data.mpp: expected a positive number"),
    ("config.data.mpp", float("nan"), "data.mpp: expected a positive number"),
    ("config.data.size", 0, "data.size: expected an image size"),
    ("model", "pix2pix", "names model 'pix2pix' but its config 'derestainer'"),
    ("size", "abc", "size='abc'"),
    ("size", 0, "size=0"),
    ("size", -3, "size=-3"),
    ("size", True, "size=True"),
    ("size", 32.5, "size=32.5"),
    ("mpp", "abc", "mpp='abc'"),
    ("mpp", 0, "mpp=0"),
    ("mpp", -1.0, "mpp=-1.0"),
    ("mpp", float("nan"), "mpp=nan"),
    ("mpp", float("inf"), "mpp=inf"),
    ("mpp", False, "mpp=False"),
    ("mpp", None, "mpp=None"),
]


@pytest.mark.parametrize("key,value,match", GENERATOR_META_CASES)
def test_generator_metadata_is_checked_before_anything_is_built(
    gen_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: Any, match: str
) -> None:
    bad = _rewrite(gen_file, tmp_path / "bad.safetensors", meta=_set(key, value))
    devices = _spy_builds(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"^{bad}: .*{match}"):
        load_generator(bad)
    assert all(d == "meta" for d in devices)  # nothing was built with real memory


def _spy_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the default device of every generator build of load_generator."""
    devices: list[str] = []
    real = files_mod.create_generator

    def spy(model_cfg: Any) -> torch.nn.Module:
        devices.append(torch.empty(0).device.type)
        return real(model_cfg)

    monkeypatch.setattr(files_mod, "create_generator", spy)
    return devices


def test_huge_widths_are_never_materialised(gen_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ngf=4096 would be ~10^10 parameters (40 GB): built on the meta device only, refused by shape
    bad = _rewrite(gen_file, tmp_path / "wide.safetensors", meta=_set("config.model.ngf", 4096))
    devices = _spy_builds(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"^{bad}: weights do not fit model 'derestainer' \(tensor '.*' has shape"):
        load_generator(bad)
    assert devices == ["meta"]


def _permute(t: dict[str, torch.Tensor]) -> None:
    key = next(k for k, v in t.items() if v.ndim == 4 and v.shape[0] != v.shape[1])
    t[key] = t[key].transpose(0, 1).contiguous()


def _first_float(t: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in t.items() if v.is_floating_point() and v.ndim == 4)


def _retype(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        k = _first_float(t)
        t[k] = t[k].to(dtype)
    return edit


def _nan(t: dict[str, torch.Tensor]) -> None:
    k = _first_float(t)
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")


def _singular_stain(t: dict[str, torch.Tensor]) -> None:
    t["destainer.separation.rgb_from_hed"] = torch.tensor([[1.0, 2, 3], [2, 4, 6], [0, 0, 1]])


GENERATOR_TENSOR_CASES = [
    (_permute, r"weights do not fit model 'derestainer' \(tensor '.*' has shape"),
    (_retype(torch.float16), r"weights do not fit model 'derestainer' \(tensor '.*' is torch.float16, expected torch.float32\)"),
    (_retype(torch.int64), r"tensor '.*' is torch.int64, expected torch.float32"),
    (lambda t: t.pop("restainer.out.1.weight", None) if "restainer.out.1.weight" in t else t.pop(next(iter(t))),
     r"weights do not fit model 'derestainer' \(missing \["),
    (lambda t: t.update(extra=torch.zeros(3)), r"unexpected \['extra'\]"),
    (_nan, r"holds non-finite values"),
    (_singular_stain, r"tensor 'destainer.separation.rgb_from_hed': stain matrix: the matrix is singular"),
]


@pytest.mark.parametrize("edit,match", GENERATOR_TENSOR_CASES)
def test_generator_tensors_are_checked_by_name_shape_and_dtype(gen_file: Path, tmp_path: Path, edit: Any, match: str) -> None:
    bad = _rewrite(gen_file, tmp_path / "bad.safetensors", tensors=edit)
    with pytest.raises(CheckpointError, match=rf"^{bad}: .*{match}"):
        load_generator(bad)


@pytest.mark.parametrize("name", ["derestainer", "pix2pix", "pix2pixhd"])
def test_good_generators_still_load_bit_identically(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    cfg = _tiny_cfg(name)
    g = create_generator(cfg.model)
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    path = save_generator(tmp_path / "g.safetensors", g, cfg, extra={"step": 7})
    devices = _spy_builds(monkeypatch)
    g2, cfg2, meta = load_generator(path)
    assert devices == ["meta", "cpu"]  # checked on the meta device, then built once for real
    assert cfg2 == cfg and meta["step"] == 7 and not g2.training
    ref = g.state_dict()
    for k, v in g2.state_dict().items():
        assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(g.eval()(x).ihc, g2(x).ihc)


def test_a_custom_stain_matrix_buffer_still_loads(tmp_path: Path) -> None:
    m = np.array([[0.6, 0.7, 0.3], [0.1, 0.9, 0.2], [0.3, 0.6, 0.7]])
    np.save(tmp_path / "m.npy", m)
    cfg = replace(_tiny_cfg(), model={"stain_matrix": str(tmp_path / "m.npy")})
    path = save_generator(tmp_path / "g.safetensors", build_generator(cfg.model), cfg)
    (tmp_path / "m.npy").unlink()  # loading does not need the matrix file
    g2, _, _ = load_generator(path)
    np.testing.assert_allclose(g2.destainer.separation.rgb_from_hed.numpy(), m, rtol=1e-6)


def test_unknown_model_name_in_a_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.name: unknown model 'nope'; available: .*derestainer"):
        create_generator(replace(_tiny_cfg(), model={"name": "nope"}).model)
    with pytest.raises(ConfigError, match="model.encoder_input: expected one of h, rgb, h\\+rgb, got 'lab'"):
        load_config("tiny", ["model.encoder_input=lab"])
    with pytest.raises(ConfigError, match="data.mpp: expected a positive number"):
        load_config("tiny", ["data.mpp=-1"])


# --------------------------------------------------------------------------------------------------
# 3. Classifier files, the comparator, and ImageNet weights


CLASSIFIER_CASES: list[tuple[Callable[[Meta], Any] | None, Any, str]] = [
    (_set("kind", "generator"), None, "this is a generator checkpoint, expected a classifier checkpoint"),
    (_set("arch", "vit"), None, "arch='vit'"),
    (_set("n_levels", 1), None, "n_levels=1"),
    (_set("n_levels", "4"), None, "n_levels='4'"),
    (_set("n_levels", True), None, "n_levels=True"),
    (_set("n_levels", 10**12), None, r"weights do not fit classifier 'tiny' \(tensor 'fc.weight' has shape"),
    (_set("size", "abc"), None, "size='abc'"),
    (_set("size", 0), None, "size=0"),
    (None, _permute, r"weights do not fit classifier 'tiny' \(tensor '.*' has shape"),
    (None, _retype(torch.float16), r"tensor '.*' is torch.float16, expected torch.float32"),
    (None, _nan, "holds non-finite values"),
    (None, lambda t: t.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
]


@pytest.mark.parametrize("meta,tensors,match", CLASSIFIER_CASES)
@pytest.mark.parametrize("loader", [load_classifier, load_comparator])
def test_classifier_files_are_checked(cls_file: Path, tmp_path: Path, meta: Any, tensors: Any, match: str, loader: Any) -> None:
    bad = _rewrite(cls_file, tmp_path / "bad.safetensors", meta=meta, tensors=tensors)
    with pytest.raises(CheckpointError, match=rf"^{bad}: .*{match}"):
        loader(bad)


def test_a_generator_given_as_classifier_or_comparator(gen_file: Path, cls_file: Path) -> None:
    msg = rf"^{gen_file}: this is a generator checkpoint, expected a classifier checkpoint"
    for fn in (load_classifier, load_comparator, read_classifier_meta):
        with pytest.raises(CheckpointError, match=msg):
            fn(gen_file)
    with pytest.raises(CheckpointError, match="the comparator: this is a generator checkpoint"):
        independence_warnings(read_meta(gen_file), read_meta(cls_file))
    # good files: unchanged
    model, meta = load_classifier(cls_file)
    assert read_classifier_meta(cls_file) == meta
    torch.manual_seed(0)
    ref = HER2Classifier("tiny")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def _load_convert_script() -> Any:
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_weights.py"
    spec = importlib.util.spec_from_file_location("convert_weights", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".PTH"])
def test_pretrained_pth_is_refused_unopened_and_its_conversion_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(5)
    state = {f"module.{k}": v.clone() for k, v in resnet18(weights=None).state_dict().items()}
    pth = tmp_path / f"r18{suffix}"
    torch.save({"state_dict": state}, pth)
    real_load = torch.load

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load must never be called by derestainer")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError, match=rf"^{pth}: PyTorch pickle files are not loaded .*scripts/convert_weights.py {pth} "):
        HER2Classifier("resnet18", pretrained_weights=pth)
    monkeypatch.setattr(torch, "load", real_load)  # the one-off conversion, run by the user
    out = tmp_path / "r18.safetensors"
    assert _load_convert_script().main([str(pth), str(out)]) == 0
    monkeypatch.setattr(torch, "load", no_load)
    m = HER2Classifier("resnet18", pretrained_weights=out)
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, state[f"module.{k}"]), k


def test_pretrained_weights_of_the_wrong_dtype_or_values(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    ints = {k: (v.long() if k == "conv1.weight" else v) for k, v in state.items()}
    save_file(ints, str(tmp_path / "ints.safetensors"))
    with pytest.raises(CheckpointError, match=r"ints.safetensors: tensor 'conv1.weight' is torch.int64, expected torch.float32"):
        HER2Classifier("resnet18", pretrained_weights=tmp_path / "ints.safetensors")
    nan = {k: (torch.full_like(v, math.nan) if k == "conv1.weight" else v) for k, v in state.items()}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"nan.safetensors: tensor 'conv1.weight' holds non-finite"):
        HER2Classifier("resnet18", pretrained_weights=tmp_path / "nan.safetensors")


# --------------------------------------------------------------------------------------------------
# 4. Stain-matrix files


def _npy_pickle(p: Path) -> None:
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _npz(p: Path) -> None:
    with open(p, "wb") as f:
        np.savez(f, m=np.eye(3))


STAIN_CASES: list[tuple[str, Callable[[Path], Any], str]] = [
    ("m.npy", _npy_pickle, "not a plain .npy array"),
    ("m.npy", lambda p: p.write_bytes(os.urandom(64)), "not a plain .npy array"),
    ("m.npy", lambda p: p.write_bytes(b""), "not a plain .npy array"),
    ("m.npy", _npz, "an .npz archive"),
    ("m.npy", lambda p: np.save(p, np.array([["a", "b", "c"]] * 3)), "holds a <U1 array of shape \\(3, 3\\)"),
    ("m.npy", lambda p: np.save(p, np.eye(3, 4)), "shape \\(3, 4\\)"),
    ("m.npy", lambda p: np.save(p, np.full((3, 3), np.nan)), "expected a finite 3x3"),
    ("m.npy", lambda p: np.save(p, np.array([[1.0, 2, 3], [2, 4, 6], [0, 0, 1]])), "singular"),
    ("m.npy", lambda p: np.save(p, np.diag([1.0, 1.0, 1e-7])), "singular"),
    ("m.json", lambda p: p.write_text("{nope"), "not valid JSON"),
    ("m.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    ("m.json", lambda p: p.write_text("[" * 100_000), "not valid JSON"),
    ("m.json", lambda p: p.write_text('[["a", 1, 2], [1, 2, 3], [4, 5, 6]]'), "expected a 3x3 list of numbers"),
    ("m.json", lambda p: p.write_text("[[1, 2], [3]]"), "expected a 3x3 list of numbers"),
    ("m.json", lambda p: p.write_text('{"h": "abc", "e": [1, 0, 0]}'), "stain matrix file: "),
    ("m.json", lambda p: p.write_text('{"h": {"x": 1}, "e": [1, 0, 0]}'), "stain matrix file: "),
    ("m.json", lambda p: p.write_text('{"hematoxylin": [1, 0, 0]}'), "unknown keys"),
    ("m.json", lambda p: p.write_text("[[NaN, 0, 0], [0, 1, 0], [0, 0, 1]]"), "expected a finite 3x3"),
    ("m.json", lambda p: p.write_text("[[1, 0, 0], [0, 1, 0], [0, 0, 1e400]]"), "expected a finite 3x3"),
    ("m.txt", lambda p: p.write_text("1"), "unsupported extension"),
    ("missing.npy", lambda p: None, "stain matrix file does not exist"),
]


@pytest.mark.parametrize("name,write,match", STAIN_CASES)
def test_stain_matrix_files_are_config_errors_naming_the_file(tmp_path: Path, name: str, write: Any, match: str) -> None:
    p = tmp_path / name
    write(p)
    with pytest.raises(ConfigError, match=rf"^{p}: .*{match}"):
        load_stain_matrix(str(p))
    with pytest.raises(ConfigError, match=rf"^{p}: "):  # the same through the config of a generator
        build_generator(replace(_tiny_cfg(), model={"stain_matrix": str(p)}).model)


# --------------------------------------------------------------------------------------------------
# 5. Run checkpoints: state.json, RNG states, optimizer states, pointers


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A run folder with one complete checkpoint (step 4) of the tiny model, optimizers with state."""
    torch.manual_seed(0)
    cfg = replace(_tiny_cfg(), train={"out": str(tmp_path_factory.mktemp("run"))})
    g, d = create_generator(cfg.model), build_discriminator(cfg.model)
    opt_g, opt_d = torch.optim.AdamW(g.parameters(), lr=1e-3), torch.optim.AdamW(d.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    g(x).ihc.mean().backward()
    opt_g.step()
    sum(o.mean() for o in d(x, x)).backward()
    opt_d.step()
    state = TrainState(step=4, epoch=1, batch_in_epoch=2, rng=[rng_state()])
    save_checkpoint(cfg.train.out, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, cfg=cfg, state=state)
    return Path(cfg.train.out), cfg


def _ckpt(run: tuple[Path, Any]) -> Path:
    return run[0] / "checkpoints" / "step-0000004"


def _copy_ckpt(run: tuple[Path, Any], tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run[0], dst)
    return dst / "checkpoints" / "step-0000004"


def _good_rng() -> dict[str, Any]:
    return rng_state()


def _rng_edit(part: str, value: Any) -> Callable[[Meta], None]:
    def edit(d: Meta) -> None:
        r = _good_rng()
        if part.startswith("numpy."):
            r["numpy"][int(part.split(".")[1])] = value
        elif part.startswith("python."):
            r["python"][int(part.split(".")[1])] = value
        else:
            r[part] = value
        d["rng"] = [r]
    return edit


STATE_CASES: list[tuple[Any, str]] = [
    ("{not json", "unreadable training state"),
    ("[1, 2]", "the training state is a JSON list, expected an object"),
    (_set("kind", "other"), "not a derestainer training state"),
    (_set("config", "abc"), "its config is not an object of sections"),
    (_set("config", {"model": 3}), "its config is not an object of sections"),
    (_set("step", "abc"), "step='abc', expected an integer ≥ 0"),
    (_set("step", -1), "step=-1"),
    (_set("step", 1.5), "step=1.5"),
    (_set("step", True), "step=True"),
    (_set("epoch", None), "epoch=None"),
    (_set("world_size", 0), "world_size=0, expected an integer ≥ 1"),
    (_set("best_value", "x"), "best_value='x'"),
    (_set("best_step", -2), "best_step=-2"),
    (_set("history", "x"), "history is not a list of objects"),
    (_set("history", [1]), "history is not a list of objects"),
    (_set("rng", "x"), "rng: RNG state is a str, expected an object"),
    (_set("rng", [{"python": 1}]), r"rng\[0\]: RNG state without numpy, torch"),
    (_rng_edit("torch", base64.b64encode(bytes(5055)).decode()), r"rng\[0\]: malformed RNG state \(.*size"),
    (_rng_edit("torch", base64.b64encode(bytes(5056)).decode()), r"malformed RNG state \(Invalid mt19937 state"),
    (_rng_edit("torch", "!!not base64!!"), "malformed RNG state"),
    (_rng_edit("torch", 17), "malformed RNG state"),
    (_rng_edit("numpy.0", "PCG64"), "numpy: expected MT19937"),
    (_rng_edit("numpy.1", [1, 2, 3]), "numpy: expected MT19937 with 624"),
    (_rng_edit("numpy.1", [-1] * 624), "numpy: expected MT19937 with 624"),
    (_rng_edit("numpy.2", 10**6), "numpy: pos must be 0..624"),
    (_rng_edit("numpy.4", "x"), "cached_gaussian must be a finite number"),
    (_rng_edit("numpy", "garbage"), "numpy: expected \\[kind"),
    (_rng_edit("python.0", 99), "malformed RNG state"),
    (_rng_edit("python.1", [0] * 10), "malformed RNG state"),
    (_rng_edit("python.2", "x"), "python: gauss must be null or a number"),
    (_rng_edit("cuda", ["%%%"]), "malformed RNG state"),
]


@pytest.mark.parametrize("edit,match", STATE_CASES)
def test_malformed_state_json_is_refused_before_any_training_work(
    run: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Any, match: str
) -> None:
    ckpt = _copy_ckpt(run, tmp_path)
    p = ckpt / "state.json"
    if isinstance(edit, str):
        p.write_text(edit)
    else:
        data = json.loads(p.read_text())
        edit(data)
        p.write_text(json.dumps(data))
    pattern = rf"^{p}: .*{match}"
    with pytest.raises(CheckpointError, match=pattern):
        read_state(ckpt)
    from derestainer.training.distributed import DistEnv

    env = DistEnv()
    for target in (ckpt, ckpt.parent.parent):  # the checkpoint, and its run folder through 'latest'
        with pytest.raises(CheckpointError, match=pattern):
            resume_target(ckpt.parent.parent, target if target == ckpt else "latest", env)


def test_a_malformed_rng_state_restores_nothing() -> None:
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    bad = _good_rng()
    bad["numpy"][2] = 10**6  # numpy itself would accept this position (and read out of bounds)
    bad["torch"] = base64.b64encode(bytes(1)).decode()
    with pytest.raises(CheckpointError, match="^state.json: rng: malformed RNG state"):
        set_rng_state(bad, "state.json: rng")
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    good = _good_rng()
    set_rng_state(good)
    assert rng_state() == good


def test_the_trainer_refuses_a_bad_state_before_building_models(run: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derestainer.training import setup as setup_mod
    from derestainer.training.loop import Trainer

    ckpt = _copy_ckpt(run, tmp_path)
    (ckpt / "state.json").write_text(json.dumps({**json.loads((ckpt / "state.json").read_text()), "step": "abc"}))

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("models built before the state was checked")

    monkeypatch.setattr(setup_mod, "build_models", no_build)
    cfg = replace(run[1], train={"out": str(ckpt.parent.parent), "device": "cpu", "tensorboard": "off"})
    with pytest.raises(CheckpointError, match=rf"^{ckpt / 'state.json'}: step='abc'"):
        Trainer(cfg, resume=ckpt)


def _optim_edit(fn: Callable[[dict[str, torch.Tensor], Meta], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        t, m = load_tensors(path)
        fn(t, m)
        save_tensors(path, t, m)
    return edit


def _moment(t: dict[str, torch.Tensor], m: Meta) -> str:
    """The tensor key of the first parameter's exp_avg (a non-scalar moment)."""
    first = m["structure"]["state"]["__int_keys__"][0][1]
    return str(first["exp_avg"]["__tensor__"])


def _reshape_moment(t: dict[str, torch.Tensor], m: Meta) -> None:
    k = _moment(t, m)
    t[k] = torch.zeros(t[k].numel() + 1)


def _int_moment(t: dict[str, torch.Tensor], m: Meta) -> None:
    k = _moment(t, m)
    t[k] = t[k].long()


OPTIM_CASES: list[tuple[Any, str]] = [
    (_optim_edit(_reshape_moment), "optimizer state 'exp_avg' of parameter 0 has shape"),
    (_optim_edit(_int_moment), "optimizer state 'exp_avg' of parameter 0 is not finite floating point"),
    (_optim_edit(lambda t, m: m["structure"]["param_groups"][0].update(lr="abc")), "optimizer setting lr='abc' does not fit"),
    (_optim_edit(lambda t, m: m["structure"]["param_groups"][0].update(betas=[0.9])), "optimizer setting betas=\\[0.9\\]"),
    (_optim_edit(lambda t, m: m["structure"]["param_groups"][0]["params"].pop()), "parameter groups differ"),
    (_optim_edit(lambda t, m: m["structure"]["param_groups"][0]["params"].__setitem__(0, "x")), "malformed parameter ids"),
    (_optim_edit(lambda t, m: m["structure"]["state"]["__int_keys__"][0].__setitem__(0, 10**6)), "unknown parameter 1000000"),
    (_optim_edit(lambda t, m: m["structure"]["state"]["__int_keys__"][0].__setitem__(0, "x")), "malformed optimizer state structure"),
    (_optim_edit(lambda t, m: m["structure"].update(state={"__int_keys__": [[1]]})), "malformed optimizer state structure"),
    (_optim_edit(lambda t, m: m.update(structure=[1, 2])), "not an optimizer state_dict"),
    (_optim_edit(lambda t, m: t.pop(_moment(t, m))), "malformed optimizer state structure .*missing"),
    (_optim_edit(lambda t, m: m.update({"class": "SGD"})), "optimizer state of a SGD"),
]


@pytest.mark.parametrize("edit,match", OPTIM_CASES)
def test_optimizer_states_that_do_not_fit(run: tuple[Path, Any], tmp_path: Path, edit: Any, match: str) -> None:
    ckpt = _copy_ckpt(run, tmp_path)
    p = ckpt / "optim_g.safetensors"
    edit(p)
    torch.manual_seed(0)
    g = create_generator(run[1].model)
    opt = torch.optim.AdamW(g.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match=rf"^{p}: .*{match}"):
        load_optimizer(p, opt)
    assert opt.state_dict()["state"] == {}  # untouched


def test_a_good_checkpoint_still_loads(run: tuple[Path, Any]) -> None:
    ckpt, cfg = _ckpt(run), run[1]
    torch.manual_seed(1)
    g, d = create_generator(cfg.model), build_discriminator(cfg.model)
    opt_g, opt_d = torch.optim.AdamW(g.parameters(), lr=1e-3), torch.optim.AdamW(d.parameters(), lr=1e-3)
    state = load_checkpoint(ckpt, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, cfg=cfg)
    assert (state.step, state.epoch, state.batch_in_epoch) == (4, 1, 2)
    stored = load_file(str(ckpt / "generator.safetensors"))
    assert all(torch.equal(v, stored[k]) for k, v in g.state_dict().items())
    assert len(opt_g.state_dict()["state"]) > 0


def test_discriminator_weights_of_another_dtype(run: tuple[Path, Any], tmp_path: Path) -> None:
    ckpt = _copy_ckpt(run, tmp_path)
    p = ckpt / "discriminator.safetensors"
    t, m = load_tensors(p)
    k = next(k for k, v in t.items() if v.is_floating_point())
    t[k] = t[k].half()
    save_tensors(p, t, m)
    cfg = run[1]
    g, d = create_generator(cfg.model), build_discriminator(cfg.model)
    opt_g, opt_d = torch.optim.AdamW(g.parameters()), torch.optim.AdamW(d.parameters())
    with pytest.raises(CheckpointError, match=rf"^{p}: weights do not fit this discriminator \(tensor '{k}' is torch.float16"):
        load_checkpoint(ckpt, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, cfg=cfg)


@pytest.mark.parametrize("text", ["../../elsewhere", "/tmp", "checkpoints/../../x", "..", b"\xff\xfe", "a\nb", "x" * 5000])
def test_pointers_must_stay_inside_their_run_folder(run: tuple[Path, Any], tmp_path: Path, text: str | bytes) -> None:
    ckpt = _copy_ckpt(run, tmp_path)
    root = ckpt.parent.parent
    (root / LATEST).unlink()
    (root / LATEST).write_bytes(text if isinstance(text, bytes) else text.encode())
    pattern = rf"^{root / LATEST}: "
    with pytest.raises(CheckpointError, match=pattern):
        find_checkpoint(root)
    with pytest.raises(CheckpointError, match=pattern):
        resolve_generator_file(root)


def test_good_pointers_and_checkpoint_folder_permissions(run: tuple[Path, Any], tmp_path: Path) -> None:
    ckpt = _copy_ckpt(run, tmp_path)
    root = ckpt.parent.parent
    assert find_checkpoint(root) == ckpt
    (root / LATEST).write_text("./checkpoints//step-0000004\n")
    assert find_checkpoint(root).resolve() == ckpt.resolve()
    # a checkpoint folder gets the permissions of any new folder (the umask), not mkdtemp's 0700
    old = os.umask(0o022)
    try:
        cfg = run[1]
        g = create_generator(cfg.model)
        opt = torch.optim.AdamW(g.parameters())
        out = save_checkpoint(root, generator=g, discriminator=None, opt_g=opt, opt_d=None, cfg=cfg, state=TrainState(step=9))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
