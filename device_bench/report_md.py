"""report.md: the bench report as a user reads it. Every table names the model; every figure says what it
measures (the legend at the end); a bicubic row gives the quality floor; numbers never show a signed zero."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from device_bench.budgets import LABELS
from device_bench.coreml_engine import REFERENCE_NOTE
from device_bench.report import EMULATED_NOTE, MEMORY_SPREAD_MB, PSNR_TIE_DB, tile_text
from device_bench.xcode_report import NOTE as XCODE_NOTE

_PARETO_SHORT = {"psnr_vs_size": "size", "psnr_vs_peak_rss": "memory", "psnr_vs_latency": "frame latency"}


def number(x: float | None, digits: int = 1) -> str:
    """A number to `digits` decimals; "—" for none; never "-0.0"."""
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    x = round(float(x), digits)
    return f"{0.0 if x == 0 else x:.{digits}f}"


def signed(x: float | None, digits: int = 2) -> str:
    """A signed number ("+0.12", "-0.12"), zero unsigned ("0.00")."""
    if x is None:
        return "—"
    x = round(float(x), digits)
    return f"{0.0:.{digits}f}" if x == 0 else f"{x:+.{digits}f}"


def _frame(r: dict[str, Any]) -> str:
    size = r.get("frame_size")
    if size:
        return f"{size[1]}x{size[0]}"
    images = r.get("frame_images") or []
    return f"test images ({len(images)})" if images else "—"


def _budget_cell(row: dict[str, Any]) -> str:
    if not row["budgets"]:
        return "no budgets"
    failed = [k for k, v in row["budgets"].items() if not v["pass"]]
    return "pass" if not failed else "**FAIL**: " + ", ".join(failed)


def _failure_line(f: dict[str, Any]) -> str:
    unit = f["unit"]
    tile = f" (tile {f['tile'][0]})" if f.get("tile") else ""
    what = f"`{f['model']}` {f['artifact']}{tile} on `{f['target']}`: {f['budget']} ({LABELS[f['budget']]})"
    if f["value"] is None:
        return f"- {what}: no measured value (limit {number(f['limit'], 2)} {unit})"
    limit, value, by = f["limit"], f["value"], f["by"]
    if f["budget"].startswith("max_"):
        rel = f" ({by / limit * 100:.1f}% over)" if limit > 0 else ""
        return (
            f"- {what}: measured {number(value, 2)} {unit} > limit {number(limit, 2)} {unit}, "
            f"over by {number(by, 2)} {unit}{rel}"
        )
    return (
        f"- {what}: measured {number(value, 3)} {unit} < minimum {number(limit, 3)} {unit}, "
        f"short by {number(by, 3)} {unit}"
    )


# info() keys shown first in the environment block (targets.DEVICE_FACTS among them), with their labels; any other
# key a target reports follows.
_ENV_KEYS = {
    "kind": "target kind",
    "host": "host",
    "device_model": "device model",
    "os": "OS",
    "android_version": "Android version",
    "kernel": "kernel",
    "machine": "machine",
    "cpu_model": "CPU",
    "cpu_count": "CPUs",
    "cpu_governor": "CPU governor",
    "mem_total_mb": "memory (MiB)",
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


def _environment_block(env: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The workload, runtime and version, threads, delegate, tiles, then the device facts the target reported."""
    rt = env.get("runtime") if isinstance(env.get("runtime"), dict) else {}
    runtimes = sorted({f"{r['runtime']['name']} {r['runtime']['version']}" for r in rows}) or [
        f"{rt.get('name', '?')} {rt.get('version', '?')}"
    ]
    threads = sorted({"runtime default" if r["threads"] == -1 else str(r["threads"]) for r in rows})
    delegates = sorted({str(r.get("delegate", "unknown")) for r in rows})
    tiles = sorted({(r["tile"][0], f"{tile_text(r)} (overlap {r['overlap']})") for r in rows})
    frames = sorted({_frame(r) for r in rows})
    lines = [
        f"- workload: LR frames {', '.join(frames) or '—'}; tiles (LR px): {', '.join(t for _, t in tiles) or '—'}",
        f"- runtime: {', '.join(runtimes)}",
        f"- threads: {', '.join(threads) or '—'}",
        f"- delegate: {', '.join(delegates) or '—'}",
    ]
    units = sorted({str(r["compute_units"]) for r in rows if r.get("compute_units")})
    if units:
        lines.append(f"- Core ML compute units: {', '.join(units)}")
    os_versions = sorted({str(r["os_version"]) for r in rows if r.get("os_version")})
    if os_versions:
        lines.append(f"- OS (Core ML rows): {', '.join(os_versions)}")
    for key, label in _ENV_KEYS.items():
        if env.get(key) not in (None, ""):
            lines.append(f"- {label}: {_env_value(env[key])}")
    for key in sorted(k for k in env if k not in _ENV_KEYS and k not in _ENV_SKIP):
        if env[key] not in (None, "", {}, []):
            lines.append(f"- {key.replace('_', ' ')}: {_env_value(env[key])}")
    if env.get("info_error"):
        lines.append(f"- device info unavailable: {env['info_error']}")
    return lines


def _phase(row: dict[str, Any], phase: str, field: str) -> float | None:
    return ((row.get("memory") or {}).get(phase) or {}).get(field)


# What a row's timing note means, for the legend.
_NOTE_LEGENDS = {
    REFERENCE_NOTE: "Core ML files run through edgesr's numpy MIL executor where Core ML cannot (Linux): their "
    "outputs, PSNR and the whole push/run/pull path are real; their times and memory are numpy's, not Core ML's. "
    "Run the target on a Mac (`compute_units` in the targets file) for Core ML's own figures.",
    XCODE_NOTE: "figures a user copied from Xcode's Core ML performance report of the same file on the device "
    "(`device_bench import-xcode`): load and tile latency are Xcode's medians; the frame latency is tiles per frame "
    "× the median prediction (stitching is not timed) and fps is 1000 / that; Xcode measures no p90, no memory and "
    "runs no images (the file's PSNR is in the other targets' rows).",
}


def _name(r: dict[str, Any]) -> str:
    """A row's first cells; a row whose runner says its timings mean nothing (Core ML's reference executor) says
    so next to its artifact, in every table."""
    note = f" ({r['timing_note']})" if r.get("timing_note") else ""
    return f"| {r['model']} | {r['artifact']}{note} | {tile_text(r)} "


