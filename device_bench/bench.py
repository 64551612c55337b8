"""Benchmark TFLite artifacts on targets: resolve inputs, validate everything, run jobs, score outputs, report.

Nothing runs and nothing is written until every input has been checked: the budgets file, the artifacts (convert
manifests, convert output folders or bare .tflite files, each described by the target's runner) and the test set.
Then, per (target, artifact), a self-contained job folder `<out>/jobs/<target>/<artifact>/` gets the model, the LR
images as .npy and job.json; the target runs it; the SR outputs come back as .npy and are scored here with the
shared metrics (quantized to 8 bit, Y channel, border = scale).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_bench import budgets as budgets_mod
from device_bench import report as report_mod
from device_bench.runner import RUNTIMES
from device_bench.targets import Target, make_targets
from edgesr.datasets import SRPair, load_test_set
from edgesr.errors import BadInput, TargetFailed
from edgesr.images import quantize_uint8, save_png, to_float
from edgesr.manifest import MANIFEST_NAME, read_json, sha256, size_bytes, write_json
from edgesr.metrics import mean_scores, sr_scores

log = logging.getLogger("device_bench")

DEFAULT_OVERLAP = 16  # LR pixels; covers the receptive-field radius of the small EDSR presets (edsr-tiny: ~12)


@dataclass(frozen=True)
class BenchConfig:
    artifacts: tuple[Path, ...]
    out: Path
    targets: tuple[str, ...] = ("local",)
    budgets: Path | None = None
    test_set: str = "sporco"
    threads: int = 1
    warmup: int = 3
    runs: int = 20
    timeout_s: float = 600.0
    device_python: Path | None = None
    overlap: int | None = None  # None: the convert manifest's tile overlap, else DEFAULT_OVERLAP
    runtime: str = "auto"
    save_images: bool = False

    def __post_init__(self) -> None:
        if not self.artifacts:
            raise BadInput("no artifacts given: pass .tflite files, convert output folders or their manifest.json")
        if self.threads < 1 and self.threads != -1:
            raise BadInput(f"--threads must be >= 1 (or -1 for the runtime's default), got {self.threads}")
        if self.warmup < 0:
            raise BadInput(f"--warmup must be >= 0, got {self.warmup}")
        if self.runs < 1:
            raise BadInput(f"--runs must be >= 1, got {self.runs}")
        if not self.timeout_s > 0:
            raise BadInput(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        if self.overlap is not None and self.overlap < 0:
            raise BadInput(f"--overlap must be >= 0, got {self.overlap}")
        if self.runtime != "auto" and self.runtime not in RUNTIMES:
            raise BadInput(f"--runtime must be auto or one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not self.targets:
            raise BadInput("--targets is empty")
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"{self.out}: --out exists and is not a folder")
        existing = next(p for p in (self.out.absolute(), *self.out.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise BadInput(f"{self.out}: cannot create or write the output folder ({existing} is not writable)")

    def settings(self) -> dict[str, Any]:
        return {
            "test_set": self.test_set,
            "threads": self.threads,
            "warmup": self.warmup,
            "runs": self.runs,
            "timeout_s": self.timeout_s,
            "overlap": self.overlap,
            "runtime": self.runtime,
            "targets": list(self.targets),
        }


@dataclass
class Artifact:
    """One TFLite file to bench and what its convert manifest (if any) says about it."""

    path: Path
    model: str
    encoding: str = "unknown"
    precision: str = "unknown"
    format: str = "tflite"
    scale: int | None = None
    tile: list[int] | None = None
    overlap: int = DEFAULT_OVERLAP
    io: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    manifest: Path | None = None
    key: str = ""

    @property
    def size_bytes(self) -> int:
        return size_bytes(self.path)


# ------------------------------------------------------------------------------------------ artifact resolving


def _from_manifest(manifest_path: Path, overlap: int | None, skipped: list[str]) -> list[Artifact]:
    m = read_json(manifest_path)
    if m.get("kind") != "convert":
        raise BadInput(f"{manifest_path}: not a convert manifest (kind {m.get('kind')!r})")
    entries = m.get("artifacts")
    if not isinstance(entries, list):
        raise BadInput(f"{manifest_path}: 'artifacts' must be a list")
    tile = m.get("tile") or {}
    io = m.get("io") or {}
    found = []
    for entry in entries:
        if not isinstance(entry, dict) or "file" not in entry:
            raise BadInput(f"{manifest_path}: each artifact needs a 'file', got {entry!r}")
        fmt = entry.get("format")
        if fmt != "tflite":
            note = "Core ML cannot run on Linux" if fmt == "coreml" else f"format {fmt!r} is not benchable here"
            skipped.append(f"{entry['file']} ({m.get('model')}): skipped, {note}")
            log.info("skipping %s: %s", entry["file"], note)
            continue
        path = manifest_path.parent / entry["file"]
        if not path.is_file():
            raise BadInput(f"{path}: listed in {manifest_path} but missing")
        if "sha256" in entry and entry["sha256"] != sha256(path):
            raise BadInput(f"{path}: sha256 differs from {manifest_path}; the file changed after conversion")
        found.append(
            Artifact(
                path=path,
                model=str(m.get("model") or path.stem),
                encoding=str(entry.get("encoding", "unknown")),
                precision=str(entry.get("precision", "unknown")),
                scale=m.get("scale"),
                tile=[tile["height"], tile["width"]] if "height" in tile and "width" in tile else None,
                overlap=overlap if overlap is not None else int(tile.get("overlap", DEFAULT_OVERLAP)),
                io=io,
                source=m.get("source") or {},
                manifest=manifest_path,
            )
        )
    return found


def resolve_artifacts(paths: tuple[Path, ...], overlap: int | None) -> tuple[list[Artifact], list[str]]:
    """The .tflite artifacts behind the command-line paths, and notes on what was skipped."""
    artifacts: list[Artifact] = []
    skipped: list[str] = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".mlpackage":
            skipped.append(f"{p.name}: skipped, Core ML cannot run on Linux")
            log.info("skipping %s: Core ML cannot run on Linux", p)
        elif p.is_dir():
            if not (p / MANIFEST_NAME).is_file():
                raise BadInput(f"{p}: folder has no {MANIFEST_NAME}; pass a convert output folder or .tflite files")
            artifacts += _from_manifest(p / MANIFEST_NAME, overlap, skipped)
        elif not p.exists():
            raise BadInput(f"{p}: no such model file or folder")
        elif p.suffix == ".json":
            artifacts += _from_manifest(p, overlap, skipped)
        elif p.suffix == ".tflite":
            artifacts.append(Artifact(path=p, model=p.stem, overlap=DEFAULT_OVERLAP if overlap is None else overlap))
            log.info("%s: bare .tflite, model name '%s', overlap %d LR px", p, p.stem, artifacts[-1].overlap)
        else:
            raise BadInput(f"{p}: not a .tflite file, a convert output folder or a convert manifest.json")
    if not artifacts:
        raise BadInput("nothing to bench: no TFLite artifacts among " + ", ".join(str(p) for p in paths))
    seen: dict[str, int] = {}
    for a in artifacts:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{a.model}--{a.path.stem}")
        seen[base] = seen.get(base, 0) + 1
        a.key = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return artifacts, skipped


def _check_description(a: Artifact, desc: dict[str, Any], target: str) -> None:
    """Fill tile/scale from the runner's description; a manifest that disagrees with the file is an error."""
    where = f"{a.path} (on {target})"
    if a.tile is not None and list(a.tile) != desc["tile"]:
        raise BadInput(f"{where}: manifest tile {a.tile} but the model's input is {desc['tile']}")
    if a.scale is not None and a.scale != desc["scale"]:
        raise BadInput(f"{where}: manifest scale {a.scale} but the model upscales x{desc['scale']}")
    for key, tensors in (("input_shape", "inputs"), ("output_shape", "outputs")):
        if key in a.io and list(a.io[key]) != desc[tensors][0]["shape"]:
            raise BadInput(f"{where}: manifest {key} {a.io[key]} but the model has {desc[tensors][0]['shape']}")
    a.tile, a.scale = list(desc["tile"]), int(desc["scale"])
    if a.manifest is None:  # a bare file: its tensors say whether its weights are stored sparse
        a.encoding = "sparse" if desc.get("sparse_tensors") else "dense"
    if 2 * a.overlap >= min(a.tile):
        raise BadInput(f"{where}: overlap {a.overlap} leaves no interior in a {a.tile[0]}x{a.tile[1]} tile")


