"""Mixed precision and channels_last on CPU: bf16 autocast, float32 losses, fp16 loss scaling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakedata import make_training_trees
from marreid.config import load_config
from marreid.engine.distributed import Precision, autocast_dtype
from marreid.engine.extract import load_target
from marreid.engine.pretrain import load_auxiliary
from marreid.engine.train import MARTrainer
from marreid.errors import ConfigError
from marreid.losses import MARLoss

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("amp_data"))


def trainer(trees, run_dir, *extra) -> MARTrainer:
    cfg = load_config(None, [
        f"data.aux_root={trees / 'aux'}", "data.aux_format=market1501",
        f"data.target_root={trees / 'tgt'}", "data.target_format=market1501",
        "data.height=32", "data.width=16", "data.pad=2", "data.num_workers=0", "model.arch=tiny",
        "train.aux_batch=8", "train.target_batch=8", "mar.mining_ratio=0.1", "mar.mdl_start_epoch=0",
        "train.device=cpu", "train.progress=false", f"output.run_dir={run_dir}", *extra,
    ])
    run = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), cfg.output.run_dir)
    run.initialize()
    return run


def first_step(run: MARTrainer) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The first batch's loss tensor, terms, and the flattened gradient after backward."""
    _, aux_batch, target_batch = next(run.batches.iterate(0))
    total, terms = run.compute_loss(0, aux_batch, target_batch)
    total.backward()
    return total, terms, torch.cat([p.grad.flatten() for p in run.model.parameters()])


def loss_inputs():
    g = torch.Generator().manual_seed(0)
    agents = F.normalize(torch.randn(7, 16, generator=g), dim=1)
    aux_feat = F.normalize(torch.randn(10, 16, generator=g), dim=1)
    tgt_feat = F.normalize(torch.randn(12, 16, generator=g), dim=1)
    return {
        "aux_feat": aux_feat, "aux_logits": 30 * aux_feat @ agents.T, "aux_labels": torch.randint(0, 7, (10,), generator=g),
        "tgt_feat": tgt_feat, "tgt_logits": 30 * tgt_feat @ agents.T, "tgt_camids": torch.arange(12) % 3,
        "tgt_index": torch.arange(12), "agents": agents,
    }


def test_cpu_autocasts_to_bfloat16():
    assert autocast_dtype(CPU) == torch.bfloat16


def test_marloss_inside_bf16_autocast_computes_in_float32():
    inputs = loss_inputs()
    loss = MARLoss(7, 12, mining_ratio=0.1)
    loss.initialize(inputs["tgt_logits"], inputs["tgt_camids"])
    results = []
    for autocast in (False, True):
        state = copy.deepcopy(loss)
        feats = {k: v.clone().requires_grad_() for k, v in inputs.items() if k.endswith("feat")}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, terms = state(**{**inputs, **feats}, mdl_on=True)
        total.backward()
        results.append((total, terms, feats["tgt_feat"].grad))
    (plain, plain_terms, plain_grad), (cast, cast_terms, cast_grad) = results
    assert cast.dtype == torch.float32 and plain_terms["mdl"] > 0 and plain_terms["cml"] > 0
    # bf16 keeps 8 bits of mantissa: any matmul done in it would show at the 1e-3 level.
    for key, value in plain_terms.items():
        assert cast_terms[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    torch.testing.assert_close(cast_grad, plain_grad, rtol=1e-6, atol=1e-7)


def test_amp_training_step_matches_float32_within_bf16_tolerance(trees, tmp_path):
    full = trainer(trees, tmp_path / "fp32")
    amp = trainer(trees, tmp_path / "amp", "train.amp=true")
    assert amp.precision.dtype == torch.bfloat16 and amp.precision.scaler is None
    images = torch.randn(4, 3, 32, 16)
    feat, logits = amp.precision.forward(amp.model, images)
    assert feat.dtype == logits.dtype == torch.bfloat16  # the forward pass really is autocast
    amp.model.zero_grad(set_to_none=True)

    total32, terms32, grad32 = first_step(full)
    total16, terms16, grad16 = first_step(amp)
    assert total16.dtype == grad16.dtype == torch.float32
    for key in ("loss", "al", "rj", "cml", "mdl"):
        assert terms16[key] == pytest.approx(terms32[key], rel=2e-2), key
    assert float((grad16 - grad32).norm() / grad32.norm()) < 5e-2


def test_channels_last_feeds_nhwc_and_keeps_the_features(trees, tmp_path):
    plain = trainer(trees, tmp_path / "plain")
    nhwc = trainer(trees, tmp_path / "nhwc", "train.channels_last=true")
    first_conv = nhwc.model.backbone.features[0]
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    first_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.randn(4, 3, 32, 16)
    plain.model.eval()
    nhwc.model.eval()
    with torch.no_grad():
        want = plain.precision.forward(plain.model, images)[0]
        got = nhwc.precision.forward(nhwc.model, images)[0]
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def sgd_setup():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    return layer, optimizer


def test_fp16_loss_scaling_steps_with_the_unscaled_gradient(tmp_path):
    layer, optimizer = sgd_setup()
    precision = Precision(CPU, torch.float16, optimizer=optimizer)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    before = [p.detach().clone() for p in layer.parameters()]
    scaled = precision.scale(layer(x).square().sum())
    scaled.backward()
    assert precision.scaler.get_scale() == 65536.0
    optimizer.step()
    # By hand: the gradient of sum((Wx + b)^2) is 2 r x^T for W and 2 sum(r) for b, r = Wx + b;
    # SGD's first step with momentum is p -= lr * (g + wd * p).
    w, b = before
    r = x @ w.T + b
    grads = [2 * r.T @ x, 2 * r.sum(0)]
    for p, p0, g in zip(layer.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * (g + 0.01 * p0), rtol=1e-6, atol=1e-7)
    assert precision.scaler.get_scale() == 65536.0


def test_fp16_loss_scaling_skips_a_non_finite_step_and_halves_the_scale():
    layer, optimizer = sgd_setup()
    precision = Precision(CPU, torch.float16, optimizer=optimizer)
    before = [p.detach().clone() for p in layer.parameters()]
    precision.scale(layer(torch.tensor([[1.0, float("inf"), 0.0]])).sum()).backward()
    optimizer.step()
    for p, p0 in zip(layer.parameters(), before):
        assert torch.equal(p.detach(), p0)
    assert all("momentum_buffer" not in optimizer.state[p] for p in layer.parameters())
    assert precision.scaler.get_scale() == 32768.0
    saved = precision.state_dict()
    assert saved["grad_scaler"]["scale"] == 32768.0

    # The next finite step goes through, and a restored scaler carries the halved scale on.
    optimizer.zero_grad()
    precision.scale(layer(torch.ones(1, 3)).sum()).backward()
    optimizer.step()
    assert not all(torch.equal(p.detach(), p0) for p, p0 in zip(layer.parameters(), before))
    other_layer, other_optimizer = sgd_setup()
    restored = Precision(CPU, torch.float16, optimizer=other_optimizer)
    restored.load_state_dict(saved)
    assert restored.scaler.get_scale() == 32768.0


def test_bf16_and_float32_need_no_loss_scaling():
    layer, optimizer = sgd_setup()
    for dtype in (None, torch.bfloat16):
        precision = Precision(CPU, dtype, optimizer=optimizer)
        loss = layer(torch.ones(1, 3)).sum()
        assert precision.scaler is None and precision.scale(loss) is loss and precision.state_dict() == {}
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        Precision(CPU, torch.float32)
    with pytest.raises(ConfigError, match="needs the optimizer"):
        Precision(CPU, torch.float16)