def _results_table(rows: list[dict[str, Any]], bicubic: float | None, emulated: bool) -> list[str]:
    timing = f" ({EMULATED_NOTE})" if emulated else ""
    lines = [
        f"| model | artifact | tile | size KB | download KB | peak MB | frame ms median / p90{timing} "
        f"| fps{timing} | Y-PSNR dB | Δ torch dB | Y-SSIM | Pareto | budgets |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        pareto = ", ".join(_PARETO_SHORT[k] for k, on in (r.get("pareto") or {}).items() if on)
        download = r.get("download_bytes")
        lines.append(
            _name(r) + f"| {number(r['size_bytes'] / 1024)} | {number(download / 1024 if download else None)} "
            f"| {number(r['peak_rss_mb'])} | {number(r.get('frame_ms_median'))} / {number(r.get('frame_ms_p90'))} "
            f"| {number(r.get('fps'), 2)} | {number(r['psnr_y_db'], 3)} | {signed(r['psnr_delta_vs_torch_db'])} "
            f"| {number(r['ssim_y'], 4)} | {pareto or '—'} | {_budget_cell(r)} |"
        )
    if bicubic is not None:
        lines.append(f"| bicubic (reference) | — | — | — | — | — | — | — | {number(bicubic, 3)} | — | — | — | — |")
    return lines


def _frame_table(rows: list[dict[str, Any]], emulated: bool) -> list[str]:
    """How a frame's time splits: its tiles' invokes (and what tiles x one tile's latency predicts) vs the rest."""
    timing = f" ({EMULATED_NOTE})" if emulated else ""
    lines = [
        f"| model | artifact | tile | LR frame | tiles / frame | tile ms median{timing} | tiles × tile ms "
        f"| frame ms median | of which invoke ms | outside invoke ms | frame vs tiles × tile | first ms | load ms |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        tiles = r.get("tiles_per_frame")
        predicted = tiles * r["latency_ms_median"] if tiles else None
        pct = r.get("frame_vs_tiles_pct")
        vs = "—" if pct is None else f"{signed(pct, 1)} %"
        lines.append(
            _name(r) + f"| {_frame(r)} | {number(tiles, 0) if tiles else '—'} | {number(r['latency_ms_median'], 2)} "
            f"| {number(predicted)} | {number(r.get('frame_ms_median'))} | {number(r.get('frame_invoke_ms_median'))} "
            f"| {number(r.get('frame_outside_invoke_ms_median'), 2)} | {vs} "
            f"| {number(r['first_inference_ms'], 2)} | {number(r['load_ms'])} |"
        )
    return lines


def _sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    """One model at several tiles: what a tile size buys in memory and frame time."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["artifact"]), []).append(r)
    swept = {k: v for k, v in groups.items() if len({tuple(r["tile"]) for r in v}) > 1}
    if not swept:
        return []
    lines = [
        "| model | artifact | tile | tiles / frame | peak MB | frame ms median / p90 | fps | Y-PSNR dB |",
        "|" + "---|" * 8,
    ]
    for group in swept.values():
        for r in sorted(group, key=lambda r: r["tile"][0] * r["tile"][1]):
            tiles = r.get("tiles_per_frame")
            lines.append(
                _name(r) + f"| {number(tiles, 0) if tiles else '—'} | {number(r['peak_rss_mb'])} "
                f"| {number(r.get('frame_ms_median'))} / {number(r.get('frame_ms_p90'))} | {number(r.get('fps'), 2)} "
                f"| {number(r['psnr_y_db'], 3)} |"
            )
    return lines


def _memory_table(rows: list[dict[str, Any]]) -> list[str]:
    phases = [("load", "hwm_mb"), ("load", "rss_anon_mb"), ("first_inference", "hwm_mb"), ("steady", "hwm_mb")]
    phases += [("steady", "rss_anon_mb"), ("steady", "rss_file_mb"), ("frames", "hwm_mb"), ("frames", "rss_anon_mb")]
    lines = [
        "| model | artifact | tile | load VmHWM | load RssAnon | first-inference VmHWM | steady VmHWM | steady RssAnon "
        "| steady RssFile | frames VmHWM | frames RssAnon | workload peak | whole run peak | method |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        cells = [_phase(r, phase, field) for phase, field in phases] + [r.get("peak_rss_mb"), r.get("run_peak_rss_mb")]
        method = (r.get("memory") or {}).get("method", "—")
        lines.append(_name(r) + "| " + " | ".join(number(c) for c in cells) + f" | {method} |")
    return lines


def _budget_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | artifact | tile | budget | limit | measured | value − limit | % of limit | verdict |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        for key, v in r["budgets"].items():
            unit, digits = v["unit"], 3 if v["unit"] == "dB" else 2
            lines.append(
                _name(r)
                + f"| {key} ({LABELS[key]}) | {number(v['limit'], digits)} {unit} | {number(v['value'], digits)} "
                f"{unit} | {signed(v.get('delta'), digits)} {unit} | {signed(v.get('delta_pct'), 1)} % "
                f"| {'pass' if v['pass'] else '**FAIL**'} |"
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


def _bicubic(report: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    scales = {str(r.get("scale")) for r in rows}
    refs = report["test_set"].get("bicubic") or {}
    values = [refs[s]["psnr_y_db"] for s in scales if s in refs]
    return values[0] if len(values) == 1 else None


def _provenance(report: dict[str, Any]) -> str:
    p = report.get("provenance") or {}
    commit = (p.get("commit") or "unknown")[:12]
    dirty = " (uncommitted changes)" if p.get("dirty") else ""
    return f"edgesr {report['edgesr_version']} at commit {commit}{dirty}, on host {p.get('host', '?')}"


def _legend(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    rows = report["rows"]
    runtimes = sorted({f"{r['runtime']['name']} {r['runtime']['version']}" for r in rows})
    threads = "runtime default" if s["threads"] == -1 else f"{s['threads']} thread(s)"
    lines = [
        "## Legend",
        "",
        "- **workload**: LR frames of the given size (made from the first test image: its centre crop, mirrored "
        "outwards where the image is smaller), or the test images as they are; each frame is cut into tiles of the "
        "artifact's input size, overlapping by the manifest's overlap, invoked one by one and stitched.",
        f"- **frame ms median / p90**: wall time of one whole frame (tiling, copies, every tile's `invoke()`, "
        f"stitching) over at least {s['runs']} frames and at least {s.get('min_seconds', 0):g} s of frames, after "
        f"{s['warmup']} warm-up invokes, {threads}, on {', '.join(runtimes)} with the delegate named in the "
        "environment (XNNPACK on CPU by default). **fps** = frames / their summed time. Loading a frame from disk "
        "is not timed.",
        "- **tile ms median**: one `invoke()` of one tile (the per-tile figure); **tiles × tile ms** is what the "
        "frame would cost if it were only its invokes; **outside invoke ms** is the rest of the frame time (tile "
        "copies, stitching); **frame vs tiles × tile** their relative difference (invokes inside a frame also run on "
        "different data and caches than one repeated tile).",
        "- **size KB**: the artifact file in KiB (1 KB = 1024 bytes); **download KB**: the file compressed with "
        "gzip -9, as an app store ships it.",
        "- **peak MB**: the workload's peak resident set (VmHWM, MiB, `/proc/self/status`) of the runner process "
        "from its start through the frame loop: the Python interpreter and numpy, the runtime, the touched pages of "
        "the mmap'd model, the tensor arena, delegate buffers and one frame's input and output. The quality pass "
        "over the test images comes after and is not the workload; the whole run's peak is shown beside it.",
        "- **Y-PSNR dB / Y-SSIM**: mean over the test images of PSNR/SSIM on luma Y (BT.601, 16–235), border = "
        f"scale pixels shaved, SR quantized to 8 bit, LR made with {_lr_text(report)}. The **bicubic** row is "
        "bicubic upscaling of the same LR images, scored the same way: the floor a model must beat.",
        "- **Δ torch dB**: this Y-PSNR minus the PyTorch model's, recorded in the convert manifest, when that was "
        "measured on the same test set and degradation (— otherwise).",
        f"- **Pareto**: on its target's front of Y-PSNR against that cost, counting a win only beyond the "
        f"measurement's spread: frame latency must win by its p90 (its p90 below the other's median), memory by "
        f"more than {MEMORY_SPREAD_MB:g} MiB, Y-PSNR by more than {PSNR_TIE_DB} dB; file size is exact.",
        "- **budgets**: " + "; ".join(f"`{k}` {v}" for k, v in LABELS.items()) + ". In the verdict table "
        "**value − limit** and **% of limit** are signed: for a `max_` budget negative is headroom, for a `min_` "
        "budget positive is.",
        "- **Sparse encoding**: sparse TFLite weights save file size only; the runtime's DENSIFY op makes a dense "
        "copy at load (and XNNPACK packs it), so peak memory and latency are not expected to drop.",
        "",
        "### Memory columns (MiB, from `/proc/<runner>/status`)",
        "",
        "- **Phases**: *load* = Interpreter construction + `allocate_tensors()`; *first inference* = the first "
        "`invoke()` (one-time work such as DENSIFY); *steady* = the warm-up and timed tile invokes; *frames* = the "
        "frame loop.",
        "- **VmHWM**: the peak resident set in the phase, absolute (everything resident counts). With *clear_refs "
        "reset* the peak is reset at each phase start, so it is the phase's own; with *process per phase* it is the "
        "peak from process start through that phase.",
        "- **RssAnon**: anonymous memory (heap, arena, packed and densified weights): the model's private cost. "
        "**RssFile**: file-backed pages (libraries, the mmap'd model), which the kernel can drop.",
    ]
    if any(r.get("emulated") for r in rows) or any(e.get("emulated") for e in report.get("environment", {}).values()):
        lines.append(f"- **{EMULATED_NOTE}**: emulated targets prove correctness and plumbing, never speed.")
    notes = sorted({r["timing_note"] for r in rows if r.get("timing_note")})
    for note in notes:
        lines.append(f"- **{note}**: {_NOTE_LEGENDS.get(note, 'the runner says so of its own figures.')}")
    return lines


def markdown(report: dict[str, Any]) -> str:
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
        f"- created {report['created']}, {_provenance(report)}",
        f"- test set `{Path(str(ts['name'])).name}` ({n_images} image{'' if n_images == 1 else 's'}, "
        f"LR: {_lr_text(report)}): {ts['protocol']}",
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
    if report["failed_budgets"]:
        lines += ["## Failed budgets", ""] + [_failure_line(f) for f in report["failed_budgets"]] + [""]
    plots = report.get("plots") or {}
    names = list(dict.fromkeys([r["target"] for r in rows] + [f["target"] for f in failed_targets]))
    for target in names:
        env = report["environment"].get(target, {})
        trows = [r for r in rows if r["target"] == target]
        emulated = bool(env.get("emulated")) or any(r.get("emulated") for r in trows)
        kind = EMULATED_NOTE if emulated else "real hardware"
        failed = next((f for f in failed_targets if f["target"] == target), None)
        status = " — FAILED" if failed else ""
        lines += [f"## Target `{target}` ({kind}){status}", "", *_environment_block(env, trows), ""]
        if failed:
            lines += [f"**Failed:** {failed['reason']}", ""]
        if not trows:
            lines += ["No finished measurements.", ""]
            continue
        lines += ["### Results", "", *_results_table(trows, _bicubic(report, trows), emulated), ""]
        resumed = [r["artifact"] for r in trows if r.get("resumed")]
        if resumed:
            lines += [f"Resumed from results.jsonl (measured in an earlier run): {', '.join(resumed)}", ""]
        padded = sorted({name for r in trows for name in r.get("padded_images", [])})
        if padded:
            lines += [f"Padded to the tile by edge replication (border differs from whole-image): {padded}", ""]
        lines += ["### Frame time: tiles and stitching", "", *_frame_table(trows, emulated), ""]
        sweep = _sweep_table(trows)
        if sweep:
            lines += ["### Tile sweep", "", "What a tile size buys: peak memory against frame time.", "", *sweep, ""]
        lines += ["### Memory by phase (MiB)", "", *_memory_table(trows), ""]
        if any(r["budgets"] for r in trows):
            lines += ["### Budget verdicts", "", *_budget_table(trows), ""]
        for title, file in (plots.get(target) or {}).items():
            lines += [f"![{title}]({file})", ""]
    for title, file in (plots.get("*") or {}).items():
        lines += [f"![{title}]({file})", ""]
    if report.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {note}" for note in report["skipped"]] + [""]
    lines += _legend(report)
    return "\n".join(lines) + "\n"
