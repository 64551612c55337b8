"""The shape model: how a measured figure grows with the fraction of channels a shape keeps.

The measured shapes are the model's knots; a shape in between is predicted by linear interpolation between its
measured neighbours of the same width family, precision, tile and target. Why not a smooth curve: kernel
efficiency is not smooth in width. Measured on this machine (edsr-tiny x2, 480x270 frames, 128 px tiles, fp32),
widths 32/24/16 ran 870/647/246 ms per frame; the quadratic through all five measured shapes predicted 577 ms for
24 and 308 ms for 16, a leave-one-out error of 117 % — while the interpolated model is exact at every measured
shape. So the fit measures the shape it is about to train before training it (`search.Fit.refine`): the figure
it predicts for the chosen artifact is always a measurement of that very shape with untrained weights, and what
the final measurement checks is the claim the fit rests on, that latency, memory and size depend on the shape,
not the weights. The model states its own error: leave-one-out over the interior knots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# report row fields the fit predicts for a shape (budgets read them)
FIGURES = ("frame_ms_p90", "frame_ms_median", "fps", "peak_rss_mb", "size_bytes", "download_bytes")


@dataclass(frozen=True)
class Curve:
    knots: tuple[tuple[float, float], ...]  # measured (kept fraction, value), sorted by fraction
    loo_error: float | None  # worst leave-one-out relative error over the interior knots (None: < 3 knots)

    def __call__(self, k: float) -> float:
        ks, ys = zip(*self.knots, strict=True)
        return float(np.interp(k, ks, ys))


def _knots(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Sorted knots; repeated measurements of one fraction are averaged."""
    by_k: dict[float, list[float]] = {}
    for k, y in points:
        by_k.setdefault(round(float(k), 9), []).append(float(y))
    return tuple((k, float(np.mean(v))) for k, v in sorted(by_k.items()))


def fit_curve(points: list[tuple[float, float]]) -> Curve:
    """The model through measured (kept fraction, value) points; at least one point."""
    if not points:
        raise ValueError("no measured points to fit")
    knots = _knots(points)
    loo = None
    if len(knots) >= 3:
        errors = []
        for i in range(1, len(knots) - 1):
            rest = Curve(knots[:i] + knots[i + 1 :], None)
            if knots[i][1] != 0:
                errors.append(abs(rest(knots[i][0]) - knots[i][1]) / abs(knots[i][1]))
        loo = max(errors) if errors else None
    return Curve(knots, loo)


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured
