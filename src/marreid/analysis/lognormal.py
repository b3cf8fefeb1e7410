"""Supplementary Fig. S1: is the log soft multilabel close to normal?

The paper's L_CML summarises each camera's log y by a mean and a standard
deviation per dimension, justified by the observation that log y (Eq. 1) looks
normal over the target training set, both pooled over all dimensions and in a
single dimension. Here the log multilabels are collected from a model, a normal
is fitted by maximum likelihood, and the fit is scored by skewness, excess
kurtosis and the Kolmogorov-Smirnov statistic.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from marreid.analysis.plotting import plot_histograms
from marreid.data import Sample
from marreid.engine.extract import model_outputs
from marreid.errors import ConfigError, DatasetError
from marreid.losses.multilabel import log_soft_multilabel


@dataclass(frozen=True)
class NormalFit:
    """A maximum-likelihood normal fit of a sample and how well it fits.

    ``std`` is the population (ddof 0) standard deviation, the normal's MLE;
    ``skewness`` and ``excess_kurtosis`` are the biased moment ratios (0 for a normal);
    ``ks_statistic`` is the largest gap between the empirical CDF and the fitted normal's.
    """

    n: int
    mean: float
    std: float
    skewness: float
    excess_kurtosis: float
    ks_statistic: float

    def as_dict(self) -> dict:
        return asdict(self)


def normal_cdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Phi((x - mean) / std) = (1 + erf((x - mean) / (std sqrt 2))) / 2, in float64."""
    z = torch.from_numpy(np.asarray((np.asarray(x, np.float64) - mean) / std, dtype=np.float64))
    return torch.special.ndtr(z).numpy()


def normal_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """exp(-(x - mean)^2 / (2 std^2)) / (std sqrt(2 pi))."""
    z = (np.asarray(x, np.float64) - mean) / std
    return np.exp(-0.5 * z * z) / (std * math.sqrt(2.0 * math.pi))


def ks_statistic(values: np.ndarray, mean: float, std: float) -> float:
    """One-sample Kolmogorov-Smirnov statistic against N(mean, std^2).

    D = max_i max(i/n - F(x_(i)), F(x_(i)) - (i-1)/n) over the sorted sample x_(1..n).
    The parameters are fitted on the same sample, so D is a descriptive gap, not a
    test with the classical KS p-value (that would be Lilliefors' test).
    """
    x = np.sort(np.asarray(values, np.float64).ravel())
    n = x.size
    cdf = normal_cdf(x, mean, std)
    upper = np.arange(1, n + 1, dtype=np.float64) / n - cdf
    lower = cdf - np.arange(0, n, dtype=np.float64) / n
    return float(max(upper.max(), lower.max()))


def fit_normal(values: np.ndarray, what: str = "values") -> NormalFit:
    """Fit N(mean, std^2) by maximum likelihood and score the fit.

    mean = sum x / n, std^2 = m2 = sum (x - mean)^2 / n,
    skewness = m3 / m2^(3/2), excess kurtosis = m4 / m2^2 - 3,
    with m_k = sum (x - mean)^k / n; ``ks_statistic`` as in :func:`ks_statistic`.
    Raises DatasetError naming ``what`` when there are fewer than two values, a
    non-finite one, or no spread.
    """
    x = np.asarray(values, np.float64).ravel()
    if x.size < 2:
        raise DatasetError(f"{what}: need at least two values to fit a normal, got {x.size}")
    if not np.isfinite(x).all():
        raise DatasetError(f"{what}: holds NaN or infinite values")
    mean = float(x.mean())
    d = x - mean
    d2 = d * d
    m2 = float(np.mean(d2))
    if m2 <= 0.0:
        raise DatasetError(f"{what}: every value is {mean:g}, a normal cannot be fitted")
    m3, m4 = float(np.mean(d2 * d)), float(np.mean(d2 * d2))
    std = math.sqrt(m2)
    return NormalFit(n=int(x.size), mean=mean, std=std, skewness=m3 / m2**1.5,
                     excess_kurtosis=m4 / (m2 * m2) - 3.0, ks_statistic=ks_statistic(x, mean, std))


