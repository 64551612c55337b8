"""android_harness: drive LiteRT's `benchmark_model` on a phone over adb.

- `adb`: a thin driver around the real `adb` binary (devices, connect, serial selection, push, pull, shell with
  exit codes and separate stderr, timeouts, offline devices);
- `benchmark_output`: the benchmark_model command line, and a parser for both of its output formats.
It depends on nothing of device_bench; device_bench builds on it: `device_bench.benchmark_model_engine` runs a
job with benchmark_model (per-tile raw inputs and outputs, stitched by the runner's tiler) and
`device_bench.adb_target` puts both behind device_bench's Target interface (`type: adb` in a targets file).
"""
