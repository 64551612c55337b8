"""The shape model: how a measured figure grows with the fraction of channels a shape keeps.

Why a quadratic in the kept fraction k: an inner conv's MACs and weights scale with k_in x k_out = k^2, its
activations (what dominates peak memory) with k, and every net has a fixed part (the RGB head and tail, the
runtime itself); a + b k + c k^2 covers all three. It is fitted by least squares to the shapes measured on one
target at one precision and tile, predicts the shapes in between, and states its own error: leave-one-out over
the measured points, and predicted vs measured for the artifact the fit chooses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# report row field -> how a budget reads it; the figures the fit predicts for a shape
FIGURES = ("frame_ms_p90", "frame_ms_median", "fps", "peak_rss_mb", "size_bytes", "download_bytes")


@dataclass(frozen=True)
class Curve:
    coef: tuple[float, ...]  # a, b, c of a + b k + c k^2 (fewer when fewer points were measured)
    loo_error: float | None  # worst leave-one-out relative error over the measured points (None: < 4 points)

    def __call__(self, k: float) -> float:
        return float(sum(c * k**i for i, c in enumerate(self.coef)))


def _fit(ks: np.ndarray, ys: np.ndarray) -> tuple[float, ...]:
    degree = min(2, len(ks) - 1)
    design = np.vander(ks, degree + 1, increasing=True)
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    return tuple(float(c) for c in coef)


def fit_curve(points: list[tuple[float, float]]) -> Curve:
    """The curve through measured (k, value) points; at least one point."""
    if not points:
        raise ValueError("no measured points to fit")
    ks = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    loo = None
    if len(points) >= 4:  # leaving one out still leaves a quadratic fit
        errors = []
        for i in range(len(points)):
            mask = np.arange(len(points)) != i
            curve = Curve(_fit(ks[mask], ys[mask]), None)
            if ys[i] != 0:
                errors.append(abs(curve(ks[i]) - ys[i]) / abs(ys[i]))
        loo = max(errors) if errors else None
    return Curve(_fit(ks, ys), loo)


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured
