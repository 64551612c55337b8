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

Each target runs at its workload (`device_bench.budgets`: the budgets file's `workload`, the target's own
override, then --frame / --tile): the artifacts converted for its tile size(s) run the frame loop on frames of
its frame size (made from the first test image), then the quality pass on the test images.

Re-running the same command resumes: measurements in results.jsonl with the same key (target, artifact sha256 and
every setting that changes the numbers) are reused, not rerun, unless `fresh` is set.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_bench import budgets as budgets_mod
from device_bench import report as report_mod
from device_bench import xcode_report
from device_bench.artifacts import Artifact, apply_description, check_description, for_workload, resolve_artifacts
from device_bench.jobs import environment, make_row, save_images, score_outputs, write_job
from device_bench.results import RESULTS_NAME, ResultsLog, key_id, measurement_key, test_set_fingerprint
from device_bench.runner import MAX_MIN_SECONDS, RUNTIMES
from device_bench.targets import LocalTarget, Target, make_targets
from edgesr.datasets import SRPair, load_test_set, lr_degradation
from edgesr.errors import BadInput, EdgesrError, TargetFailed
from edgesr.images import bicubic_upscale, check_degradation
from edgesr.manifest import provenance, sha256
from edgesr.metrics import mean_scores, sr_scores
from edgesr.progress import progress
from edgesr.workload import Workload, format_size, parse_frame, parse_tiles

log = logging.getLogger("device_bench")


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
    frame: str | None = None  # LR frame WxH of the workload; None: the budgets file's, else the test images
    tiles: str | None = None  # tile sides (or "frame"), comma-separated; None: the budgets file's, else as built
    min_seconds: float = 1.0  # the frame loop runs at least this long (and at least `runs` frames)

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
        if not 0 <= self.min_seconds <= MAX_MIN_SECONDS:
            raise BadInput(f"--min-seconds must be 0..{MAX_MIN_SECONDS:g}, got {self.min_seconds}")
        if self.frame is not None:
            parse_frame(self.frame)
        if self.tiles is not None:
            parse_tiles(self.tiles)
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
            "frame": self.frame,
            "tiles": self.tiles,
            "min_seconds": self.min_seconds,
        }


