"""``marreid export``: the embedding network of a checkpoint as an ONNX file."""

from __future__ import annotations

import argparse
import sys

from marreid.cli.common import add_config_args, add_trust_arg

# onnxruntime and PyTorch agree to about 1e-6 on L2-normalised features; more is a broken export.
CHECK_TOLERANCE = 1e-4


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's embedding network (image -> L2-normalised feature) as ONNX",
        description="Exports MARModel.extract in eval mode: input 'images' [batch, 3, H, W] (normalised like the "
                    "test transform), output 'features' [batch, D], the batch axis dynamic. The input size is the "
                    "checkpoint configuration's data.height x data.width unless --height / --width. When "
                    "onnxruntime is installed the file is checked against PyTorch on a random batch.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid checkpoint or a weight file")
    parser.add_argument("--onnx", metavar="MODEL.onnx", required=True, help="where to write the ONNX file")
    parser.add_argument("--height", type=int, metavar="H", help="input height in pixels")
    parser.add_argument("--width", type=int, metavar="W", help="input width in pixels")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: 17)")
    add_config_args(parser, positional=False)
    add_trust_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from marreid.cli.common import checkpoint_config
    from marreid.engine.extract import model_from_checkpoint
    from marreid.errors import ConfigError
    from marreid.models.export import DEFAULT_OPSET, export_onnx, onnx_max_difference

    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}: must be a positive number of pixels, got {value}")
    cfg, state = checkpoint_config(args, args.checkpoint)
    model = model_from_checkpoint(state, args.checkpoint, cfg)
    height = args.height or cfg.data.height
    width = args.width or cfg.data.width
    path = export_onnx(model, args.onnx, height, width, args.opset or DEFAULT_OPSET)
    print(f"{path}: images [batch, 3, {height}, {width}] -> features [batch, {model.feat_dim}]")
    try:
        difference = onnx_max_difference(model, path, torch.randn(2, 3, height, width))
    except ImportError:
        print("onnxruntime is not installed: the file was not checked")
        return 0
    if difference > CHECK_TOLERANCE:
        print(f"marreid export: warning: onnxruntime's features differ from PyTorch's by up to {difference:.2e}",
              file=sys.stderr)
        return 1
    print(f"checked with onnxruntime: largest difference from PyTorch {difference:.1e}")
    return 0