# ----------------------------------------------------------------------------------------------------- jobs


def write_job(job_dir: Path, a: Artifact, pairs: list[SRPair], cfg: BenchConfig) -> None:
    """A self-contained job folder: model, LR inputs (.npy float32 HxWx3 in [0, 1]) and job.json."""
    if job_dir.exists():
        shutil.rmtree(job_dir)
    (job_dir / "inputs").mkdir(parents=True)
    shutil.copyfile(a.path, job_dir / "model.tflite")
    for p in pairs:
        np.save(job_dir / "inputs" / f"{p.name}.npy", to_float(p.lr))
    job = {
        "runner_version": 1,
        "model": "model.tflite",
        "inputs": [{"name": p.name, "path": f"inputs/{p.name}.npy"} for p in pairs],
        "out_dir": "out",
        "tile": a.tile,
        "overlap": a.overlap,
        "scale": a.scale,
        "threads": cfg.threads,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "runtime": cfg.runtime,
    }
    write_json(job_dir / "job.json", job)


def score_outputs(result: dict[str, Any], out_dir: Path, pairs: list[SRPair], scale: int) -> dict[str, Any]:
    """Per-image Y-PSNR/SSIM (plus the runner's timing) of the SR .npy files the runner wrote."""
    by_name = {img["name"]: img for img in result["images"]}
    per_image = {}
    for p in pairs:
        if p.name not in by_name:
            raise TargetFailed(f"runner result lacks image {p.name}")
        path = out_dir / by_name[p.name]["output"]
        try:
            sr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TargetFailed(f"{path}: unreadable SR output ({exc})") from None
        if sr.shape != p.hr.shape:
            raise TargetFailed(f"{path}: SR output {sr.shape} but the HR image is {p.hr.shape}")
        img = by_name[p.name]
        per_image[p.name] = {
            **sr_scores(quantize_uint8(sr), p.hr, scale),
            "ms": img["ms"],
            "tiles": img["tiles"],
            "padded": img["padded"],
        }
    return per_image


