"""The bench report: report.json (the contract), report.md (for people) and a PSNR-vs-size plot.

Every figure in the Markdown comes with a legend saying what exactly it measures. `render` rebuilds the
Markdown and plot from an existing report.json, optionally re-checking its rows against another budgets file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from device_bench import budgets as budgets_mod
from edgesr.errors import EXIT_BUDGET_FAILED, EXIT_OK, BadInput
from edgesr.manifest import atomic_output, new_manifest, read_json, versions, write_json

log = logging.getLogger("device_bench")

PLOT_NAME = "psnr_vs_size.png"
REPORT_FILES = ("report.json", "report.md", PLOT_NAME)
_BUDGET_LABELS = {
    "max_model_kb": "model size",
    "max_peak_mb": "peak RSS",
    "max_latency_ms": "tile latency (median)",
    "min_psnr_db": "Y-PSNR",
}


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
    report["failed_budgets"] = failed_budgets(report["rows"])
    report["passed"] = not report["failed_budgets"]
    report["exit_code"] = EXIT_OK if report["passed"] else EXIT_BUDGET_FAILED


def build_report(
    rows: list[dict[str, Any]],
    environment: dict[str, Any],
    settings: dict[str, Any],
    test_set: dict[str, Any],
    skipped: list[str],
    budgets: dict[str, Any],
) -> dict[str, Any]:
    report = new_manifest(
        "bench",
        test_set=test_set,
        settings=settings,
        budgets=budgets,
        environment=environment,
        rows=rows,
        skipped=skipped,
        versions=versions("numpy", "Pillow", "PyYAML", "matplotlib"),
    )
    _verdict(report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json, report.md and the plot, each written atomically."""
    write_json(out / "report.json", report)
    write_markdown_and_plot(out, report)


def write_markdown_and_plot(out: Path, report: dict[str, Any]) -> None:
    plot = plot_psnr_vs_size(out / PLOT_NAME, report)
    with atomic_output(out / "report.md") as tmp:
        tmp.write_text(markdown(report, plot_name=PLOT_NAME if plot else None))


def render(folder: Path, budgets_path: Path | None = None) -> dict[str, Any]:
    """Re-render report.md and the plot from <folder>/report.json; with a budgets file, re-check the rows first."""
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


def _env_line(env: dict[str, Any]) -> str:
    rt = env.get("runtime") or {}
    parts = [
        f"runtime {rt.get('name', '?')} {rt.get('version', '?')}",
        f"Python {env.get('python', '?')}",
        f"numpy {env.get('numpy', '?')}",
        str(env.get("platform", "?")),
        f"{env.get('cpu_count', '?')} CPUs",
        f"device Python `{env.get('device_python', '?')}`",
    ]
    return " · ".join(parts)


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
        "- **peak RSS MB**: VmHWM (peak resident set size, MiB) of the runner process from `/proc/self/status` at "
        "the end of its run. It is the whole process: the Python interpreter and numpy (the runner's baseline after "
        "imports is `rss_after_import_mb` in report.json), the TFLite runtime, the touched pages of the mmap'd model, "
        "the tensor arena, delegate (XNNPACK) buffers and one image's input/output arrays. Per-phase VmHWM/VmRSS/"
        "RssAnon/RssFile are in report.json (`memory_phases_mb`).",
        f"- **latency median / p90 ms**: wall-clock time of one `invoke()` of one tile ({', '.join(tiles)} LR "
        f"pixels, see the tile column) after {s['warmup']} warm-up invokes, over {s['runs']} timed invokes, with "
        f"{threads}, on {', '.join(runtimes)} (default op resolver: the runtime applies XNNPACK on CPU). Whole "
        "images take one invoke per tile plus copies: see `per_image.*.ms` in report.json.",
        "- **load ms**: Interpreter construction plus `allocate_tensors()`; **first ms**: the first `invoke()` "
        "(one tile), which includes one-time work (e.g. weight packing/DENSIFY without a delegate).",
        "- **Y-PSNR dB / Y-SSIM**: mean over the test-set images of PSNR/SSIM on the luma channel Y (BT.601, "
        "16–235), border = scale pixels shaved on every side, the SR output quantized to 8 bit first, LR images made "
        "with Pillow bicubic (not MATLAB `imresize`, so not comparable with paper tables). Images are processed in "
        f"tiles overlapping by {', '.join(map(str, overlaps))} LR pixels; each tile contributes its interior, so the "
        "stitched output equals whole-image inference when the overlap is at least the receptive-field radius.",
        "- **Δ torch dB**: this Y-PSNR minus the PyTorch model's Y-PSNR recorded in the convert manifest, when that "
        "was measured on the same test set (— otherwise).",
        "- **budgets**: `pass`, or the budget keys that failed (details under *Failed budgets*). Model size is "
        "checked in KB, peak RSS in MB, latency on the median tile invoke, quality on the mean Y-PSNR.",
        "- **Sparse encoding**: sparse TFLite conv weights save file size only. The runtime's DENSIFY op materialises "
        "a dense copy of the weights at run time (and XNNPACK packs them again), so peak memory and latency are not "
        "expected to drop versus the dense file; peak memory can even be slightly higher.",
    ]
    if any(r.get("emulated") for r in rows):
        lines.append("- **emulated** targets prove correctness and plumbing, never speed: ignore their timings.")
    return lines