@dataclass
class TargetOutcome:
    """What one target did in this run."""

    target: Target
    todo: list[Artifact]
    workload: Workload = field(default_factory=Workload)
    artifacts: list[Artifact] = field(default_factory=list)  # what this target measures (todo or resumed)
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
    workloads = {t.name: budgets.workload_for(t.name, cfg.frame, cfg.tiles) for t in targets}
    if all(a.tile is not None for a in artifacts):  # every tile known from manifests: check before any target
        for name, wl in workloads.items():
            for_workload(artifacts, wl, name)
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
        if a.scale is None:
            return None
        return measurement_key(target, a, cfg, fingerprints[a.scale], workloads[target.name])

    resumed: dict[tuple[str, str], dict[str, Any]] = {}
    outcomes = []
    for target in targets:
        sizes = workloads[target.name].tile_sizes()
        runnable = [a for a in artifacts if a.format in target.formats]
        for a in artifacts:
            if a.format not in target.formats:
                note = f"{a.path.name} ({a.model}) on {target.name}: skipped, this target runs no {a.format} files"
                skipped.append(note)
                log.info("%s", note)
        candidates = [a for a in runnable if sizes is None or a.tile is None or tuple(a.tile) in sizes]
        todo = []
        for a in candidates:
            key = key_of(target, a)
            record = prior.get(key_id(key)) if key is not None else None
            if record is not None:
                resumed[(target.name, a.key)] = record
            else:
                todo.append(a)
        outcomes.append(TargetOutcome(target, todo, workloads[target.name], candidates))
    if resumed:
        log.info("resuming: %d measurement(s) already in %s (--fresh reruns them)", len(resumed), results.path)

    descriptions = _preflight(outcomes)
    for o in outcomes:
        for a in o.todo:
            if a.key in descriptions.get(o.target.name, {}):
                check_description(a, descriptions[o.target.name][a.key], o.target.name)
    for o in outcomes:
        for a in o.todo:
            if a.key in descriptions.get(o.target.name, {}):
                apply_description(a, descriptions[o.target.name][a.key])
    for o in outcomes:  # every tile is known now: each target keeps the artifacts of its workload's tiles
        if o.failure is None:
            chosen = {a.key for a in for_workload([a for a in artifacts if a.tile], o.workload, o.target.name)}
            o.todo = [a for a in o.todo if a.key in chosen]
            o.artifacts = [a for a in o.artifacts if a.key in chosen]
    for a in artifacts:
        if a.scale is not None:
            test_set_for(a.scale)

    # Inputs are valid: from here on the out folder is ours to write.
    cfg.out.mkdir(parents=True, exist_ok=True)
    for stale in report_mod.stale_report_files(cfg.out):  # a stale report must not outlive this run
        stale.unlink(missing_ok=True)
    if cfg.fresh:
        results.path.unlink(missing_ok=True)

    def run_target(o: TargetOutcome, bar: Any) -> None:
        if o.failure is not None:
            return
        for i, a in enumerate(o.todo):
            try:
                o.rows[a.key] = _measure(o, a, cfg, test_set_for(a.scale), fingerprints[a.scale], budgets, results)
                bar.update()
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
    bar = progress(None, desc="bench", total=sum(len(o.todo) for o in outcomes if o.failure is None), unit="run")
    _in_threads(groups, lambda o: run_target(o, bar))
    bar.close()
    for o in outcomes:
        if o.error is not None:
            raise o.error
    log.info("all targets done in %.1f s", time.monotonic() - t0)

    rows, environment, failed_targets = [], {}, []
    for o in outcomes:
        for a in o.artifacts:
            record = resumed.get((o.target.name, a.key))
            row = o.rows.get(a.key) or (record["row"] if record else None)
            if row is None:
                continue
            row = {**row, "resumed": record is not None and a.key not in o.rows}
            budgets_mod.judge(budgets, row)
            rows.append(row)
            if record is not None and o.target.name not in environment:
                environment[o.target.name] = record.get("environment") or {}
        if o.environment is not None:
            environment[o.target.name] = o.environment
        if o.failure is not None:
            failed_targets.append({"target": o.target.name, "reason": o.failure, "not_run": o.not_run})
            environment.setdefault(o.target.name, _safe_info(o.target))
    imported, imported_env = xcode_report.imported_rows(prior, {a.sha256 for a in artifacts})
    for row in imported:  # Xcode reports imported into this folder stay in its report
        budgets_mod.judge(budgets, row)
        rows.append(row)
    for name, env in imported_env.items():
        environment.setdefault(name, env)
    test_set = {
        "name": str(cfg.test_set),
        "images": {str(s): [p.name for p in pairs] for s, pairs in pairs_by_scale.items()},
        "sha256": {str(s): fp for s, fp in fingerprints.items()},
        "lr": {str(s): lr_degradation(cfg.test_set, s, cfg.degradation) for s in pairs_by_scale},
        "protocol": "Y (BT.601), border = scale, SR quantized to 8 bit",
        "bicubic": {str(s): bicubic_reference(pairs, s) for s, pairs in pairs_by_scale.items()},
    }
    report = report_mod.build_report(
        rows, environment, cfg.settings(), test_set, skipped, budgets.to_dict(), failed_targets=failed_targets
    )
    report["results_file"] = RESULTS_NAME
    report_mod.write_report(cfg.out, report)
    return report


def bicubic_reference(pairs: list[SRPair], scale: int) -> dict[str, float]:
    """Bicubic upscaling of the same LR images, scored the same way: the floor every SR model must beat."""
    return mean_scores([sr_scores(bicubic_upscale(p.lr, scale), p.hr, scale) for p in pairs])


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
    write_job(job_dir, a, pairs, cfg, o.workload, compute_units=target.compute_units)
    frame = format_size(o.workload.frame) if o.workload.frame else "the test images"
    log.info(
        "%s: running %s (frames: %s; tile %dx%d, overlap %d; %d test images)",
        target.name,
        a.key,
        frame,
        a.tile[1],
        a.tile[0],
        a.overlap,
        len(pairs),
    )
    result = target.run(job_dir)
    per_image = score_outputs(result, job_dir / "out", pairs, a.scale)
    row = make_row(a, target, result, per_image, cfg.test_set, cfg.degradation)
    row["job_dir"] = str(job_dir.relative_to(cfg.out))
    row["workload"] = o.workload.to_dict()
    if o.environment is None:
        o.environment = environment(target, result)
    key = measurement_key(target, a, cfg, test_set_sha, o.workload)
    finished = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
    results.append(
        {"key": key, "row": row, "environment": o.environment, "finished": finished, "provenance": provenance()}
    )
    if cfg.save_images:
        save_images(cfg.out / "images" / target.name / a.key, job_dir / "out", result)
    verdicts = budgets_mod.check(budgets, target.name, row)
    log.info(
        "%s: %s: %.1f KB; frame %.1f ms median (p90 %.1f, %.2f fps, %s tiles of %.2f ms); peak RSS %.1f MB; "
        "Y-PSNR %.3f dB%s",
        target.name,
        a.key,
        row["size_bytes"] / 1024,
        row["frame_ms_median"],
        row["frame_ms_p90"],
        row["fps"],
        row["tiles_per_frame"],
        row["latency_ms_median"],
        row["peak_rss_mb"],
        row["psnr_y_db"],
        "" if all(v["pass"] for v in verdicts.values()) else "  BUDGET FAILED",
    )
    return row
