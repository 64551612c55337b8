"""The bench report: report.json (the contract), report.md (for people, `report_md`) and plots (`report_plots`).

report.json holds every row with its budget verdicts and Pareto marks, the workload, the test set with its
bicubic reference, the environment per target and where the figures came from (commit, host, versions).
`render` rebuilds the Markdown and plots from an existing report.json, optionally re-checking its rows against
another budgets file.

Pareto fronts respect the measurement's spread: a point only beats another on a cost when it is better beyond
the spread of that cost (frame latency: its p90 below the other's median; peak memory: by more than
MEMORY_SPREAD_MB; file size is exact) or better in Y-PSNR by more than PSNR_TIE_DB. A 3 % latency difference
inside the timing noise is a tie, not a win.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from device_bench import budgets as budgets_mod
from edgesr.errors import EXIT_BUDGET_FAILED, EXIT_OK, EXIT_TARGET_FAILED, BadInput
from edgesr.manifest import atomic_output, new_manifest, read_json, versions, write_json

log = logging.getLogger("device_bench")

EMULATED_NOTE = "emulated — timings not meaningful"
MEMORY_SPREAD_MB = 1.0  # peak RSS moves by about this between identical runs (page-granular, allocator noise)
PSNR_TIE_DB = 0.005  # Y-PSNR is printed to 3 decimals; closer than this is a tie
# plot name -> (row field on x (smaller is better), row field of the x spread's upper end or None, axis label,
#               whether x is a timing, the budget drawn on x)
PLOTS: dict[str, tuple[str, str | None, str, bool, str]] = {
    "psnr_vs_size": ("size_kb", None, "artifact file size (KB = 1024 bytes)", False, "max_model_kb"),
    "psnr_vs_peak_rss": ("peak_rss_mb", None, "peak RSS at the workload (MiB, VmHWM)", False, "max_peak_mb"),
    "psnr_vs_latency": ("frame_ms_median", "frame_ms_p90", "frame latency, median (ms)", True, "max_frame_ms"),
}
REPORT_GLOBS = ("report.json", "report.md", "psnr_vs_*.png", "tile_sweep*.png")


def stale_report_files(out: Path) -> list[Path]:
    """The files a previous report left in `out` (removed before a new run writes its own)."""
    return sorted({p for pattern in REPORT_GLOBS for p in Path(out).glob(pattern)})


def tile_text(row: dict[str, Any], sep: str = " ") -> str:
    """How a row's tile reads: "128" for 128x128, "frame (960x540)" for the whole frame, else WxH."""
    h, w = row["tile"]
    frame = row.get("frame_size")
    if frame and [h, w] == list(frame):
        return f"frame{sep}({w}x{h})" if sep == " " else f"frame{sep}{w}x{h}"
    return str(h) if h == w else f"{w}x{h}"


