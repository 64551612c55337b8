from convert.cli import entry

raise SystemExit(entry())
