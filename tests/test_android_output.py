"""benchmark_model output parsing, on logs assembled from the tool's own format strings (both formats)."""

import pytest

from android_harness.benchmark_output import BenchmarkCommand, parse_benchmark_output
from device_bench.benchmark_model_engine import timing_result
from edgesr.errors import TargetFailed

# Lines in the order BenchmarkModel::Run() and its listeners print them (tflite/tools/benchmark).
TFLITE_LOG = """\
INFO: The input model file size (MB): 0.103584
INFO: Initialized session in 12.5ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=4 first=170001 curr=160200 min=158000 max=170001 avg=162550 std=4700 p5=158000 median=161000 p95=170001

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=50 first=161000 curr=160500 min=155250 max=171000 avg=160420.5 std=3100 p5=156000 median=160100 p95=166000

INFO: Inference timings in us: Init: 12500, First inference: 170001, Warmup (avg): 162550, Inference (avg): 160420.5
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=3.25 overall=81.5
INFO: Overall peak memory footprint (MB) via periodic monitoring: 121.75
INFO: Memory status at the end of exeution:
INFO: - VmRSS              : 118 MB
INFO: + RssAnnon           : 96 MB
INFO: + RssFile + RssShmem : 22 MB
"""

LITERT_LOG = """\
========== BENCHMARK RESULTS ==========
Model initialization: 45.20 ms
Warmup (first):       170.00 ms
Warmup (avg):         162.55 ms (4 runs)
Inference (avg):      160.42 ms (50 runs)
Inference (min):      155.25 ms
Inference (max):      171.00 ms
Inference (std):      3.10
Throughput:           0.65 MB/s
Memory Usage:
Init footprint:       3.25 MB
Overall footprint:    81.50 MB
Peak memory:          121.75 MB
======================================
"""


def test_classic_format_every_figure():
    out = parse_benchmark_output(TFLITE_LOG)
    assert out.format == "tflite" and out.model_size_mb == pytest.approx(0.103584)
    assert out.runs == {"inference": 50, "warmup": 4}
    assert out.latency_ms["median"] == pytest.approx(160.1) and out.latency_ms["p95"] == pytest.approx(166.0)
    assert out.latency_ms["avg"] == pytest.approx(160.4205) and out.latency_ms["first"] == pytest.approx(170.001)
    assert out.latency_ms["init"] == pytest.approx(12.5) and out.latency_ms["warmup_avg"] == pytest.approx(162.55)
    assert out.memory_mb == {
        "init_delta": 3.25,
        "overall_delta": 81.5,
        "peak": 121.75,
        "vm_rss": 118.0,
        "rss_anon": 96.0,
        "rss_file_shmem": 22.0,
    }
    assert out.raw == TFLITE_LOG


def test_classic_format_older_builds_and_all_same():
    log = (
        "INFO: count=3 curr=7000(all same)\n"
        "Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9\n"
    )
    out = parse_benchmark_output(log)
    assert out.latency_ms["median"] == 7.0 and out.latency_ms["std"] == 0.0
    assert out.latency_ms["avg"] == pytest.approx(79.7609) and out.latency_ms["init"] == pytest.approx(38.467)
    assert "peak" not in out.memory_mb  # absent, not zero


def test_litert_format_every_figure():
    out = parse_benchmark_output(LITERT_LOG)
    assert out.format == "litert" and out.runs == {"warmup": 4, "inference": 50}
    assert out.latency_ms == {
        "init": 45.2,
        "first": 170.0,
        "warmup_avg": 162.55,
        "avg": 160.42,
        "min": 155.25,
        "max": 171.0,
        "std": 3.1,
    }
    assert out.memory_mb == {"init_footprint": 3.25, "overall_footprint": 81.5, "peak": 121.75}
    unavailable = LITERT_LOG.replace(
        "Peak memory:          121.75 MB", "Peak memory usage not available. (peak_mem_mb <= 0)"
    )
    assert "peak" not in parse_benchmark_output(unavailable).memory_mb


def test_unrelated_output_is_unknown():
    assert parse_benchmark_output("ERROR: Could not open 'x.tflite'.\n").format == "unknown"


