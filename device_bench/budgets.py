"""User budgets: limits on model size, peak memory, latency and quality, with per-target overrides.

  defaults: {max_model_kb: 600, max_peak_mb: 400, max_latency_ms: 500, min_psnr_db: 30.0}
  targets:
    local: {max_latency_ms: 1000}

A target's limits are the defaults updated by its own entry. No budgets file means no limits: everything passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesr.errors import BadInput
from edgesr.manifest import read_yaml

# budget key -> (row field it limits, how the row value is turned into the budget's unit, "max" or "min", unit)
BUDGETS: dict[str, tuple[str, float, str, str]] = {
    "max_model_kb": ("size_bytes", 1 / 1024, "max", "KB"),
    "max_peak_mb": ("peak_rss_mb", 1.0, "max", "MB"),
    "max_latency_ms": ("latency_ms_median", 1.0, "max", "ms"),
    "min_psnr_db": ("psnr_y_db", 1.0, "min", "dB"),
}
TOP_LEVEL_KEYS = ("defaults", "targets")


@dataclass(frozen=True)
class Budgets:
    defaults: dict[str, float] = field(default_factory=dict)
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str | None = None

    def for_target(self, target: str) -> dict[str, float]:
        return {**self.defaults, **self.targets.get(target, {})}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "defaults": self.defaults, "targets": self.targets}


def _limits(obj: Any, where: str, path: Path) -> dict[str, float]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: {where} must be a mapping of budget keys to numbers, got {type(obj).__name__}")
    limits = {}
    for key, value in obj.items():
        if key not in BUDGETS:
            raise BadInput(f"{path}: unknown budget key '{key}' in {where}; valid keys: {', '.join(BUDGETS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"{path}: {where}.{key} must be a number, got {value!r}")
        if value < 0:
            raise BadInput(f"{path}: {where}.{key} must not be negative, got {value!r}")
        limits[key] = float(value)
    return limits


def load_budgets(path: str | Path | None) -> Budgets:
    """Parse and validate a budgets YAML file; None gives no budgets."""
    if path is None:
        return Budgets()
    path = Path(path)
    doc = read_yaml(path, "budgets file")
    if doc is None:
        return Budgets(source=str(path))
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise BadInput(f"{path}: unknown top-level key '{key}'; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    targets = doc.get("targets") or {}
    if not isinstance(targets, dict):
        raise BadInput(f"{path}: 'targets' must map target names to budgets")
    return Budgets(
        defaults=_limits(doc.get("defaults"), "defaults", path),
        targets={str(name): _limits(limits, f"targets.{name}", path) for name, limits in targets.items()},
        source=str(path),
    )


def check(budgets: Budgets, target: str, row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{budget key: {limit, value, pass, margin, unit}} for one report row on one target.

    `margin` is the headroom in the budget's unit: limit - value for a max, value - limit for a min; negative
    means the budget failed by that much. `delta` is value - limit and `delta_pct` the same in % of the limit (None
    for a zero limit), whatever the budget's direction. A value the row lacks fails its budget (value None)."""
    verdicts = {}
    for key, limit in budgets.for_target(target).items():
        row_field, factor, kind, unit = BUDGETS[key]
        raw = row.get(row_field)
        if raw is None:
            verdicts[key] = {
                "limit": limit,
                "value": None,
                "pass": False,
                "margin": None,
                "delta": None,
                "delta_pct": None,
                "unit": unit,
            }
            continue
        value = float(raw) * factor
        margin = limit - value if kind == "max" else value - limit
        verdicts[key] = {
            "limit": limit,
            "value": value,
            "pass": margin >= 0,
            "margin": margin,
            "delta": value - limit,
            "delta_pct": (value - limit) / limit * 100 if limit else None,
            "unit": unit,
        }
    return verdicts
