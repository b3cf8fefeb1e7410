"""AdaBN: running statistics recomputed as the plain average of batch statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marreid.models.adabn import recompute_batchnorm


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         nn.BatchNorm2d(2))


def test_statistics_are_the_average_of_batch_statistics():
    net = small_net()
    gen = torch.Generator().manual_seed(1)
    # batches of unequal size: the cumulative average weights batches, not images
    batches = [torch.randn(n, 3, 5, 4, generator=gen) * 2 + 1 for n in (6, 3, 5)]
    weights_before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    net.train()
    assert recompute_batchnorm(net, batches) == 3
    assert net.training and net[1].momentum == 0.1

    # by hand: the inputs of the first BatchNorm are the first conv's outputs
    conv = net[0]
    with torch.no_grad():
        outs = [conv(b) for b in batches]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs])
    variances = torch.stack([o.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for o in outs])
    torch.testing.assert_close(net[1].running_mean, means.mean(0))
    torch.testing.assert_close(net[1].running_var, variances.mean(0))
    assert int(net[1].num_batches_tracked) == 3
    for key, value in net.state_dict().items():
        if key in weights_before:
            assert torch.equal(value, weights_before[key]), key


def test_second_layer_sees_the_first_layers_batch_normalisation():
    net = small_net()
    batches = [torch.randn(4, 3, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    net.eval()
    recompute_batchnorm(net, batches)
    assert not net.training
    # the second BatchNorm's input, as the training-mode forward made it: batch statistics in layer 1
    first = nn.functional
    means = []
    with torch.no_grad():
        for b in batches:
            h = net[0](b)
            h = first.batch_norm(h, None, None, net[1].weight, net[1].bias, training=True)
            means.append(net[3](first.relu(h)).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(net[4].running_mean, torch.stack(means).mean(0))


def test_errors_are_one_line():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="no images"):
        recompute_batchnorm(small_net(), [])


def test_evaluate_adabn_recomputes_on_the_targets_training_images(tmp_path):
    import json

    from fakedata import make_market_tree, write_tiny_config
    from marreid.cli import main
    from marreid.data.loaders import plain_loader
    from marreid.engine.checkpoint import load_checkpoint
    from marreid.engine.extract import eval_transform, evaluate_model, load_target, model_from_checkpoint
    from marreid.config import load_config

    make_market_tree(tmp_path / "aux", ids=5, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(tmp_path / "tgt", ids=6, cams=3, per_id=4, size=(32, 16), seed=3)
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "aux", tmp_path / "tgt")
    assert main(["pretrain", str(config), "--run-dir", str(tmp_path / "pre")]) == 0
    ckpt = tmp_path / "pre" / "last.pt"
    out = tmp_path / "m.json"
    assert main(["evaluate", str(ckpt), "--adabn", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())

    cfg = load_config(tmp_path / "pre" / "config.yaml")
    model = model_from_checkpoint(load_checkpoint(ckpt), str(ckpt), cfg)
    target = load_target(cfg)
    loader = plain_loader(target.train, eval_transform(cfg), cfg.eval.batch_size, 0)
    recompute_batchnorm(model, (b[0] for b in loader))
    expected = evaluate_model(model, target, cfg, "cpu")
    assert metrics["adabn_images"] == len(target.train)
    assert metrics["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    plain = evaluate_model(model_from_checkpoint(load_checkpoint(ckpt), str(ckpt), cfg), target, cfg, "cpu")
    assert plain["mAP"] != pytest.approx(metrics["mAP"], abs=1e-9)
