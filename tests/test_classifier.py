"""HER2 classifier (comparator C / semantic evaluator), its checkpoints and its training loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from derestainer.core.errors import CheckpointError, ClassifierDataError
from derestainer.core.fileformat import save_tensors
from derestainer.core.levels import confusion_matrix
from derestainer.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HER2Classifier,
    freeze,
    independence_warnings,
    load_classifier,
    load_comparator,
    names_hash,
    prepare_images,
    save_classifier,
)
from derestainer.stain.functional import hed_to_rgb
from derestainer.training.classifier import fit_classifier, report_path, train_classifier
from derestainer.training.classifier_data import stratified_split, subset_indices
from derestainer.training.classifier_loop import augment_batch, lr_lambda
from derestainer.training.classifier_metrics import classification_metrics, format_confusion

# --------------------------------------------------------------------------------------------------
# Synthetic IHC-like data: hematoxylin texture everywhere, DAB amplitude growing with the level.


def make_ihc(level: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 [3,S,S] rendered by Beer–Lambert from H and DAB concentration maps."""
    g = torch.Generator().manual_seed(seed)
    h = 0.02 + 0.02 * torch.rand(1, size, size, generator=g)
    dab = (0.025 * level) * (0.8 + 0.4 * torch.rand(1, size, size, generator=g))
    hed = torch.cat([h, torch.zeros_like(h), dab]).double()
    rgb = hed_to_rgb(hed)
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8)


def make_items(n_per_level: int, seed: int, size: int = 32, levels: tuple[int, ...] = (0, 1, 2, 3)) -> list[dict]:
    items = []
    for _ in range(n_per_level):
        for lv in levels:
            ihc = make_ihc(lv, seed * 100_003 + len(items), size)
            items.append({"he": torch.zeros_like(ihc), "ihc": ihc, "level": lv, "name": f"{len(items):05d}_train_{lv}"})
    return items


