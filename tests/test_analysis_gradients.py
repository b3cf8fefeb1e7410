"""Each term's share of the backbone gradient: the terms add up to the full loss's gradient, each
share matches one computed from separately taken gradients, and the loss's state is left untouched."""

from __future__ import annotations

import math

import pytest
import torch

from marreid.analysis.gradients import gradient_shares, term_gradients
from marreid.losses import MARLoss
from marreid.models import build_model

N_AGENTS, N_TARGET = 5, 12
SWITCHES = {"mdl": "use_mdl", "cml": "use_cml", "al": "use_al", "rj": "use_rj"}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = build_model("tiny", N_AGENTS, scale=10.0).train()
    loss = MARLoss(N_AGENTS, N_TARGET, mining_ratio=0.2, lambda_cml=0.05, lambda_ral=2.0)
    camids_all = torch.arange(N_TARGET) % 3
    with torch.no_grad():
        loss.initialize(model(torch.randn(N_TARGET, 3, 32, 16))[1], camids_all)
    batch = {"aux_images": torch.randn(6, 3, 32, 16), "aux_labels": torch.tensor([0, 1, 2, 3, 4, 0]),
             "tgt_images": torch.randn(8, 3, 32, 16), "tgt_camids": camids_all[:8], "tgt_index": torch.arange(8)}
    return model, loss, batch


def backbone_gradient(model, loss, batch, terms) -> list[torch.Tensor]:
    """The backbone gradient, parameter by parameter, of Eq. 10 with only ``terms`` switched on; the
    loss in eval mode (state untouched), its switches and mode restored."""
    saved = {switch: getattr(loss, switch) for switch in SWITCHES.values()}
    for name, switch in SWITCHES.items():
        setattr(loss, switch, name in terms)
    loss.eval()
    try:
        params = list(model.backbone.parameters())
        n_aux = len(batch["aux_images"])
        feat, logits = model(torch.cat([batch["aux_images"], batch["tgt_images"]]))
        total, _ = loss(feat[:n_aux], logits[:n_aux], batch["aux_labels"], feat[n_aux:], logits[n_aux:],
                        batch["tgt_camids"], batch["tgt_index"], model.agent_matrix(), mdl_on=True)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    finally:
        for switch, value in saved.items():
            setattr(loss, switch, value)
        loss.train()


def full_gradient(model, loss, batch) -> torch.Tensor:
    """The flattened backbone gradient of the whole Eq. 10."""
    return torch.cat([g.flatten() for g in backbone_gradient(model, loss, batch, SWITCHES)])


def test_term_gradients_add_up_to_the_full_gradient_and_leave_the_state(setup):
    model, loss, batch = setup
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    grads = term_gradients(model, loss, **batch)
    assert set(grads) == {"mdl", "cml", "al", "rj"}
    # the same batch statistics: BatchNorm in train mode depends only on this batch
    want = full_gradient(model, loss, batch)
    assert float((sum(grads.values()) - want).norm()) < 1e-5 * float(want.norm())
    assert all(float(g.norm()) > 0 for g in grads.values())
    for key, value in loss.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert (loss.use_al, loss.use_rj, loss.use_cml, loss.use_mdl) == (True, True, True, True)
    assert loss.training


def test_each_share_is_its_terms_projection_on_the_total_gradient(setup):
    model, loss, batch = setup
    shares = gradient_shares(term_gradients(model, loss, **batch))
    # (g_t . G) / |G|^2 from gradients taken apart: each term alone, and the whole loss for G,
    # accumulated parameter by parameter
    total = backbone_gradient(model, loss, batch, SWITCHES)
    total_sq = sum(float(g.double().pow(2).sum()) for g in total)
    for name in SWITCHES:
        own = backbone_gradient(model, loss, batch, {name})
        dot = sum(float((g.double() * t.double()).sum()) for g, t in zip(own, total))
        assert shares[name]["along_total"] == pytest.approx(dot / total_sq, rel=1e-4, abs=1e-6), name


def test_switched_off_terms_are_not_reported(setup):
    model, loss, batch = setup
    loss.use_cml = False
    assert set(term_gradients(model, loss, **batch)) == {"mdl", "al", "rj"}
    assert loss.use_cml is False


def test_shares_by_hand():
    shares = gradient_shares({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0])})
    # G = (2, 1), |G|^2 = 5
    assert shares["a"]["along_total"] == pytest.approx(2 / 5)
    assert shares["b"]["along_total"] == pytest.approx(3 / 5)
    assert shares["b"]["norm"] == pytest.approx(math.sqrt(2))
    assert shares["a"]["cosine"] == pytest.approx(2 / math.sqrt(5))
