"""The on-device runner: standard library + numpy + a TFLite interpreter (or coremltools), nothing from edgesr.

Copy it to the device next to a job folder and run it with the device's Python:

  python runner.py --job JOB/job.json           # run a benchmark job, write JOB/<out_dir>/result.json
  python runner.py --describe model.tflite      # print the model's input/output shapes and the runtime as JSON
  python runner.py --job JOB --stop-after load  # (internal) run up to a phase's end, print its memory as JSON

A job is files only (so a local subprocess, ssh and adb all work the same way):
  job.json  {"runner_version": 1, "model": "model.tflite",
             "inputs": [{"name": "kodim23", "path": "inputs/kodim23.npy"}], "out_dir": "out",
             "tile": [64, 64], "overlap": 14, "scale": 2, "threads": 1, "warmup": 3, "runs": 20, "runtime": "auto",
             "runtime_requirements": {"xnnpack": false}, "memory_phases": "auto",
             "frames": [{"name": "frame", "path": "inputs/frame.npy"}], "min_seconds": 1.0}   (the last four optional)
  Relative paths are relative to the folder holding job.json. Inputs and frames are LR images, float32 HxWx3 in
  [0, 1]. Input paths are plain (letters, digits, ".", "_", "+", "-" per component); names are free text, data only.
  The runner writes <out_dir>/<input file name> (float32 HxWx3, the model's unclipped output) for each input, and
  <out_dir>/result.json, whose images[].output names that file. `frames` (default: the inputs) are the workload:
  what an app would feed the model.

Models have a fixed input size (the tile). An image is cut into tiles that overlap by `overlap` LR pixels on each
side; each tile contributes only its interior (the outer `overlap` pixels are discarded, except at the image
border), so when `overlap` >= the network's receptive-field radius the stitched output equals whole-image inference.
The last tile in a row or column is placed flush with the image edge. An image smaller than the tile is padded by
edge replication and the output cropped back; the result says so ("padded": true), since that border differs from
whole-image inference.

Timing: `load_ms` = Interpreter construction + allocate_tensors; `first_inference_ms` = the first invoke (one tile);
then `warmup` untimed and `runs` timed invokes of that same tile give the per-tile latency samples (`latency_ms`).
Then the frame loop, the workload as an app runs it: whole frames are cut into tiles, invoked and stitched, one
after the other (the frames cycled), until at least `runs` frames and at least `min_seconds` of frame time have
been timed (as benchmark_model's --min_secs). Each frame's time covers tiling, copies, invokes and stitching
(`frame.ms`); the invokes alone are summed per frame (`frame.invoke_ms`), so the difference is the stitching cost.
`frame.fps` = frames / their summed time. Loading a frame from disk is not timed. Finally every input image is run
through the tiler once, timed as a whole, and its output written for scoring (the quality pass).

Memory, per phase, from /proc/self/status: VmHWM (peak resident set), VmRSS, RssAnon (anonymous: heap, arena,
packed/densified weights) and RssFile (file-backed: the mmap'd model pages touched, shared libraries). Phases:
`load` (Interpreter + allocate_tensors), `first_inference`, `steady` (the warm-up and timed invokes), `frames`
(the frame loop), plus `baseline` (interpreter start + imports) and `images` (the quality pass). Where the kernel allows
it (Linux >= 4.0), writing "5" to /proc/self/clear_refs resets VmHWM to VmRSS at the start of each phase, so a
phase's `hwm_mb` is that phase's own peak; the runner checks that the reset really works before relying on it.
Elsewhere each phase is measured in its own process that stops at the end of that phase ("process per phase"): its
`hwm_mb` is then the peak from process start through that phase. `peak_rss_mb` is the peak from process start
through the frame loop (the workload's peak; the quality pass is left out, as its images are not the workload);
`run_peak_rss_mb` is the whole run's peak, quality pass included.
The job field `memory_phases` ("auto", "clear_refs", "process") forces a method.

Delegates: the runtime's default op resolver applies XNNPACK on CPU. A job with `runtime_requirements:
{"xnnpack": false}` (from the convert manifest, for files XNNPACK cannot prepare) builds the interpreter with
BUILTIN_WITHOUT_DEFAULT_DELEGATES instead. The result's `delegate` says which, and whether the runtime logged
creating the XNNPACK delegate.

Core ML: a job whose model is a .mlpackage runs through `coreml_engine.py` (copied next to this file with
`mil_exec.py`): Core ML's MLModel at the job's "compute_units" on macOS ("coreml"), edgesr's numpy MIL executor
elsewhere ("coreml-reference", whose result says `timings_meaningful: false`; it makes one timed tile invoke and
one timed frame whatever the job asks: more runs of numpy would mean nothing more). Tiling, timing, memory phases
and outputs are the same code as for TFLite; the result adds compute_units, os_version and the timing note.

Exit status: 0 done; 2 the model or job is unusable ("invalid-model", "unsupported-model", "bad-job");
3 no TFLite runtime found; 1 anything else. Errors are one line on stderr: `runner error [<kind>]: <message>`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RUNNER_VERSION = 1
RUNTIMES = {
    # name: (module to import, attribute path to the Interpreter class, distributions that may provide it)
    "ai_edge_litert": ("ai_edge_litert.interpreter", "Interpreter", ("ai-edge-litert", "ai-edge-litert-nightly")),
    "tflite_runtime": ("tflite_runtime.interpreter", "Interpreter", ("tflite-runtime", "tflite-runtime-nightly")),
    "tensorflow": ("tensorflow", "lite.Interpreter", ("tensorflow", "tensorflow-cpu", "tf-nightly")),
}
EXIT_FAILED, EXIT_INVALID, EXIT_NO_RUNTIME = 1, 2, 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # a path component the host wrote (no "..", no spaces)
MAX_NAME_CHARS = 255
_MEMORY_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSwap")
MAX_MIN_SECONDS = 3600.0  # a frame loop never runs longer than this, whatever the job asks


class RunnerError(Exception):
    def __init__(self, kind: str, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.kind, self.code = kind, code


def invalid(kind: str, message: str) -> RunnerError:
    return RunnerError(kind, message, EXIT_INVALID)


# ----------------------------------------------------------------------------------------------------- memory


def memory_snapshot() -> dict[str, float]:
    """Resident memory in MiB from /proc/self/status (Linux, Android); getrusage's peak elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"VmHWM": peak / (1 << 20) if sys.platform == "darwin" else peak / 1024.0}
    snap = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _MEMORY_FIELDS:
            snap[key] = int(value.split()[0]) / 1024.0  # the kernel reports kB (KiB)
    return snap


def memory_source() -> str:
    if Path("/proc/self/status").exists():
        return "/proc/self/status VmHWM, VmRSS, RssAnon, RssFile"
    return "getrusage(RUSAGE_SELF).ru_maxrss (peak only)"


def reset_peak() -> None:
    """Reset this process's VmHWM to its current VmRSS (Linux >= 4.0); OSError where the kernel refuses."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_reset_works() -> bool:
    """Whether resetting VmHWM really works here: raise the peak with a touched-then-unmapped 16 MiB buffer,
    reset, and check that VmHWM fell back to VmRSS (a kernel may accept the write and ignore it)."""
    import mmap

    size = 16 << 20
    try:
        buf = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            buf[offset] = 1
        buf.close()
        raised = memory_snapshot()
        if raised.get("VmHWM", 0.0) - raised.get("VmRSS", 0.0) < 8.0:  # the peak did not visibly rise: unprovable
            return False
        reset_peak()
    except (OSError, ValueError):
        return False
    after = memory_snapshot()
    return after["VmHWM"] - after["VmRSS"] < 1.0


def _phase_figures(snap: dict[str, float]) -> dict[str, float | None]:
    return {
        "hwm_mb": snap.get("VmHWM"),
        "rss_mb": snap.get("VmRSS"),
        "rss_anon_mb": snap.get("RssAnon"),
        "rss_file_mb": snap.get("RssFile"),
    }


class PhaseMeter:
    """Memory per phase. With `reset`, VmHWM is reset at each phase start so every phase's peak is its own;
    otherwise a phase's VmHWM is the peak from process start through that phase's end."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset
        self.phases: dict[str, dict[str, float | None]] = {}

    def start(self) -> None:
        if self.reset:
            reset_peak()

    def end(self, phase: str) -> dict[str, float | None]:
        self.phases[phase] = _phase_figures(memory_snapshot())
        return self.phases[phase]

    def peak(self, leave_out: tuple[str, ...] = ()) -> float | None:
        """The largest phase peak (the phases cover the run back to back), without the phases in `leave_out`."""
        peaks = [p["hwm_mb"] for k, p in self.phases.items() if p["hwm_mb"] is not None and k not in leave_out]
        return max(peaks) if peaks else None