def make_row(a: Artifact, target: Target, result: dict[str, Any], per_image: dict[str, Any], test_set: str) -> dict:
    mean = mean_scores([{k: s[k] for k in ("psnr_y_db", "ssim_y")} for s in per_image.values()])
    torch_psnr = a.source.get("psnr_y_db")
    same_set = torch_psnr is not None and str(a.source.get("test_set")) == str(test_set)
    lat = result["latency_ms"]
    phases = result["memory"]["phases"]
    return {
        "model": a.model,
        "format": a.format,
        "encoding": a.encoding,
        "precision": a.precision,
        "artifact": a.path.name,
        "artifact_path": str(a.path),
        "sha256": sha256(a.path),
        "target": target.name,
        "emulated": target.emulated,
        "size_bytes": a.size_bytes,
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_after_import_mb": phases.get("after_import", {}).get("VmHWM"),
        "latency_ms_median": lat["median"],
        "latency_ms_p90": lat["p90"],
        "latency_ms_mean": lat["mean"],
        "latency_ms_min": lat["min"],
        "load_ms": result["load_ms"],
        "first_inference_ms": result["first_inference_ms"],
        "image_ms_mean": float(np.mean([s["ms"] for s in per_image.values()])),
        "psnr_y_db": mean["psnr_y_db"],
        "ssim_y": mean["ssim_y"],
        "per_image": per_image,
        "torch_psnr_y_db": torch_psnr,
        "torch_test_set": a.source.get("test_set"),
        "psnr_delta_vs_torch_db": mean["psnr_y_db"] - torch_psnr if same_set else None,
        "scale": a.scale,
        "tile": result["tile"],
        "overlap": result["overlap"],
        "threads": result["threads"],
        "warmup": result["warmup"],
        "runs": result["runs"],
        "runtime": {"name": result["runtime"]["name"], "version": result["runtime"]["version"]},
        "padded_images": [name for name, s in per_image.items() if s["padded"]],
        "latency_samples_ms": lat["samples"],
        "memory_phases_mb": phases,
    }


