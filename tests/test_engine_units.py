"""Engine pieces in isolation: SGD groups, the loss guard, the JSONL log, feature extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fakedata import make_market_tree
from marreid.config import load_config
from marreid.data import load_dataset
from marreid.engine.extract import eval_transform, extract_features, resolve_device
from marreid.engine.logging import RunLogger, read_log
from marreid.engine.stepped import check_finite, parameter_groups
from marreid.errors import ConfigError, TrainingError
from marreid.models import build_model


def test_batchnorm_parameters_get_no_weight_decay():
    model = build_model("tiny", 5)
    decay, free = parameter_groups(model, 0.025, no_decay_bn=True)
    assert decay["weight_decay"] == 0.025 and free["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    bn_names = {f"{mod_name}.{pname}" for mod_name, mod in model.named_modules()
                if isinstance(mod, nn.BatchNorm2d) for pname in ("weight", "bias")}
    assert {names[id(p)] for p in free["params"]} == bn_names
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - bn_names
    assert "agents.weight" in {names[id(p)] for p in decay["params"]}
    (everything,) = parameter_groups(model, 0.025, no_decay_bn=False)
    assert len(everything["params"]) == len(names)


def test_check_finite_names_the_term_and_step(tmp_path):
    check_finite({"loss": 1.0, "cml": 2.0}, ("loss", "cml"), 3, tmp_path / "last.pt")
    with pytest.raises(TrainingError) as info:
        check_finite({"loss": 1.0, "cml": float("inf")}, ("loss", "cml"), 7, tmp_path / "last.pt")
    assert "'cml'" in str(info.value) and "step 7" in str(info.value)


def test_run_logger_writes_one_json_object_per_line(tmp_path):
    with RunLogger(tmp_path, enabled=False) as log:
        log.log("step", {"loss": 1.5, "lr": 2e-4, "mdl": float("nan")}, step=0)
        log.log("eval", {"mAP": 0.25}, step=3)
    with RunLogger(tmp_path, enabled=False) as log:  # a resumed run appends
        log.log("step", {"loss": 1.0}, step=4)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0] == {"kind": "step", "step": 0, "loss": 1.5, "lr": 2e-4, "mdl": "nan"}
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl", "step")] == [0, 4]
    assert read_log(tmp_path / "log.jsonl", "eval") == [{"kind": "eval", "step": 3, "mAP": 0.25}]


def test_extract_features_in_order_normalised_and_in_eval_mode(tmp_path):
    make_market_tree(tmp_path, ids=3, cams=2, per_id=2, size=(32, 16))
    samples = load_dataset("market1501", tmp_path).query + load_dataset("market1501", tmp_path).gallery
    cfg = load_config(None, ["data.height=32", "data.width=16"])
    model = build_model("tiny", 4)
    model.train()
    feats, pids, camids = extract_features(model, samples, eval_transform(cfg), 4, 0, "cpu")
    assert model.training  # restored
    assert feats.dtype == np.float32 and feats.shape == (len(samples), model.feat_dim)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert pids.tolist() == [s.pid for s in samples] and camids.tolist() == [s.camid for s in samples]
    # One image alone through the eval-mode model gives the same row (no batch statistics used).
    model.eval()
    one = model.extract(eval_transform(cfg)(Image.open(samples[3].path).convert("RGB")).unsqueeze(0)).detach().numpy()[0]
    assert np.allclose(one, feats[3], atol=1e-5)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device"):
            resolve_device("cuda")
