"""Build `benchmark_model` command lines and parse what the tool prints, in both of its output formats.

Formats (strings as in the LiteRT sources, tflite/tools/benchmark and litert/tools):
- classic TFLite `benchmark_model`: `INFO: count=... avg=... median=...` stat lines (microseconds), the
  `Inference timings in us: Init: ..., First inference: ..., Warmup (avg): ..., Inference (avg): ...` summary
  (older builds: `Average inference timings in us: Warmup: ..., Init: ..., Inference: ...`), and memory lines
  (`Memory footprint delta ... init=.. overall=..`, `Overall peak memory footprint (MB) via periodic monitoring:`,
  `- VmRSS`, `+ RssAnnon` [sic], `+ RssFile + RssShmem`);
- LiteRT "next" `benchmark_model`: a `========== BENCHMARK RESULTS ==========` block in milliseconds.
The parsed result keeps every figure it found and the raw log; figures it did not find are absent, never 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NUM = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


@dataclass
class BenchmarkOutput:
    format: str  # "tflite" | "litert" | "unknown"
    latency_ms: dict[str, float] = field(default_factory=dict)  # init, first, warmup_avg, avg, median, p5, ...
    memory_mb: dict[str, float] = field(default_factory=dict)  # init_delta, overall_delta, peak, vm_rss, ...
    runs: dict[str, int] = field(default_factory=dict)  # warmup, inference
    model_size_mb: float | None = None
    raw: str = ""


def _find(text: str, patterns: dict[str, str], cast: type = float) -> dict:
    """{key: cast(first group)} for each pattern that matches `text`; keys whose pattern is absent are left out."""
    return {key: cast(m.group(1)) for key, pat in patterns.items() if (m := re.search(pat, text))}


def _stat_fields(line: str) -> dict[str, float]:
    """`count=50 first=1 curr=2 ... median=3 p95=4` or `count=3 curr=7(all same)` -> {name: value}."""
    out = {k: float(v) for k, v in re.findall(r"(\w+)=" + _NUM, line)}
    if "(all same)" in line and "curr" in out:
        for k in ("first", "min", "max", "avg", "median", "p5", "p95"):
            out.setdefault(k, out["curr"])
        out.setdefault("std", 0.0)
    return out


def _parse_tflite(text: str, res: BenchmarkOutput) -> None:
    stats = [_stat_fields(m) for m in re.findall(r"^(?:INFO: )?(count=.*)$", text, re.M)]
    if stats:
        timed = stats[-1]  # the warm-up stat line comes first, the timed runs last
        for k in ("min", "max", "avg", "std", "median", "p5", "p95", "first"):
            if k in timed:
                res.latency_ms[k] = timed[k] / 1000.0
        res.runs["inference"] = int(timed.get("count", 0))
        if len(stats) > 1:
            res.runs["warmup"] = int(stats[0].get("count", 0))
    m = re.search(
        r"Inference timings in us: Init: "
        + _NUM
        + r", First inference: "
        + _NUM
        + r", Warmup \(avg\): "
        + _NUM
        + r", Inference \(avg\): "
        + _NUM,
        text,
    )
    if m:
        init, first, warm, avg = map(float, m.groups())
        res.latency_ms.update(init=init / 1000, first=first / 1000, warmup_avg=warm / 1000, avg=avg / 1000)
    m = re.search(
        r"Average inference timings in us: Warmup: " + _NUM + r", Init: " + _NUM + r", Inference: " + _NUM, text
    )
    if m:
        warm, init, avg = map(float, m.groups())
        res.latency_ms.update(warmup_avg=warm / 1000, init=init / 1000, avg=avg / 1000)
    m = re.search(r"Memory footprint delta from the start of the tool \(MB\): init=" + _NUM + r" overall=" + _NUM, text)
    if m:
        res.memory_mb.update(init_delta=float(m.group(1)), overall_delta=float(m.group(2)))
    patterns = {
        "peak": r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM,
        "vm_rss": r"- VmRSS\s*: " + _NUM + " MB",
        "rss_anon": r"\+ RssAnn?on\s*: " + _NUM + " MB",
        "rss_file_shmem": r"\+ RssFile \+ RssShmem\s*: " + _NUM + " MB",
    }
    res.memory_mb.update(_find(text, patterns))
    if m := re.search(r"The input model file size \(MB\): " + _NUM, text):
        res.model_size_mb = float(m.group(1))
    if m := re.search(r"Initialized session in " + _NUM + "ms", text):
        res.latency_ms.setdefault("init", float(m.group(1)))


def _parse_litert(text: str, res: BenchmarkOutput) -> None:
    ms = {
        "init": r"Model initialization:\s*" + _NUM + " ms",
        "first": r"Warmup \(first\):\s*" + _NUM + " ms",
        "warmup_avg": r"Warmup \(avg\):\s*" + _NUM + " ms",
        "avg": r"Inference \(avg\):\s*" + _NUM + " ms",
        "min": r"Inference \(min\):\s*" + _NUM + " ms",
        "max": r"Inference \(max\):\s*" + _NUM + " ms",
        "std": r"Inference \(std\):\s*" + _NUM,
    }
    res.latency_ms.update(_find(text, ms))
    runs = {"warmup": r"Warmup \(avg\):.*\((\d+) runs\)", "inference": r"Inference \(avg\):.*\((\d+) runs\)"}
    res.runs.update(_find(text, runs, int))
    mem = {
        "init_footprint": r"Init footprint:\s*" + _NUM + " MB",
        "overall_footprint": r"Overall footprint:\s*" + _NUM + " MB",
        "peak": r"Peak memory:\s*" + _NUM + " MB",
    }
    res.memory_mb.update(_find(text, mem))


def parse_benchmark_output(text: str) -> BenchmarkOutput:
    """Parse a benchmark_model log (stdout + stderr) of either format."""
    if "========== BENCHMARK RESULTS ==========" in text:
        res = BenchmarkOutput("litert", raw=text)
        _parse_litert(text, res)
    elif re.search(r"count=\d+|Inference timings in us|Average inference timings in us", text):
        res = BenchmarkOutput("tflite", raw=text)
        _parse_tflite(text, res)
    else:
        res = BenchmarkOutput("unknown", raw=text)
    return res


@dataclass(frozen=True)
class BenchmarkCommand:
    """The settings of one classic `benchmark_model` run; `argv()` is the command as an argument list."""

    binary: str
    graph: str
    num_threads: int = 1
    num_runs: int = 50
    warmup_runs: int = 1
    delegate: str = "xnnpack"  # xnnpack | gpu | nnapi | none
    taskset_mask: str | None = None  # e.g. "f0" for the big cores of many phones
    input_layer: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_file: str | None = None
    output_filepath: str | None = None
    report_peak_memory: bool = True
    # The tool keeps running until both num_runs and min_secs are reached (defaults 1 s, warm-up 0.5 s); an
    # output-only run of one tile sets them to 0 so it runs exactly once.
    min_secs: float | None = None
    warmup_min_secs: float | None = None

    def __post_init__(self) -> None:
        if self.delegate not in ("xnnpack", "gpu", "nnapi", "none"):
            raise ValueError(f"unknown delegate '{self.delegate}'; known: xnnpack, gpu, nnapi, none")
        if self.taskset_mask is not None and not re.fullmatch(r"[0-9a-fA-F]+", self.taskset_mask):
            raise ValueError(f"taskset mask must be hexadecimal, got {self.taskset_mask!r}")
        if (self.input_file is None) != (self.input_layer is None) or (self.input_file and not self.input_shape):
            raise ValueError("input_file needs input_layer and input_shape")

    def argv(self) -> list[str]:
        cmd = ["taskset", self.taskset_mask] if self.taskset_mask else []
        cmd += [
            self.binary,
            f"--graph={self.graph}",
            f"--num_threads={self.num_threads}",
            f"--num_runs={self.num_runs}",
            f"--warmup_runs={self.warmup_runs}",
        ]
        if self.min_secs is not None:
            cmd.append(f"--min_secs={self.min_secs:g}")
        if self.warmup_min_secs is not None:
            cmd.append(f"--warmup_min_secs={self.warmup_min_secs:g}")
        # An explicit --use_xnnpack switches the tool to the resolver without default delegates.
        cmd += {
            "xnnpack": ["--use_xnnpack=true"],
            "gpu": ["--use_gpu=true"],
            "nnapi": ["--use_nnapi=true"],
            "none": ["--use_xnnpack=false"],
        }[self.delegate]
        if self.input_file:
            # A literal ':' in a layer name is written '::' in these flags.
            name = self.input_layer.replace(":", "::")
            cmd += [
                f"--input_layer={name}",
                f"--input_layer_shape={','.join(map(str, self.input_shape))}",
                f"--input_layer_value_files={name}:{self.input_file}",
            ]
        if self.output_filepath:
            cmd.append(f"--output_filepath={self.output_filepath}")
        if self.report_peak_memory:
            cmd.append("--report_peak_memory_footprint=true")
        return cmd