class LevelsDataset(torch.utils.data.Dataset):
    """A dataset exposing ``levels`` and ``names`` attributes, like the package's paired datasets."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items
        self.levels = [it["level"] for it in items]
        self.names = [it["name"] for it in items]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return self.items[i]


def _perturb_bn(model: nn.Module, size: int = 32) -> None:
    """Run a few train-mode forwards so that BatchNorm running statistics are not their defaults."""
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(s)) * 2 - 1)
    model.eval()


# --------------------------------------------------------------------------------------------------
# Model


def test_tiny_shapes_and_size() -> None:
    torch.manual_seed(0)
    m = HER2Classifier("tiny", n_levels=4).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert m(x).shape == (5, 4)
    f = m.features(x)
    assert f.shape == (5, m.feature_dim) and m.feature_dim == 32
    n_params = sum(p.numel() for p in m.parameters())
    assert 1_000 < n_params < 10_000
    # forward is the linear head on the features
    torch.testing.assert_close(m(x), m.fc(f))
    logits, f2 = m.forward_with_features(x)
    torch.testing.assert_close(logits, m(x))
    torch.testing.assert_close(f2, f)
    # non-square and other sizes work (global pooling)
    assert m(torch.zeros(2, 3, 48, 40)).shape == (2, 4)


def test_normalisation_is_imagenet_on_unit_range() -> None:
    m = HER2Classifier("tiny")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(m.normalize(x), ((x + 1) / 2 - mean) / std)
    # mean/std are constants, not part of the checkpoint
    assert not any(k in ("mean", "std") for k in m.state_dict())
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        m(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        m(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_forward(size: int) -> None:
    torch.manual_seed(0)
    m = HER2Classifier("resnet18").eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        assert m(x).shape == (2, 4)
        assert m.features(x).shape == (2, 512) and m.feature_dim == 512


def test_resnet50_feature_dim() -> None:
    m = HER2Classifier("resnet50", n_levels=3).eval()
    assert m.feature_dim == 2048 and m.fc.out_features == 3
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown classifier architecture"):
        HER2Classifier("vgg16")
    with pytest.raises(ValueError, match="resnet"):
        HER2Classifier("tiny", pretrained_weights="weights.safetensors")


def test_prepare_images() -> None:
    img = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4)
    x = prepare_images(img)
    assert x.shape == (1, 3, 4, 4)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    y = prepare_images(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8), 16)
    assert y.shape == (2, 3, 16, 16) and y.min() >= -1 and y.max() <= 1
    # a constant image stays constant through the resize
    torch.testing.assert_close(prepare_images(img, 2), x[:, :, :2, :2])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    m = HER2Classifier("tiny")
    _perturb_bn(m)
    path = save_classifier(tmp_path / "c.safetensors", m, {"size": 32, "seed": 3, "train_images_hash": "abc", "accuracy": 0.5})
    m2, meta = load_classifier(path)
    assert not m2.training
    assert meta["kind"] == "classifier" and meta["arch"] == "tiny" and meta["n_levels"] == 4
    assert meta["size"] == 32 and meta["seed"] == 3 and meta["accuracy"] == 0.5
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        assert torch.equal(m.features(x), m2.features(x))
    c, cmeta = load_comparator(path)
    assert c.frozen and not c.train().training and cmeta == meta
    assert not any(p.requires_grad for p in c.parameters())
    with torch.no_grad():
        assert torch.equal(c.features(x), m.features(x))


def test_save_requires_classifier(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="HER2Classifier"):
        save_classifier(tmp_path / "x.safetensors", nn.Linear(2, 2), {})


def test_load_wrong_kind_and_garbage(tmp_path: Path) -> None:
    gen = tmp_path / "gen.safetensors"
    save_tensors(gen, {"w": torch.zeros(2)}, {"kind": "generator"})
    with pytest.raises(CheckpointError, match="generator checkpoint, expected a classifier"):
        load_classifier(gen)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_classifier(junk)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_classifier(tmp_path / "missing.safetensors")
    # right kind, wrong weights
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, {"fc.weight": torch.zeros(4, 32)}, {"kind": "classifier", "arch": "tiny", "n_levels": 4})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(bad)
    unknown = tmp_path / "unknown.safetensors"
    save_tensors(unknown, {}, {"kind": "classifier", "arch": "vit", "n_levels": 4})
    with pytest.raises(CheckpointError, match="vit"):
        load_classifier(unknown)


# --------------------------------------------------------------------------------------------------
# Freezing (the comparator)


def test_freeze_pins_eval_mode_and_passes_gradients() -> None:
    torch.manual_seed(0)
    cmp = freeze(HER2Classifier("tiny"))
    assert cmp.frozen and not cmp.training
    assert all(not p.requires_grad for p in cmp.parameters())

    class Holder(nn.Module):  # a generator-like parent that holds the comparator as a sub-module
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.cmp = cmp

    parent = Holder().train()
    assert parent.training and parent.conv.training
    assert not cmp.training and not any(m.training for m in cmp.modules())
    bn = next(m for m in cmp.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    f = parent.cmp.features(parent.conv(x))
    assert torch.equal(bn.running_mean, before)  # running statistics untouched
    f.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients flow through to the input
    assert parent.conv.weight.grad is not None
    assert all(p.grad is None for p in cmp.parameters())
    # an unfrozen classifier follows .train() as usual
    free = HER2Classifier("tiny").eval()
    free.train()
    assert free.training


# --------------------------------------------------------------------------------------------------
# Local ImageNet weights


def _resnet18_file(tmp_path: Path, fmt: str, prefix: str = "") -> tuple[Path, dict[str, torch.Tensor]]:
    from torchvision.models import resnet18

    torch.manual_seed(123)
    net = resnet18(weights=None)
    _perturb_bn(net)
    state = {prefix + k: v.clone() for k, v in net.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        p = tmp_path / "r18.safetensors"
        save_file(state, str(p))
    else:
        p = tmp_path / "r18.pth"
        torch.save({"state_dict": state}, p)
    return p, state


def _convert_weights(src: Path, dst: Path) -> Path:
    """Run scripts/convert_weights.py (the one place allowed to torch.load a .pth) on ``src``."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_weights.py"
    spec = importlib.util.spec_from_file_location("convert_weights", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(src), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("pth", "module.")])
