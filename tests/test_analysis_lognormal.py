"""Fig. S1's statistics against hand-worked values and loops written from the definitions."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from marreid.analysis.lognormal import (
    collect_log_multilabels,
    density_histogram,
    fit_normal,
    ks_statistic,
    lognormal_panels,
    normal_pdf,
    write_lognormal_report,
)
from marreid.data import Sample
from marreid.data.transforms import TestTransform
from marreid.errors import ConfigError, DatasetError
from marreid.models import build_model


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def naive_ks(values, mean: float, std: float) -> float:
    """sup_x |F_n(x) - F(x)|, checked just before and at every sample point."""
    xs = sorted(values)
    n = len(xs)
    worst = 0.0
    for x in xs:
        f = phi((x - mean) / std)
        below = sum(v < x for v in xs) / n
        at = sum(v <= x for v in xs) / n
        worst = max(worst, abs(at - f), abs(below - f))
    return worst


def test_hand_worked_moments() -> None:
    # x = 1, 2, 3, 6: mean 3, deviations -2 -1 0 3, m2 = 14/4, m3 = 18/4, m4 = 98/4
    fit = fit_normal(np.array([1.0, 2.0, 3.0, 6.0]))
    assert fit.n == 4 and fit.mean == pytest.approx(3.0)
    assert fit.std == pytest.approx(math.sqrt(3.5))
    assert fit.skewness == pytest.approx(4.5 / 3.5**1.5)
    assert fit.excess_kurtosis == pytest.approx(24.5 / 3.5**2 - 3.0)


def test_hand_worked_ks_statistic() -> None:
    # Two points at -1 and 1 against N(0, 1): the gaps are 1/2 - Phi(-1) and Phi(1) - 1/2.
    assert ks_statistic(np.array([1.0, -1.0]), 0.0, 1.0) == pytest.approx(phi(1.0) - 0.5, abs=1e-12)


def test_fit_matches_numpy_and_naive_loops() -> None:
    values = np.random.default_rng(3).gamma(2.0, 1.5, 400) - 4.0
    fit = fit_normal(values.astype(np.float32))
    x = values.astype(np.float32).astype(np.float64)
    assert fit.mean == pytest.approx(float(np.mean(x)), rel=1e-12)
    assert fit.std == pytest.approx(float(np.std(x)), rel=1e-12)
    mean = sum(x) / len(x)
    m = {k: sum((v - mean) ** k for v in x) / len(x) for k in (2, 3, 4)}
    assert fit.skewness == pytest.approx(m[3] / m[2] ** 1.5, rel=1e-9)
    assert fit.excess_kurtosis == pytest.approx(m[4] / m[2] ** 2 - 3.0, rel=1e-9)
    assert fit.ks_statistic == pytest.approx(naive_ks(list(x), fit.mean, fit.std), abs=1e-12)


def test_a_normal_sample_fits_and_a_skewed_one_does_not() -> None:
    rng = np.random.default_rng(0)
    normal = fit_normal(rng.normal(-6.0, 2.0, 20000))
    skewed = fit_normal(rng.exponential(1.0, 20000))
    assert abs(normal.skewness) < 0.1 and abs(normal.excess_kurtosis) < 0.2 and normal.ks_statistic < 0.02
    assert skewed.skewness > 1.5 and skewed.ks_statistic > 0.05


def test_density_histogram_counts_and_normal_pdf() -> None:
    values = np.array([0.0, 0.1, 0.2, 0.9, 1.0, 1.0])
    density, edges = density_histogram(values, 2)
    # two bins of width 0.5 over [0, 1]: 3 values, then 3 (the right edge is closed)
    np.testing.assert_allclose(edges, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(density, [3 / (6 * 0.5), 3 / (6 * 0.5)])
    assert normal_pdf(np.array([1.0]), 1.0, 2.0)[0] == pytest.approx(1.0 / (2.0 * math.sqrt(2 * math.pi)))
    with pytest.raises(ConfigError, match="--bins"):
        density_histogram(values, 0)


def test_panels_and_bad_input() -> None:
    log_y = np.arange(12, dtype=np.float32).reshape(4, 3)
    panels = lognormal_panels(log_y, dim=2)
    np.testing.assert_array_equal(panels["all dimensions"], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(panels["dimension 2"], [2, 5, 8, 11])
    with pytest.raises(ConfigError, match="--dim 3"):
        lognormal_panels(log_y, dim=3)
    with pytest.raises(DatasetError, match="every value is 2"):
        fit_normal(np.full(5, 2.0))
    with pytest.raises(DatasetError, match="NaN"):
        fit_normal(np.array([1.0, float("nan")]))


def test_report_files_hold_the_fits(tmp_path) -> None:
    log_y = np.random.default_rng(1).normal(-5.0, 1.5, (50, 6)).astype(np.float32)
    result = write_lognormal_report(log_y, tmp_path, dim=1, bins=10, meta={"checkpoint": "x.pt"})
    with Image.open(result["png"]) as img:
        assert img.size == (1200, 450)
    report = json.loads(result["json"].read_text())
    assert report["checkpoint"] == "x.pt" and report["num_images"] == 50 and report["num_agents"] == 6
    everything, column = log_y.astype(np.float64).ravel(), log_y[:, 1].astype(np.float64)
    assert report["fits"]["all dimensions"]["mean"] == pytest.approx(np.mean(everything), rel=1e-12)
    assert report["fits"]["all dimensions"]["std"] == pytest.approx(np.std(everything), rel=1e-12)
    assert report["fits"]["dimension 1"]["mean"] == pytest.approx(np.mean(column), rel=1e-12)
    assert report["fits"]["dimension 1"]["std"] == pytest.approx(np.std(column), rel=1e-12)
    with result["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20
    first = [r for r in rows if r["panel"] == "dimension 1"]
    counts, _ = np.histogram(column, bins=10)
    width = float(first[0]["bin_right"]) - float(first[0]["bin_left"])
    np.testing.assert_allclose([float(r["density"]) for r in first], counts / (50 * width), rtol=1e-9)


def test_collect_log_multilabels_is_the_log_of_eq1(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 5, scale=30.0)
    model.train()
    samples = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), 1, 0))
    transform = TestTransform(32, 16)
    log_y = collect_log_multilabels(model, samples, transform, batch_size=2, num_workers=0, device="cpu")
    assert model.training and log_y.shape == (5, 5) and log_y.dtype == np.float32
    model.eval()
    with torch.no_grad():
        images = torch.stack([transform(Image.open(s.path).convert("RGB")) for s in samples])
        feat = model.extract(images).double()
        agents = model.agents.weight.double()
        agents = agents / agents.norm(dim=1, keepdim=True)
    for i in range(5):
        logits = [30.0 * float(feat[i] @ agents[k]) for k in range(5)]
        total = sum(math.exp(v) for v in logits)
        want = [math.log(math.exp(v) / total) for v in logits]
        np.testing.assert_allclose(log_y[i], want, atol=1e-4)
