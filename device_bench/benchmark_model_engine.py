"""The `benchmark_model` engine: a device_bench job run with LiteRT's benchmark_model binary on an adb device.

benchmark_model takes one input tensor from a raw file and writes the last run's output tensor raw
(`--input_layer_value_files`, `--output_filepath`; deployment.md §1.2, §1.4). So the job's LR images are cut into
model-sized tiles on the host with the runner's own tiler (`TiledModel`), each tile goes to the device as raw
float32 NHWC [1,H,W,3], and:
- one timed run on the first tile (the tile the Python runner times too): `warmup` + `runs` invocations, every
  timing and memory line of the log parsed (both output formats), the raw log kept in the job folder;
- one output-only run per other tile (1 invocation, min_secs 0), all in a single device shell call;
then the raw outputs come back, are stitched by the same tiler and saved as `<out_dir>/<name>.npy`, and the host
scores them exactly as it scores the runner's outputs. `result.json` has the runner's layout where the figures
exist; figures benchmark_model does not print (p90, samples) are None/empty, never invented.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from android_harness.adb import Adb
from android_harness.benchmark_output import BenchmarkCommand, BenchmarkOutput, parse_benchmark_output
from device_bench.runner import TiledModel
from edgesr.errors import TargetFailed
from edgesr.manifest import write_json

log = logging.getLogger("android_harness")

LOG_NAME = "benchmark_model.log"
MAX_SCRIPT = 3000  # characters of output-only commands per device shell call


@dataclass(frozen=True)
class EngineSettings:
    binary: str  # the binary's path on the device
    threads: int
    delegate: str  # xnnpack | gpu | nnapi | none
    taskset: str | None
    env_prefix: str = ""  # "K=V K2=V2 " for the device shell (already quoted)
    timeout_s: float = 600.0


class TileRecorder(TiledModel):
    """The runner's tiler with the interpreter replaced: it records the tiles it is asked to run, then (given the
    device's outputs in the same order) replays them so the stitching is the runner's own code."""

    def __init__(self, io: dict[str, Any], overlap: int) -> None:
        super().__init__(None, {**io, "input_index": 0, "output_index": 0}, overlap)
        self.tiles: list[np.ndarray] = []
        self.outputs: list[np.ndarray] | None = None

    def invoke(self, tile: np.ndarray) -> np.ndarray:
        if self.outputs is None:
            self.tiles.append(np.ascontiguousarray(tile, dtype=np.float32))
            return np.zeros((self.tile_h * self.scale, self.tile_w * self.scale, 3), np.float32)
        return self.outputs.pop(0)


def timing_result(parsed: BenchmarkOutput) -> dict[str, Any]:
    """The runner-style timing and memory fields from a parsed benchmark_model log (either format)."""
    lat, mem = parsed.latency_ms, parsed.memory_mb
    if "avg" not in lat:
        raise TargetFailed(f"benchmark_model printed no inference timings (format {parsed.format})")
    latency = {
        "median": lat.get("median", lat["avg"]),  # older builds and the LiteRT format print no median
        "median_source": "median" if "median" in lat else "avg",
        "p90": None,  # benchmark_model prints p5/median/p95, not p90
        "p95": lat.get("p95"),
        "p5": lat.get("p5"),
        "mean": lat["avg"],
        "min": lat.get("min"),
        "max": lat.get("max"),
        "std": lat.get("std"),
        "samples": [],  # the tool prints statistics only
    }
    steady = {"hwm_mb": mem.get("peak"), "rss_mb": mem.get("vm_rss"), "rss_anon_mb": mem.get("rss_anon")}
    steady["rss_file_mb"] = mem.get("rss_file_shmem")
    return {
        "load_ms": lat.get("init"),
        "first_inference_ms": lat.get("first"),
        "warmup_avg_ms": lat.get("warmup_avg"),
        "latency_ms": latency,
        "peak_rss_mb": mem.get("peak"),
        "memory": {
            "method": "benchmark_model",
            "source": "benchmark_model: ru_maxrss polled during the run (--report_peak_memory_footprint), "
            "/proc/self/statm at exit (VmRSS, RssAnnon, RssFile + RssShmem)",
            "unit": "MiB",
            "steady": steady,
            "hwm_delta_mb": {"init": mem.get("init_delta"), "overall": mem.get("overall_delta")},
            "reported": dict(mem),
            "phases": {},
        },
        "benchmark_runs": dict(parsed.runs),
    }


def run_job(adb: Adb, remote_dir: str, job_dir: Path, io: dict[str, Any], settings: EngineSettings) -> dict[str, Any]:
    """Run `job_dir/job.json` with benchmark_model in the device folder `remote_dir`; write `<out_dir>/*.npy`
    and `<out_dir>/result.json`, keep the raw log as `job_dir/benchmark_model.log`; return the result."""
    t_start = time.perf_counter()
    job = json.loads((job_dir / "job.json").read_text())
    delegate = settings.delegate
    if (job.get("runtime_requirements") or {}).get("xnnpack") is False and delegate == "xnnpack":
        log.info("%s: the artifact requires XNNPACK off: running with --use_xnnpack=false", job_dir.name)
        delegate = "none"
    in_shape, out_shape = io["inputs"][0]["shape"], io["outputs"][0]["shape"]
    tiler = TileRecorder(io, int(job["overlap"]))
    images = []
    for item in job["inputs"]:
        lr = np.load(job_dir / item["path"], allow_pickle=False)
        first = len(tiler.tiles)
        _, n, padded = tiler.upscale(lr)
        images.append(
            {
                "name": item["name"],
                "output": Path(item["path"]).name,  # the host-made input file name; the user's name stays data
                "lr": lr.shape[:2],
                "first": first,
                "tiles": n,
                "padded": padded,
            }
        )
    q = shlex.quote
    with tempfile.TemporaryDirectory(prefix="edgesr-tiles-") as tmp:
        staging = Path(tmp) / "tiles"
        staging.mkdir()
        for k, tile in enumerate(tiler.tiles):
            tile[None].tofile(staging / f"tile{k}.raw")  # raw float32 NHWC, the input tensor's exact bytes
        adb.push([job_dir / job["model"], staging], remote_dir, timeout=settings.timeout_s)
    model = f"{remote_dir}/{Path(job['model']).name}"
    adb.shell(f"mkdir -p {q(remote_dir + '/out')}", check=True)

    def command(k: int, timed: bool) -> BenchmarkCommand:
        return BenchmarkCommand(
            binary=settings.binary,
            graph=model,
            num_threads=settings.threads,
            num_runs=int(job["runs"]) if timed else 1,
            warmup_runs=int(job["warmup"]) if timed else 0,
            delegate=delegate,
            taskset_mask=settings.taskset,
            input_layer=io["inputs"][0]["name"],
            input_shape=tuple(in_shape),
            input_file=f"{remote_dir}/tiles/tile{k}.raw",
            output_filepath=f"{remote_dir}/out/tile{k}.raw",
            report_peak_memory=timed,
            min_secs=None if timed else 0,
            warmup_min_secs=None if timed else 0,
        )

    timed = command(0, True)
    log_lines = [f"$ {shlex.join(timed.argv())}"]
    res = adb.shell(settings.env_prefix + shlex.join(timed.argv()), timeout=settings.timeout_s)
    log_lines += [res.out, res.err]
    log_path = job_dir / LOG_NAME
    log_path.write_text("\n".join(log_lines))
    if res.returncode != 0:
        raise TargetFailed(f"benchmark_model failed (exit {res.returncode}): {_last_line(res)} (log: {log_path})")
    parsed = parse_benchmark_output(res.out + res.err)
    lines = [
        f"{settings.env_prefix}{shlex.join(command(k, False).argv())} || exit $?" for k in range(1, len(tiler.tiles))
    ]
    while lines:  # a few commands per shell call: older adbd limit a service request to 4 KiB
        batch = [lines.pop(0)]
        while lines and sum(map(len, batch)) + len(lines[0]) < MAX_SCRIPT:
            batch.append(lines.pop(0))
        more = adb.shell("\n".join(batch), timeout=settings.timeout_s)
        log_lines += [f"$ {line}" for line in batch] + [more.out, more.err]
        log_path.write_text("\n".join(log_lines))
        if more.returncode != 0:
            raise TargetFailed(f"benchmark_model failed on a tile (exit {more.returncode}): {_last_line(more)}")
    timing = timing_result(parsed)

    out_dir = job_dir / job["out_dir"]
    adb.pull_dir(f"{remote_dir}/out", out_dir, timeout=settings.timeout_s)
    expected = int(np.prod(out_shape)) * 4
    outputs = []
    for k in range(len(tiler.tiles)):
        raw = out_dir / f"tile{k}.raw"
        if not raw.is_file() or raw.stat().st_size != expected:
            size = raw.stat().st_size if raw.is_file() else "no"
            raise TargetFailed(f"benchmark_model output {raw.name}: {size} bytes, expected {expected} ({out_shape})")
        outputs.append(np.fromfile(raw, dtype=np.float32).reshape(out_shape)[0])
        raw.unlink()
    tiler.outputs = outputs
    image_rows = []
    for img in images:
        sr, _, _ = tiler.upscale(np.zeros((*img["lr"], 3), np.float32))
        np.save(out_dir / img["output"], sr)
        image_rows.append(
            {
                "name": img["name"],
                "lr_shape": list(img["lr"]),
                "sr_shape": list(sr.shape[:2]),
                "tiles": img["tiles"],
                "padded": img["padded"],
                "ms": round(img["tiles"] * timing["latency_ms"]["median"], 4),
                "output": img["output"],
            }
        )
    tile = [int(in_shape[1]), int(in_shape[2])]
    result = {
        "engine": "benchmark_model",
        "model": model,
        "model_size_bytes": (job_dir / job["model"]).stat().st_size,
        "runtime": {"name": "benchmark_model", "version": "unknown", "binary": settings.binary},
        "delegate": {"name": delegate, "flags": [a for a in timed.argv() if a.startswith("--use_")]},
        "taskset": settings.taskset,
        "threads": settings.threads,
        "tile": tile,
        "overlap": int(job["overlap"]),
        "stride": [t - 2 * int(job["overlap"]) for t in tile],
        "scale": int(io["scale"]),
        # benchmark_model runs at least num_runs and at least min_secs (1 s; warm-up 0.5 s): the counts it did
        "warmup": parsed.runs.get("warmup", int(job["warmup"])),
        "runs": parsed.runs.get("inference", int(job["runs"])),
        "requested": {"warmup": int(job["warmup"]), "runs": int(job["runs"])},
        **timing,
        "image_ms_method": "tiles x median tile latency (benchmark_model runs one tile per process)",
        "images": image_rows,
        "outputs": [row["output"] for row in image_rows],
        "benchmark_model": {
            "format": parsed.format,
            "latency_ms": parsed.latency_ms,
            "memory_mb": parsed.memory_mb,
            "runs": parsed.runs,
            "model_size_mb": parsed.model_size_mb,
            "argv": timed.argv(),
            "log": LOG_NAME,
        },
        "wall_ms": round((time.perf_counter() - t_start) * 1000, 3),
    }
    write_json(out_dir / "result.json", result)
    return result


def _last_line(res: Any) -> str:
    lines = [line.strip() for line in (res.err + "\n" + res.out).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