def density_histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram normalised to unit area (count / (n * bin width)) and its ``bins + 1`` edges."""
    if bins < 1:
        raise ConfigError(f"--bins must be at least 1, got {bins}")
    density, edges = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins, density=True)
    return density, edges


def check_dimension(log_y: np.ndarray, dim: int) -> None:
    """ConfigError naming ``--dim`` unless ``dim`` indexes a column of ``log_y``."""
    if not 0 <= dim < log_y.shape[1]:
        raise ConfigError(f"--dim {dim}: the model has {log_y.shape[1]} reference agents (0..{log_y.shape[1] - 1})")


def lognormal_panels(log_y: np.ndarray, dim: int = 0) -> dict[str, np.ndarray]:
    """The two samples of Fig. S1: every entry of ``log_y`` [N, K], and its column ``dim``."""
    check_dimension(log_y, dim)
    return {"all dimensions": log_y.ravel(), f"dimension {dim}": log_y[:, dim]}


def collect_log_multilabels(model: torch.nn.Module, samples: Sequence[Sample], transform, batch_size: int,
                            num_workers: int, device: torch.device | str) -> np.ndarray:
    """log y of Eq. 1 (a log-softmax of the agent logits) for every sample, float32 [N, K].

    The model is put in eval mode and restored afterwards.
    """
    if not samples:
        raise DatasetError("no images to compute soft multilabels of (empty training split)")
    return log_soft_multilabel(model_outputs(model, samples, transform, batch_size, num_workers, device)[1]).numpy()


def write_lognormal_report(log_y: np.ndarray, out_dir: str | Path, dim: int = 0, bins: int = 100,
                           meta: dict | None = None) -> dict:
    """Fit both Fig. S1 panels and write ``lognormal.png`` (histograms with the fitted normals),
    ``lognormal.json`` (the fits, ``meta`` and the sizes) and ``lognormal.csv`` (every bin: panel,
    edges, histogram density and the fitted density at the bin centre).

    Returns ``{"fits": {panel: NormalFit}, "png", "json", "csv"}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fits, drawn, table = {}, [], []
    for title, values in lognormal_panels(log_y, dim).items():
        fit = fit_normal(values, f"log soft multilabels, {title}")
        density, edges = density_histogram(values, bins)
        xs = np.linspace(edges[0], edges[-1], 400)
        label = f"N({fit.mean:.2f}, {fit.std:.2f}²)"
        heading = (f"{title}: skew {fit.skewness:.2f}, excess kurtosis {fit.excess_kurtosis:.2f}, "
                   f"KS {fit.ks_statistic:.3f}")
        drawn.append((heading, density, edges, xs, normal_pdf(xs, fit.mean, fit.std), label))
        at_centres = normal_pdf((edges[:-1] + edges[1:]) / 2, fit.mean, fit.std)
        table += [[title, lo, hi, d, f] for lo, hi, d, f in
                  zip(edges[:-1].tolist(), edges[1:].tolist(), density.tolist(), at_centres.tolist())]
        fits[title] = fit
    png = plot_histograms(drawn, out_dir / "lognormal.png", xlabel="log soft multilabel (log y)")
    report = {**(meta or {}), "num_images": int(log_y.shape[0]), "num_agents": int(log_y.shape[1]),
              "dimension": dim, "bins": bins, "std_rule": "population (ddof=0), the normal's maximum-likelihood fit",
              "fits": {title: fit.as_dict() for title, fit in fits.items()}}
    json_path = out_dir / "lognormal.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    csv_path = out_dir / "lognormal.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["panel", "bin_left", "bin_right", "density", "fitted_density"])
        writer.writerows(table)
    return {"fits": fits, "png": png, "json": json_path, "csv": csv_path}


__all__ = ["NormalFit", "normal_cdf", "normal_pdf", "ks_statistic", "fit_normal", "density_histogram",
           "lognormal_panels", "check_dimension", "collect_log_multilabels", "write_lognormal_report"]
