"""Choosing a shape from measurements: per target, the largest candidate whose predicted figures meet every
budget with the stated margin, and, when none does, the budget that binds and the nearest point.

A candidate is (shape, precision, tile), plus a weight sparsity when only file size stops its shape (the shape
the other budgets allow, its conv weights magnitude-pruned so the sparse-encoded file fits: `fit.sparse`). Its
figures are predicted by the shape model fitted to the measured shapes of its width family at that precision and
tile on that target (`predict.fit_curve`); a sparse candidate's are those measured of its one-shot cut. "Largest"
means most parameters (what buys quality at a fixed training budget), then the higher precision, then the faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from device_bench.budgets import BUDGETS
from edgesr.workload import tile_label
from fit.predict import FIGURES, Curve, fit_curve
from fit.shapes import Shape

PREDICTED = (*FIGURES, "latency_ms_median")
PRECISION_RANK = {"fp32": 0, "fp16": 1, "int8-dynamic": 2, "int8": 3}
UNPREDICTABLE = ("min_psnr_db",)  # known only after training
SIZE_BUDGETS = ("max_model_kb", "max_download_kb")  # what weight sparsity can meet without a narrower shape


@dataclass
class Candidate:
    shape: Shape
    precision: str
    tile: tuple[int, int]
    predicted: dict[str, float]
    measured: dict[str, Any] | None = None  # the shape-stage row when this very candidate was measured
    violations: dict[str, dict[str, float]] = field(default_factory=dict)  # budget -> {limit, predicted, excess}
    sparsity: float = 0.0  # of the conv weights the sparse encoding leaves out (0: a dense file)

    @property
    def feasible(self) -> bool:
        return not self.violations

    def order(self) -> tuple:
        return (-self.shape.params, PRECISION_RANK.get(self.precision, 9), self.predicted.get("frame_ms_p90", 0.0))

    @property
    def encoding(self) -> str:
        return "sparse" if self.sparsity else "dense"

    def label(self) -> str:
        sparse = f" sparse {self.sparsity:.0%}" if self.sparsity else ""
        return f"{self.shape.label()} {self.precision}{sparse} tile {tile_label(self.tile)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape.to_dict(),
            "precision": self.precision,
            "tile": list(self.tile),
            "sparsity": self.sparsity,
            "predicted": {k: round(v, 4) for k, v in self.predicted.items()},
            "measured": self.measured,
            "feasible": self.feasible,
            "rejected_by": self.violations,
        }


def budget_value(key: str, figures: dict[str, Any]) -> float | None:
    field_, factor, _, _ = BUDGETS[key]
    value = figures.get(field_)
    return None if value is None else float(value) * factor


def violations(limits: dict[str, float], figures: dict[str, Any], margin: float) -> dict[str, dict[str, float]]:
    """The budgets `figures` miss once `margin` is applied (a max must hold at value x (1 + margin))."""
    out = {}
    for key, limit in limits.items():
        if key in UNPREDICTABLE:
            continue
        value = budget_value(key, figures)
        if value is None:
            continue
        kind = BUDGETS[key][2]
        padded = value * (1 + margin) if kind == "max" else value * (1 - margin)
        if (kind == "max" and padded > limit) or (kind == "min" and padded < limit):
            excess = (padded - limit) / limit if limit else float("inf")
            out[key] = {"limit": limit, "value": round(value, 4), "excess": round(abs(excess), 4)}
    return out


def curves_for(
    rows_by_shape: dict[str, list[dict[str, Any]]], family: list[Shape], precision: str, tile: tuple[int, int]
) -> dict[str, Curve]:
    """Per figure, the curve through the family's measured shapes at one precision and tile."""
    points: dict[str, list[tuple[float, float]]] = {f: [] for f in PREDICTED}
    for shape in family:
        for row in rows_by_shape.get(shape.id, []):
            if row["precision"] != precision or tuple(row["tile"]) != tuple(tile):
                continue
            for f in PREDICTED:
                if row.get(f) is not None:
                    points[f].append((shape.fraction, float(row[f])))
    return {f: fit_curve(p) for f, p in points.items() if p}


def candidates(
    grid: list[Shape],
    curves: dict[str, Curve],
    precision: str,
    tile: tuple[int, int],
    limits: dict[str, float],
    margin: float,
    measured: dict[str, list[dict[str, Any]]],
) -> list[Candidate]:
    out = []
    for shape in grid:
        predicted = {f: c(shape.fraction) for f, c in curves.items()}
        row = next(
            (r for r in measured.get(shape.id, []) if r["precision"] == precision and tuple(r["tile"]) == tile),
            None,
        )
        c = Candidate(shape, precision, tile, predicted, row)
        c.violations = violations(limits, predicted, margin)
        out.append(c)
    return out


def ranked(cands: list[Candidate]) -> list[Candidate]:
    """Feasible candidates, best first."""
    return sorted((c for c in cands if c.feasible), key=Candidate.order)


def binding(chosen: Candidate, cands: list[Candidate]) -> list[str]:
    """The budgets the next larger shape of the chosen's family, precision and tile misses (what stops growth)."""
    same = [
        c
        for c in cands
        if c.precision == chosen.precision
        and c.tile == chosen.tile
        and c.shape.round_to == chosen.shape.round_to
        and c.shape.params > chosen.shape.params
    ]
    if not same:
        return []
    nxt = min(same, key=lambda c: c.shape.params)
    return sorted(nxt.violations)


def sparse_bases(cands: list[Candidate], chosen: Candidate | None) -> list[Candidate]:
    """Where weight sparsity could start from, one per precision: the widest shape whose only predicted misses are
    file-size budgets, wider than `chosen` (the best feasible candidate); smallest file first. Which precision
    needs the fewest zeros is measured, not assumed: sparse encoding's index overhead weighs more on int8 values."""
    blocked = [c for c in cands if c.violations and set(c.violations) <= set(SIZE_BUDGETS)]
    if chosen is not None:
        blocked = [c for c in blocked if c.shape.params > chosen.shape.params]
    per_precision: dict[str, Candidate] = {}
    for c in sorted(blocked, key=lambda c: (-c.shape.params, c.predicted.get("size_bytes", 0.0), c.order())):
        per_precision.setdefault(c.precision, c)
    return sorted(per_precision.values(), key=lambda c: c.predicted.get("size_bytes", 0.0))


def nearest(cands: list[Candidate]) -> Candidate:
    """The candidate closest to feasible: the smallest worst excess over its budgets."""
    return min(cands, key=lambda c: (max(v["excess"] for v in c.violations.values()), c.order()))
