"""ONNX export of the embedding network: an image batch -> L2-normalised features, in eval mode.

The exported graph is ``MARModel.extract`` alone (the agents are a training-time
device): input ``images`` ``[batch, 3, H, W]`` (normalised as the test transform
does), output ``features`` ``[batch, D]``, with the batch axis dynamic. Eval mode
makes BatchNorm use its running statistics, which the exporter folds into the
convolutions, so a row's feature does not depend on the rest of the batch.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from marreid.errors import ConfigError
from marreid.models.mar import MARModel

INPUT_NAME = "images"
OUTPUT_NAME = "features"
BATCH_AXIS = "batch"
DEFAULT_OPSET = 17


class EmbeddingNet(nn.Module):
    """The deployable part of a MARModel: f(x), the L2-normalised feature."""

    def __init__(self, model: MARModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract(images)


def export_onnx(model: MARModel, path: str | os.PathLike, height: int, width: int,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model``'s embedding network to ``path`` as ONNX for ``height`` x ``width`` inputs.

    The model is exported in eval mode on its own device and put back in the
    mode it was in. Missing parent folders are created.

    Raises
    ------
    ConfigError
        For a non-positive size, or when ``path`` cannot be written.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"export size must be positive, got {height} x {width}")
    path = Path(path)
    device = next(model.parameters()).device
    net = EmbeddingNet(model)
    was_training = model.training
    net.eval()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The legacy (TorchScript) exporter: the torch.export-based one needs the onnxscript package.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (torch.zeros(2, 3, height, width, device=device),), str(path), dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                              do_constant_folding=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the ONNX file {path}: {exc.strerror or exc}") from None
    finally:
        model.train(was_training)
    return path


@torch.no_grad()
def onnx_max_difference(model: MARModel, path: str | os.PathLike, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's features for ``images`` and the model's (eval mode).

    Needs the ``onnxruntime`` package (ImportError otherwise).
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().numpy().astype(np.float32)})[0]
    was_training = model.training
    model.eval()
    try:
        want = model.extract(images.to(next(model.parameters()).device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    return float(np.abs(got - want).max())


__all__ = ["EmbeddingNet", "export_onnx", "onnx_max_difference", "INPUT_NAME", "OUTPUT_NAME", "BATCH_AXIS",
           "DEFAULT_OPSET"]
