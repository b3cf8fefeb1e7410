"""The demo's expected range: the shipped reference, the comparison and the busy-machine hint."""

from __future__ import annotations

import argparse

import pytest

from marreid.cli import demo_expected
from marreid.cli.demo_cmd import expected_comparison, shipped_settings

REFERENCE = {
    "command": "marreid demo --seeds 3", "measured_on": "a test", "ap_rule": "plain", "seeds": [0, 1, 2],
    "rows": {"direct": {"rank1": {"mean": 40.0, "std": 5.0}, "mAP": {"mean": 15.0, "std": 2.0}},
             "mar": {"rank1": {"mean": 55.0, "std": 3.0}, "mAP": {"mean": 22.0, "std": 1.0}},
             "gain": {"rank1": {"mean": 15.0, "std": 2.0}, "mAP": {"mean": 7.0, "std": 1.0}}},
}


def summary(direct: tuple[list[float], list[float]], mar: tuple[list[float], list[float]] | None = None) -> dict:
    """A ``pipeline.aggregate_seeds`` summary holding only what the comparison reads (fractions)."""
    rows = {"direct": direct} if mar is None else {"direct": direct, "mar": mar}
    return {row: {"label": row, "plain": {"rank1": {"values": r1}, "mAP": {"values": ap}}}
            for row, (r1, ap) in rows.items()}


def by_key(entries: list[dict]) -> dict[tuple[str, str], dict]:
    return {(e["row"], e["metric"]): e for e in entries}


def test_own_rows_are_percent_and_the_gain_is_taken_seed_by_seed():
    own = demo_expected.expected_rows(summary(([0.40, 0.30], [0.15, 0.10]), ([0.50, 0.50], [0.20, 0.16])), "plain")
    assert own["direct"]["rank1"]["values"] == pytest.approx([40.0, 30.0])
    assert own["gain"]["rank1"]["values"] == pytest.approx([10.0, 20.0])
    assert own["gain"]["mAP"]["mean"] == pytest.approx(5.5)
    assert own["gain"]["rank1"]["std"] == pytest.approx(7.0710678)  # sample std (ddof = 1)


def test_each_number_is_judged_against_mean_plus_minus_two_spreads():
    # direct rank-1 44.0 is inside 40 +- 10; MAR mAP 19.0 is outside 22 +- 2; the gain follows.
    own = demo_expected.expected_rows(summary(([0.44], [0.15]), ([0.56], [0.19])), "plain")
    entries = by_key(demo_expected.compare(own, REFERENCE))
    assert entries[("direct", "rank-1")]["low"] == pytest.approx(30.0)
    assert entries[("direct", "rank-1")]["high"] == pytest.approx(50.0)
    assert entries[("direct", "rank-1")]["outside_seeds"] == []
    assert entries[("mar", "mAP")]["outside_seeds"] == [0]
    assert entries[("gain", "rank-1")]["values"] == pytest.approx([12.0])
    assert entries[("gain", "mAP")]["outside_seeds"] == [0]  # 4.0 against 7 +- 2


def test_the_table_names_the_seeds_outside_and_says_whether_the_run_is_healthy():
    own = demo_expected.expected_rows(summary(([0.40, 0.20], [0.15, 0.15]), ([0.55, 0.55], [0.22, 0.22])), "plain")
    text = demo_expected.comparison_markdown(demo_expected.compare(own, REFERENCE), REFERENCE)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["direct transfer, rank-1"] == ["40.0, 20.0", "40.0 ± 5.0", "30.0 to 50.0", "NO (seed 1)"]
    assert rows["MAR, mAP"][-1] == "yes"
    assert "Some number of this run is outside" in text
    healthy = demo_expected.expected_rows(summary(([0.40], [0.15]), ([0.55], [0.22])), "plain")
    assert "Every number of this run is inside" in demo_expected.comparison_markdown(
        demo_expected.compare(healthy, REFERENCE), REFERENCE)


def test_rows_the_run_did_not_train_are_not_compared():
    own = demo_expected.expected_rows(summary(([0.40], [0.15])), "plain")
    assert {e["row"] for e in demo_expected.compare(own, REFERENCE)} == {"direct"}


def test_the_shipped_reference_is_read_and_compares_a_run():
    expected = demo_expected.load_expected()
    assert set(expected["rows"]) == {"direct", "mar", "gain"} and expected["ap_rule"] == "plain"
    for metrics in expected["rows"].values():
        assert {"rank1", "mAP"} <= set(metrics) and all(m["std"] > 0 for m in metrics.values())
    entries, text = expected_comparison(summary(([0.40], [0.15]), ([0.55], [0.22])), "plain")
    assert len(entries) == 6 and sum(line.startswith("| ") for line in text.splitlines()) == 7  # head + 6 rows


@pytest.mark.parametrize("config, overrides, shipped", [
    (None, [], True), ("other.yaml", [], False), (None, ["optim.lr=0.1"], False),
])
def test_only_the_shipped_settings_get_the_expected_range(config, overrides, shipped):
    assert shipped_settings(argparse.Namespace(config=config, overrides=overrides)) is shipped


@pytest.mark.parametrize("threads, load, cpus, hinted", [
    (2, 1.9, 2, True),    # another job fills the cores
    (2, 0.1, 2, False),   # idle machine: use them all
    (1, 3.0, 2, False),   # one thread has nothing to wait on
    (4, 3.0, 8, False),   # room for both
])
def test_busy_machine_hint(threads, load, cpus, hinted):
    hint = demo_expected.busy_hint(threads, load, cpus)
    assert (hint is not None) is hinted
    if hinted:
        assert "--threads 1" in hint