def failed_budgets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every failed budget as {target, model, artifact, tile, budget, limit, value, unit, by}."""
    failed = []
    for row in rows:
        for key, v in row["budgets"].items():
            if not v["pass"]:
                failed.append(
                    {
                        "target": row["target"],
                        "model": row["model"],
                        "artifact": row["artifact"],
                        "tile": row.get("tile"),
                        "budget": key,
                        "limit": v["limit"],
                        "value": v["value"],
                        "unit": v["unit"],
                        "by": None if v["margin"] is None else abs(v["margin"]),
                    }
                )
    return failed


def _verdict(report: dict[str, Any]) -> None:
    """Exit code: 3 when a target failed (whatever the budgets say), else 1 when a budget failed, else 0."""
    report.setdefault("failed_targets", [])
    report["failed_budgets"] = failed_budgets(report["rows"])
    report["passed"] = not report["failed_budgets"] and not report["failed_targets"]
    if report["failed_targets"]:
        report["exit_code"] = EXIT_TARGET_FAILED
    else:
        report["exit_code"] = EXIT_OK if not report["failed_budgets"] else EXIT_BUDGET_FAILED


Point = tuple[float, float, float]  # (x, upper end of x's spread, y)


def pareto_front(points: list[Point], x_spread: float = 0.0, y_tie: float = PSNR_TIE_DB) -> list[bool]:
    """Which points are Pareto-optimal for smaller x and larger y, wins counted only beyond the spread.

    Point B dominates A when B is no worse on either axis (B's x at most A's x's upper end + `x_spread`, B's y at
    least A's y - `y_tie`) and better beyond the spread on one (B's upper x + `x_spread` below A's x, or B's y
    above A's y + `y_tie`). Exact ties dominate nobody, so equal points are all on the front."""

    def dominates(b: Point, a: Point) -> bool:
        no_worse = b[0] <= a[1] + x_spread and b[2] >= a[2] - y_tie
        better = b[1] + x_spread < a[0] or b[2] > a[2] + y_tie
        return no_worse and better

    return [not any(dominates(b, a) for b in points if b is not a) for a in points]


def point(row: dict[str, Any], plot: str) -> Point | None:
    """The row's (x, x upper, Y-PSNR) on a plot, or None when it lacks a finite figure."""
    field, upper, *_ = PLOTS[plot]
    x = row["size_bytes"] / 1024 if field == "size_kb" else row.get(field)
    hi = row.get(upper) if upper else x
    y = row.get("psnr_y_db")
    values = (x, hi, y)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return float(x), float(max(x, hi)), float(y)


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """row["pareto"][plot] = whether the row is on its target's front of Y-PSNR vs that plot's cost, among the
    rows of the same workload (same frame and tile count are not required: the workload is the frame). Rows whose
    runner says its timings mean nothing (Core ML's reference executor) are on no latency or memory front."""
    for row in rows:
        row["pareto"] = {}
    for plot in PLOTS:
        spread = MEMORY_SPREAD_MB if plot == "psnr_vs_peak_rss" else 0.0
        for target in dict.fromkeys(r["target"] for r in rows):
            group = [
                r
                for r in rows
                if r["target"] == target
                and point(r, plot) is not None
                and (plot == "psnr_vs_size" or r.get("timings_meaningful", True))
            ]
            front = pareto_front([point(r, plot) for r in group], x_spread=spread)
            for r, on in zip(group, front, strict=True):
                r["pareto"][plot] = on


def build_report(
    rows: list[dict[str, Any]],
    environment: dict[str, Any],
    settings: dict[str, Any],
    test_set: dict[str, Any],
    skipped: list[str],
    budgets: dict[str, Any],
    failed_targets: list[dict[str, Any]] | tuple = (),
) -> dict[str, Any]:
    mark_pareto(rows)
    report = new_manifest(
        "bench",
        test_set=test_set,
        settings=settings,
        budgets=budgets,
        environment=environment,
        rows=rows,
        failed_targets=list(failed_targets),
        skipped=skipped,
        versions=versions("numpy", "Pillow", "PyYAML", "matplotlib"),
    )
    _verdict(report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    """The plots, then report.json (listing them) and report.md, each written atomically."""
    from device_bench.report_md import markdown  # they import this module's figures
    from device_bench.report_plots import draw_plots

    for stale in stale_report_files(out):
        if stale.suffix == ".png":
            stale.unlink(missing_ok=True)
    report["plots"] = draw_plots(out, report)
    write_json(out / "report.json", report)
    with atomic_output(out / "report.md") as tmp:
        tmp.write_text(markdown(report))


def render(folder: Path, budgets_path: Path | None = None) -> dict[str, Any]:
    """Re-render report.md and the plots from <folder>/report.json; with a budgets file, re-check the rows first."""
    report = load_report(folder)
    budgets = budgets_mod.load_budgets(budgets_path) if budgets_path is not None else None
    rewrite(Path(folder), report, budgets)
    return report


def load_report(folder: Path) -> dict[str, Any]:
    """<folder>/report.json, which must be a bench report."""
    report = read_json(Path(folder) / "report.json")
    if report.get("kind") != "bench" or not isinstance(report.get("rows"), list):
        raise BadInput(f"{folder}/report.json: not a device_bench report")
    return report


def rewrite(out: Path, report: dict[str, Any], budgets: budgets_mod.Budgets | None = None) -> None:
    """Write an existing report again after its rows changed: with `budgets`, every row is re-checked against
    them (and they are recorded); then the Pareto marks, the verdict, report.json, report.md and the plots."""
    if budgets is not None:
        for row in report["rows"]:
            budgets_mod.judge(budgets, row)
        report["budgets"] = budgets.to_dict()
    mark_pareto(report["rows"])
    _verdict(report)
    write_report(out, report)