def markdown(report: dict[str, Any], plot_name: str | None = PLOT_NAME) -> str:
    rows = report["rows"]
    ts = report["test_set"]
    n_images = len(next(iter(ts["images"].values()), []))
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        "# edgesr device bench",
        "",
        f"- created {report['created']}, edgesr {report['edgesr_version']}",
        f"- test set `{ts['name']}` ({n_images} images): {ts['protocol']}",
        f"- budgets: {report['budgets'].get('source') or 'none (everything passes)'}",
        f"- overall: **{verdict}** (exit code {report['exit_code']})",
        "",
    ]
    header = (
        "| model | artifact | format / encoding | tile | size KB | peak RSS MB | latency median / p90 ms | load ms "
        "| first ms | Y-PSNR dB | Δ torch dB | Y-SSIM | budgets |"
    )
    for target in dict.fromkeys(r["target"] for r in rows):
        env = report["environment"].get(target, {})
        kind = "emulated — correctness only, not speed" if env.get("emulated") else "real hardware"
        lines += [f"## Target `{target}` ({kind})", "", _env_line(env), "", header, "|" + "---|" * 13]
        for r in (r for r in rows if r["target"] == target):
            lines.append(
                f"| {r['model']} | {r['artifact']} | {r['format']} / {r['encoding']} | {r['tile'][0]}x{r['tile'][1]} "
                f"| {_f(r['size_bytes'] / 1024)} | {_f(r['peak_rss_mb'])} "
                f"| {_f(r['latency_ms_median'], 2)} / {_f(r['latency_ms_p90'], 2)} | {_f(r['load_ms'])} "
                f"| {_f(r['first_inference_ms'], 2)} | {_f(r['psnr_y_db'], 3)} "
                f"| {_signed(r['psnr_delta_vs_torch_db'])} "
                f"| {_f(r['ssim_y'], 4)} | {_budget_cell(r)} |"
            )
        padded = sorted({name for r in rows if r["target"] == target for name in r.get("padded_images", [])})
        if padded:
            lines += ["", f"Padded to the tile by edge replication (border differs from whole-image): {padded}"]
        lines.append("")
    if report["failed_budgets"]:
        lines += ["## Failed budgets", ""] + [_failure_line(f) for f in report["failed_budgets"]] + [""]
    if report.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {note}" for note in report["skipped"]] + [""]
    if plot_name:
        lines += ["## Y-PSNR vs size", "", f"![Y-PSNR vs model size]({plot_name})", ""]
    lines += _legend(report)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- plot


def plot_psnr_vs_size(path: Path, report: dict[str, Any]) -> bool:
    """One labelled point per artifact (its first target's row); budget lines where defaults set them."""
    from matplotlib.figure import Figure  # Figure + Agg canvas: no GUI backend, no pyplot state

    points = {}
    for r in report["rows"]:
        if r["psnr_y_db"] is not None and math.isfinite(r["psnr_y_db"]):
            points.setdefault((r["model"], r["artifact"]), (r["size_bytes"] / 1024, r["psnr_y_db"]))
    if not points:
        return False
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    for (model, artifact), (kb, db) in points.items():
        ax.scatter([kb], [db], s=36)
        ax.annotate(f"{model}\n{artifact}", (kb, db), textcoords="offset points", xytext=(6, 4), fontsize=7)
    defaults = (report.get("budgets") or {}).get("defaults") or {}
    if "min_psnr_db" in defaults:
        ax.axhline(defaults["min_psnr_db"], color="tab:red", lw=0.8, ls="--", label="min_psnr_db")
    if "max_model_kb" in defaults:
        ax.axvline(defaults["max_model_kb"], color="tab:orange", lw=0.8, ls="--", label="max_model_kb")
    if defaults.keys() & {"min_psnr_db", "max_model_kb"}:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("artifact size (KB = 1024 bytes)")
    ax.set_ylabel(f"Y-PSNR (dB) on {Path(report['test_set']['name']).name}")
    ax.set_title("Y-PSNR vs size (TFLite artifacts)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
