"""android_harness: drive LiteRT's `benchmark_model` on a phone over adb.

- `adb`: a thin driver around the real `adb` binary (devices, connect, serial selection, push, pull, shell with
  exit codes and separate stderr, timeouts, offline devices);
- `benchmark_output`: the benchmark_model command line, and a parser for both of its output formats;
- `engine`: a device_bench job run with benchmark_model (per-tile raw inputs and outputs, stitched on the host).
device_bench/adb_target.py puts these behind device_bench's Target interface (`type: adb` in a targets file).
"""