def test_pretrained_weights_from_local_file(tmp_path: Path, fmt: str, prefix: str) -> None:
    path, state = _resnet18_file(tmp_path, fmt, prefix)
    if fmt == "pth":  # a .pth is refused; its one-off conversion to safetensors loads
        with pytest.raises(CheckpointError, match="convert_weights.py"):
            HER2Classifier("resnet18", pretrained_weights=path)
        path = _convert_weights(path, tmp_path / "r18_converted.safetensors")
    torch.manual_seed(0)
    scratch = HER2Classifier("resnet18")
    torch.manual_seed(0)
    m = HER2Classifier("resnet18", pretrained_weights=path)
    own = m.backbone.state_dict()
    changed = 0
    for k, v in own.items():
        ref = state[prefix + k]
        assert torch.equal(v, ref.to(v.dtype)), k
        changed += not torch.equal(scratch.backbone.state_dict()[k], v)
    assert changed > 50  # the weights did change from the random initialisation
    # the file's 1000-way fc is ignored: the HER2 head keeps its shape and its own initialisation
    assert m.fc.weight.shape == (4, 512)
    torch.testing.assert_close(m.fc.weight, scratch.fc.weight)


def test_pretrained_weights_errors(tmp_path: Path) -> None:
    path, _ = _resnet18_file(tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match="another architecture"):
        HER2Classifier("resnet50", pretrained_weights=path)
    with pytest.raises(CheckpointError, match="never downloaded"):
        HER2Classifier("resnet18", pretrained_weights=tmp_path / "nope.pth")
    pickled = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "obj": Path("x")}, pickled)
    with pytest.raises(CheckpointError, match="evil.pth: PyTorch pickle files are not loaded"):
        HER2Classifier("resnet18", pretrained_weights=pickled)
    disguised = tmp_path / "evil.safetensors"  # a pickle under a safetensors name: refused, not unpickled
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(CheckpointError, match="evil.safetensors: not a readable safetensors file.*convert_weights"):
        HER2Classifier("resnet18", pretrained_weights=disguised)


# --------------------------------------------------------------------------------------------------
# Pure training helpers


def test_confusion_matrix_against_brute_force(rng: np.random.Generator) -> None:
    t = rng.integers(0, 4, 200)
    p = rng.integers(0, 4, 200)
    cm = confusion_matrix(t, p, 4)
    ref = np.zeros((4, 4), dtype=np.int64)
    for a, b in zip(t, p, strict=True):
        ref[a, b] += 1
    assert np.array_equal(cm, ref)
    m = classification_metrics(cm)
    assert m["n"] == 200 and m["accuracy"] == pytest.approx(np.mean(t == p))
    recalls = [np.mean(p[t == k] == k) for k in range(4)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["per_level_recall"] == pytest.approx(recalls)
    with pytest.raises(ValueError):
        confusion_matrix([0, 4], [0, 1], 4)


def test_metrics_with_absent_level() -> None:
    cm = confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 4)
    m = classification_metrics(cm)
    assert m["per_level_recall"] == [0.5, 1.0, None, None]
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    text = format_confusion(cm)
    assert "true\\pred" in text and "3+" in text and len(text.splitlines()) == 5


def test_subsets_and_split() -> None:
    even, odd = subset_indices(7, "even"), subset_indices(7, "odd")
    assert even == [0, 2, 4, 6] and odd == [1, 3, 5]
    assert subset_indices(3, "all") == [0, 1, 2]
    with pytest.raises(ValueError, match="subset"):
        subset_indices(3, "half")
    levels = [0] * 20 + [1] * 10 + [2] * 2 + [3]
    tr, va = stratified_split(levels, 0.2, seed=0)
    assert sorted(tr + va) == list(range(len(levels))) and not set(tr) & set(va)
    held = [levels[i] for i in va]
    assert held.count(0) == 4 and held.count(1) == 2 and held.count(2) == 1 and held.count(3) == 0
    assert stratified_split(levels, 0.2, seed=1) != (tr, va)


def test_lr_schedule() -> None:
    f = lr_lambda(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)


def test_augment_is_seeded_and_geometric_without_jitter() -> None:
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    a = augment_batch(x, torch.Generator().manual_seed(0), jitter=0.0)
    b = augment_batch(x, torch.Generator().manual_seed(0), jitter=0.0)
    assert torch.equal(a, b)
    # each sample is one of the 8 flips/rotations of its input
    for i in range(6):
        variants = [torch.rot90(v, r, dims=(-2, -1)) for v in (x[i], x[i].flip(-1)) for r in range(4)]
        assert any(torch.equal(a[i], v) for v in variants)
    c = augment_batch(x, torch.Generator().manual_seed(0), jitter=0.05)
    assert c.min() >= -1 and c.max() <= 1
    # small jitter: pixels change by a few percent of the range at most
    assert (c - a).abs().max() < 0.25


