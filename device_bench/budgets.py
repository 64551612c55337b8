"""User budgets: limits per frame of the user's workload, with per-target overrides.

  workload: {frame: 960x540, tile: 128}        # LR frame WxH; tile side(s) in LR px or `frame` (a list: a sweep)
  defaults: {max_frame_ms: 400, max_peak_mb: 300, max_model_kb: 600, min_psnr_db: 30.0}
  targets:
    local: {max_frame_ms: 150}
    pi: {workload: {tile: 96}, max_frame_ms: 2000}
    iphone: {max_frame_ms: null, max_frame_ms_median: 50, max_peak_mb: null, min_psnr_db: null}

A target's limits are the defaults updated by its own entry (`null` takes a default away from that target: a
figure its source never measures, such as memory in Xcode's performance report); its workload is the top-level
one updated by its own `workload`. No budgets file means no limits (everything passes) and the default workload
(the test images as they are, each artifact at the tile it was converted for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesr.errors import BadInput
from edgesr.manifest import read_yaml
from edgesr.workload import Workload, parse_frame, parse_tiles

# budget key -> (row field it limits, how the row value is turned into the budget's unit, "max" or "min", unit)
BUDGETS: dict[str, tuple[str, float, str, str]] = {
    "max_frame_ms": ("frame_ms_p90", 1.0, "max", "ms"),
    "max_frame_ms_median": ("frame_ms_median", 1.0, "max", "ms"),
    "min_fps": ("fps", 1.0, "min", "fps"),
    "max_peak_mb": ("peak_rss_mb", 1.0, "max", "MB"),
    "max_model_kb": ("size_bytes", 1 / 1024, "max", "KB"),
    "max_download_kb": ("download_bytes", 1 / 1024, "max", "KB"),
    "max_tile_ms": ("latency_ms_median", 1.0, "max", "ms"),
    "min_psnr_db": ("psnr_y_db", 1.0, "min", "dB"),
}
# What each budget limits, in words (the report's labels and the example file's comments say the same).
LABELS = {
    "max_frame_ms": "frame latency (p90)",
    "max_frame_ms_median": "frame latency (median)",
    "min_fps": "frames per second",
    "max_peak_mb": "peak RSS at the workload",
    "max_model_kb": "model file size",
    "max_download_kb": "download size (gzip -9)",
    "max_tile_ms": "tile latency (median)",
    "min_psnr_db": "Y-PSNR",
}
RENAMED = {"max_latency_ms": "max_tile_ms (it limits one tile's invoke; per frame: max_frame_ms)"}
TOP_LEVEL_KEYS = ("workload", "defaults", "targets")
WORKLOAD_KEYS = ("frame", "tile")


@dataclass(frozen=True)
class Budgets:
    defaults: dict[str, float] = field(default_factory=dict)
    targets: dict[str, dict[str, float | None]] = field(default_factory=dict)
    source: str | None = None
    workload: dict[str, Any] = field(default_factory=dict)  # {"frame": (h, w), "tiles": (...)}, either optional
    target_workloads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_target(self, target: str) -> dict[str, float]:
        merged = {**self.defaults, **self.targets.get(target, {})}
        return {k: v for k, v in merged.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budgets:
        """The budgets a report recorded (`to_dict`), to check rows added to it later."""

        def wl(w: dict[str, Any] | None, where: str) -> dict[str, Any]:
            text = {k: v for k, v in (w or {}).items() if v is not None}
            return _workload(
                {"frame": text.get("frame"), "tile": text.get("tiles")}, where, Path(d.get("source") or "report")
            )

        return cls(
            defaults=dict(d.get("defaults") or {}),
            targets={t: dict(v) for t, v in (d.get("targets") or {}).items()},
            source=d.get("source"),
            workload=wl(d.get("workload"), "workload"),
            target_workloads={t: wl(w, f"targets.{t}.workload") for t, w in (d.get("target_workloads") or {}).items()},
        )

    def workload_for(self, target: str, frame: str | None = None, tiles: str | None = None) -> Workload:
        """The target's workload: --frame / --tile (given as text) over its own entry over the top-level one."""
        merged = {**self.workload, **self.target_workloads.get(target, {})}
        if frame is not None:
            merged["frame"] = parse_frame(frame)
        if tiles is not None:
            merged["tiles"] = parse_tiles(tiles)
        wl = Workload(frame=merged.get("frame"), tiles=merged.get("tiles"))
        wl.tile_sizes()  # a `frame` tile needs a frame size: fail here, before anything runs
        return wl

    def to_dict(self) -> dict[str, Any]:
        def wl(d: dict[str, Any]) -> dict[str, Any]:
            return Workload(d.get("frame"), d.get("tiles")).to_dict()

        return {
            "source": self.source,
            "workload": wl(self.workload),
            "defaults": self.defaults,
            "targets": self.targets,
            "target_workloads": {t: wl(d) for t, d in self.target_workloads.items()},
        }


def _workload(obj: Any, where: str, path: Path) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: {where} must be a mapping like {{frame: 960x540, tile: 128}}")
    for key in obj:
        if key not in WORKLOAD_KEYS:
            raise BadInput(f"{path}: unknown key '{key}' in {where}; valid keys: {', '.join(WORKLOAD_KEYS)}")
    out: dict[str, Any] = {}
    if obj.get("frame") is not None:
        out["frame"] = parse_frame(obj["frame"], f"{path}: {where}.frame")
    if obj.get("tile") is not None:
        tile = obj["tile"]
        text = ",".join(str(t) for t in tile) if isinstance(tile, list) else str(tile)
        out["tiles"] = parse_tiles(text, f"{path}: {where}.tile")
    return out


def _limits(obj: Any, where: str, path: Path, allow_workload: bool = False) -> dict[str, float | None]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: {where} must be a mapping of budget keys to numbers, got {type(obj).__name__}")
    limits = {}
    for key, value in obj.items():
        if key == "workload" and allow_workload:
            continue
        if key in RENAMED:
            raise BadInput(f"{path}: {where}.{key} is now {RENAMED[key]}")
        if key not in BUDGETS:
            raise BadInput(f"{path}: unknown budget key '{key}' in {where}; valid keys: {', '.join(BUDGETS)}")
        if value is None and allow_workload:  # a target's null: this default does not apply to it
            limits[key] = None
            continue
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
    target_workloads = {}
    for name, entry in targets.items():
        if isinstance(entry, dict) and entry.get("workload") is not None:
            target_workloads[str(name)] = _workload(entry["workload"], f"targets.{name}.workload", path)
    return Budgets(
        defaults=_limits(doc.get("defaults"), "defaults", path),
        targets={str(n): _limits(lim, f"targets.{n}", path, allow_workload=True) for n, lim in targets.items()},
        source=str(path),
        workload=_workload(doc.get("workload"), "workload", path),
        target_workloads=target_workloads,
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
        verdict: dict[str, Any] = {"limit": limit, "value": None, "pass": False, "margin": None}
        verdict.update(delta=None, delta_pct=None, unit=unit)
        if raw is not None:
            value = float(raw) * factor
            margin = limit - value if kind == "max" else value - limit
            verdict.update(value=value, margin=margin, delta=value - limit)
            verdict["pass"] = margin >= 0
            verdict["delta_pct"] = (value - limit) / limit * 100 if limit else None
        verdicts[key] = verdict
    return verdicts


def judge(budgets: Budgets, row: dict[str, Any]) -> None:
    """Record on a report row its verdicts (`check` on its own target) and whether they all pass."""
    row["budgets"] = check(budgets, row["target"], row)
    row["pass"] = all(v["pass"] for v in row["budgets"].values())
