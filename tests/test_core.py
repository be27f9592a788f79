"""The foundation layer: HER2 levels, the label CSV, the confusion matrix, device choice, value ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from derestainer.core import levels, ranges
from derestainer.core.device import resolve_device
from derestainer.core.errors import DatasetError, DerestainerError, DeviceError, LabelError
from derestainer.core.runs import find_checkpoint, resolve_generator_file


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0), (3, 3), ("0", 0), ("1+", 1), (" 2+ ", 2), ("3", 3), ("3+", 3), (-1, -1), ("", -1), ("unknown", -1),
    ("NaN", -1), (np.int64(2), 2),
])
def test_parse_level_accepts_every_spelling(value: object, expected: int) -> None:
    assert levels.parse_level(value) == expected


@pytest.mark.parametrize("value", ["4+", "4", "positive", True, 7, -2, "1.5"])
def test_parse_level_rejects_the_rest_naming_where(value: object) -> None:
    with pytest.raises(LabelError, match=r"^labels.csv:3: HER2 level"):
        levels.parse_level(value, "labels.csv:3")


def test_unknown_can_be_refused() -> None:
    with pytest.raises(LabelError):
        levels.parse_level("", "x", allow_unknown=False)


def test_label_error_is_a_dataset_error_and_a_user_error() -> None:
    assert issubclass(LabelError, DatasetError) and issubclass(LabelError, DerestainerError)
    assert issubclass(LabelError, ValueError)


def test_bci_names() -> None:
    assert levels.parse_bci_level("a/b/00012_train_2+.png") == 2
    assert levels.level_from_name("00012_test_3+.png") == 3
    assert levels.level_from_name("00012_test_3+") == 3
    assert levels.level_from_name("slide_a") is None
    with pytest.raises(LabelError, match="unknown HER2 label '4'"):
        levels.parse_bci_level("00001_train_4.png")
    with pytest.raises(LabelError, match="not a BCI file name"):
        levels.parse_bci_level("image.png")
    assert [levels.level_name(i) for i in (-1, 0, 1, 2, 3)] == ["unknown", "0", "1+", "2+", "3+"]


@pytest.mark.parametrize("header", ["", "name,level\n", "# made by hand\nfile,level\n"])
def test_one_label_csv_format_with_or_without_header(tmp_path: Path, header: str) -> None:
    p = tmp_path / "labels.csv"
    p.write_text(header + "a.png,1+\nb,3\n\nc.tif,-1\n")
    assert levels.read_labels_csv(p) == {"a": 1, "b": 3, "c": -1}


@pytest.mark.parametrize(("body", "match"), [
    ("a.png,5\n", r"labels.csv:1: HER2 level"),
    ("a.png\n", r"labels.csv:1: expected 'name,level'"),
    ("a.png,1+\na,2+\n", r"labels.csv:2: 'a' is listed twice"),
])
def test_label_csv_errors_name_file_and_line(tmp_path: Path, body: str, match: str) -> None:
    p = tmp_path / "labels.csv"
    p.write_text(body)
    with pytest.raises(LabelError, match=match):
        levels.read_labels_csv(p)
    with pytest.raises(LabelError, match="not found"):
        levels.read_labels_csv(tmp_path / "missing.csv")


def test_confusion_matrix_against_a_loop() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(-1, 4, 500)
    p = rng.integers(-1, 4, 500)
    brute = np.zeros((4, 4), dtype=np.int64)
    for a, b in zip(t, p):
        if a >= 0 and b >= 0:
            brute[a, b] += 1
    cm = levels.confusion_matrix(t, p)
    assert cm.dtype == np.int64 and np.array_equal(cm, brute)
    with pytest.raises(ValueError, match="pair up"):
        levels.confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="0..3"):
        levels.confusion_matrix([4], [0])


def test_value_ranges_are_exact_inverses() -> None:
    x = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    s = ranges.uint8_to_signed(x)
    assert s.min() == -1.0 and s.max() == 1.0
    assert torch.equal(ranges.signed_to_uint8(s), x)
    assert torch.equal(ranges.signed_to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    u = ranges.signed_to_unit(s)
    assert torch.allclose(u, x.float() / 255.0, atol=1e-6)
    assert torch.allclose(ranges.unit_to_signed(u), s, atol=1e-6)
    assert torch.equal(ranges.unit_to_uint8(u), x)


def test_device_choice() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_run_folder_resolution(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (100, 200):
        ck = run / "checkpoints" / f"step-{step:07d}"
        ck.mkdir(parents=True)
        (ck / "state.json").write_text("{}")
        (ck / "generator.safetensors").write_bytes(b"x")
    (run / "checkpoints" / ".tmp-abc").mkdir()
    (run / "latest").write_text("checkpoints/step-0000100\n")
    assert find_checkpoint(run).name == "step-0000100"  # the pointer wins over the newest folder
    (run / "latest").unlink()
    assert find_checkpoint(run).name == "step-0000200"
    assert resolve_generator_file(run) == run / "checkpoints" / "step-0000200" / "generator.safetensors"
    (run / "generator.safetensors").write_bytes(b"y")
    assert resolve_generator_file(run) == run / "generator.safetensors"
    with pytest.raises(DerestainerError, match="no checkpoint to resume from"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(DerestainerError, match="no such model file"):
        resolve_generator_file(tmp_path / "nothing")


def test_label_csv_header_finds_columns_by_name(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("level,split,filename\n2+,test,a.png\n0,test,b\n")
    assert levels.read_labels_csv(p) == {"a": 2, "b": 0}
    p.write_text("name,score\na,1\n")
    with pytest.raises(LabelError, match=r"labels.csv:1: the header names no 'level' column"):
        levels.read_labels_csv(p)
