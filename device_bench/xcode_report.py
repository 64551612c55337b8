"""Figures from Xcode's Core ML performance report, as rows of a bench report.

An iPhone cannot be driven from Linux or over ssh. Xcode measures a `.mlpackage` on one (open the package in
Xcode, Performance tab, "+", pick the device and compute units, Run test) and shows load and prediction times and
the compute unit of every op. Apple documents no file format for that report, so the import reads the figures a
user copies from it into a small YAML file, one per report:

  model: ../convert/sparse.mlpackage    # the package the report measured (relative to this file)
  device: iPhone 15 Pro                 # the device the report ran on
  os: iOS 18.2
  compute_units: ALL                    # the report's setting: CPU_ONLY, CPU_AND_GPU, CPU_AND_NE or ALL
  load_ms: 31.2                         # "Load" (median)
  prediction_ms: 4.8                    # "Prediction" (median)
  compile_ms: 212.0                     # optional: "Compilation" (median)
  xcode: "16.2"                         # optional
  ops: {neural_engine: 41, gpu: 0, cpu: 2}   # optional: how many ops each compute unit runs
  target: iphone15                      # optional: the rows' target name (default: the device, as a name)

The package must be one the bench folder measured already (matched by sha256): its bench row gives the model,
encoding, tile and overlap. The imported row's tile latency is Xcode's median prediction (one prediction = one
tile at the package's input size); its frame latency is derived, tiles per frame x that median, for the workload
frame the package was benched at (or --frame); its fps is 1000 / that. It has no p90 and no memory (Xcode measures
none) and no PSNR (the report runs no images; the bench's rows of the same file have the file's PSNR). A budget on
a figure the row lacks fails, as for every row; a target's budgets entry can set such a budget to null.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from pathlib import Path
from typing import Any

from device_bench import budgets as budgets_mod
from device_bench import report as report_mod
from device_bench.coreml_engine import COMPUTE_UNITS
from device_bench.results import RESULTS_NAME, ResultsLog, key_id
from device_bench.runner import tile_regions
from edgesr.errors import BadInput
from edgesr.manifest import provenance, read_yaml, sha256
from edgesr.workload import Size, parse_frame

log = logging.getLogger("device_bench")

SOURCE = "xcode-report"
REQUIRED = ("model", "device", "os", "compute_units", "load_ms", "prediction_ms")
OPTIONAL = ("compile_ms", "xcode", "ops", "target")
OP_UNITS = ("neural_engine", "gpu", "cpu")
MAX_MS = 3_600_000.0  # an hour: a longer "median prediction" is a typo, not a figure
NOTE = "Xcode report: frame = tiles × median prediction; no memory or PSNR measured"
# The bench row's fields that describe the file, not its measurement: an imported row takes them as they are.
ARTIFACT_FIELDS = (
    "model",
    "format",
    "encoding",
    "precision",
    "artifact",
    "artifact_path",
    "sha256",
    "size_bytes",
    "download_bytes",
    "scale",
    "tile",
    "overlap",
    "torch_psnr_y_db",
    "torch_test_set",
    "runtime_requirements",
)


def target_name(device: str) -> str:
    """A target name from a device name: "iPhone 15 Pro" -> "iphone-15-pro"."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "iphone"


def _ms(doc: dict[str, Any], key: str, path: Path) -> float | None:
    value = doc.get(key)
    if value is None and key not in REQUIRED:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{path}: {key} must be a number of milliseconds, got {value!r}")
    if not 0 < value <= MAX_MS:
        raise BadInput(f"{path}: {key} must be > 0 and at most {MAX_MS:g} ms, got {value!r}")
    return float(value)


def _text(doc: dict[str, Any], key: str, path: Path) -> str | None:
    value = doc.get(key)
    if value is None and key not in REQUIRED:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise BadInput(f"{path}: {key} must be a non-empty text, got {value!r}")
    text = str(value).strip()
    if len(text) > 100 or "\n" in text:
        raise BadInput(f"{path}: {key} must be one line of at most 100 characters")
    return text


