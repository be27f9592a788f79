"""Paired datasets (BCI, MIST, folders), their error messages, and synchronised paired transforms."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Subset

from derestainer.core.config import DataConfig
from derestainer.core.errors import DatasetError, ImageReadError, PairSizeError
from derestainer.core.levels import parse_bci_level
from derestainer.data import (
    BCIDataset,
    MISTDataset,
    PairedFolderDataset,
    PairedTransform,
    PairParams,
    apply_params,
    build_dataset,
    check,
    from_model_space,
    pair_level_counts,
    resize_uint8,
    resized_shape,
    sample_params,
    to_model_space,
)
from derestainer.data import datasets as dsmod

LABELS = ["0", "1+", "2+", "3+"]


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rand(rng: np.random.Generator, size: int = 32, h: int | None = None) -> np.ndarray:
    return rng.integers(0, 256, size=(h or size, size, 3), dtype=np.uint8)


def _bci(root: Path, rng: np.random.Generator, n_train: int = 8, n_test: int = 4, size: int = 32) -> dict[str, np.ndarray]:
    """BCI layout; returns {relative path: array} of everything written."""
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            name = f"{i:05d}_{split}_{LABELS[i % 4]}.png"
            for stain in ("HE", "IHC"):
                arr = _rand(rng, size)
                _png(root / stain / split / name, arr)
                written[f"{stain}/{split}/{name}"] = arr
    return written


def _coords(h: int, w: int) -> np.ndarray:
    """An image whose pixels encode their own position: R = row, G = column, B = 7."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([r, c, np.full_like(r, 7)], axis=-1).astype(np.uint8)


def _linear_map(out: torch.Tensor) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """For a transformed coordinate image: the 2×2 signed permutation (d src_row/d i, d src_row/d j,
    d src_col/d i, d src_col/d j) and the source position of the output's top-left pixel; asserts the
    map is exactly affine (a rigid crop + dihedral transform)."""
    r = out[0].long().numpy()
    c = out[1].long().numpy()
    h, w = r.shape
    m = (int(r[1, 0] - r[0, 0]), int(r[0, 1] - r[0, 0]), int(c[1, 0] - c[0, 0]), int(c[0, 1] - c[0, 0]))
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    assert np.array_equal(r, r[0, 0] + m[0] * ii + m[1] * jj)
    assert np.array_equal(c, c[0, 0] + m[2] * ii + m[3] * jj)
    return m, (int(r[0, 0]), int(c[0, 0]))


# ----------------------------------------------------------------------------- BCI / MIST / folders
def test_bci_dataset_items(tmp_path: Path, rng: np.random.Generator) -> None:
    written = _bci(tmp_path, rng, n_train=8, n_test=4)
    train, test = BCIDataset(tmp_path, "train"), BCIDataset(tmp_path, "test")
    assert len(train) == 8 and len(test) == 4
    assert train.names == [f"{i:05d}_train_{LABELS[i % 4]}" for i in range(8)]
    assert train.levels == [i % 4 for i in range(8)]
    assert pair_level_counts(train) == {0: 2, 1: 2, 2: 2, 3: 2}
    item = train[5]
    assert set(item) == {"he", "ihc", "level", "name"}
    assert item["he"].dtype == torch.uint8 and item["he"].shape == (3, 32, 32)
    assert item["ihc"].dtype == torch.uint8 and item["ihc"].shape == (3, 32, 32)
    assert item["level"] == 1 and item["name"] == "00005_train_1+"
    assert np.array_equal(item["he"].permute(1, 2, 0).numpy(), written["HE/train/00005_train_1+.png"])
    assert np.array_equal(item["ihc"].permute(1, 2, 0).numpy(), written["IHC/train/00005_train_1+.png"])
    assert test[-1]["name"] == "00003_test_3+"
    with pytest.raises(IndexError):
        train[8]
    with pytest.raises(ValueError, match="split"):
        BCIDataset(tmp_path, "val")