def test_report_path() -> None:
    assert report_path("runs/cmp.safetensors") == Path("runs/cmp.json")
    assert report_path("cmp") == Path("cmp.json")
    with pytest.raises(ValueError, match=".json"):
        report_path("cmp.json")


def test_names_hash_and_independence() -> None:
    assert names_hash(["b", "a"]) == names_hash(["a", "b"]) != names_hash(["a"])
    a = {"seed": 0, "train_images_hash": "x"}
    assert len(independence_warnings(a, {"seed": 0, "train_images_hash": "x"})) == 2
    assert independence_warnings(a, {"seed": 1, "train_images_hash": "y"}) == []


# --------------------------------------------------------------------------------------------------
# Training


def test_training_tiny_separable(tmp_path: Path) -> None:
    train = LevelsDataset(make_items(24, seed=1))
    val = make_items(10, seed=2)
    out = tmp_path / "cmp.safetensors"
    model, m = fit_classifier(
        train, arch="tiny", size=32, steps=40, batch_size=16, lr=1e-2, seed=0, val_data=val,
        out=out, progress=False, extra_meta={"data": "synthetic"},
    )
    assert m["accuracy"] >= 0.9, m
    cm = np.asarray(m["confusion"])
    assert cm.shape == (4, 4) and cm.sum() == m["n_val"] == len(val)
    assert m["n_train"] == len(train) and m["train_counts"] == [24] * 4
    assert train.reads == len(train)  # labels from .levels; each image decoded once into the cache
    # checkpoint + report
    loaded, meta = load_classifier(out)
    assert meta["kind"] == "classifier" and meta["arch"] == "tiny" and meta["size"] == 32 and meta["seed"] == 0
    assert meta["accuracy"] == m["accuracy"] and meta["confusion"] == m["confusion"]
    assert meta["train_images_hash"] == names_hash(train.names) and meta["data"] == "synthetic"
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert report["accuracy"] == m["accuracy"] and report["confusion"] == m["confusion"]
    x = prepare_images(torch.stack([it["ihc"] for it in val[:8]]))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_training_is_seeded() -> None:
    items = make_items(4, seed=3)
    kw = dict(arch="tiny", size=32, steps=6, batch_size=8, seed=5, val_fraction=0.25, progress=False)
    a, ma = fit_classifier(items, **kw)
    b, mb = fit_classifier(items, **kw)
    c, _ = fit_classifier(items, **{**kw, "seed": 6})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert ma["confusion"] == mb["confusion"] and np.asarray(ma["confusion"]).sum() == ma["n_val"] == 4


def test_subsets_give_disjoint_training_sets(tmp_path: Path) -> None:
    items = make_items(3, seed=4)  # 12 items, levels cycle 0..3 so even/odd both see two levels
    kw = dict(arch="tiny", size=32, steps=2, batch_size=4, val_fraction=0.0, progress=False)
    m_even = train_classifier(items, subset="even", seed=0, out=tmp_path / "even.safetensors", **kw)
    m_odd = train_classifier(items, subset="odd", seed=1, out=tmp_path / "odd.safetensors", **kw)
    assert m_even["n_train"] == m_odd["n_train"] == 6
    assert m_even["accuracy"] is None and m_even["n_val"] == 0
    _, me = load_classifier(tmp_path / "even.safetensors")
    _, mo = load_classifier(tmp_path / "odd.safetensors")
    assert me["subset"] == "even" and mo["subset"] == "odd"
    assert me["train_images_hash"] != mo["train_images_hash"]
    assert independence_warnings(me, mo) == []


