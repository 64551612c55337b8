"""The report's plots (PNG, matplotlib's Agg canvas: no GUI, no pyplot state).

- Pareto plots of Y-PSNR against file size, peak memory and frame latency: one set for all targets when they
  share their budgets, else one set per target, each drawing that target's own limits.
- A tile sweep per target where a model ran at several tiles: peak memory and frame latency against tile size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from device_bench.budgets import LABELS
from device_bench.report import EMULATED_NOTE, PLOTS, point, tile_text
from edgesr.manifest import atomic_output

_TITLES = {"psnr_vs_size": "Y-PSNR vs size", "psnr_vs_peak_rss": "Y-PSNR vs peak memory"}
_TITLES["psnr_vs_latency"] = "Y-PSNR vs frame latency"
# Where a point's label goes (points, right of the point), in turn: labels of points at about the same Y-PSNR are
# stacked at different heights so that they do not sit on each other.
_OFFSETS = ((6, 5), (6, -11), (6, 17), (6, -23))


def _limits(report: dict[str, Any], target: str) -> dict[str, float]:
    b = report.get("budgets") or {}
    return {**(b.get("defaults") or {}), **((b.get("targets") or {}).get(target) or {})}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def draw_plots(out: Path, report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Draw every plot the rows allow; {target or "*" (all targets): {title: file}}."""
    rows = report["rows"]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    shared = len({tuple(sorted(_limits(report, t).items())) for t in targets}) <= 1
    groups = {"*": targets} if shared else {t: [t] for t in targets}
    drawn: dict[str, dict[str, str]] = {}
    for key, members in groups.items():
        suffix = "" if key == "*" else f"-{_safe(key)}"
        for plot in PLOTS:
            file = f"{plot}{suffix}.png"
            if _pareto_plot(out / file, report, plot, members):
                title = _TITLES[plot] + ("" if key == "*" else f" on {key}")
                drawn.setdefault(key, {})[title] = file
    for target in targets:
        file = f"tile_sweep-{_safe(target)}.png"
        if _sweep_plot(out / file, [r for r in rows if r["target"] == target], target):
            drawn.setdefault(target, {})[f"Tile sweep on {target}"] = file
    return drawn