def test_parse_bci_level() -> None:
    assert [parse_bci_level(f"00012_train_{lab}.png") for lab in LABELS] == [0, 1, 2, 3]
    assert parse_bci_level(Path("some/dir/00001_test_3+.png")) == 3
    with pytest.raises(DatasetError, match=r"00001_train_4\+\.png.*unknown HER2 label"):
        parse_bci_level("00001_train_4+.png")
    with pytest.raises(DatasetError, match="not a BCI file name"):
        parse_bci_level("slide12_tile.png")


def test_mist_dataset(tmp_path: Path, rng: np.random.Generator) -> None:
    base = tmp_path / "HER2" / "TrainValAB"
    for split, n in (("train", 5), ("val", 3)):
        for i in range(n):
            _png(base / f"{split}A" / f"{i}_{split}.jpg", _rand(rng, 40))
            _png(base / f"{split}B" / f"{i}_{split}.jpg", _rand(rng, 40))
    tr = MISTDataset(tmp_path / "HER2", "train")
    assert len(tr) == 5 and tr.levels == [-1] * 5 and tr.names == [f"{i}_train" for i in range(5)]
    assert pair_level_counts(tr) == {-1: 5, 0: 0, 1: 0, 2: 0, 3: 0}
    item = tr[0]
    assert item["level"] == -1 and item["he"].shape == (3, 40, 40) and item["ihc"].dtype == torch.uint8
    # 'test' is MIST's val split; root may also be the TrainValAB folder itself
    assert MISTDataset(tmp_path / "HER2", "test").names == MISTDataset(base, "val").names == [f"{i}_val" for i in range(3)]
    with pytest.raises(DatasetError, match=r"TrainValAB/\{trainA,trainB,valA,valB\}"):
        MISTDataset(tmp_path, "train")


def test_folder_dataset_levels(tmp_path: Path, rng: np.random.Generator) -> None:
    he, ihc = tmp_path / "he", tmp_path / "ihc"
    for stem in ("a", "b", "c"):
        _png(he / f"{stem}.png", _rand(rng))
        _png(ihc / f"{stem}.jpg" if stem == "b" else ihc / f"{stem}.png", _rand(rng))  # suffix may differ
    (ihc / "notes.txt").write_text("not an image")
    ds = PairedFolderDataset(he, ihc)
    assert ds.names == ["a", "b", "c"] and ds.levels == [-1, -1, -1]
    assert ds.pairs[1][2].name == "b.jpg"
    csv = tmp_path / "levels.csv"
    csv.write_text("name,level\na.png,2+\nb,0\nc,3\n")
    assert PairedFolderDataset(he, ihc, levels=csv).levels == [2, 0, 3]
    assert PairedFolderDataset(he, ihc, levels=lambda s: "abc".index(s)).levels == [0, 1, 2]
    with pytest.warns(UserWarning, match="1 of 3 pairs have no level"):
        assert PairedFolderDataset(he, ihc, levels={"a": 1, "c": 2}).levels == [1, -1, 2]
    csv.write_text("a,5+\n")
    with pytest.raises(DatasetError, match=r"levels\.csv:1.*5\+"):
        PairedFolderDataset(he, ihc, levels=csv)
    # BCI-style names give their level without a table
    bci = tmp_path / "bci"
    for name in ("00000_x_2+", "00001_x_0", "weird_name"):
        _png(bci / "he" / f"{name}.png", _rand(rng))
        _png(bci / "ihc" / f"{name}.png", _rand(rng))
    assert PairedFolderDataset(bci / "he", bci / "ihc").levels == [2, 0, -1]