def _environment(target: Target, result: dict[str, Any]) -> dict[str, Any]:
    keys = ("runtime", "python", "platform", "machine", "cpu_count", "numpy")
    return {**target.info(), **{k: result.get(k) for k in keys}}


def _save_images(folder: Path, out_dir: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for img in result["images"]:
        save_png(folder / f"{img['name']}.png", quantize_uint8(np.load(out_dir / img["output"])))


# --------------------------------------------------------------------------------------------------- the run


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Validate, run every (target, artifact) job, write report.json/.md/.png; returns the report."""
    budgets = budgets_mod.load_budgets(cfg.budgets)
    artifacts, skipped = resolve_artifacts(cfg.artifacts, cfg.overlap)
    targets = make_targets(list(cfg.targets), cfg.device_python, cfg.timeout_s, cfg.runtime)
    for target in targets:
        for a in artifacts:
            _check_description(a, target.describe(a.path), target.name)
    pairs_by_scale = {s: load_test_set(cfg.test_set, s) for s in sorted({a.scale for a in artifacts})}

    # Inputs are valid: from here on the out folder is ours to write.
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name in report_mod.REPORT_FILES:  # a stale report must not outlive a failed run
        (cfg.out / name).unlink(missing_ok=True)
    rows, environment = [], {}
    for target in targets:
        for a in artifacts:
            pairs = pairs_by_scale[a.scale]
            job_dir = cfg.out / "jobs" / target.name / a.key
            write_job(job_dir, a, pairs, cfg)
            log.info(
                "%s: running %s (%d images, tile %dx%d, overlap %d)", target.name, a.key, len(pairs), *a.tile, a.overlap
            )
            result = target.run(job_dir)
            try:
                per_image = score_outputs(result, job_dir / "out", pairs, a.scale)
            except TargetFailed as exc:
                raise TargetFailed(f"target {target.name}: {exc}") from None
            row = make_row(a, target, result, per_image, cfg.test_set)
            row["job_dir"] = str(job_dir.relative_to(cfg.out))
            row["budgets"] = budgets_mod.check(budgets, target.name, row)
            row["pass"] = all(v["pass"] for v in row["budgets"].values())
            rows.append(row)
            environment.setdefault(target.name, _environment(target, result))
            if cfg.save_images:
                _save_images(cfg.out / "images" / target.name / a.key, job_dir / "out", result)
            log.info(
                "%s: %s: %.1f KB, peak RSS %.1f MB, tile latency %.2f ms (p90 %.2f), Y-PSNR %.3f dB%s",
                target.name,
                a.path.name,
                row["size_bytes"] / 1024,
                row["peak_rss_mb"],
                row["latency_ms_median"],
                row["latency_ms_p90"],
                row["psnr_y_db"],
                "" if row["pass"] else "  BUDGET FAILED",
            )
    test_set = {
        "name": str(cfg.test_set),
        "images": {str(s): [p.name for p in pairs] for s, pairs in pairs_by_scale.items()},
        "protocol": "Y (BT.601), border = scale, SR quantized to 8 bit, LR by Pillow bicubic",
    }
    report = report_mod.build_report(rows, environment, cfg.settings(), test_set, skipped, budgets.to_dict())
    report_mod.write_report(cfg.out, report)
    return report