def _label(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The model, then only what tells its points apart: encoding, precision, tile."""
    same_model = [x for x in rows if x["model"] == r["model"]]
    text = r["model"]
    for key in ("encoding", "precision"):
        if len({x.get(key) for x in same_model}) > 1:
            text += f" {r.get(key)}"
    if len({tuple(x["tile"]) for x in same_model}) > 1:
        text += f" @{tile_text(r, sep=' ')}"
    return text


def _pareto_plot(path: Path, report: dict[str, Any], plot: str, targets: list[str]) -> bool:
    from matplotlib.figure import Figure

    _, _, xlabel, timing, budget = PLOTS[plot]
    rows = [r for r in report["rows"] if r["target"] in targets and point(r, plot) is not None]
    if not rows:
        return False
    fig = Figure(figsize=(7.2, 4.8), dpi=120)
    ax = fig.subplots()
    env = report.get("environment", {})
    n = 0
    for i, target in enumerate(targets):
        group = [r for r in rows if r["target"] == target]
        if not group:
            continue
        color = f"C{i % 10}"
        emulated = any(r.get("emulated") for r in group) or bool(env.get(target, {}).get("emulated"))
        label = f"{target} ({EMULATED_NOTE})" if emulated and timing else target
        pts = [point(r, plot) for r in group]
        xs, ys = [p[0] for p in pts], [p[2] for p in pts]
        ax.scatter(xs, ys, s=30, color=color, label=label, zorder=3)
        if timing:  # the spread: median to p90
            ax.hlines(ys, xs, [p[1] for p in pts], color=color, lw=1.5, alpha=0.6)
        on = [(r.get("pareto") or {}).get(plot, False) for r in group]
        front = sorted((p[0], p[2]) for p, o in zip(pts, on, strict=True) if o)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, lw=1, alpha=0.7)
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=110, facecolors="none", edgecolors=color)
        for r, p in sorted(zip(group, pts, strict=True), key=lambda rp: (rp[1][2], rp[1][0])):
            dx, dy = _OFFSETS[n % len(_OFFSETS)]
            n += 1
            ax.annotate(_label(r, rows), (p[0], p[2]), textcoords="offset points", xytext=(dx, dy), fontsize=7)
    limits = _limits(report, targets[0]) if len(targets) == 1 else (report.get("budgets") or {}).get("defaults") or {}
    whose = targets[0] if len(targets) == 1 else "all targets"
    if "min_psnr_db" in limits:
        ax.axhline(limits["min_psnr_db"], color="tab:red", lw=0.8, ls="--", label=f"min_psnr_db ({whose})")
    if budget in limits:
        ax.axvline(limits[budget], color="tab:orange", lw=0.8, ls="--", label=f"{budget}: {LABELS[budget]} ({whose})")
    if plot == "psnr_vs_latency" and "max_frame_ms_median" in limits:
        ax.axvline(limits["max_frame_ms_median"], color="tab:purple", lw=0.8, ls=":", label="max_frame_ms_median")
    bicubic = _bicubic(report, rows)
    if bicubic is not None:
        ax.axhline(bicubic, color="grey", lw=0.8, ls=":", label=f"bicubic {bicubic:.2f} dB")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(xlabel + (" — bar: median to p90" if timing else ""))
    ax.set_ylabel(f"Y-PSNR (dB) on {Path(str(report['test_set']['name'])).name}")
    title = _TITLES[plot] + (f" on {targets[0]}" if len(targets) == 1 else "") + " — ringed: Pareto front"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.3, y=0.2)
    ax.set_xlim(left=0)  # every cost is >= 0
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def _bicubic(report: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    refs = report["test_set"].get("bicubic") or {}
    values = {refs[str(r.get("scale"))]["psnr_y_db"] for r in rows if str(r.get("scale")) in refs}
    return values.pop() if len(values) == 1 else None


def _sweep_plot(path: Path, rows: list[dict[str, Any]], target: str) -> bool:
    """Peak memory and frame latency against tile side, one line per (model, artifact) run at several tiles."""
    from matplotlib.figure import Figure

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("frame_ms_median") is not None:
            groups.setdefault((r["model"], r["artifact"]), []).append(r)
    swept = {k: v for k, v in groups.items() if len({tuple(r["tile"]) for r in v}) > 1}
    if not swept:
        return False
    fig = Figure(figsize=(9.0, 3.8), dpi=120)
    mem_ax, lat_ax = fig.subplots(1, 2)
    for i, ((model, artifact), group) in enumerate(swept.items()):
        group = sorted(group, key=lambda r: r["tile"][0] * r["tile"][1])
        ticks = [tile_text(r, sep="\n") for r in group]
        xs = list(range(len(group)))
        color = f"C{i % 10}"
        label = f"{model} ({artifact})"
        mem_ax.plot(xs, [r["peak_rss_mb"] for r in group], "o-", color=color, label=label)
        lat_ax.plot(xs, [r["frame_ms_median"] for r in group], "o-", color=color, label=label)
        lat_ax.vlines(xs, [r["frame_ms_median"] for r in group], [r["frame_ms_p90"] for r in group], color=color)
        for ax in (mem_ax, lat_ax):
            ax.set_xticks(xs, ticks, fontsize=7)
    frame = next((r.get("frame_size") for r in rows if r.get("frame_size")), None)
    where = f"{frame[1]}x{frame[0]} LR frame" if frame else "the test images"
    mem_ax.set_ylabel("peak RSS at the workload (MiB, VmHWM)")
    lat_ax.set_ylabel("frame latency, median (ms; bar to p90)")
    for ax in (mem_ax, lat_ax):
        ax.set_xlabel("tile (LR px)")
        ax.grid(alpha=0.3)
    lat_ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Tile sweep on {target}: {where}", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