def test_training_data_errors() -> None:
    items = make_items(2, seed=5)
    unknown = [{**it, "level": -1} for it in items]
    with pytest.raises(ClassifierDataError, match="unknown|-1"):
        train_classifier(unknown, arch="tiny", size=32, steps=1, progress=False)
    one_level = make_items(4, seed=6, levels=(2,))
    with pytest.raises(ClassifierDataError, match="fewer than two"):
        train_classifier(one_level, arch="tiny", size=32, steps=1, val_fraction=0, progress=False)
    with pytest.raises(ClassifierDataError, match="outside"):
        train_classifier([{**items[0], "level": 7}], arch="tiny", size=32, steps=1, progress=False)
    with pytest.raises(ValueError, match="not both"):
        train_classifier(items, arch="tiny", size=32, steps=1, epochs=1, progress=False)
    # some unknown levels: skipped with a message, training goes on
    msgs: list[str] = []
    mixed = items + unknown[:3]
    m = train_classifier(mixed, arch="tiny", size=32, steps=1, batch_size=4, val_fraction=0, progress=False, log=msgs.append)
    assert m["n_train"] == len(items)
    assert any("skipping 3" in s for s in msgs)


def test_training_resizes_and_counts_epochs() -> None:
    items = make_items(2, seed=7, size=48)  # 8 items at 48 px, trained at 32 px
    m = train_classifier(items, arch="tiny", size=32, epochs=2, batch_size=4, val_fraction=0, cache=False, progress=False)
    assert m["steps"] == 4


# --------------------------------------------------------------------------------------------------
# Command line


def _write_bci(root: Path, n_per_level: dict[str, int], size: int = 32) -> None:
    from derestainer.core.io import write_image

    k = 0
    for split, n in n_per_level.items():
        for _ in range(n):
            for lv, tok in enumerate(("0", "1+", "2+", "3+")):
                ihc = make_ihc(lv, 1000 * (split == "test") + k, size).permute(1, 2, 0).numpy()
                name = f"{k:05d}_{split}_{tok}.png"
                write_image(root / "IHC" / split / name, ihc)
                write_image(root / "HE" / split / name, np.full_like(ihc, 200))
                k += 1


def test_cli_train_classifier(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from derestainer.cli import main

    root = tmp_path / "bci"
    _write_bci(root, {"train": 8, "test": 4}, size=40)
    out = tmp_path / "cmp.safetensors"
    args = ["train-classifier", "--data", str(root), "--out", str(out), "--arch", "tiny", "--size", "32",
            "--steps", "40", "--batch-size", "16", "--lr", "1e-2", "--seed", "3", "--workers", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "true\\pred" in res.output
    _model, meta = load_classifier(out)
    assert meta["arch"] == "tiny" and meta["seed"] == 3 and meta["size"] == 32 and meta["n_train"] == 32
    assert meta["n_val"] == 16 and np.asarray(meta["confusion"]).sum() == 16
    assert meta["accuracy"] >= 0.9
    assert f"accuracy {meta['accuracy']:.4f}" in res.output
    assert (tmp_path / "cmp.json").is_file()

    # the evaluator: other seed, other images, validated on a held-out part of its own subset
    out2 = tmp_path / "eval.safetensors"
    args2 = args[:4] + [str(out2)] + args[5:] + ["--subset", "odd", "--seed", "4", "--val-split", "none", "--no-cache", "--steps", "5"]
    res = CliRunner().invoke(main, args2)
    assert res.exit_code == 0, res.output
    _, meta2 = load_classifier(out2)
    assert meta2["subset"] == "odd" and meta2["n_train"] + meta2["n_val"] == 16
    assert independence_warnings(meta, meta2) == []


def test_cli_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from derestainer.cli import main

    base = ["train-classifier", "--out", str(tmp_path / "c.safetensors"), "--arch", "tiny", "--steps", "1"]
    res = CliRunner().invoke(main, base + ["--data", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "not a BCI dataset folder" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, base + ["--data", str(tmp_path), "--layout", "mist"])
    assert res.exit_code == 1 and "no per-image HER2 level" in res.output
    res = CliRunner().invoke(main, base + ["--data", str(tmp_path), "--epochs", "1"])
    assert res.exit_code == 1 and "not both" in res.output
    _write_bci(tmp_path / "bci", {"train": 1, "test": 1})
    res = CliRunner().invoke(main, base + ["--data", str(tmp_path / "bci"), "--pretrained", str(tmp_path / "w.pth")])
    assert res.exit_code == 1 and "resnet" in res.output
    assert not (tmp_path / "c.safetensors").exists()
