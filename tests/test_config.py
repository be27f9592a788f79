"""Config resolution: presets, inheritance, overrides, strictness, round trip."""

from __future__ import annotations

import pytest
import yaml

from derestainer.core.config import Config, dump_yaml, from_dict, load_config, preset_names, replace, to_dict
from derestainer.core.errors import ConfigError


def test_paper_preset_holds_the_papers_numbers() -> None:
    c = load_config("paper")
    assert (c.loss.stain, c.loss.h, c.loss.dab) == (2.0, 1.0, 1.0)
    assert (c.loss.content, c.loss.ssim, c.loss.mae, c.loss.cmp) == (13.0, 1.0, 10.0, 2.0)
    assert (c.loss.level, c.loss.gan) == (5.0, 1.0)
    assert c.train.lr == 1e-5 and c.data.size == 512
    assert (c.model.n_down, c.model.n_head_down, c.model.n_fusion_blocks) == (3, 2, 9)


def test_inheritance_and_ablations() -> None:
    tiny = load_config("tiny")
    assert tiny.model.ngf == 8 and tiny.loss.mae == 10.0  # inherited from paper
    assert load_config("no_stain").loss.stain == 0.0
    nd = load_config("no_dab")
    assert nd.loss.dab == 0.0 and nd.loss.h == 1.0
    assert {"paper", "tiny", "no_stain", "no_dab"} <= set(preset_names())
    # pix2pix and BCI's PyramidPix2Pix train with the BCE GAN loss; DeReStainer and pix2pixHD with LSGAN
    assert load_config("pix2pix").loss.gan_mode == "vanilla" == load_config("pyramidpix2pix").loss.gan_mode
    assert load_config("paper").loss.gan_mode == "lsgan" == load_config("pix2pixhd").loss.gan_mode


def test_overrides_are_typed_and_strict() -> None:
    c = load_config("tiny", ["train.lr=3e-4", "model.encoder_input=rgb", "train.betas=[0.9, 0.99]", "data.flip=false"])
    assert c.train.lr == 3e-4 and c.model.encoder_input == "rgb" and c.train.betas == (0.9, 0.99) and c.data.flip is False
    with pytest.raises(ConfigError, match="lrr"):
        load_config("tiny", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="integer"):
        load_config("tiny", ["train.steps=ten"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config("tiny", ["lr=1"])
    with pytest.raises(ConfigError, match="no preset"):
        load_config("does-not-exist")


def test_round_trip_and_yaml_file(tmp_path) -> None:
    c = load_config("tiny", ["train.seed=7"])
    assert from_dict(to_dict(c)) == c
    assert from_dict(yaml.safe_load(dump_yaml(c))) == c
    f = tmp_path / "mine.yaml"
    f.write_text("extends: tiny\ntrain:\n  steps: 12\n")
    m = load_config(str(f))
    assert m.train.steps == 12 and m.model.ngf == 8
    assert replace(m, train={"steps": 3}).train.steps == 3
    assert isinstance(Config(), Config)


def test_mode_fields_accept_their_values_and_yaml_on_off() -> None:
    """``--set train.amp=off`` (the NaN-abort advice) and ``tensorboard=off`` survive YAML's off → false."""
    cfg = load_config("tiny", ["train.amp=off", "train.tensorboard=off"])
    assert cfg.train.amp == "off" and cfg.train.tensorboard == "off"
    assert load_config("tiny", ["train.amp=bf16"]).train.amp == "bf16"
    assert load_config("tiny", ["train.tensorboard=on"]).train.tensorboard == "on"
    with pytest.raises(ConfigError, match=r"train.amp: expected one of auto, bf16, off, got 'fp16'"):
        load_config("tiny", ["train.amp=fp16"])
    with pytest.raises(ConfigError, match=r"train.amp: expected one of auto, bf16, off, got True \(read as 'on'\)"):
        load_config("tiny", ["train.amp=on"])  # the user's own value is named, not the word it was read as


def test_configs_saved_by_earlier_versions_still_load() -> None:
    """Earlier versions stored ``--set train.tensorboard=off`` as the string "False" in every run and model file."""
    d = to_dict(load_config("tiny"))
    d["train"]["tensorboard"] = "False"
    assert from_dict(d).train.tensorboard == "off"
    d["train"]["tensorboard"] = "True"
    assert from_dict(d).train.tensorboard == "on"
