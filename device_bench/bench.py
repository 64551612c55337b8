"""Benchmark TFLite artifacts on a fleet of targets: validate, run jobs, score outputs, record, report.

Nothing runs and nothing is written until every input has been checked: the budgets file, the targets, the
artifacts (convert manifests, convert output folders or bare .tflite files, each described by the targets that
still have work to do) and the test set. A target whose pre-flight describe fails is a failed target (exit 3),
not a reason to stop the others; a model the runner finds unusable is bad input (exit 2).

Then every target runs in its own thread (targets on the same device, e.g. several local ones, take turns so they
do not skew each other's timings); a target runs its artifacts one after the other. Per (target, artifact) a
self-contained job folder `<out>/jobs/<target>/<artifact>/` gets the model, the LR images as .npy and job.json; the
target runs it; the SR outputs come back as .npy and are scored here with the shared metrics (quantized to 8 bit,
Y channel, border = scale). Each finished measurement is appended to `<out>/results.jsonl` at once (flushed and
fsynced), so a target that dies later loses nothing already measured. A target that fails (unreachable, killed,
timed out, dropped) is marked failed with its reason and skips its remaining artifacts; the others go on.

Re-running the same command resumes: measurements in results.jsonl with the same key (target, artifact sha256 and
every setting that changes the numbers) are reused, not rerun, unless `fresh` is set.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_bench import budgets as budgets_mod
from device_bench import report as report_mod
from device_bench.runner import RUNTIMES
from device_bench.targets import LocalTarget, Target, make_targets
from edgesr.datasets import SRPair, load_test_set, lr_degradation
from edgesr.errors import BadInput, EdgesrError, TargetFailed
from edgesr.images import DEGRADATIONS, check_degradation, quantize_uint8, save_png, to_float
from edgesr.manifest import MANIFEST_NAME, read_json, sha256, size_bytes, write_json
from edgesr.metrics import mean_scores, sr_scores

log = logging.getLogger("device_bench")

DEFAULT_OVERLAP = 16  # LR pixels; covers the receptive-field radius of the small EDSR presets (edsr-tiny: ~12)
RESULTS_NAME = "results.jsonl"


@dataclass(frozen=True)
class BenchConfig:
    artifacts: tuple[Path, ...]
    out: Path
    targets: tuple[str, ...] = ("local",)
    budgets: Path | None = None
    test_set: str = "sporco"
    degradation: str = "pillow"  # edgesr.images.DEGRADATIONS; DIV2K/BasicSR folders use their shipped LR files
    threads: int = 1
    warmup: int = 3
    runs: int = 20
    timeout_s: float = 600.0
    device_python: Path | None = None
    overlap: int | None = None  # None: the convert manifest's tile overlap, else DEFAULT_OVERLAP
    runtime: str = "auto"
    save_images: bool = False
    targets_file: Path | None = None
    fresh: bool = False  # ignore (and replace) results.jsonl instead of resuming from it

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
        check_degradation(self.degradation)
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"{self.out}: --out exists and is not a folder")
        existing = next(p for p in (self.out.absolute(), *self.out.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise BadInput(f"{self.out}: cannot create or write the output folder ({existing} is not writable)")

    def settings(self) -> dict[str, Any]:
        return {
            "test_set": self.test_set,
            "degradation": self.degradation,
            "threads": self.threads,
            "warmup": self.warmup,
            "runs": self.runs,
            "timeout_s": self.timeout_s,
            "overlap": self.overlap,
            "runtime": self.runtime,
            "targets": list(self.targets),
            "targets_file": str(self.targets_file) if self.targets_file else None,
            "fresh": self.fresh,
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
    runtime_requirements: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

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
        if not isinstance(entry.get("runtime_requirements", {}), dict):
            raise BadInput(f"{manifest_path}: {entry['file']}: 'runtime_requirements' must be an object")
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
                runtime_requirements=dict(entry.get("runtime_requirements") or {}),
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
    """A manifest (or another target's description) that disagrees with the file is an error."""
    where = f"{a.path} (on {target})"
    if a.tile is not None and list(a.tile) != desc["tile"]:
        raise BadInput(f"{where}: manifest tile {a.tile} but the model's input is {desc['tile']}")
    if a.scale is not None and a.scale != desc["scale"]:
        raise BadInput(f"{where}: manifest scale {a.scale} but the model upscales x{desc['scale']}")
    for key, tensors in (("input_shape", "inputs"), ("output_shape", "outputs")):
        if key in a.io and list(a.io[key]) != desc[tensors][0]["shape"]:
            raise BadInput(f"{where}: manifest {key} {a.io[key]} but the model has {desc[tensors][0]['shape']}")
    if 2 * a.overlap >= min(desc["tile"]):
        raise BadInput(f"{where}: overlap {a.overlap} leaves no interior in a {desc['tile'][0]}x{desc['tile'][1]} tile")


def _apply_description(a: Artifact, desc: dict[str, Any]) -> None:
    a.tile, a.scale = list(desc["tile"]), int(desc["scale"])
    if a.manifest is None:  # a bare file: its tensors say whether its weights are stored sparse
        a.encoding = "sparse" if desc.get("sparse_tensors") else "dense"


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
        "runtime_requirements": a.runtime_requirements,
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


def make_row(
    a: Artifact,
    target: Target,
    result: dict[str, Any],
    per_image: dict[str, Any],
    test_set: str,
    degradation: str = "pillow",
) -> dict:
    mean = mean_scores([{k: s[k] for k in ("psnr_y_db", "ssim_y")} for s in per_image.values()])
    torch_psnr = a.source.get("psnr_y_db")
    same_set = torch_psnr is not None and str(a.source.get("test_set")) == str(test_set)
    if same_set:  # same images only if the LR was made the same way (a source without "degradation" used Pillow)
        source_degradation = str(a.source.get("degradation") or "pillow")
        same_set = source_degradation in DEGRADATIONS and lr_degradation(
            test_set, a.scale, source_degradation
        ) == lr_degradation(test_set, a.scale, degradation)
    lat = result["latency_ms"]
    memory = result.get("memory") or {}  # engines other than the runner may measure fewer phases
    delegate = result.get("delegate") or {}
    return {
        "model": a.model,
        "format": a.format,
        "encoding": a.encoding,
        "precision": a.precision,
        "artifact": a.path.name,
        "artifact_path": str(a.path),
        "sha256": a.sha256 or sha256(a.path),
        "target": target.name,
        "emulated": target.emulated,
        "size_bytes": a.size_bytes,
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_after_import_mb": (memory.get("baseline") or {}).get("hwm_mb"),
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
        "delegate": delegate.get("name", "unknown"),
        "runtime_requirements": a.runtime_requirements,
        "padded_images": [name for name, s in per_image.items() if s["padded"]],
        "latency_samples_ms": lat["samples"],
        "memory": memory,
    }


def _environment(target: Target, result: dict[str, Any]) -> dict[str, Any]:
    keys = ("runtime", "python", "platform", "machine", "cpu_count", "numpy")
    return {**target.info(), **{k: result.get(k) for k in keys}}


def _save_images(folder: Path, out_dir: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for img in result["images"]:
        save_png(folder / f"{img['name']}.png", quantize_uint8(np.load(out_dir / img["output"])))


# ---------------------------------------------------------------------------------------- results and resume


def test_set_fingerprint(pairs: list[SRPair]) -> str:
    """sha256 of the test images as measured (names, HR and LR pixels): a changed image is a new measurement."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.name.encode() + b"\0" + str(p.hr.shape).encode() + p.hr.tobytes() + p.lr.tobytes())
    return h.hexdigest()


def measurement_key(target: Target, a: Artifact, cfg: BenchConfig, test_set_sha: str) -> dict[str, Any]:
    """What makes two measurements the same: the target, the file and every setting that changes the numbers."""
    return {
        "target": target.name,
        "artifact_sha256": a.sha256,
        "threads": cfg.threads,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "tile": a.tile,
        "overlap": a.overlap,
        "test_set": {"name": str(cfg.test_set), "sha256": test_set_sha},
        "runtime": str(getattr(target, "runtime", None) or cfg.runtime),
        "runtime_requirements": a.runtime_requirements,
    }


def _key_id(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


class ResultsLog:
    """`<out>/results.jsonl`: one JSON line {key, row, environment, finished} per finished measurement, appended
    under a lock and flushed + fsynced as it arrives. A line cut short by a crash is skipped when read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict[str, Any]]:
        """The recorded measurements by key (a later line for the same key wins)."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[_key_id(record["key"])] = record
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: unreadable line skipped (cut short by an interrupted run?)", self.path, n)
        return records

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._lock, open(self.path, "a+b") as fh:
            if fh.tell() > 0:  # "a+" starts at the end: complete a line an interrupted run left unterminated
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class TargetOutcome:
    """What one target did in this run."""

    target: Target
    todo: list[Artifact]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # artifact key -> row, new in this run
    environment: dict[str, Any] | None = None
    failure: str | None = None
    not_run: list[str] = field(default_factory=list)
    error: BaseException | None = None  # an unexpected error, re-raised after the other targets finish


def _device_of(target: Target) -> str:
    """Targets on the same device take turns; every local target shares this machine."""
    return "this machine" if isinstance(target, LocalTarget) else f"target {target.name}"


def _in_threads(groups: dict[str, list[TargetOutcome]], work: Any) -> None:
    """Run `work(outcome)` for every outcome: one thread per device, the outcomes of a device in order."""

    def run_group(outcomes: list[TargetOutcome]) -> None:
        for outcome in outcomes:
            try:
                work(outcome)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome.error = exc

    threads = [threading.Thread(target=run_group, args=(o,), name=d, daemon=True) for d, o in groups.items()]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # a timed join keeps Ctrl-C responsive
            t.join(0.2)


def _preflight(outcomes: list[TargetOutcome]) -> dict[str, dict[str, dict[str, Any]]]:
    """Describe every artifact a target still has to run, all targets at once. A target that cannot describe is
    failed (its reason kept); a model the runner rejects raises BadInput (exit 2) after all targets answered."""
    descriptions: dict[str, dict[str, dict[str, Any]]] = {}

    def describe(o: TargetOutcome) -> None:
        found = descriptions.setdefault(o.target.name, {})
        for a in o.todo:
            try:
                found[a.key] = o.target.describe(a.path)
            except TargetFailed as exc:
                o.failure, o.not_run = str(exc), [x.key for x in o.todo]
                log.error("%s: failed its pre-flight describe: %s", o.target.name, exc)
                return

    groups: dict[str, list[TargetOutcome]] = {}
    for o in outcomes:
        if o.todo:
            groups.setdefault(_device_of(o.target), []).append(o)
    _in_threads(groups, describe)
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return descriptions


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Validate, run every (target, artifact) job not already recorded, write results.jsonl and the report."""
    budgets = budgets_mod.load_budgets(cfg.budgets)
    artifacts, skipped = resolve_artifacts(cfg.artifacts, cfg.overlap)
    targets = make_targets(list(cfg.targets), cfg.device_python, cfg.timeout_s, cfg.runtime, cfg.targets_file)
    results = ResultsLog(cfg.out / RESULTS_NAME)
    prior = {} if cfg.fresh else results.read()
    for a in artifacts:
        a.sha256 = sha256(a.path)
        for record in prior.values():  # the same file measured before: its shapes are known without a device
            row = record.get("row") or {}
            if record["key"].get("artifact_sha256") == a.sha256 and row.get("tile") and row.get("scale"):
                a.tile, a.scale = a.tile or list(row["tile"]), a.scale or int(row["scale"])

    pairs_by_scale: dict[int, list[SRPair]] = {}
    fingerprints: dict[int, str] = {}

    def test_set_for(scale: int) -> list[SRPair]:
        if scale not in pairs_by_scale:
            pairs_by_scale[scale] = load_test_set(cfg.test_set, scale, cfg.degradation)
            fingerprints[scale] = test_set_fingerprint(pairs_by_scale[scale])
        return pairs_by_scale[scale]

    for scale in sorted({a.scale for a in artifacts if a.scale is not None}):
        test_set_for(scale)

    def key_of(target: Target, a: Artifact) -> dict[str, Any] | None:
        return None if a.scale is None else measurement_key(target, a, cfg, fingerprints[a.scale])

    resumed: dict[tuple[str, str], dict[str, Any]] = {}
    outcomes = []
    for target in targets:
        todo = []
        for a in artifacts:
            key = key_of(target, a)
            record = prior.get(_key_id(key)) if key is not None else None
            if record is not None:
                resumed[(target.name, a.key)] = record
            else:
                todo.append(a)
        outcomes.append(TargetOutcome(target, todo))
    if resumed:
        log.info("resuming: %d measurement(s) already in %s (--fresh reruns them)", len(resumed), results.path)

    descriptions = _preflight(outcomes)
    for o in outcomes:
        for a in o.todo:
            if a.key in descriptions.get(o.target.name, {}):
                _check_description(a, descriptions[o.target.name][a.key], o.target.name)
    for o in outcomes:
        for a in o.todo:
            if a.key in descriptions.get(o.target.name, {}):
                _apply_description(a, descriptions[o.target.name][a.key])
    for a in artifacts:
        if a.scale is not None:
            test_set_for(a.scale)

    # Inputs are valid: from here on the out folder is ours to write.
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name in report_mod.REPORT_FILES:  # a stale report must not outlive this run
        (cfg.out / name).unlink(missing_ok=True)
    if cfg.fresh:
        results.path.unlink(missing_ok=True)

    def run_target(o: TargetOutcome) -> None:
        if o.failure is not None:
            return
        for i, a in enumerate(o.todo):
            try:
                o.rows[a.key] = _measure(o, a, cfg, test_set_for(a.scale), fingerprints[a.scale], budgets, results)
            except (TargetFailed, BadInput) as exc:
                reason = (
                    str(exc) if str(exc).startswith(f"target {o.target.name}") else f"target {o.target.name}: {exc}"
                )
                o.failure, o.not_run = reason, [x.key for x in o.todo[i:]]
                log.error("%s: FAILED, %d artifact(s) not run: %s", o.target.name, len(o.not_run), reason)
                return

    groups: dict[str, list[TargetOutcome]] = {}
    for o in outcomes:
        groups.setdefault(_device_of(o.target), []).append(o)
    t0 = time.monotonic()
    _in_threads(groups, run_target)
    for o in outcomes:
        if o.error is not None:
            raise o.error
    log.info("all targets done in %.1f s", time.monotonic() - t0)

    rows, environment, failed_targets = [], {}, []
    for o in outcomes:
        for a in artifacts:
            record = resumed.get((o.target.name, a.key))
            row = o.rows.get(a.key) or (record["row"] if record else None)
            if row is None:
                continue
            row = {**row, "resumed": record is not None and a.key not in o.rows}
            row["budgets"] = budgets_mod.check(budgets, o.target.name, row)
            row["pass"] = all(v["pass"] for v in row["budgets"].values())
            rows.append(row)
            if record is not None and o.target.name not in environment:
                environment[o.target.name] = record.get("environment") or {}
        if o.environment is not None:
            environment[o.target.name] = o.environment
        if o.failure is not None:
            failed_targets.append({"target": o.target.name, "reason": o.failure, "not_run": o.not_run})
            environment.setdefault(o.target.name, _safe_info(o.target))
    test_set = {
        "name": str(cfg.test_set),
        "images": {str(s): [p.name for p in pairs] for s, pairs in pairs_by_scale.items()},
        "sha256": {str(s): fp for s, fp in fingerprints.items()},
        "lr": {str(s): lr_degradation(cfg.test_set, s, cfg.degradation) for s in pairs_by_scale},
        "protocol": "Y (BT.601), border = scale, SR quantized to 8 bit",
    }
    report = report_mod.build_report(
        rows, environment, cfg.settings(), test_set, skipped, budgets.to_dict(), failed_targets=failed_targets
    )
    report["results_file"] = RESULTS_NAME
    report_mod.write_report(cfg.out, report)
    return report


def _safe_info(target: Target) -> dict[str, Any]:
    """A failed target's environment block: whatever info() can still say without failing the report."""
    try:
        return target.info()
    except EdgesrError as exc:
        return {"name": target.name, "emulated": target.emulated, "info_error": str(exc)}


def _measure(
    o: TargetOutcome,
    a: Artifact,
    cfg: BenchConfig,
    pairs: list[SRPair],
    test_set_sha: str,
    budgets: budgets_mod.Budgets,
    results: ResultsLog,
) -> dict[str, Any]:
    """One (target, artifact) job: write it, run it, score it, append it to results.jsonl; the report row."""
    target = o.target
    job_dir = cfg.out / "jobs" / target.name / a.key
    write_job(job_dir, a, pairs, cfg)
    log.info("%s: running %s (%d images, tile %dx%d, overlap %d)", target.name, a.key, len(pairs), *a.tile, a.overlap)
    result = target.run(job_dir)
    per_image = score_outputs(result, job_dir / "out", pairs, a.scale)
    row = make_row(a, target, result, per_image, cfg.test_set, cfg.degradation)
    row["job_dir"] = str(job_dir.relative_to(cfg.out))
    if o.environment is None:
        o.environment = _environment(target, result)
    key = measurement_key(target, a, cfg, test_set_sha)
    finished = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
    results.append({"key": key, "row": row, "environment": o.environment, "finished": finished})
    if cfg.save_images:
        _save_images(cfg.out / "images" / target.name / a.key, job_dir / "out", result)
    verdicts = budgets_mod.check(budgets, target.name, row)
    log.info(
        "%s: %s: %.1f KB, peak RSS %.1f MB, tile latency %.2f ms (p90 %.2f), Y-PSNR %.3f dB%s",
        target.name,
        a.path.name,
        row["size_bytes"] / 1024,
        row["peak_rss_mb"],
        row["latency_ms_median"],
        row["latency_ms_p90"],
        row["psnr_y_db"],
        "" if all(v["pass"] for v in verdicts.values()) else "  BUDGET FAILED",
    )
    return row