def test_levels_and_names_need_no_decoding(tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    _bci(tmp_path, rng, n_train=6, n_test=1)

    def boom(path: object) -> None:
        raise AssertionError("decoded an image")

    monkeypatch.setattr(dsmod, "read_image", boom)
    ds = BCIDataset(tmp_path, "train")
    assert ds.levels == [0, 1, 2, 3, 0, 1]
    sub = Subset(ds, [1, 2, 5])
    assert pair_level_counts(sub) == {0: 0, 1: 2, 2: 1, 3: 0}
    assert pair_level_counts(ConcatDataset([ds, sub])) == {0: 2, 1: 4, 2: 2, 3: 1}


# ----------------------------------------------------------------------------- errors
def test_missing_partner_both_directions(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path, rng, n_train=9, n_test=1)
    for i in range(7):  # 7 H&E without IHC: listed first few + count
        (tmp_path / "IHC" / "train" / f"{i:05d}_train_{LABELS[i % 4]}.png").unlink()
    with pytest.raises(DatasetError) as ei:
        BCIDataset(tmp_path, "train")
    msg = str(ei.value)
    assert "7 H&E image(s)" in msg and "00000_train_0.png" in msg and "and 2 more" in msg
    assert "without an IHC partner" in msg and "without an H&E partner" not in msg and "\n" not in msg
    # reverse: an IHC without H&E
    (tmp_path / "HE" / "test" / "00000_test_0.png").rename(tmp_path / "HE" / "test" / "00099_test_0.png")
    with pytest.raises(DatasetError) as ei:
        BCIDataset(tmp_path, "test")
    msg = str(ei.value)
    assert "1 IHC image(s)" in msg and "00000_test_0.png" in msg and "without an H&E partner" in msg
    assert "1 H&E image(s)" in msg and "00099_test_0.png" in msg


def test_unknown_label_names_the_file(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path, rng, n_train=2, n_test=1)
    for stain in ("HE", "IHC"):
        _png(tmp_path / stain / "train" / "00007_train_4+.png", _rand(rng))
    with pytest.raises(DatasetError, match=r"00007_train_4\+\.png.*unknown HER2 label '4\+'"):
        BCIDataset(tmp_path, "train")


def test_empty_and_missing_folders(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(DatasetError, match=r"expected ROOT/HE/\{train,test\} and ROOT/IHC/\{train,test\}"):
        BCIDataset(tmp_path / "nowhere", "train")
    (tmp_path / "HE" / "train").mkdir(parents=True)
    _png(tmp_path / "IHC" / "train" / "00000_train_0.png", _rand(rng))
    with pytest.raises(DatasetError, match=r"HE/train: H&E folder is empty"):
        BCIDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"he_missing: H&E folder not found"):
        PairedFolderDataset(tmp_path / "he_missing", tmp_path / "IHC" / "train")


def test_duplicate_stems_are_ambiguous(tmp_path: Path, rng: np.random.Generator) -> None:
    _png(tmp_path / "he" / "a.png", _rand(rng))
    _png(tmp_path / "he" / "a.jpg", _rand(rng))
    _png(tmp_path / "ihc" / "a.png", _rand(rng))
    with pytest.raises(DatasetError, match=r"a\.jpg / a\.png|a\.png / a\.jpg"):
        PairedFolderDataset(tmp_path / "he", tmp_path / "ihc")


def test_truncated_png_raises_on_load_and_verify(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path, rng, n_train=4, n_test=1, size=64)
    bad = tmp_path / "IHC" / "train" / "00002_train_2+.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    ds = BCIDataset(tmp_path, "train")  # construction does not decode
    ds[1]
    with pytest.raises(ImageReadError, match=r"00002_train_2\+\.png"):
        ds[2]
    with pytest.raises(DatasetError, match=r"1 of 4 pairs cannot be loaded: .*IHC/train/00002_train_2\+\.png"):
        BCIDataset(tmp_path, "train", verify=True)
    with pytest.raises(DatasetError, match=r"00002_train_2\+\.png"):
        check(ds, workers=1)
    (tmp_path / "HE" / "train" / "00003_train_3+.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"2 of 4 pairs(.|\n)*00002_train_2\+(.|\n)*HE/train/00003_train_3\+\.png"):
        check(ds)


def test_size_mismatch_names_both_files(tmp_path: Path, rng: np.random.Generator) -> None:
    _png(tmp_path / "he" / "p.png", _rand(rng, 32))
    _png(tmp_path / "ihc" / "p.png", _rand(rng, 32, h=48))
    ds = PairedFolderDataset(tmp_path / "he", tmp_path / "ihc")
    with pytest.raises(PairSizeError) as ei:
        ds[0]
    msg = str(ei.value)
    assert str(tmp_path / "he" / "p.png") in msg and str(tmp_path / "ihc" / "p.png") in msg
    assert "32x32" in msg and "48x32" in msg


def test_grayscale_and_rgba_are_converted(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0      # fully transparent row → white
    rgba[1, :, 3] = 255    # opaque row → its own colour
    _png(tmp_path / "he" / "x.png", gray)   # PIL mode L
    _png(tmp_path / "ihc" / "x.png", rgba)  # PIL mode RGBA
    with Image.open(tmp_path / "he" / "x.png") as a, Image.open(tmp_path / "ihc" / "x.png") as b:
        assert (a.mode, b.mode) == ("L", "RGBA")
    item = PairedFolderDataset(tmp_path / "he", tmp_path / "ihc")[0]
    he, ihc = item["he"].permute(1, 2, 0).numpy(), item["ihc"].permute(1, 2, 0).numpy()
    assert he.shape == ihc.shape == (32, 32, 3)
    assert all(np.array_equal(he[..., k], gray) for k in range(3))
    assert np.all(ihc[0] == 255)
    assert np.array_equal(ihc[1], rgba[1, :, :3])
    a = rgba[..., 3:].astype(float) / 255  # compositing over white
    assert np.abs(ihc.astype(float) - (rgba[..., :3] * a + 255 * (1 - a))).max() <= 0.5 + 1e-9


# ----------------------------------------------------------------------------- transforms
def test_model_space_round_trip() -> None:
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    y = to_model_space(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(from_model_space(y), x)
    assert torch.equal(from_model_space(torch.tensor([-3.0, 2.0, 0.0])), torch.tensor([0, 255, 128], dtype=torch.uint8))
    with pytest.raises(TypeError):
        to_model_space(y)


def test_resize_references() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    t = torch.from_numpy(img).permute(2, 0, 1)
    # area: 2× reduction is the exact 2×2 mean
    area = resize_uint8(t, (32, 32), "area").permute(1, 2, 0).numpy()
    ref = img.reshape(32, 2, 32, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(area - ref).max() <= 0.5 + 1e-9
    # antialiased bilinear: PIL's bilinear reduction (the same triangle filter), within rounding
    bil = resize_uint8(t, (32, 32), "bilinear").permute(1, 2, 0).numpy().astype(int)
    pil = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR)).astype(int)
    assert np.abs(bil - pil).max() <= 1
    assert resized_shape(1024, 1024, 512) == (512, 512)
    assert resized_shape(100, 200, 50) == (50, 100) and resized_shape(300, 100, 50) == (150, 50)
    assert resized_shape(30, 40, (20, 10)) == (20, 10) and resized_shape(30, 40, None) == (30, 40)


def test_pair_receives_identical_transform_and_all_dihedral_outcomes() -> None:
    h = w = 48
    he = torch.from_numpy(_coords(h, w)).permute(2, 0, 1).contiguous()
    ihc = 255 - he  # a known pixel-wise function of the H&E
    tf = PairedTransform(size=None, crop=40, flip=True, rot90=True, seed=3)
    seen_maps, seen_tl = set(), set()
    for _ in range(200):
        a, b = tf(he, ihc)
        assert a.shape == b.shape == (3, 40, 40) and a.dtype == torch.uint8
        assert torch.equal(b, 255 - a)  # the IHC got exactly the H&E's transform
        m, tl = _linear_map(a)
        seen_maps.add(m)
        seen_tl.add(tl)
    dihedral = {(a, b, c, d) for a, b, c, d in itertools.product((-1, 0, 1), repeat=4)
                if abs(a) + abs(b) == 1 and abs(c) + abs(d) == 1 and abs(a) != abs(c)}
    assert len(dihedral) == 8 and seen_maps == dihedral
    assert len(seen_tl) > 20  # the crop moves (corners of 9×9 possible boxes × 8 symmetries)
    # identical images stay identical through resize + crop + flips + rotations
    img = torch.from_numpy(_rand(np.random.default_rng(2), 64)).permute(2, 0, 1).contiguous()
    tf2 = PairedTransform(size=48, crop=32, seed=0)
    for _ in range(50):
        a, b = tf2(img, img.clone())
        assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_flip_only_and_rot_only_and_non_square() -> None:
    he = torch.from_numpy(_coords(16, 16)).permute(2, 0, 1).contiguous()
    flips = {_linear_map(PairedTransform(flip=True, rot90=False, seed=s)(he, he)[0])[0] for s in range(40)}
    assert flips == {(1, 0, 0, 1), (-1, 0, 0, 1), (1, 0, 0, -1), (-1, 0, 0, -1)}
    rots = {_linear_map(PairedTransform(flip=False, rot90=True, seed=s)(he, he)[0])[0] for s in range(40)}
    assert len(rots) == 4 and (-1, 0, 0, 1) not in rots
    rect = torch.from_numpy(_coords(12, 20)).permute(2, 0, 1).contiguous()
    tf = PairedTransform(seed=0)
    assert {tuple(tf(rect, rect)[0].shape) for _ in range(30)} == {(3, 12, 20)}  # no 90° turn of a rectangle
    assert PairedTransform(size=32, flip=False, rot90=False).is_random is False
    with pytest.raises(ValueError, match="larger than the image"):
        PairedTransform(crop=20)(rect, rect)
    with pytest.raises(ValueError, match="same shape"):
        PairedTransform()(rect, he)


def test_seeded_generator_is_reproducible() -> None:
    assert sample_params(64, 64, 32, generator=torch.Generator().manual_seed(5)) == \
        sample_params(64, 64, 32, generator=torch.Generator().manual_seed(5))
    a = [PairedTransform(crop=16, seed=9).sample(64, 64) for _ in range(3)]
    t1, t2 = PairedTransform(crop=16, seed=9), PairedTransform(crop=16, seed=9)
    assert [t1.sample(64, 64) for _ in range(10)] == [t2.sample(64, 64) for _ in range(10)]
    assert a[0] == a[1] == a[2]  # each fresh transform starts from the seed
    t3 = PairedTransform(crop=16, seed=10)
    assert [t3.sample(64, 64) for _ in range(10)] != [PairedTransform(crop=16, seed=9).sample(64, 64) for _ in range(10)]
    p = PairParams(crop=(1, 2, 3, 4), hflip=True, k=1)
    x = torch.arange(60).reshape(1, 6, 10)
    assert torch.equal(apply_params(x, p), torch.rot90(x[:, 1:4, 2:6].flip(-1), 1, dims=(-2, -1)))


def _loader_batches(ds: torch.utils.data.Dataset, seed: int) -> list[dict]:
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(seed))
    return list(loader)


def test_dataloader_workers_reproducible(tmp_path: Path) -> None:
    img = _coords(32, 32)
    for i in range(16):  # identical pairs: every difference between items is the augmentation
        for stain in ("HE", "IHC"):
            _png(tmp_path / stain / "train" / f"{i:05d}_train_{LABELS[i % 4]}.png", img)
    ds = BCIDataset(tmp_path, "train", transform=PairedTransform(size=None, crop=24, seed=1))
    run1, run2, run3 = _loader_batches(ds, 0), _loader_batches(ds, 0), _loader_batches(ds, 1)
    assert len(run1) == 4
    for b1, b2 in zip(run1, run2):
        assert b1["name"] == b2["name"] and torch.equal(b1["level"], b2["level"])
        assert torch.equal(b1["he"], b2["he"]) and torch.equal(b1["ihc"], b2["ihc"])
        assert torch.equal(b1["he"], b1["ihc"])
        assert b1["he"].shape == (4, 3, 24, 24) and b1["he"].dtype == torch.uint8
    assert not all(torch.equal(a["he"], b["he"]) for a, b in zip(run1, run3))
    # the two workers (batches 0 and 1) do not share a random stream
    assert not torch.equal(run1[0]["he"], run1[1]["he"])
    # and a new epoch of the same loader draws new augmentations
    loader = DataLoader(ds, batch_size=16, num_workers=2, generator=torch.Generator().manual_seed(0))
    e1, e2 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(e1["he"], e2["he"])


def test_cache_decodes_once(tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    _bci(tmp_path, rng, n_train=3, n_test=1, size=64)
    calls: list[Path] = []
    real = dsmod.read_image

    def counting(path: Path) -> np.ndarray:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(dsmod, "read_image", counting)
    ds = BCIDataset(tmp_path, "train", transform=PairedTransform(size=32, crop=16, seed=0), cache=True)
    outs = [ds[1]["he"] for _ in range(20)]
    assert len(calls) == 2  # one H&E + one IHC decode
    assert ds._cache[1][0].shape == (3, 32, 32)  # cached after resizing, before augmentation
    assert all(o.shape == (3, 16, 16) for o in outs) and len({o.numpy().tobytes() for o in outs}) > 1
    ds.preload(workers=2)
    assert len(calls) == 6 and len(ds._cache) == 3


def test_build_dataset(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path / "bci", rng, n_train=4, n_test=2, size=64)
    cfg = DataConfig(root=str(tmp_path / "bci"), layout="bci", size=32, crop=16)
    tr, te = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert tr[0]["he"].shape == (3, 16, 16) and te[0]["he"].shape == (3, 32, 32)
    assert torch.equal(te[1]["he"], te[1]["he"])  # deterministic
    ref = resize_uint8(BCIDataset(tmp_path / "bci", "test")[1]["ihc"], (32, 32))
    assert torch.equal(te[1]["ihc"], ref)
    for i in range(3):
        for split in ("train", "val"):
            _png(tmp_path / "mist" / "TrainValAB" / f"{split}A" / f"m{i}.png", _rand(rng))
            _png(tmp_path / "mist" / "TrainValAB" / f"{split}B" / f"m{i}.png", _rand(rng))
            _png(tmp_path / "own" / split / "he" / f"m{i}.png", _rand(rng))
            _png(tmp_path / "own" / split / "ihc" / f"m{i}.png", _rand(rng))
    mist = build_dataset(DataConfig(root=str(tmp_path / "mist"), layout="mist", size=16), "test")
    assert isinstance(mist, MISTDataset) and len(mist) == 3 and mist[0]["he"].shape == (3, 16, 16)
    own = build_dataset(DataConfig(root=str(tmp_path / "own"), layout="folders", he_dir="{split}/he",
                                   ihc_dir="{split}/ihc", size=0, workers=2, cache=True), "val")
    assert isinstance(own, PairedFolderDataset) and len(own._cache) == 3 and own.levels == [-1] * 3
    with pytest.raises(DatasetError, match="data.root is not set"):
        build_dataset(DataConfig(layout="bci"), "train")
    with pytest.raises(DatasetError, match="unknown data.layout"):
        build_dataset(DataConfig(root="x", layout="zip"), "train")


def test_no_warnings_on_normal_use(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path, rng, n_train=2, n_test=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BCIDataset(tmp_path, "train", transform=PairedTransform(16))[0]


def test_cached_pairs_are_not_changed_by_callers(tmp_path) -> None:
    """A caller writing into an item must not corrupt the cache for later epochs."""
    import numpy as np

    from derestainer.core.io import write_image
    from derestainer.data import BCIDataset

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for kind in ("HE", "IHC"):
            write_image(tmp_path / kind / split / f"00000_{split}_2+.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ds = BCIDataset(tmp_path, "train", cache=True)
    first = ds[0]
    ref = first["he"].clone()
    first["he"].zero_()
    first["ihc"].zero_()
    again = ds[0]
    assert torch.equal(again["he"], ref) and again["ihc"].any()
