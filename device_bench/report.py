"""The bench report: report.json (the contract), report.md (for people) and three Pareto plots (PNG).

Every figure in the Markdown comes with a legend saying what exactly it measures. Per target: its environment,
a results table, a memory-by-phase table and the budget verdicts with margins; failed targets are listed with
their reason. `render` rebuilds the Markdown and plots from an existing report.json, optionally re-checking its
rows against another budgets file.
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
# plot name -> (file, row field on x (smaller is better), x-axis label, whether x is a timing)
PLOTS: dict[str, tuple[str, str, str, bool]] = {
    "psnr_vs_size": ("psnr_vs_size.png", "size_kb", "artifact size (KB = 1024 bytes)", False),
    "psnr_vs_peak_rss": ("psnr_vs_peak_rss.png", "peak_rss_mb", "peak RSS of the run (MiB, VmHWM)", False),
    "psnr_vs_latency": ("psnr_vs_latency.png", "latency_ms_median", "tile latency, median (ms)", True),
}
PLOT_NAME = PLOTS["psnr_vs_size"][0]
REPORT_FILES = ("report.json", "report.md", *(f for f, *_ in PLOTS.values()))
_BUDGET_LABELS = {
    "max_model_kb": "model size",
    "max_peak_mb": "peak RSS",
    "max_latency_ms": "tile latency (median)",
    "min_psnr_db": "Y-PSNR",
}
_BUDGET_ON_X = {"psnr_vs_size": "max_model_kb", "psnr_vs_peak_rss": "max_peak_mb", "psnr_vs_latency": "max_latency_ms"}


def failed_budgets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every failed budget as {target, model, artifact, budget, limit, value, unit, by}."""
    failed = []
    for row in rows:
        for key, v in row["budgets"].items():
            if not v["pass"]:
                by = None if v["margin"] is None else abs(v["margin"])
                failed.append(
                    {
                        "target": row["target"],
                        "model": row["model"],
                        "artifact": row["artifact"],
                        "budget": key,
                        "limit": v["limit"],
                        "value": v["value"],
                        "unit": v["unit"],
                        "by": by,
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


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (x, y) points are Pareto-optimal for smaller x and larger y: no other point is at least as good in
    both and strictly better in one."""
    return [not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points) for x, y in points]


def _x_value(row: dict[str, Any], field: str) -> float | None:
    value = row["size_bytes"] / 1024 if field == "size_kb" else row.get(field)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """row["pareto"][plot] = whether the row is on its target's Pareto front of Y-PSNR vs that plot's x."""
    for row in rows:
        row["pareto"] = {}
    for plot, (_, field, _, _) in PLOTS.items():
        for target in dict.fromkeys(r["target"] for r in rows):
            group = [r for r in rows if r["target"] == target and _point(r, field) is not None]
            front = pareto_front([_point(r, field) for r in group])
            for r, on in zip(group, front, strict=True):
                r["pareto"][plot] = on


def _point(row: dict[str, Any], field: str) -> tuple[float, float] | None:
    x, y = _x_value(row, field), row.get("psnr_y_db")
    if x is None or not isinstance(y, (int, float)) or not math.isfinite(y):
        return None
    return x, y


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
        plots={name: file for name, (file, *_) in PLOTS.items()},
        versions=versions("numpy", "Pillow", "PyYAML", "matplotlib"),
    )
    _verdict(report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json, report.md and the plots, each written atomically."""
    write_json(out / "report.json", report)
    write_markdown_and_plot(out, report)


def write_markdown_and_plot(out: Path, report: dict[str, Any]) -> None:
    drawn = {name: file for name, (file, *_) in PLOTS.items() if plot_pareto(out / file, report, name)}
    with atomic_output(out / "report.md") as tmp:
        tmp.write_text(markdown(report, plots=drawn))


def render(folder: Path, budgets_path: Path | None = None) -> dict[str, Any]:
    """Re-render report.md and the plots from <folder>/report.json; with a budgets file, re-check the rows first."""
    report = read_json(Path(folder) / "report.json")
    if report.get("kind") != "bench" or not isinstance(report.get("rows"), list):
        raise BadInput(f"{folder}/report.json: not a device_bench report")
    if budgets_path is not None:
        budgets = budgets_mod.load_budgets(budgets_path)
        for row in report["rows"]:
            row["budgets"] = budgets_mod.check(budgets, row["target"], row)
            row["pass"] = all(v["pass"] for v in row["budgets"].values())
        report["budgets"] = budgets.to_dict()
        _verdict(report)
        write_json(Path(folder) / "report.json", report)
    mark_pareto(report["rows"])
    report.setdefault("failed_targets", [])
    write_markdown_and_plot(Path(folder), report)
    return report


# --------------------------------------------------------------------------------------------------- markdown


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _signed(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _budget_cell(row: dict[str, Any]) -> str:
    if not row["budgets"]:
        return "no budgets"
    failed = [k for k, v in row["budgets"].items() if not v["pass"]]
    return "pass" if not failed else "**FAIL**: " + ", ".join(failed)


def _failure_line(f: dict[str, Any]) -> str:
    unit = f["unit"]
    what = f"`{f['model']}` {f['artifact']} on `{f['target']}`: {f['budget']} ({_BUDGET_LABELS[f['budget']]})"
    if f["value"] is None:
        return f"- {what}: no measured value (limit {_f(f['limit'], 2)} {unit})"
    limit, value, by = f["limit"], f["value"], f["by"]
    if f["budget"].startswith("max_"):
        rel = f" ({by / limit * 100:.1f}% over)" if limit > 0 else ""
        return (
            f"- {what}: measured {_f(value, 2)} {unit} > limit {_f(limit, 2)} {unit}, over by {_f(by, 2)} {unit}{rel}"
        )
    return f"- {what}: measured {_f(value, 3)} {unit} < minimum {_f(limit, 3)} {unit}, short by {_f(by, 3)} {unit}"


# info() keys shown first in the environment block, with their labels; any other key a target reports follows.
_ENV_KEYS = {
    "kind": "target kind",
    "host": "host",
    "device_model": "device model",
    "model": "device model",
    "os": "OS",
    "os_release": "OS",
    "android_version": "Android version",
    "kernel": "kernel",
    "cpu_governor": "CPU governor",
    "governor": "CPU governor",
    "machine": "machine",
    "cpu_count": "CPUs",
    "platform": "platform",
    "python": "Python",
    "numpy": "numpy",
    "device_python": "device Python",
}
_ENV_SKIP = {"name", "emulated", "runtime", "info_error"}


def _env_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v not in (None, ""))
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _environment_block(target: str, env: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Runtime and version, threads, delegate, tile size, then the device facts the target reported."""
    rt = env.get("runtime") if isinstance(env.get("runtime"), dict) else {}
    runtimes = sorted({f"{r['runtime']['name']} {r['runtime']['version']}" for r in rows}) or [
        f"{rt.get('name', '?')} {rt.get('version', '?')}"
    ]
    threads = sorted({"runtime default" if r["threads"] == -1 else str(r["threads"]) for r in rows})
    delegates = sorted({str(r.get("delegate", "unknown")) for r in rows})
    tiles = sorted({f"{r['tile'][0]}x{r['tile'][1]} (overlap {r['overlap']})" for r in rows})
    lines = [
        f"- runtime: {', '.join(runtimes)}",
        f"- threads: {', '.join(threads) or '—'}",
        f"- delegate: {', '.join(delegates) or '—'}",
        f"- tile size (LR px): {', '.join(tiles) or '—'}",
    ]
    shown = set()
    for key, label in _ENV_KEYS.items():
        if env.get(key) not in (None, "") and label not in shown:
            lines.append(f"- {label}: {_env_value(env[key])}")
            shown.add(label)
    for key in sorted(k for k in env if k not in _ENV_KEYS and k not in _ENV_SKIP):
        if env[key] not in (None, "", {}, []):
            lines.append(f"- {key.replace('_', ' ')}: {_env_value(env[key])}")
    if env.get("info_error"):
        lines.append(f"- device info unavailable: {env['info_error']}")
    return lines


def _phase(row: dict[str, Any], phase: str, field: str) -> float | None:
    return ((row.get("memory") or {}).get(phase) or {}).get(field)


def _memory_table(rows: list[dict[str, Any]]) -> list[str]:
    header = (
        "| artifact | load VmHWM | load RssAnon | load RssFile | first-inference VmHWM | first-inference RssAnon "
        "| steady VmHWM | steady VmRSS | steady RssAnon | steady RssFile | run peak | method |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        cells = [
            _phase(r, "load", "hwm_mb"),
            _phase(r, "load", "rss_anon_mb"),
            _phase(r, "load", "rss_file_mb"),
            _phase(r, "first_inference", "hwm_mb"),
            _phase(r, "first_inference", "rss_anon_mb"),
            _phase(r, "steady", "hwm_mb"),
            _phase(r, "steady", "rss_mb"),
            _phase(r, "steady", "rss_anon_mb"),
            _phase(r, "steady", "rss_file_mb"),
            r.get("peak_rss_mb"),
        ]
        method = (r.get("memory") or {}).get("method", "—")
        lines.append(f"| {r['artifact']} | " + " | ".join(_f(c) for c in cells) + f" | {method} |")
    return lines


def _budget_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| artifact | budget | limit | measured | value − limit | % of limit | verdict |", "|" + "---|" * 7]
    for r in rows:
        for key, v in r["budgets"].items():
            unit = v["unit"]
            delta = v.get("delta", None if v["value"] is None else v["value"] - v["limit"])
            pct = v.get("delta_pct")
            if pct is None and delta is not None and v["limit"]:
                pct = delta / v["limit"] * 100
            digits = 3 if unit == "dB" else 2
            lines.append(
                f"| {r['artifact']} | {key} ({_BUDGET_LABELS[key]}) | {_f(v['limit'], digits)} {unit} "
                f"| {_f(v['value'], digits)} {unit} | {_signed(delta, digits)} {unit} | {_signed(pct, 1)}% "
                f"| {'pass' if v['pass'] else '**FAIL**'} |"
            )
    return lines


def _legend(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    rows = report["rows"]
    tiles = sorted({f"{r['tile'][0]}x{r['tile'][1]}" for r in rows})
    overlaps = sorted({r["overlap"] for r in rows})
    runtimes = sorted({f"{r['runtime']['name']} {r['runtime']['version']}" for r in rows})
    threads = "runtime default" if s["threads"] == -1 else f"{s['threads']} thread(s)"
    lines = [
        "## Legend",
        "",
        "- **size KB**: size of the artifact file in KiB (1 KB = 1024 bytes) — what is stored and downloaded.",
        "- **peak RSS MB**: the whole run's peak resident set size (VmHWM, MiB, from `/proc/self/status`) of the "
        "runner process. It is the whole process: the Python interpreter and numpy (the runner's baseline after "
        "imports is `rss_after_import_mb` in report.json), the TFLite runtime, the touched pages of the mmap'd model, "
        "the tensor arena, delegate (XNNPACK) buffers and one image's input/output arrays.",
        f"- **latency median / p90 ms**: wall-clock time of one `invoke()` of one tile ({', '.join(tiles)} LR "
        f"pixels, see the tile column) after {s['warmup']} warm-up invokes, over {s['runs']} timed invokes, with "
        f"{threads}, on {', '.join(runtimes)} with the delegate named in the target's environment (the default op "
        "resolver applies XNNPACK on CPU; `none` = BUILTIN_WITHOUT_DEFAULT_DELEGATES, for files whose manifest says "
        "XNNPACK cannot run them). Whole images take one invoke per tile plus copies: see `per_image.*.ms` in "
        "report.json.",
        "- **load ms**: Interpreter construction plus `allocate_tensors()`; **first ms**: the first `invoke()` "
        "(one tile), which includes one-time work (e.g. weight packing/DENSIFY without a delegate).",
        "- **Y-PSNR dB / Y-SSIM**: mean over the test-set images of PSNR/SSIM on the luma channel Y (BT.601, "
        "16–235), border = scale pixels shaved on every side, the SR output quantized to 8 bit first, LR images made "
        "with Pillow bicubic (not MATLAB `imresize`, so not comparable with paper tables). Images are processed in "
        f"tiles overlapping by {', '.join(map(str, overlaps))} LR pixels; each tile contributes its interior, so the "
        "stitched output equals whole-image inference when the overlap is at least the receptive-field radius.",
        "- **Δ torch dB**: this Y-PSNR minus the PyTorch model's Y-PSNR recorded in the convert manifest, when that "
        "was measured on the same test set (— otherwise).",
        "- **budgets**: `pass`, or the budget keys that failed. Model size is checked in KB, peak RSS in MB (the "
        "run peak), latency on the median tile invoke, quality on the mean Y-PSNR. In the verdict tables, **value − "
        "limit** and **% of limit** are signed: for a `max_` budget a negative value is headroom, for `min_psnr_db` "
        "a positive one is.",
        "- **Sparse encoding**: sparse TFLite conv weights save file size only. The runtime's DENSIFY op materialises "
        "a dense copy of the weights at run time (and XNNPACK packs them again), so peak memory and latency are not "
        "expected to drop versus the dense file; peak memory can even be slightly higher.",
        "",
        "### Memory columns (MiB, from `/proc/<runner>/status`)",
        "",
        "- **Phases**: *load* = Interpreter construction + `allocate_tensors()` (model mmap'd, arena planned, XNNPACK "
        "delegate created and weights packed); *first inference* = the first `invoke()` (lazy one-time work, e.g. "
        "DENSIFY materialising dense weights, first-touch of the arena); *steady* = the warm-up and timed invokes.",
        '- **VmHWM**: the peak resident set size ("high-water mark") in the phase — absolute, not a delta: it '
        "includes everything resident at the time (Python, numpy, the runtime's code). With method *clear_refs "
        "reset* the kernel's high-water mark is reset to the current RSS at the start of each phase (writing 5 to "
        "`/proc/self/clear_refs`; the runner first checks that the reset really works), so each phase's VmHWM is "
        "its own peak. With *process per phase* (kernels without the reset) each phase is measured in a process "
        "that stops at the phase's end, so its VmHWM is the peak from process start through that phase.",
        "- **VmRSS**: resident set size at the end of the phase (current, not peak) = RssAnon + RssFile + RssShmem.",
        "- **RssAnon**: resident anonymous memory — the heap, the tensor arena, XNNPACK's packed weights and the "
        "dense weight copies DENSIFY makes of sparse tensors. This is the memory the model really costs the device "
        "(closest to what iOS/Android low-memory killers count).",
        "- **RssFile**: resident file-backed pages — shared libraries and the touched pages of the mmap'd .tflite "
        "file. The kernel can drop and re-read them, so they inflate RSS without being a private cost; a bigger "
        "file (or one whose weights are all read to be packed or densified) shows up here.",
        "- **run peak**: VmHWM over the whole run (all phases plus the whole-image tiling) — the `peak_rss_mb` "
        "column and budget.",
    ]
    if any(r.get("emulated") for r in rows) or any(e.get("emulated") for e in report.get("environment", {}).values()):
        lines.append(f"- **{EMULATED_NOTE}**: emulated targets prove correctness and plumbing, never speed.")
    return lines


def _results_table(rows: list[dict[str, Any]], emulated: bool) -> list[str]:
    timing = f" ({EMULATED_NOTE})" if emulated else ""
    header = (
        f"| model | artifact | format / encoding | tile | size KB | peak RSS MB | latency median / p90 ms{timing} "
        f"| load ms{timing} | first ms{timing} | Y-PSNR dB | Δ torch dB | Y-SSIM | Pareto | budgets |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        pareto = ", ".join(
            {"psnr_vs_size": "size", "psnr_vs_peak_rss": "RSS", "psnr_vs_latency": "latency"}[k]
            for k, on in (r.get("pareto") or {}).items()
            if on
        )
        lines.append(
            f"| {r['model']} | {r['artifact']} | {r['format']} / {r['encoding']} | {r['tile'][0]}x{r['tile'][1]} "
            f"| {_f(r['size_bytes'] / 1024)} | {_f(r['peak_rss_mb'])} "
            f"| {_f(r['latency_ms_median'], 2)} / {_f(r['latency_ms_p90'], 2)} | {_f(r['load_ms'])} "
            f"| {_f(r['first_inference_ms'], 2)} | {_f(r['psnr_y_db'], 3)} "
            f"| {_signed(r['psnr_delta_vs_torch_db'])} "
            f"| {_f(r['ssim_y'], 4)} | {pareto or '—'} | {_budget_cell(r)} |"
        )
    return lines


def _lr_text(report: dict[str, Any]) -> str:
    """How the test set's LR images were made, e.g. 'matlab-bicubic' or 'x2 shipped LR files (LRbicx2/), x4 ...'."""
    lr = report["test_set"].get("lr")
    if not lr:  # no scale loaded, or a report from before the degradation was recorded (always Pillow then)
        return f"{report.get('settings', {}).get('degradation', 'pillow')}-bicubic"
    if len(set(lr.values())) == 1:
        return next(iter(lr.values()))
    return ", ".join(f"x{s} {v}" for s, v in sorted(lr.items()))


def markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    rows = report["rows"]
    ts = report["test_set"]
    failed_targets = report.get("failed_targets", [])
    n_images = len(next(iter(ts["images"].values()), []))
    verdict = "PASS" if report["passed"] else "FAIL"
    why = []
    if failed_targets:
        why.append(f"{len(failed_targets)} target(s) failed")
    if report["failed_budgets"]:
        why.append(f"{len(report['failed_budgets'])} budget(s) failed")
    lines = [
        "# edgesr device bench",
        "",
        f"- created {report['created']}, edgesr {report['edgesr_version']}",
        f"- test set `{ts['name']}` ({n_images} images, LR: {_lr_text(report)}): {ts['protocol']}",
        f"- budgets: {report['budgets'].get('source') or 'none (everything passes)'}",
        f"- overall: **{verdict}**{' (' + ', '.join(why) + ')' if why else ''} (exit code {report['exit_code']})",
        "",
    ]
    if failed_targets:
        lines += ["## Failed targets", ""]
        for f in failed_targets:
            not_run = f", not run: {', '.join(f['not_run'])}" if f.get("not_run") else ""
            lines.append(f"- `{f['target']}`: {f['reason']}{not_run}")
        lines.append("")
    names = list(dict.fromkeys([r["target"] for r in rows] + [f["target"] for f in failed_targets]))
    for target in names:
        env = report["environment"].get(target, {})
        trows = [r for r in rows if r["target"] == target]
        emulated = bool(env.get("emulated")) or any(r.get("emulated") for r in trows)
        kind = EMULATED_NOTE if emulated else "real hardware"
        failed = next((f for f in failed_targets if f["target"] == target), None)
        status = " — FAILED" if failed else ""
        lines += [f"## Target `{target}` ({kind}){status}", "", *_environment_block(target, env, trows), ""]
        if failed:
            lines += [f"**Failed:** {failed['reason']}", ""]
        if not trows:
            lines += ["No finished measurements.", ""]
            continue
        resumed = [r["artifact"] for r in trows if r.get("resumed")]
        lines += ["### Results", "", *_results_table(trows, emulated), ""]
        if resumed:
            lines += [f"Resumed from results.jsonl (measured in an earlier run): {', '.join(resumed)}", ""]
        padded = sorted({name for r in trows for name in r.get("padded_images", [])})
        if padded:
            lines += [f"Padded to the tile by edge replication (border differs from whole-image): {padded}", ""]
        lines += ["### Memory by phase (MiB)", "", *_memory_table(trows), ""]
        if any(r["budgets"] for r in trows):
            lines += ["### Budget verdicts", "", *_budget_table(trows), ""]
    if report["failed_budgets"]:
        lines += ["## Failed budgets", ""] + [_failure_line(f) for f in report["failed_budgets"]] + [""]
    if report.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {note}" for note in report["skipped"]] + [""]
    if plots:
        lines += [
            "## Pareto plots",
            "",
            "One point per (target, artifact); the line and ringed points are each target's Pareto front (no other "
            "artifact on that target is both smaller/faster and better in Y-PSNR). Dashed lines are budget limits.",
            "",
        ]
        titles = {"psnr_vs_size": "Y-PSNR vs size", "psnr_vs_peak_rss": "Y-PSNR vs peak RSS"}
        titles["psnr_vs_latency"] = "Y-PSNR vs latency"
        for name, file in plots.items():
            lines += [f"![{titles[name]}]({file})", ""]
    lines += _legend(report)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- plots


def plot_pareto(path: Path, report: dict[str, Any], plot: str) -> bool:
    """Y-PSNR vs one cost (size, peak RSS or latency): a series per target, its Pareto front drawn as a step line."""
    from matplotlib.figure import Figure  # Figure + Agg canvas: no GUI backend, no pyplot state

    _, field, xlabel, timing = PLOTS[plot]
    rows = [r for r in report["rows"] if _point(r, field) is not None]
    if not rows:
        return False
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    env = report.get("environment", {})
    for i, target in enumerate(dict.fromkeys(r["target"] for r in rows)):
        group = [r for r in rows if r["target"] == target]
        color = f"C{i % 10}"
        emulated = any(r.get("emulated") for r in group) or bool(env.get(target, {}).get("emulated"))
        label = f"{target} ({EMULATED_NOTE})" if emulated and timing else target
        pts = [_point(r, field) for r in group]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, color=color, label=label)
        front = sorted(p for p, on in zip(pts, pareto_front(pts), strict=True) if on)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, lw=1, alpha=0.7)
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=90, facecolors="none", edgecolors=color)
        for r, (x, y) in zip(group, pts, strict=True):
            ax.annotate(f"{r['model']}\n{r['artifact']}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=6)
    defaults = (report.get("budgets") or {}).get("defaults") or {}
    if "min_psnr_db" in defaults:
        ax.axhline(defaults["min_psnr_db"], color="tab:red", lw=0.8, ls="--", label="min_psnr_db (defaults)")
    if _BUDGET_ON_X[plot] in defaults:
        key = _BUDGET_ON_X[plot]
        ax.axvline(defaults[key], color="tab:orange", lw=0.8, ls="--", label=f"{key} (defaults)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Y-PSNR (dB) on {Path(report['test_set']['name']).name}")
    ax.set_title(f"Y-PSNR vs {xlabel.split(' (')[0]} — Pareto front per target", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