MEMORY_METHODS = {"clear_refs": "clear_refs reset", "process": "process per phase"}
PHASES = ("load", "first_inference", "steady")


def choose_memory_method(requested: str) -> str:
    """'clear_refs' where the VmHWM reset is proven to work (or 'process' if asked or it is not). The proof runs
    in a child process, so its 16 MiB probe cannot inflate this process's peak where the reset does not work."""
    import subprocess

    if requested == "process":
        return "process"
    probe = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--check-peak-reset"], capture_output=True, text=True
    )
    if probe.returncode == 0 and probe.stdout.strip() == "true":
        return "clear_refs"
    if requested == "clear_refs":
        raise RunnerError("no-peak-reset", "memory_phases 'clear_refs' asked for, but VmHWM cannot be reset here")
    return "process"


def measure_phase_in_own_process(job_path: Path, runtime_choice: str | None, phase: str) -> dict[str, Any]:
    """Run this file again on the same job, stopping at the end of `phase`; its memory figures at that point."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", str(job_path), "--stop-after", phase]
    if runtime_choice:
        cmd += ["--runtime", runtime_choice]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit {proc.returncode}"
        raise RunnerError("failed", f"the {phase} phase process failed: {detail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- runtime


def _distribution_version(names: tuple[str, ...]) -> str | None:
    import importlib.metadata

    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def load_runtime(choice: str) -> tuple[dict[str, str], Any]:
    """Import the first available interpreter (or the one asked for): ({name, version, module}, Interpreter class)."""
    names = list(RUNTIMES) if choice == "auto" else [choice]
    if choice != "auto" and choice not in RUNTIMES:
        raise invalid("bad-job", f"unknown runtime {choice!r}; choose auto or one of {', '.join(RUNTIMES)}")
    tried = []
    for name in names:
        module_name, attr, dists = RUNTIMES[name]
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            tried.append(f"{module_name} ({exc.__class__.__name__})")
            continue
        module = sys.modules[module_name.split(".")[0]]
        version = _distribution_version(dists) or str(getattr(module, "__version__", "unknown"))
        return {"name": name, "version": version, "module": module_name}, obj
    raise RunnerError("no-runtime", f"no TFLite runtime importable; tried {', '.join(tried)}", EXIT_NO_RUNTIME)


def open_model(interpreter_cls: Any, model: Path, threads: int, xnnpack: bool = True) -> Any:
    """Build the interpreter and allocate its tensors, classifying a file that is not a TFLite model.

    `xnnpack=False` builds it without the runtime's default delegates (BUILTIN_WITHOUT_DEFAULT_DELEGATES)."""
    if not model.is_file():
        raise invalid("invalid-model", f"{model}: no such model file")
    with open(model, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise invalid("invalid-model", f"{model}: not a valid TFLite model (no TFL3 file identifier)")
    kwargs: dict[str, Any] = {"model_path": str(model), "num_threads": None if threads < 1 else threads}
    if not xnnpack:
        resolver = getattr(sys.modules[interpreter_cls.__module__], "OpResolverType", None)
        if resolver is None:
            raise RunnerError("no-runtime", "this runtime cannot turn off its default delegates (no OpResolverType)")
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = interpreter_cls(**kwargs)
    except ValueError as exc:  # the runtime's flatbuffer verifier rejects truncated or corrupt files this way
        raise invalid("invalid-model", f"{model}: not a valid TFLite model ({_one_line(exc)})") from None
    interp.allocate_tensors()
    return interp


def open_model_logged(interpreter_cls: Any, model: Path, threads: int, xnnpack: bool) -> tuple[Any, dict[str, Any]]:
    """open_model, also reading what the runtime logs on stderr meanwhile (passed on) to record the delegate."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            interp = open_model(interpreter_cls, model, threads, xnnpack)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text = log.read().decode(errors="replace")
            sys.stderr.write(text)
    logged = [line.strip() for line in text.splitlines() if "XNNPACK" in line]
    if not xnnpack:
        name = "none"
    else:
        name = "xnnpack" if logged else "runtime default (no XNNPACK delegate logged)"
    delegate = {
        "name": name,
        "op_resolver": "BUILTIN" if xnnpack else "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
        "xnnpack_requested": xnnpack,
        "runtime_log": logged[:3],
    }
    return interp, delegate


def model_io(interp: Any, model: Path) -> dict[str, Any]:
    """Shapes of a single-input, single-output float32 NHWC RGB SR model, and the scale they imply."""
    ins, outs = interp.get_input_details(), interp.get_output_details()
    described = {
        "inputs": [_tensor_info(d) for d in ins],
        "outputs": [_tensor_info(d) for d in outs],
    }
    if len(ins) != 1 or len(outs) != 1:
        raise invalid("unsupported-model", f"{model}: expected 1 input and 1 output, got {len(ins)} and {len(outs)}")
    i, o = described["inputs"][0], described["outputs"][0]
    if len(i["shape"]) != 4 or i["shape"][0] != 1 or i["shape"][3] != 3 or len(o["shape"]) != 4 or o["shape"][3] != 3:
        raise invalid(
            "unsupported-model", f"{model}: expected NHWC RGB tensors [1,H,W,3], got {i['shape']} -> {o['shape']}"
        )
    if i["dtype"] != "float32" or o["dtype"] != "float32":
        raise invalid("unsupported-model", f"{model}: expected float32 input/output, got {i['dtype']}/{o['dtype']}")
    (th, tw), (oh, ow) = i["shape"][1:3], o["shape"][1:3]
    if oh % th or ow % tw or oh // th != ow // tw or oh // th < 1:
        raise invalid("unsupported-model", f"{model}: output {oh}x{ow} is not an integer upscale of input {th}x{tw}")
    described.update(tile=[th, tw], scale=oh // th, input_index=ins[0]["index"], output_index=outs[0]["index"])
    return described


def _tensor_info(d: dict[str, Any]) -> dict[str, Any]:
    return {"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


# ----------------------------------------------------------------------------------------------------- tiling


def tile_regions(length: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis as (start, own_from, own_to): the tile covers [start, start+tile) and contributes
    [own_from, own_to). Consecutive tiles are `tile - 2*overlap` apart; the last is flush with the edge. Every
    owned pixel not on the image border is at least `overlap` pixels inside its tile."""
    if length <= tile:
        return [(0, 0, length)]
    stride = tile - 2 * overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    regions, own_from = [], 0
    for k, start in enumerate(starts):
        own_to = length if k == len(starts) - 1 else start + tile - overlap
        regions.append((start, own_from, own_to))
        own_from = own_to
    return regions


class TiledModel:
    """Runs a fixed-size SR interpreter over images of any size."""

    def __init__(self, interp: Any, io: dict[str, Any], overlap: int) -> None:
        self.interp, self.overlap = interp, overlap
        self.tile_h, self.tile_w = io["tile"]
        self.scale = io["scale"]
        self.input_index, self.output_index = io["input_index"], io["output_index"]
        self.invoke_ns = 0  # time spent in interp.invoke() since the caller last zeroed it

    def invoke(self, tile: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.input_index, np.ascontiguousarray(tile[None], dtype=np.float32))
        t0 = time.perf_counter_ns()
        self.interp.invoke()
        self.invoke_ns += time.perf_counter_ns() - t0
        return self.interp.get_tensor(self.output_index)[0]

    def upscale(self, lr: np.ndarray) -> tuple[np.ndarray, int, bool]:
        """(SR image float32 (sH)x(sW)x3, number of tiles, whether the image had to be padded to the tile)."""
        h, w = lr.shape[:2]
        ph, pw = max(h, self.tile_h), max(w, self.tile_w)
        padded = (ph, pw) != (h, w)
        if padded:
            lr = np.pad(lr, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        s = self.scale
        out = np.empty((ph * s, pw * s, 3), dtype=np.float32)
        rows = tile_regions(ph, self.tile_h, self.overlap)
        cols = tile_regions(pw, self.tile_w, self.overlap)
        for ys, ya, yb in rows:
            for xs, xa, xb in cols:
                sr = self.invoke(lr[ys : ys + self.tile_h, xs : xs + self.tile_w])
                out[ya * s : yb * s, xa * s : xb * s] = sr[(ya - ys) * s : (yb - ys) * s, (xa - xs) * s : (xb - xs) * s]
        return out[: h * s, : w * s], len(rows) * len(cols), padded


# ------------------------------------------------------------------------------------------------------- jobs


def _ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def _int(job: dict[str, Any], key: str, default: int | None = None, minimum: int = 0) -> int:
    value = job.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid("bad-job", f"job field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def read_job(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "job.json"
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise invalid("bad-job", f"{path}: cannot read job ({_one_line(exc)})") from None
    if not isinstance(job, dict):
        raise invalid("bad-job", f"{path}: a job is a JSON object")
    if job.get("runner_version", RUNNER_VERSION) != RUNNER_VERSION:
        raise invalid("bad-job", f"{path}: job for runner version {job['runner_version']}, this is {RUNNER_VERSION}")
    base = path.parent
    inputs = _image_list(job, "inputs", path)
    frames = _image_list(job, "frames", path) if "frames" in job else inputs
    min_seconds = job.get("min_seconds", 0.0)
    if isinstance(min_seconds, bool) or not isinstance(min_seconds, (int, float)):
        raise invalid("bad-job", f"{path}: 'min_seconds' must be a number, got {min_seconds!r}")
    if not 0 <= min_seconds <= MAX_MIN_SECONDS:
        raise invalid("bad-job", f"{path}: 'min_seconds' must be 0..{MAX_MIN_SECONDS:g}, got {min_seconds!r}")
    if "model" not in job or "out_dir" not in job:
        raise invalid("bad-job", f"{path}: 'model' and 'out_dir' are required")
    return {
        "model": base / job["model"],
        "inputs": [(item["name"], base / item["path"]) for item in inputs],
        "frames": [(item["name"], base / item["path"]) for item in frames],
        "min_seconds": float(min_seconds),
        "out_dir": base / job["out_dir"],
        "tile": job.get("tile"),
        "overlap": _int(job, "overlap", 16),
        "scale": job.get("scale"),
        "threads": _int(job, "threads", 1, minimum=-1),
        "warmup": _int(job, "warmup", 3),
        "runs": _int(job, "runs", 20, minimum=1),
        "runtime": str(job.get("runtime", "auto")),
        "xnnpack": _xnnpack_allowed(job, path),
        "memory_phases": _memory_phases(job, path),
        "compute_units": _compute_units(job, path),
    }


def _image_list(job: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    items = job.get(key)
    if not isinstance(items, list) or not items:
        raise invalid("bad-job", f"{path}: {key!r} must be a non-empty list")
    for item in items:
        # The name is data (the user's file name, reported back as it is); the path is the host's own and plain.
        name, rel = (item.get("name"), item.get("path")) if isinstance(item, dict) else (None, None)
        plain = isinstance(rel, str) and all(_NAME.match(part) for part in rel.split("/"))
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not plain:
            raise invalid("bad-job", f"{path}: each of {key!r} needs a 'name' and a plain relative 'path'")
    return items


def _xnnpack_allowed(job: dict[str, Any], path: Path) -> bool:
    req = job.get("runtime_requirements") or {}
    if not isinstance(req, dict) or not isinstance(req.get("xnnpack", True), bool):
        raise invalid("bad-job", f"{path}: 'runtime_requirements' must be an object like {{\"xnnpack\": false}}")
    return req.get("xnnpack", True)


def _compute_units(job: dict[str, Any], path: Path) -> str:
    units = job.get("compute_units", "ALL")
    if units not in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"):
        raise invalid("bad-job", f"{path}: 'compute_units' must be CPU_ONLY, CPU_AND_GPU, CPU_AND_NE or ALL")
    return units


def _memory_phases(job: dict[str, Any], path: Path) -> str:
    method = job.get("memory_phases", "auto")
    if method not in ("auto", *MEMORY_METHODS):
        raise invalid("bad-job", f"{path}: 'memory_phases' must be auto, clear_refs or process, got {method!r}")
    return method


def load_lr(name: str, path: Path) -> np.ndarray:
    try:
        lr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise invalid("bad-job", f"input {name}: cannot load {path} ({_one_line(exc)})") from None
    if lr.ndim != 3 or lr.shape[2] != 3 or lr.dtype != np.float32:
        raise invalid("bad-job", f"input {name}: expected float32 HxWx3, got {lr.dtype} {lr.shape}")
    return lr


def latency_stats(samples_ms: list[float]) -> dict[str, Any]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "samples": [round(float(v), 4) for v in a],
    }


def run_frames(model: TiledModel, frames: list[tuple[str, Path]], runs: int, min_seconds: float) -> dict[str, Any]:
    """The frame loop: whole frames tiled, invoked and stitched, until >= `runs` frames and >= `min_seconds` of
    frame time. Frames are loaded (untimed) one at a time, so the loop holds one frame's buffers, as an app does."""
    frame_ms, invoke_ms, shapes, tiles_per_frame, padded = [], [], {}, {}, False
    while len(frame_ms) < runs or sum(frame_ms) < min_seconds * 1000:
        name, path = frames[len(frame_ms) % len(frames)]
        lr = load_lr(name, path)
        model.invoke_ns = 0
        t0 = time.perf_counter_ns()
        sr, tiles, was_padded = model.upscale(lr)
        frame_ms.append(_ms(t0))
        invoke_ms.append(model.invoke_ns / 1e6)
        shapes[name], tiles_per_frame[name] = list(lr.shape[:2]), tiles
        padded = padded or was_padded
        del lr, sr
    return {
        "frames": [{"name": n, "lr_shape": shapes[n], "tiles": tiles_per_frame[n]} for n in shapes],
        "frames_run": len(frame_ms),
        "min_seconds": min_seconds,
        "padded": padded,
        "ms": latency_stats(frame_ms),
        "invoke_ms": latency_stats(invoke_ms),
        "fps": len(frame_ms) / (sum(frame_ms) / 1000),
    }


def run_job(job_path: Path, runtime_choice: str | None = None, stop_after: str | None = None) -> dict[str, Any]:
    """Run a job and return its result; with `stop_after` a phase name, stop at that phase's end and return only
    its memory figures (how "process per phase" measures each phase in a fresh process)."""
    t_start = time.perf_counter_ns()
    job = read_job(job_path)
    choice = runtime_choice or job["runtime"]
    coreml = _coreml_engine() if job["model"].suffix == ".mlpackage" else None
    if coreml is None:
        runtime, interpreter_cls = load_runtime(choice)
    method = "process" if stop_after else choose_memory_method(job["memory_phases"])
    meter = PhaseMeter(reset=method == "clear_refs")
    meter.end("baseline")  # interpreter start + imports: the runner's own baseline

    meter.start()
    t0 = time.perf_counter_ns()
    if coreml is not None:
        runtime, interp, delegate, io = _open_coreml(coreml, job["model"], choice, job["compute_units"])
    else:
        interp, delegate = open_model_logged(interpreter_cls, job["model"], job["threads"], job["xnnpack"])
    load_ms = _ms(t0)
    meter.end("load")
    if stop_after == "load":
        return meter.phases["load"]
    if coreml is None:
        io = model_io(interp, job["model"])
    elif runtime["name"] == "coreml-reference":  # its timings mean nothing: time one tile and one frame, no more
        job.update(warmup=0, runs=1, min_seconds=0.0)
    if job["tile"] is not None and list(job["tile"]) != io["tile"]:
        raise invalid("bad-job", f"job tile {job['tile']} but the model's input is {io['tile']}")
    if job["scale"] is not None and job["scale"] != io["scale"]:
        raise invalid("bad-job", f"job scale {job['scale']} but the model upscales x{io['scale']}")
    if 2 * job["overlap"] >= min(io["tile"]):
        raise invalid("bad-job", f"overlap {job['overlap']} leaves no interior in a {io['tile']} tile")
    model = TiledModel(interp, io, job["overlap"])

    first_name, first_path = job["inputs"][0]
    lr = load_lr(first_name, first_path)
    pad = ((0, max(0, model.tile_h - lr.shape[0])), (0, max(0, model.tile_w - lr.shape[1])), (0, 0))
    bench_tile = np.pad(lr, pad, mode="edge")[: model.tile_h, : model.tile_w]  # the timed tile: real image content
    del lr
    meter.start()
    t0 = time.perf_counter_ns()
    model.invoke(bench_tile)
    first_inference_ms = _ms(t0)
    meter.end("first_inference")
    if stop_after == "first_inference":
        return meter.phases["first_inference"]

    meter.start()
    for _ in range(job["warmup"]):
        model.invoke(bench_tile)
    samples = []
    for _ in range(job["runs"]):
        t0 = time.perf_counter_ns()
        model.invoke(bench_tile)
        samples.append(_ms(t0))
    meter.end("steady")
    if stop_after == "steady":
        return meter.phases["steady"]

    meter.start()
    frame = run_frames(model, job["frames"], job["runs"], job["min_seconds"])
    meter.end("frames")

    meter.start()
    out_dir = job["out_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name, path in job["inputs"]:  # one image at a time, so the peak holds one image's buffers
        lr = load_lr(name, path)
        t0 = time.perf_counter_ns()
        sr, tiles, padded = model.upscale(lr)
        ms = _ms(t0)
        output = path.name  # the input's own (host-made) file name: the user's name never names a file here
        np.save(out_dir / output, sr)
        images.append(
            {
                "name": name,
                "lr_shape": list(lr.shape[:2]),
                "sr_shape": list(sr.shape[:2]),
                "tiles": tiles,
                "padded": padded,
                "ms": round(ms, 4),
                "output": output,
            }
        )
        del lr, sr
    meter.end("images")
    peak, run_peak = meter.peak(leave_out=("images",)), meter.peak()
    if method == "process":
        # This process ran every phase without resets, so its phase figures are cumulative; the load and first
        # inference figures come from processes that stopped at those phases' ends (this one is the steady one).
        for phase in ("load", "first_inference"):
            meter.phases[phase] = measure_phase_in_own_process(job_path, runtime_choice, phase)
    memory: dict[str, Any] = {
        "load": meter.phases["load"],
        "first_inference": meter.phases["first_inference"],
        "steady": meter.phases["steady"],
        "frames": meter.phases["frames"],
        "baseline": meter.phases["baseline"],
        "images": meter.phases["images"],
        "method": MEMORY_METHODS[method],
        "source": memory_source(),
        "unit": "MiB",
        "hwm_scope": "phase" if method == "clear_refs" else "process start through the phase",
    }
    extra = coreml.result_fields(runtime, job["compute_units"]) if coreml is not None else {}
    return {
        "runner_version": RUNNER_VERSION,
        "model": str(job["model"]),
        "model_size_bytes": _size(job["model"]),
        "runtime": runtime,
        "delegate": delegate,
        **extra,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "threads": job["threads"],
        "tile": io["tile"],
        "overlap": job["overlap"],
        "stride": [t - 2 * job["overlap"] for t in io["tile"]],
        "scale": io["scale"],
        "warmup": job["warmup"],
        "runs": job["runs"],
        "load_ms": round(load_ms, 4),
        "first_inference_ms": round(first_inference_ms, 4),
        "latency_ms": latency_stats(samples),
        "frame": frame,
        "images": images,
        "outputs": [img["output"] for img in images],
        "memory": memory,
        "peak_rss_mb": peak,
        "run_peak_rss_mb": run_peak,
        "wall_ms": round(_ms(t_start), 3),
    }


def _coreml_engine() -> Any:
    """coreml_engine (next to this file on a device, or device_bench's own), imported only for Core ML jobs."""
    if __package__:
        return importlib.import_module(f"{__package__}.coreml_engine")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module("coreml_engine")


def _open_coreml(engine: Any, model: Path, choice: str, compute_units: str) -> tuple[Any, ...]:
    try:
        return engine.open_coreml(model, choice, compute_units)
    except engine.CoreMLError as exc:
        code = EXIT_NO_RUNTIME if exc.kind == "no-runtime" else EXIT_INVALID
        raise RunnerError(exc.kind, str(exc), code) from None


def _size(path: Path) -> int:
    """A file's size, or a folder's (a .mlpackage): the total of its files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def describe(model: Path, runtime_choice: str) -> dict[str, Any]:
    if model.suffix == ".mlpackage":
        return describe_coreml(model, runtime_choice)
    runtime, interpreter_cls = load_runtime(runtime_choice)
    # Shapes need no delegate; without XNNPACK a file it cannot prepare (runtime_requirements) still describes.
    has_resolver = hasattr(sys.modules[interpreter_cls.__module__], "OpResolverType")
    interp = open_model(interpreter_cls, model, threads=1, xnnpack=not has_resolver)
    io = model_io(interp, model)
    # Tensors stored in TFLite's sparse format (inputs of DENSIFY ops): how a bare file reveals its encoding.
    sparse = [t["name"] for t in interp.get_tensor_details() if t.get("sparsity_parameters")]
    return {
        "runner_version": RUNNER_VERSION,
        "model": str(model),
        "size_bytes": model.stat().st_size,
        "sparse_tensors": len(sparse),
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "tile": io["tile"],
        "scale": io["scale"],
        "runtime": runtime,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def describe_coreml(model: Path, runtime_choice: str) -> dict[str, Any]:
    """A .mlpackage's shapes from its program (no Core ML needed), and the runtime a job would get here."""
    engine = _coreml_engine()
    try:
        _, io = engine.program_io(model)
    except engine.CoreMLError as exc:
        raise RunnerError(exc.kind, str(exc), EXIT_INVALID) from None
    name = engine.choose_runtime(runtime_choice)
    return {
        "runner_version": RUNNER_VERSION,
        "model": str(model),
        "size_bytes": _size(model),
        "sparse_tensors": None,
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "layout": "NCHW",
        "tile": io["tile"],
        "scale": io["scale"],
        "runtime": {"name": name, "version": engine._version("coremltools")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--job", type=Path, help="job.json (or the folder holding it) to run")
    mode.add_argument("--describe", type=Path, metavar="MODEL", help="print a model's shapes as JSON")
    mode.add_argument("--check-peak-reset", action="store_true", help=argparse.SUPPRESS)  # prints true or false
    parser.add_argument(
        "--runtime",
        default=None,
        choices=["auto", *RUNTIMES, "coreml", "coreml-reference"],
        help="interpreter (default auto); a TFLite one leaves .mlpackage jobs to auto",
    )
    parser.add_argument("--stop-after", choices=PHASES, help=argparse.SUPPRESS)  # one process per phase
    args = parser.parse_args(argv)
    if args.check_peak_reset:
        print("true" if peak_reset_works() else "false")
        return 0
    try:
        if args.describe is not None:
            print(json.dumps(describe(args.describe, args.runtime or "auto")))
            return 0
        job_path = args.job / "job.json" if args.job.is_dir() else args.job
        if args.stop_after:
            print(json.dumps(run_job(job_path, args.runtime, stop_after=args.stop_after)))
            return 0
        result = run_job(job_path, args.runtime)  # a --runtime on the command line overrides the job's
        write_json_atomic(read_job(job_path)["out_dir"] / "result.json", result)
        frame = result["frame"]
        print(
            f"runner: {len(result['images'])} image(s), tile latency median {result['latency_ms']['median']:.3f} ms, "
            f"frame median {frame['ms']['median']:.1f} ms over {frame['frames_run']} frames"
        )
        return 0
    except RunnerError as exc:
        print(f"runner error [{exc.kind}]: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # anything the runtime raises: one line, no traceback, non-zero
        kind = getattr(exc, "kind", None)  # the Core ML engine's own errors name their kind
        if kind in ("invalid-model", "unsupported-model"):
            print(f"runner error [{kind}]: {_one_line(exc)}", file=sys.stderr)
            return EXIT_INVALID
        print(f"runner error [failed]: {exc.__class__.__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
