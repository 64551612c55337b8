from device_bench.cli import entry

raise SystemExit(entry())
