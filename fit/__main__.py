from fit.cli import entry

raise SystemExit(entry())