def read_report(path: Path) -> dict[str, Any]:
    """One report file, validated: {model (Path), device, os, compute_units, load_ms, prediction_ms, ...}."""
    path = Path(path)
    doc = read_yaml(path, "Xcode report file")
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping with keys {', '.join(REQUIRED)}")
    unknown = [k for k in doc if k not in REQUIRED + OPTIONAL]
    if unknown:
        raise BadInput(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if doc.get(k) is None]
    if missing:
        raise BadInput(f"{path}: missing {', '.join(missing)} (the figures Xcode's performance report shows)")
    units = _text(doc, "compute_units", path)
    if units not in COMPUTE_UNITS:
        raise BadInput(f"{path}: compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {units!r}")
    model = path.parent / _text(doc, "model", path)
    if model.suffix != ".mlpackage" or not (model / "Manifest.json").is_file():
        raise BadInput(f"{path}: model {model} is not a .mlpackage folder (no Manifest.json)")
    ops = doc.get("ops")
    if ops is not None:
        if not isinstance(ops, dict) or any(k not in OP_UNITS for k in ops):
            raise BadInput(f"{path}: ops must map {', '.join(OP_UNITS)} to op counts, got {ops!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 10**7 for v in ops.values()):
            raise BadInput(f"{path}: ops counts must be whole numbers >= 0, got {ops!r}")
    device = _text(doc, "device", path)
    target = _text(doc, "target", path) or target_name(device)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", target):
        raise BadInput(f"{path}: target {target!r} must be letters, digits, '.', '_' or '-'")
    return {
        "path": path,
        "model": model,
        "device": device,
        "os": _text(doc, "os", path),
        "compute_units": units,
        "load_ms": _ms(doc, "load_ms", path),
        "prediction_ms": _ms(doc, "prediction_ms", path),
        "compile_ms": _ms(doc, "compile_ms", path),
        "xcode": _text(doc, "xcode", path),
        "ops": dict(ops) if ops else None,
        "target": target,
    }


def tiles_per_frame(frame: Size, tile: list[int], overlap: int) -> int:
    """How many tile invokes the runner's tiler makes for one frame (a frame smaller than the tile is padded)."""
    h, w = max(frame[0], tile[0]), max(frame[1], tile[1])
    return len(tile_regions(h, tile[0], overlap)) * len(tile_regions(w, tile[1], overlap))


def make_row(rep: dict[str, Any], base: dict[str, Any], frame: Size | None) -> dict[str, Any]:
    """The report row for one Xcode report of the file that `base` (a bench row of the same sha256) measured."""
    tiles = tiles_per_frame(frame, base["tile"], base["overlap"]) if frame else None
    frame_ms = tiles * rep["prediction_ms"] if tiles else None
    figures = {k: rep[k] for k in ("load_ms", "prediction_ms", "compile_ms") if rep[k] is not None}
    return {
        **{k: base.get(k) for k in ARTIFACT_FIELDS},
        "target": rep["target"],
        "source": SOURCE,
        "emulated": False,
        "timings_meaningful": True,
        "timing_note": NOTE,
        "compute_units": rep["compute_units"],
        "os_version": rep["os"],
        "peak_rss_mb": None,
        "rss_after_import_mb": None,
        "latency_ms_median": rep["prediction_ms"],
        "latency_ms_p90": None,
        "latency_ms_mean": None,
        "latency_ms_min": None,
        "load_ms": rep["load_ms"],
        "first_inference_ms": None,
        "image_ms_mean": None,
        "psnr_y_db": None,
        "ssim_y": None,
        "per_image": {},
        "psnr_delta_vs_torch_db": None,
        "threads": -1,  # Core ML picks its own
        "warmup": None,
        "runs": None,
        "runtime": {"name": "Core ML (Xcode performance report)", "version": rep["os"]},
        "delegate": f"Core ML {rep['compute_units']}",
        "padded_images": [],
        "latency_samples_ms": [],
        "frame_size": list(frame) if frame else None,
        "tiles_per_frame": tiles,
        "frame_ms_median": frame_ms,
        "frame_ms_p90": None,
        "frame_ms_source": f"derived: {tiles} tiles × Xcode's median prediction (stitching not timed)"
        if tiles
        else None,
        "fps": 1000 / frame_ms if frame_ms else None,
        "memory": {},
        "workload": {"frame": f"{frame[1]}x{frame[0]}" if frame else None, "tiles": [base["tile"][0]]},
        "xcode_report": {
            "file": str(rep["path"]),
            "file_sha256": sha256(rep["path"]),
            "device": rep["device"],
            "os": rep["os"],
            "xcode": rep["xcode"],
            "figures_ms": figures,
            "ops": rep["ops"],
        },
    }


def record_key(row: dict[str, Any]) -> dict[str, Any]:
    """What makes two imports the same (a later one replaces an earlier): target, file, compute units, frame."""
    return {
        "source": SOURCE,
        "target": row["target"],
        "artifact_sha256": row["sha256"],
        "compute_units": row["compute_units"],
        "frame": row["frame_size"],
    }


def environment(rep: dict[str, Any]) -> dict[str, Any]:
    env = {"name": rep["target"], "emulated": False, "kind": "Xcode performance report (imported)"}
    env.update(device_model=rep["device"], os=rep["os"], xcode=rep["xcode"])
    return env


def imported_rows(prior: dict[str, dict[str, Any]], shas: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The imported rows in a results.jsonl (`ResultsLog.read`) for the files a bench measures, with their
    environments: a bench run keeps what was imported into its folder."""
    rows, env = [], {}
    for record in prior.values():
        if record["key"].get("source") == SOURCE and record["key"].get("artifact_sha256") in shas:
            rows.append({**record["row"], "resumed": True})
            env.setdefault(record["row"]["target"], record.get("environment") or {})
    return rows, env


def import_reports(
    paths: list[Path], out: Path, budgets_path: Path | None = None, frame: str | None = None
) -> dict[str, Any]:
    """Add the Xcode reports at `paths` to the bench report in `out`: validate every file first, append their
    rows to results.jsonl, check them against the budgets (--budgets, else those the report recorded) and write
    report.json, report.md and the plots again. Returns the report."""
    out = Path(out)
    report = report_mod.load_report(out)
    budgets = (
        budgets_mod.load_budgets(budgets_path)
        if budgets_path is not None
        else budgets_mod.Budgets.from_dict(report.get("budgets") or {})
    )
    size = parse_frame(frame) if frame is not None else None
    benched = {r["sha256"]: r for r in report["rows"] if r.get("source") != SOURCE and r.get("format") == "coreml"}
    others = {r["target"] for r in report["rows"] if r.get("source") != SOURCE}
    new: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for path in paths:
        rep = read_report(path)
        digest = sha256(rep["model"])
        if digest not in benched:
            raise BadInput(
                f"{path}: {rep['model'].name} is not among the Core ML files benched in {out.name} (sha256 "
                f"{digest[:12]}); bench it into that folder first"
            )
        if rep["target"] in others:
            raise BadInput(f"{path}: target {rep['target']!r} is a measured target in {out}; set another `target`")
        base = benched[digest]
        row = make_row(rep, base, size or (tuple(base["frame_size"]) if base.get("frame_size") else None))
        new.append((row, environment(rep)))
    results = ResultsLog(out / RESULTS_NAME)
    finished = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
    latest = {key_id(record_key(row)): (row, env) for row, env in new}  # the same report twice: the later wins
    report["rows"] = [r for r in report["rows"] if r.get("source") != SOURCE or key_id(record_key(r)) not in latest]
    for row, env in latest.values():
        results.append(
            {"key": record_key(row), "row": row, "environment": env, "finished": finished, "provenance": provenance()}
        )
        report.setdefault("environment", {})[row["target"]] = env
        log.info(
            "%s: %s (%s): %.2f ms per prediction; frame %s",
            row["target"],
            row["artifact"],
            row["compute_units"],
            row["latency_ms_median"],
            f"{row['frame_ms_median']:.1f} ms ({row['tiles_per_frame']} tiles)" if row["frame_ms_median"] else "—",
        )
        if budgets_path is None:  # only the new rows: the others keep the verdicts the report recorded
            budgets_mod.judge(budgets, row)
        report["rows"].append(row)
    report_mod.rewrite(out, report, budgets if budgets_path is not None else None)
    return report
