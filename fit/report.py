"""fit.json, fit.md and the plots: per target, the verdict, the chosen artifact (predicted vs measured), the budget
that binds, every candidate with its predicted figures and why it was rejected, and the shape model's error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from device_bench.budgets import LABELS
from device_bench.report_md import number, signed
from edgesr.manifest import atomic_output, write_json
from edgesr.workload import tile_label

log = logging.getLogger("fit")

PLOTTED = (  # row figure, axis label, budget keys drawn on it
    ("frame_ms_p90", "frame latency p90 (ms)", ("max_frame_ms",)),
    ("peak_rss_mb", "peak RSS at the workload (MiB, VmHWM)", ("max_peak_mb",)),
    ("size_bytes", "model file (KB)", ("max_model_kb",)),
)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{signed(100 * x, 1)} %"


def _sparse(cand: dict[str, Any]) -> str:
    return f" sparse {100 * cand['sparsity']:.0f}%" if cand.get("sparsity") else ""


def _sparse_md(t: dict[str, Any]) -> list[str]:
    """Weight sparsity where only file size binds: the probes and the comparison with the narrower shape."""
    sp = t.get("sparse_probes")
    if not sp:
        return []
    bases = "; ".join(
        f"{b['shape']['fraction']:.3f} of the channels {b['precision']} tile {tile_label(b['tile'])} ("
        + ", ".join(f"{k} +{v['excess']:.0%}" for k, v in b["rejected_by"].items())
        + ")"
        for b in sp["bases"]
    )
    lines = [
        "",
        "### Weight sparsity (only file size stops a wider shape)",
        "",
        f"Wider shapes missing only a file budget (predicted, dense): {bases}. Each sparsity is a one-shot magnitude "
        "cut of the untrained weights, sparse-encoded and measured:",
        "",
        "| base | sparsity | KB | download KB | frame p90 ms | peak MB | rejected by |",
        "|---|---|---|---|---|---|---|",
    ]
    for pr in sp["probes"]:
        b = f"{pr['base']['shape']['fraction']:.3f} {pr['base']['precision']}"
        r = pr.get("row")
        if not r:
            lines.append(f"| {b} | {pr['sparsity']:.0%} | — | — | — | — | {pr.get('why') or 'refused by convert'} |")
            continue
        why = ", ".join(f"{k} (+{v['excess']:.0%})" for k, v in pr["rejected_by"].items()) or "fits"
        lines.append(
            f"| {b} | {pr['sparsity']:.0%} | {number(r['size_bytes'] / 1024, 1)} | "
            f"{number((r.get('download_bytes') or 0) / 1024, 1)} | {number(r.get('frame_ms_p90'), 1)} | "
            f"{number(r.get('peak_rss_mb'), 1)} | {why} |"
        )
    if not sp["probes"]:
        lines.append("No sparsity of --sparsities can bring the file under the limit.")
    return lines


def _target_md(name: str, t: dict[str, Any], margin: float) -> list[str]:
    wl = t["workload"]
    lines = [
        f"## Target `{name}`",
        "",
        f"- workload: LR frame {wl['frame']}, tiles {', '.join(map(str, wl['tiles']))}",
        "- budgets: " + (", ".join(f"{k} {number(v, 1)}" for k, v in t["budgets"].items()) or "none"),
    ]
    if t["status"] == "pass":
        c = t["chosen"]
        r = c["row"]
        lines += [
            f"- **PASS**: {c['candidate']['shape']['fraction']:.3f} of the channels "
            f"({c['candidate']['shape']['params']} parameters), {r['precision']}{_sparse(c['candidate'])}, "
            f"tile {tile_label(r['tile'])} (`{r['artifact']}`); published in `{c.get('published')}`",
            "- binding budget (what the next larger shape misses): "
            + (", ".join(t["binding"]) or "none: the dense net fits"),
            "",
            "| figure | predicted | measured | error |",
            "|---|---|---|---|",
        ]
        for f in ("frame_ms_p90", "frame_ms_median", "peak_rss_mb", "size_bytes"):
            pred, meas = c["candidate"]["predicted"].get(f), r.get(f)
            err = None if pred is None or not meas else (pred - meas) / meas
            lines.append(f"| {f} | {number(pred, 1)} | {number(meas, 1)} | {_pct(err)} |")
        lines.append(f"| Y-PSNR dB ({r.get('target')}, the test set) | — | {number(r.get('psnr_y_db'), 3)} | |")
    else:
        lines += [f"- **NO ARTIFACT**: {t['reason']}", f"- binding: {', '.join(t.get('binding') or []) or '—'}"]
    if t["attempts"]:
        lines += ["", "### Trained and measured", "", "| candidate | steps | torch dB | device dB | frame p90 ms | "
                  "peak MB | KB | failed budgets |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for a in t["attempts"]:
            r, cand = a["row"], a["candidate"]
            failed = [k for k, v in a["budgets"].items() if not v["pass"]] or ["—"]
            steps = (a.get("train") or {}).get("steps", 0)
            lines.append(
                f"| {a.get('label') or cand['shape']['fraction']} | {steps} "
                f"| {number(a.get('torch_psnr_y_db'), 3)} | {number(r.get('psnr_y_db'), 3)} | "
                f"{number(r.get('frame_ms_p90'), 1)} | {number(r.get('peak_rss_mb'), 1)} | "
                f"{number(r['size_bytes'] / 1024, 1)} | {', '.join(failed)} |"
            )
    lines += _sparse_md(t)
    if t.get("contest"):
        lines += [
            "",
            "### Contest at the budget (measured on the target; the highest passing PSNR wins)",
            "",
            "| contender | params | Y-PSNR dB | frame p90 ms | KB | passes |",
            "|---|---|---|---|---|---|",
        ]
        for e in t["contest"]:
            lines.append(
                f"| {e['label']} | {e['params']} | {number(e['psnr_y_db'], 3)} | {number(e['frame_ms_p90'], 1)} | "
                f"{number((e['size_bytes'] or 0) / 1024, 1)} | {'yes' if e['pass'] else 'no'} |"
            )
    lines += [
        "",
        f"### Candidates (predicted; a shape is feasible when every prediction meets its budget by {margin:.0%})",
        "",
        "| kept | widths mult. | params | precision | tile | frame p90 ms | peak MB | KB | measured p90 / peak | "
        "rejected by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in t["candidates"]:
        p, m = c["predicted"], c["measured"]
        meas = "—" if not m else f"{number(m.get('frame_ms_p90'), 1)} / {number(m.get('peak_rss_mb'), 1)}"
        why = ", ".join(f"{k} (+{v['excess']:.0%})" for k, v in c["rejected_by"].items()) or "feasible"
        lines.append(
            f"| {c['shape']['fraction']:.3f} | {c['shape']['round_to']} | {c['shape']['params']} | {c['precision']} "
            f"| {tile_label(c['tile'])} | {number(p.get('frame_ms_p90'), 1)} | {number(p.get('peak_rss_mb'), 1)} | "
            f"{number((p.get('size_bytes') or 0) / 1024, 1)} | {meas} | {why} |"
        )
    lines += ["", "### Shape model (interpolation between measured shapes; worst leave-one-out error)", ""]
    lines += ["| family, precision, tile | frame p90 | peak memory | file size |", "|---|---|---|---|"]
    for curve in t["curves"]:
        figures = curve["figures"]
        cells = [_pct((figures.get(f) or {}).get("loo_error")) for f in ("frame_ms_p90", "peak_rss_mb", "size_bytes")]
        lines.append(f"| {curve['label']} | {' | '.join(cells)} |")
    return lines + [""]


def render_md(record: dict[str, Any]) -> str:
    s = record["settings"]
    prov = record.get("provenance") or {}
    lines = [
        "# edgesr fit",
        "",
        f"- created {record.get('created')}, edgesr at commit {str(prov.get('commit'))[:12]}"
        f"{' (dirty)' if prov.get('dirty') else ''}, on host {prov.get('host')}",
        f"- model {record['model']} ({s['model']['origin']}); methods {', '.join(s['methods'])}, {s['steps']} "
        "fine-tuning steps per trained candidate, distilled from the unpruned model",
        f"- shapes measured: keep {', '.join(map(str, s['keeps']))} x width multiples "
        f"{', '.join(map(str, s['round_to']))}; precisions {', '.join(s['precisions'])}; {s['runs']} frames per "
        f"measurement after {s['warmup']} warm-up, {s['threads']} thread(s)",
        f"- trials: {record['trials']['ran']} run, {record['trials']['reused']} reused from "
        f"{record['trials']['storage']}; {record['seconds']:.0f} s",
        "",
        *[
            f"- precision {p} refused by convert (not a candidate): {why}"
            for p, why in (record.get("refused_precisions") or {}).items()
        ],  # fmt: skip
        "",
        "Figures are per frame of the target's workload, measured by `device_bench` on the target itself (an "
        "emulated target proves correctness, not speed). Shape-stage measurements use the L1 cut before "
        "fine-tuning: its latency, memory and size are the shape's; its PSNR is not used.",
        "",
    ]
    for name, t in record["targets"].items():
        lines += _target_md(name, t, s["margin"])
        if t.get("plot"):
            lines += [f"![shape model on {name}]({t['plot']})", ""]
    return "\n".join(lines)


def _plot(path: Path, name: str, t: dict[str, Any]) -> bool:
    """Per figure: measured shapes (points) and the fitted curve per precision/tile, the limit, the chosen point."""
    from matplotlib.figure import Figure

    from fit.predict import Curve

    if not t["curves"]:
        return False
    fig = Figure(figsize=(12, 3.8), dpi=110)
    axes = fig.subplots(1, len(PLOTTED))
    for ax, (fig_key, label, keys) in zip(axes, PLOTTED, strict=True):
        scale = 1 / 1024 if fig_key == "size_bytes" else 1.0
        for i, option in enumerate(t["curves"]):
            cv = option["figures"].get(fig_key)
            if not cv:
                continue
            curve = Curve(tuple(tuple(k) for k in cv["knots"]), None)
            lo = curve.knots[0][0]  # drawn over the measured range only: the model never extrapolates
            ks = [lo + (1 - lo) * j / 50 for j in range(51)]
            ax.plot(ks, [curve(k) * scale for k in ks], color=f"C{i % 10}", lw=1, label=option["label"])
            pts = [
                (c["shape"]["fraction"], c["measured"][fig_key] * scale)
                for c in t["candidates"]
                if c["measured"]
                and (c["shape"]["round_to"], c["precision"], list(c["tile"]))
                == (option["round_to"], option["precision"], option["tile"])
            ]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", s=18, zorder=3)
        for key in keys:
            if key in t["budgets"]:
                ax.axhline(t["budgets"][key], color="red", ls="--", lw=0.9, label=f"{key} ({LABELS[key]})")
        for a in t["attempts"]:
            v = a["row"].get(fig_key)
            if v is not None:
                k, ok = a["candidate"]["shape"]["fraction"], a["pass"]
                colour, verdict = ("green", "pass") if ok else ("black", "fail")
                ax.scatter([k], [v * scale], marker="*", s=140, zorder=4, color=colour, label=f"trained: {verdict}")
        ax.set_xlabel("kept fraction of the prunable channels")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"Shape model on {name}: measured (dots), predicted (lines), trained artifacts (stars)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(seen) + 2) // 3), 1, 1))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def write_fit(out: Path, record: dict[str, Any]) -> None:
    for name, t in record["targets"].items():
        plot = f"fit-{name}.png"
        try:
            t["plot"] = plot if _plot(out / plot, name, t) else None
        except Exception as exc:  # a plot must never cost the user the fit's results
            log.warning("plot for %s not drawn: %s", name, exc)
            t["plot"] = None
    write_json(out / "fit.json", record)
    with atomic_output(out / "fit.md") as tmp:
        tmp.write_text(render_md(record) + "\n")
