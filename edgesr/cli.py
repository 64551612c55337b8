"""`edgesr`: one front door to the stages. `edgesr compress|convert|bench|report|fit ...` (each has --help).

The stages are also runnable as modules: `python -m compress`, `python -m convert`, `python -m device_bench`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

STAGES = {
    "compress": ("compress.cli", [], "train, prune and evaluate SR models (torch)"),
    "convert": ("convert.cli", [], "convert a checkpoint to TFLite and Core ML, dense and sparse, with parity checks"),
    "bench": ("device_bench.cli", ["bench"], "measure TFLite artifacts on targets against budgets; write the report"),
    "report": ("device_bench.cli", ["report"], "re-render report.md and the plot from a report.json folder"),
    "fit": ("fit.cli", [], "the largest pruned artifact that passes per-frame budgets on every target, measured there"),
}

USAGE = (
    "usage: edgesr {"
    + ",".join(STAGES)
    + "} ...\n\n"
    + "\n".join(f"  {name:<9} {help_}" for name, (_, _, help_) in STAGES.items())
)


def entry(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] not in STAGES:
        from edgesr.errors import one_line

        print(f"error: {one_line(f'unknown command {args[0]!r}; known: ' + ', '.join(STAGES))}", file=sys.stderr)
        return 2
    module, prefix, _ = STAGES[args[0]]
    from edgesr.errors import run_cli

    return run_cli(importlib.import_module(module).main, prefix + args[1:])


if __name__ == "__main__":
    raise SystemExit(entry())
