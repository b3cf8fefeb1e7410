"""Configuration: defaults, YAML, --set overrides, errors, presets against the paper's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from marreid.config import (Config, config_from_dict, config_to_dict, load_config,
                            resolve_milestones, save_config)
from marreid.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_papers_values():
    cfg = load_config(None)
    assert cfg.model.arch == "resnet50" and cfg.model.scale == 30.0
    assert (cfg.mar.lambda_cml, cfg.mar.lambda_ral, cfg.mar.beta) == (2e-4, 50.0, 0.2)
    assert (cfg.mar.margin, cfg.mar.mining_ratio) == (1.0, 0.005)
    assert cfg.mar.stats_momentum == pytest.approx(368 / 10000)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (2e-4, 0.9, 2.5e-2)
    assert (cfg.train.aux_batch, cfg.train.target_batch) == (184, 184)
    assert cfg.eval.ap_rule == "plain"


def test_fractional_and_explicit_milestones():
    # The release: int(20 * 5 / 8) = 12, int(20 * 7 / 8) = 17.
    assert resolve_milestones([0.625, 0.875], 20) == [12, 17]
    assert resolve_milestones([0.625, 0.875], 8) == [5, 7]
    assert resolve_milestones([3, 6.0], 20) == [3, 6]
    with pytest.raises(ConfigError, match="optim.milestones"):
        load_config(None, ["optim.milestones=[2.5]"])


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  epochs: 4\ndata:\n  flip: false\n")
    cfg = load_config(path, ["optim.lr=1e-4", "data.mean=[0.5, 0.5, 0.5]", "model.pretrained=null",
                             "train.max_steps=7", "mar.use_cml=false", "model.scale=16"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 4 and cfg.data.flip is False
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.model.pretrained is None and cfg.train.max_steps == 7
    assert cfg.mar.use_cml is False
    assert cfg.model.scale == 16.0 and isinstance(cfg.model.scale, float)
    assert cfg.optim.momentum == 0.9  # untouched default


def test_regex_pattern_survives_set():
    cfg = load_config(None, [r"data.aux_pattern=(?P<pid>\d{4})_\d{2}"])
    assert cfg.data.aux_pattern == r"(?P<pid>\d{4})_\d{2}"


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "optim.lr"]),
    ("optimm.lr=1", ["optimm", "optim"]),
    ("train.seed=abc", ["train.seed", "int"]),
    ("train.seed=1.5", ["train.seed", "int"]),
    ("data.flip=3", ["data.flip", "bool"]),
    ("data.mean=0.5", ["data.mean", "list"]),
    ("optim=1", ["optim", "section"]),
    ("optim.lr.x=1", ["optim.lr"]),
    ("optim.lr", ["KEY=VALUE"]),
    ("eval.ap_rule=best", ["eval.ap_rule", "mar-release"]),
    ("train.aux_batch=0", ["train.aux_batch"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mar:\n  lamda_cml: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "mar.lamda_cml" in msg and "mar.lambda_cml" in msg and str(path) in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "b.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="b.yaml"):
        load_config(bad)
    top = tmp_path / "t.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="t.yaml"):
        load_config(top)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "data.aux_splits=[train, query]", "train.diagnostics=false"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_relative_roots_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.target_root=some/where"])
    assert cfg.data.target_root == str(tmp_path / "some" / "where")
    assert cfg.data.aux_root == ""


@pytest.mark.parametrize("name, target_format", [("paper_market.yaml", "market1501"),
                                                 ("paper_duke.yaml", "dukemtmc")])
def test_paper_presets_hold_method_values(name, target_format):
    cfg = load_config(CONFIGS / name)
    # The paper's numbers (supplementary Sec. 3) and the authors' release.
    assert cfg.data.aux_format == "msmt17"
    assert sorted(cfg.data.aux_splits) == ["gallery", "query", "train"]
    assert cfg.data.target_format == target_format
    assert (cfg.data.height, cfg.data.width, cfg.data.flip, cfg.data.pad) == (384, 128, True, 7)
    assert cfg.model.arch == "resnet50" and cfg.model.scale == 30
    assert cfg.optim.lr == 2e-4 and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 2.5e-2 and cfg.optim.no_decay_bn is True
    assert cfg.optim.epochs == 20 and cfg.optim.gamma == 0.1
    assert resolve_milestones(cfg.optim.milestones, cfg.optim.epochs) == [12, 17]
    assert cfg.train.aux_batch + cfg.train.target_batch == 368
    assert cfg.train.aux_batch == cfg.train.target_batch
    assert cfg.mar.lambda_cml == 2e-4 and cfg.mar.lambda_ral == 50
    assert cfg.mar.beta == 0.2 and cfg.mar.margin == 1 and cfg.mar.mining_ratio == 0.005
    assert cfg.mar.stats_momentum == 0.0368
    assert cfg.mar.threshold_momentum == 0.1 and cfg.mar.memory_momentum == 0.1
    assert cfg.mar.mdl_start_epoch == 1  # from the second epoch
    assert all((cfg.mar.use_al, cfg.mar.use_rj, cfg.mar.use_cml, cfg.mar.use_mdl))
    assert (cfg.pretrain.epochs, cfg.pretrain.batch_size) == (40, 64)
    assert (cfg.pretrain.lr, cfg.pretrain.weight_decay) == (1e-2, 1e-2)


@pytest.mark.parametrize("name", ["cpu_quick.yaml", "cpu_cuhk03_market.yaml"])
def test_cpu_presets_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.device in ("cpu", "auto")
