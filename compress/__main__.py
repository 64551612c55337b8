from compress.cli import entry

raise SystemExit(entry())
