"""The report's plots (PNG, matplotlib's Agg canvas: no GUI, no pyplot state).

- Pareto plots of Y-PSNR against file size, peak memory and frame latency: one set for all targets when they
  share their budgets, else one set per target, each drawing that target's own limits.
- A tile sweep per target where a model ran at several tiles: peak memory and frame latency against tile size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from device_bench.report import EMULATED_NOTE, PLOTS, point, tile_text
from edgesr.manifest import atomic_output

_TITLES = {"psnr_vs_size": "Y-PSNR vs size", "psnr_vs_peak_rss": "Y-PSNR vs peak memory"}
_TITLES["psnr_vs_latency"] = "Y-PSNR vs frame latency"


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


_MARKERS = "osD^vP*Xh<>p"  # one per tile size, in order of tile area
_LINESTYLES = ("-", "--", ":", "-.")  # one per target's Pareto front


def _pareto_plot(path: Path, report: dict[str, Any], plot: str, targets: list[str]) -> bool:
    """Y-PSNR against one cost: colour = model, marker = tile, hollow = sparse file; each target's Pareto front a
    step line through ringed points; the budget limits dashed (a limit far off the data is named, not drawn)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    _, _, xlabel, timing, budget = PLOTS[plot]
    rows = [r for r in report["rows"] if r["target"] in targets and point(r, plot) is not None]
    if not rows:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    tiles = sorted({tuple(r["tile"]) for r in rows}, key=lambda t: t[0] * t[1])
    color = {m: f"C{i % 10}" for i, m in enumerate(models)}
    marker = {t: _MARKERS[i % len(_MARKERS)] for i, t in enumerate(tiles)}
    fig = Figure(figsize=(8.4, 4.8), dpi=120)
    ax = fig.subplots()
    handles: list[Any] = [Line2D([], [], ls="", marker="o", color=color[m], label=m) for m in models]
    if len(tiles) > 1:
        by_tile = {tuple(r["tile"]): r for r in rows}
        handles += [
            Line2D([], [], ls="", marker=marker[t], color="grey", label=f"tile {tile_text(by_tile[t])}") for t in tiles
        ]
    if any(r["encoding"] == "sparse" for r in rows):
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="grey", label="hollow: sparse file"))
    env = report.get("environment", {})
    xs_all = []
    for i, target in enumerate(targets):
        group = [r for r in rows if r["target"] == target]
        if not group:
            continue
        for r in group:
            x, hi, y = point(r, plot)
            xs_all += [x, hi]
            hollow = r["encoding"] == "sparse"
            ax.scatter(
                [x],
                [y],
                s=36,
                marker=marker[tuple(r["tile"])],
                zorder=3,
                color=color[r["model"]],
                facecolors="none" if hollow else color[r["model"]],
            )
            if timing:  # the spread: median to p90
                ax.hlines([y], [x], [hi], color=color[r["model"]], lw=1.5, alpha=0.6)
        on = [(r.get("pareto") or {}).get(plot, False) for r in group]
        front = sorted((point(r, plot)[0], point(r, plot)[2]) for r, o in zip(group, on, strict=True) if o)
        style = _LINESTYLES[i % len(_LINESTYLES)]
        emulated = any(r.get("emulated") for r in group) or bool(env.get(target, {}).get("emulated"))
        name = f"{target} ({EMULATED_NOTE})" if emulated and timing else target
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=0.8, ls=style)
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=130, facecolors="none", edgecolors="black", lw=0.8)
        handles.append(Line2D([], [], color="black", lw=0.8, ls=style, marker="o", mfc="none", label=f"front: {name}"))
    limits = _limits(report, targets[0]) if len(targets) == 1 else (report.get("budgets") or {}).get("defaults") or {}
    whose = targets[0] if len(targets) == 1 else "defaults"
    span = max(xs_all) if xs_all else 1.0
    ys = [point(r, plot)[2] for r in rows]
    if "min_psnr_db" in limits:
        ax.axhline(limits["min_psnr_db"], color="tab:red", lw=0.8, ls="--")
        handles.append(Line2D([], [], color="tab:red", lw=0.8, ls="--", label=f"min_psnr_db ({whose})"))
        ys.append(limits["min_psnr_db"])
    for key, style in ((budget, "--"), ("max_frame_ms_median" if plot == "psnr_vs_latency" else "", ":")):
        if key in limits:
            limit = limits[key]
            if limit <= 2.5 * span:  # near the data: draw it; far off: name it, so the points keep the axis
                ax.axvline(limit, color="tab:orange", lw=0.8, ls=style)
                label = f"{key} {limit:g} ({whose})"
            else:
                label = f"{key} {limit:g} ({whose}): off scale, all points inside"
            handles.append(Line2D([], [], color="tab:orange", lw=0.8, ls=style, label=label))
    bicubic = _bicubic(report, rows)
    if bicubic is not None:
        ax.axhline(bicubic, color="grey", lw=0.8, ls=":")
        handles.append(Line2D([], [], color="grey", lw=0.8, ls=":", label=f"bicubic {bicubic:.2f} dB"))
        ys.append(bicubic)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_xlabel(xlabel + (" — bar: median to p90" if timing else ""))
    ax.set_ylabel(f"Y-PSNR (dB) on {Path(str(report['test_set']['name'])).name}")
    title = _TITLES[plot] + (f" on {targets[0]}" if len(targets) == 1 else "") + " — ringed: Pareto front"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    pad = (max(ys) - min(ys)) * 0.08 or 0.5
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlim(0, ax.get_xlim()[1] * 1.05)  # every cost is >= 0
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