def test_command_line_is_an_argument_list():
    cmd = BenchmarkCommand(
        binary="/data/local/tmp/benchmark_model",
        graph="/data/local/tmp/m o;del.tflite",
        num_threads=4,
        taskset_mask="f0",
        input_layer="serving_default_args_0:0",
        input_shape=(1, 128, 128, 3),
        input_file="/data/local/tmp/tile 0.raw",
        output_filepath="/data/local/tmp/out 0.raw",
    )
    assert cmd.argv() == [
        "taskset",
        "f0",
        "/data/local/tmp/benchmark_model",
        "--graph=/data/local/tmp/m o;del.tflite",
        "--num_threads=4",
        "--num_runs=50",
        "--warmup_runs=1",
        "--use_xnnpack=true",
        "--input_layer=serving_default_args_0::0",
        "--input_layer_shape=1,128,128,3",
        "--input_layer_value_files=serving_default_args_0::0:/data/local/tmp/tile 0.raw",
        "--output_filepath=/data/local/tmp/out 0.raw",
        "--report_peak_memory_footprint=true",
    ]
    with pytest.raises(ValueError, match="unknown delegate 'npu'"):
        BenchmarkCommand(binary="b", graph="g", delegate="npu")
    with pytest.raises(ValueError, match="hexadecimal"):
        BenchmarkCommand(binary="b", graph="g", taskset_mask="f0; reboot")


@pytest.mark.parametrize(
    ("delegate", "flag"),
    [
        ("xnnpack", "--use_xnnpack=true"),
        ("gpu", "--use_gpu=true"),
        ("nnapi", "--use_nnapi=true"),
        ("none", "--use_xnnpack=false"),
    ],
)
def test_delegate_flags_and_output_only_runs(delegate, flag):
    argv = BenchmarkCommand(binary="bm", graph="m.tflite", delegate=delegate, report_peak_memory=False).argv()
    assert [a for a in argv if a.startswith("--use_")] == [flag] and argv[0] == "bm"
    once = BenchmarkCommand(binary="bm", graph="g", num_runs=1, warmup_runs=0, min_secs=0, warmup_min_secs=0)
    assert once.argv()[3:7] == ["--num_runs=1", "--warmup_runs=0", "--min_secs=0", "--warmup_min_secs=0"]


def test_timing_result_from_both_formats():
    classic = timing_result(parse_benchmark_output(TFLITE_LOG))
    assert classic["latency_ms"] == {
        "median": pytest.approx(160.1),
        "median_source": "median",
        "p90": None,  # not printed by the tool: absent, never estimated
        "p95": pytest.approx(166.0),
        "p5": pytest.approx(156.0),
        "mean": pytest.approx(160.4205),
        "min": pytest.approx(155.25),
        "max": pytest.approx(171.0),
        "std": pytest.approx(3.1),
        "samples": [],
    }
    assert classic["load_ms"] == pytest.approx(12.5) and classic["first_inference_ms"] == pytest.approx(170.001)
    assert classic["peak_rss_mb"] == 121.75 and classic["benchmark_runs"] == {"inference": 50, "warmup": 4}
    assert classic["memory"]["steady"] == {"hwm_mb": 121.75, "rss_mb": 118.0, "rss_anon_mb": 96.0, "rss_file_mb": 22.0}
    assert classic["memory"]["hwm_delta_mb"] == {"init": 3.25, "overall": 81.5}
    litert = timing_result(parse_benchmark_output(LITERT_LOG))
    assert litert["latency_ms"]["median"] == 160.42 and litert["latency_ms"]["median_source"] == "avg"
    assert litert["load_ms"] == 45.2 and litert["first_inference_ms"] == 170.0 and litert["peak_rss_mb"] == 121.75
    assert litert["memory"]["steady"]["rss_anon_mb"] is None and litert["benchmark_runs"] == {
        "warmup": 4,
        "inference": 50,
    }
    with pytest.raises(TargetFailed, match="no inference timings"):
        timing_result(parse_benchmark_output("ERROR: Could not open 'x.tflite'.\n"))
