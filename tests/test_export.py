"""ONNX export of the embedding network, run in onnxruntime against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from marreid.cli import main
from marreid.config import config_to_dict, load_config
from marreid.engine.checkpoint import save_checkpoint
from marreid.models import build_model
from marreid.models.export import BATCH_AXIS, INPUT_NAME, OUTPUT_NAME, export_onnx


def model_with_real_statistics(arch: str, seed: int = 0):
    """A model whose BatchNorms hold running statistics far from a batch's own, so training-mode
    BatchNorm (batch statistics) and eval mode (running statistics) give visibly different features."""
    torch.manual_seed(seed)
    model = build_model(arch, 3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.train()


def run_onnx(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


@torch.no_grad()
def eval_features(model, images: torch.Tensor) -> np.ndarray:
    model.eval()
    try:
        return model.extract(images).numpy()
    finally:
        model.train()


@pytest.mark.parametrize("arch, height, width", [("tiny", 32, 16), ("mobilenet_v2", 64, 32), ("resnet18", 64, 32)])
def test_onnx_features_match_pytorch_in_eval_mode(tmp_path, arch, height, width):
    model = model_with_real_statistics(arch)
    path = export_onnx(model, tmp_path / "out" / f"{arch}.onnx", height, width)
    assert model.training  # put back as it was
    images = torch.randn(4, 3, height, width, generator=torch.Generator().manual_seed(1))
    got = run_onnx(path, images)
    want = eval_features(model, images)
    assert got.shape == (4, model.feat_dim)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        batch_statistics = model.extract(images).numpy()  # what a training-mode graph would give
    assert np.abs(got - batch_statistics).max() > 1e-2

    # The batch axis is dynamic and no row depends on the others: one image alone gives its row of four.
    for n in (1, 3):
        np.testing.assert_allclose(run_onnx(path, images[:n]), got[:n], atol=1e-5, rtol=0)


def test_exported_graph_has_no_training_mode_batchnorm(tmp_path):
    path = export_onnx(model_with_real_statistics("resnet18"), tmp_path / "r18.onnx", 64, 32)
    graph = onnx.load(str(path)).graph
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes.get("training_mode", 0) == 0 and len(node.output) == 1
    (inp,) = graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == INPUT_NAME and dims[0].dim_param == BATCH_AXIS
    assert [d.dim_value for d in dims[1:]] == [3, 64, 32]


def test_export_rejects_a_non_positive_size(tmp_path):
    from marreid.errors import ConfigError

    with pytest.raises(ConfigError, match="0 x 16"):
        export_onnx(build_model("tiny", 2), tmp_path / "x.onnx", 0, 16)


@pytest.fixture
def checkpoint(tmp_path):
    model = model_with_real_statistics("tiny", seed=3)
    cfg = load_config(None, ["model.arch=tiny", "data.height=48", "data.width=24"])
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"kind": "mar", "arch": "tiny", "num_agents": 3, "config": config_to_dict(cfg),
                           "model": model.state_dict()})
    return path, model


def test_cli_exports_a_checkpoint_at_its_configured_size(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "model.onnx"
    assert main(["export", str(path), "--onnx", str(out)]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 48, 24]
    images = torch.randn(2, 3, 48, 24)
    np.testing.assert_allclose(run_onnx(out, images), eval_features(model, images), atol=1e-4, rtol=0)


def test_cli_size_flags_override_the_configuration(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "small.onnx"
    assert main(["export", str(path), "--onnx", str(out), "--height", "32", "--width", "16"]) == 0
    images = torch.randn(3, 3, 32, 16)
    np.testing.assert_allclose(run_onnx(out, images), eval_features(model, images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["--height", "0"], "--height: must be a positive number of pixels, got 0"),
    (["--width", "-3"], "--width: must be a positive number of pixels, got -3"),
])
def test_cli_rejects_bad_sizes_in_one_line(checkpoint, tmp_path, capsys, argv, message):
    path, _ = checkpoint
    assert main(["export", str(path), "--onnx", str(tmp_path / "m.onnx"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"marreid export: error: {message}"
    assert not (tmp_path / "m.onnx").exists()


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["export", str(missing), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
