"""android_harness: drive LiteRT's `benchmark_model` on a phone over adb.

Today: building the benchmark_model command line and parsing both of its output formats
(`benchmark_output`). The adb transport (push, taskset, run, pull) arrives behind device_bench's target
interface in a later issue.
"""
