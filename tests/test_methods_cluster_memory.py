"""ClusterMemory: the release's per-feature momentum update, reset, and state across cluster counts."""

from __future__ import annotations

import io

import pytest
import torch

from marreid.errors import ConfigError, TrainingError
from marreid.methods.cluster_memory import ClusterMemory


def hand_update(centres, features, labels, m):
    """The release's CM.backward: for (x, y) in batch order, c_y = m c_y + (1 - m) x; c_y /= ||c_y||."""
    c = centres.clone()
    for x, y in zip(features, labels.tolist()):
        c[y] = m * c[y] + (1.0 - m) * x
        c[y] = c[y] / c[y].norm()
    return c


def unit(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*rows, generator=g, dtype=torch.float64), dim=1)


def memory_with(centres, momentum=0.1):
    memory = ClusterMemory(centres.shape[1], momentum).double()
    memory.reset(centres)
    return memory


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.0, 1.0])
def test_update_matches_the_per_feature_loop_with_repeated_labels(momentum):
    centres = unit((5, 8), 0)
    features = unit((12, 8), 1)
    labels = torch.tensor([3, 1, 3, 3, 0, 1, 4, 3, 0, 2, 3, 1])
    memory = memory_with(centres, momentum)
    memory.update(features, labels)
    torch.testing.assert_close(memory.centres, hand_update(centres, features, labels, momentum), rtol=1e-12, atol=1e-12)


def test_order_within_a_cluster_matters_and_is_followed():
    centres = unit((2, 8), 2)
    features = unit((3, 8), 3)
    labels = torch.tensor([1, 1, 1])
    forward, backward = memory_with(centres), memory_with(centres)
    forward.update(features, labels)
    backward.update(features.flip(0), labels)
    assert not torch.allclose(forward.centres[1], backward.centres[1])
    torch.testing.assert_close(forward.centres, hand_update(centres, features, labels, 0.1))
    torch.testing.assert_close(forward.centres[0], centres[0])


def test_reset_normalises_and_resizes_on_the_buffer_device_and_dtype():
    memory = ClusterMemory(4)
    assert memory.num_clusters == 0 and memory.centres.shape == (0, 4)
    raw = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    memory.reset(raw)
    assert memory.num_clusters == 3 and memory.centres.dtype == torch.float32
    expected = torch.tensor([[0.6, 0.8, 0, 0], [0, 0, 0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(memory.centres, expected)
    memory.reset(raw[:1])
    assert memory.num_clusters == 1
    assert "centres" in dict(memory.named_buffers())


def test_state_dict_round_trip_across_cluster_counts():
    saved = memory_with(unit((7, 8), 4)).float()
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    for start in (0, 3, 9):
        fresh = ClusterMemory(8)
        if start:
            fresh.reset(unit((start, 8), 5).float())
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        buffer.seek(0)
        assert fresh.num_clusters == 7
        assert torch.equal(fresh.centres, saved.centres)


def test_state_dict_with_another_dimension_is_refused():
    other = ClusterMemory(6)
    other.reset(torch.ones(2, 6))
    with pytest.raises(RuntimeError, match="size mismatch"):
        ClusterMemory(8).load_state_dict(other.state_dict())


def test_nested_state_dict_resizes_too():
    parent = torch.nn.Module()
    parent.memory = ClusterMemory(4)
    parent.memory.reset(torch.eye(4)[:3])
    other = torch.nn.Module()
    other.memory = ClusterMemory(4)
    other.load_state_dict(parent.state_dict())
    assert torch.equal(other.memory.centres, torch.eye(4)[:3])


def test_validation():
    with pytest.raises(ConfigError, match="momentum"):
        ClusterMemory(4, momentum=1.5)
    memory = ClusterMemory(4)
    with pytest.raises(TrainingError, match="no cluster"):
        memory.reset(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"\[C, 4\]"):
        memory.reset(torch.zeros(2, 3))
    memory.reset(torch.eye(4)[:2])
    with pytest.raises(ValueError, match="outside the memory's 2 clusters"):
        memory.update(torch.zeros(1, 4), torch.tensor([2]))
    with pytest.raises(ValueError, match="must be"):
        memory.update(torch.zeros(2, 4), torch.tensor([0]))
    before = memory.centres.clone()
    memory.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert torch.equal(memory.centres, before)
