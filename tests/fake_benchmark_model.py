"""TEST DOUBLE of LiteRT's `benchmark_model` binary (none can be obtained here): same flags, same log lines.

It takes the classic tool's flags (--graph, --num_threads, --num_runs, --warmup_runs, --use_xnnpack, --use_gpu,
--use_nnapi, --input_layer, --input_layer_shape, --input_layer_value_files, --output_filepath,
--report_peak_memory_footprint, --min_secs, --warmup_min_secs), really runs the model with the device Python's
TFLite interpreter on the raw input file (its size must equal the tensor's bytes, as in the real tool), writes the
last run's output tensor raw to --output_filepath, and prints its measured figures in the exact line formats of
tflite/tools/benchmark (deployment.md §1.3). Each call appends its argv and CPU affinity as one JSON line to
`<this file>.calls.jsonl`, so tests can check the command the harness built, taskset included.

The tests install it with a `#!<device python>` line in place of the first line and push it as the "binary".
"""

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

T0 = time.perf_counter()


def flags(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            print(f"ERROR: unrecognized flag {arg!r}", file=sys.stderr)
            sys.exit(1)
        key, _, value = arg[2:].partition("=")
        out[key] = value
    return out


def value_file(spec: str) -> tuple[str, str]:
    """`name:path` with '::' standing for a literal ':' in the name."""
    name, i = "", 0
    while i < len(spec):
        if spec.startswith("::", i):
            name, i = name + ":", i + 2
        elif spec[i] == ":":
            return name, spec[i + 1 :]
        else:
            name, i = name + spec[i], i + 1
    raise SystemExit(f"ERROR: bad --input_layer_value_files {spec!r}")


def mb_statm() -> tuple[int, int, int]:
    pages = [int(v) for v in Path("/proc/self/statm").read_text().split()]
    page = os.sysconf("SC_PAGE_SIZE")
    return (pages[1] * page) >> 20, ((pages[1] - pages[2]) * page) >> 20, (pages[2] * page) >> 20


def stat_line(us: list[float]) -> str:
    s = sorted(us)
    pct = lambda p: s[min(len(s) - 1, int(p / 100 * len(s)))]
    std = statistics.pstdev(us) if len(us) > 1 else 0.0
    return (
        f"INFO: count={len(us)} first={us[0]:.0f} curr={us[-1]:.0f} min={s[0]:.0f} max={s[-1]:.0f} "
        f"avg={statistics.fmean(us):g} std={std:.0f} p5={pct(5):.0f} median={pct(50):.0f} p95={pct(95):.0f}\n"
    )


def main() -> int:
    f = flags(sys.argv[1:])
    with open(__file__ + ".calls.jsonl", "a") as log:
        log.write(json.dumps({"argv": sys.argv[1:], "affinity": sorted(os.sched_getaffinity(0))}) + "\n")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph = f["graph"]
    print(f"INFO: The input model file size (MB): {os.path.getsize(graph) / 1e6:g}")
    resolver = (
        OpResolverType.AUTO
        if f.get("use_xnnpack", "true") == "true"
        else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    t = time.perf_counter()
    interp = Interpreter(
        model_path=graph, num_threads=int(f.get("num_threads", -1)), experimental_op_resolver_type=resolver
    )
    interp.allocate_tensors()
    init_us = (time.perf_counter() - t) * 1e6
    init_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"INFO: Initialized session in {init_us / 1000:g}ms.")
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    name, path = value_file(f["input_layer_value_files"])
    if name != f.get("input_layer") or list(map(int, f["input_layer_shape"].split(","))) != list(inp["shape"]):
        print(f"FATAL: Cannot find the corresponding input_layer name({name}) or shape", file=sys.stderr)
        return 134
    want = int(np.prod(inp["shape"])) * 4
    if os.path.getsize(path) != want:
        print(
            f"FATAL: The size of {path} is {os.path.getsize(path)} bytes. It should be {want} bytes.", file=sys.stderr
        )
        return 134
    interp.set_tensor(inp["index"], np.fromfile(path, dtype=np.float32).reshape(inp["shape"]))

    def runs(n: int, min_secs: float, label_secs: float) -> list[float]:
        print(
            f"INFO: Running benchmark for at least {n} iterations and at least {label_secs:g} seconds but "
            "terminate if exceeding 150 seconds."
        )
        us, t_start = [], time.perf_counter()
        while len(us) < n or time.perf_counter() - t_start < min_secs:
            t = time.perf_counter()
            interp.invoke()
            us.append((time.perf_counter() - t) * 1e6)
        if us:
            print(stat_line(us))
        return us

    warm = runs(
        int(f.get("warmup_runs", 1)), float(f.get("warmup_min_secs", 0.5)), float(f.get("warmup_min_secs", 0.5))
    )
    timed = runs(int(f.get("num_runs", 50)), float(f.get("min_secs", 1.0)), float(f.get("min_secs", 1.0)))
    if not timed:
        timed = warm
    first = warm[0] if warm else timed[0]
    warm_avg = statistics.fmean(warm) if warm else 0.0
    print(
        f"INFO: Inference timings in us: Init: {init_us:.0f}, First inference: {first:.0f}, "
        f"Warmup (avg): {warm_avg:g}, Inference (avg): {statistics.fmean(timed):g}"
    )
    if "output_filepath" in f:
        interp.get_tensor(out["index"]).tofile(f["output_filepath"])
    end_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        "INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to "
        "the actual memory footprint of the model at runtime. Take the information at your discretion."
    )
    print(
        f"INFO: Memory footprint delta from the start of the tool (MB): init={(init_kb - start_kb) / 1024:g} "
        f"overall={(end_kb - start_kb) / 1024:g}"
    )
    if f.get("report_peak_memory_footprint") == "true":
        rss, anon, shared = mb_statm()
        print(f"INFO: Overall peak memory footprint (MB) via periodic monitoring: {end_kb / 1024:g}")
        print("INFO: Memory status at the end of exeution:")
        print(f"INFO: - VmRSS              : {rss} MB")
        print(f"INFO: + RssAnnon           : {anon} MB")
        print(f"INFO: + RssFile + RssShmem : {shared} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
