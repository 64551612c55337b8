"""`python -m device_bench`: measure TFLite and Core ML artifacts on devices and check them against budgets.

  python -m device_bench bench runs/convert --out runs/bench --budgets device_bench/budgets.example.yaml
  python -m device_bench bench model.tflite --out runs/bench --overlap 14 --test-set path/to/hr_images
  python -m device_bench bench runs/convert --out runs/bench --test-set path/to/Set5 --degradation matlab
  python -m device_bench bench runs/sweep --frame 960x540 --tile 128,256,frame --out runs/sweep-bench
  python -m device_bench report runs/bench                      # re-render report.md + plot from report.json
  python -m device_bench report runs/bench --budgets other.yaml # re-check the measured rows against new budgets
  python -m device_bench import-xcode iphone15.yaml --out runs/bench  # add an iPhone's Xcode performance report

ARTIFACT is a convert output folder (its manifest.json lists the artifacts, or one tile-*/ subfolder per tile
from `convert --tile 128,256,...`), a convert manifest.json, or a bare .tflite file or .mlpackage folder (scale
and tile are read from the model's shapes; the model name is the file stem). Core ML files run through
coremltools' MLModel on macOS and through edgesr's reference executor elsewhere (its timings are marked as not
meaningful); adb targets skip them. An iPhone is measured with Xcode; `import-xcode` adds its figures.

The workload: --frame WxH is the LR frame an app feeds the model (default: the test images as they are); --tile
picks the artifacts converted for those tile sides (a list is a tile sweep; `frame`: the model takes the whole
frame). Both default to the budgets file's `workload` (per target). The runner processes whole frames as an app
would (tile, invoke, stitch) for at least --runs frames and --min-seconds, and reports per-frame latency (median,
p90), frames per second and peak memory at the workload, beside the per-tile invoke figures.

The local target runs device_bench/runner.py in a separate process with the device Python (only a TFLite runtime
and numpy): --device-python, else $EDGESR_DEVICE_PYTHON, else <repo>/.venv-device/bin/python.

Several targets run at once (`--targets local,pi,phone`; remote targets come from --targets-file), each in its
own thread; a target that fails (unreachable, killed, timed out, dropped) is reported with its reason while the
others finish. Every finished measurement is appended to <out>/results.jsonl as it arrives; re-running the same
command resumes from it (skips measurements with the same target, artifact sha256 and settings) unless --fresh.

Writes <out>/results.jsonl, <out>/report.json, <out>/report.md, Pareto plots of Y-PSNR against size, peak
memory and frame latency (one set per target when their budgets differ), a tile-sweep plot when several tiles
ran, and one job folder per (target, artifact) under <out>/jobs/.
Exit codes: 0 all budgets pass; 1 a budget fails; 2 bad usage or input; 3 a target failed (the report is still
written, listing the failed target and its reason).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from device_bench.artifacts import DEFAULT_OVERLAP
from device_bench.bench import BenchConfig, run_bench
from device_bench.report import render
from device_bench.results import RESULTS_NAME
from device_bench.runner import RUNTIMES
from device_bench.targets import DEVICE_PYTHON_ENV, TARGET_KINDS
from device_bench.xcode_report import import_reports
from edgesr.errors import ArgumentParser, finite_float, one_line, run_cli
from edgesr.images import DEGRADATION_INFO, DEGRADATIONS
from edgesr.manifest import exclusive_output

log = logging.getLogger("device_bench")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m device_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,report,import-xcode}")
    b = sub.add_parser(
        "bench",
        help="run artifacts on targets, score them, check budgets, write the report",
        description="Run TFLite artifacts on targets (concurrently, one thread per device), score their SR outputs "
        "on the host, check budgets, append each measurement to <out>/results.jsonl, write <out>/report.json, "
        "report.md and the plots (Pareto, tile sweep). Re-running resumes from results.jsonl unless --fresh. "
        "Exit codes: 0 all budgets pass; 1 a budget fails; 2 bad usage or input; 3 a target failed.",
    )
    b.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT", help=".tflite, convert folder or manifest")
    b.add_argument("--out", type=Path, required=True, help="output folder for report.json/.md/.png and jobs/")
    b.add_argument(
        "--targets",
        default="local",
        help=f"comma-separated targets: {', '.join(TARGET_KINDS)} or names from --targets-file (default local)",
    )
    b.add_argument(
        "--targets-file",
        type=Path,
        help="YAML naming the remote targets (ssh, adb): host, port, user, identity, python, runtime, ...",
    )
    b.add_argument("--budgets", type=Path, help="budgets YAML (see device_bench/budgets.example.yaml); none: all pass")
    b.add_argument("--test-set", default="sporco", help="bundled test set (sporco, butterfly) or a folder of HR images")
    b.add_argument(
        "--degradation",
        default="pillow",
        choices=DEGRADATIONS,
        help="how LR images are made from HR ones: "
        + "; ".join(f"{k}: {v}" for k, v in DEGRADATION_INFO.items())
        + " (default pillow; DIV2K and BasicSR folders use the LR files they ship)",
    )
    b.add_argument(
        "--frame",
        metavar="WxH",
        help="LR frame size of the workload, e.g. 960x540 (default: the "
        "budgets file's workload, else the test images as they are)",
    )
    b.add_argument(
        "--tile",
        dest="tiles",
        metavar="N[,N|frame...]",
        help="tile side(s) in LR px, or frame; a list "
        "is a tile sweep (default: the budgets file's workload, else every artifact at its own tile)",
    )
    b.add_argument(
        "--min-seconds",
        type=finite_float,
        default=1.0,
        help="the frame loop runs at least this long "
        "(and at least --runs frames), as benchmark_model's --min_secs (default 1)",
    )
    b.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1; -1: runtime default)")
    b.add_argument("--warmup", type=int, default=3, help="untimed invokes before timing (default 3)")
    b.add_argument(
        "--runs", type=int, default=20, help="timed invokes of one tile, and at least as many timed frames (default 20)"
    )
    b.add_argument("--timeout", type=finite_float, default=600.0, help="seconds per runner call before it fails (600)")
    b.add_argument("--device-python", type=Path, help=f"device Python for the local target (or ${DEVICE_PYTHON_ENV})")
    b.add_argument(
        "--overlap",
        type=int,
        help=f"tile overlap in LR px, >= the receptive-field radius (default: the manifest's, else {DEFAULT_OVERLAP})",
    )
    b.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES], help="TFLite interpreter (default auto)")
    b.add_argument("--save-images", action="store_true", help="also save the SR images as PNG under <out>/images/")
    b.add_argument(
        "--fresh",
        "--no-resume",
        dest="fresh",
        action="store_true",
        help="measure everything again instead of resuming from <out>/results.jsonl (which is replaced)",
    )
    r = sub.add_parser(
        "report",
        help="re-render report.md and the plots from an existing report.json",
        description="Re-render <folder>/report.md and the plots from report.json (with --budgets: re-check the "
        "recorded rows first and update report.json). Exits with the report's verdict: 0 pass, 1 a budget fails, "
        "3 a target failed in the recorded run.",
    )
    r.add_argument("folder", type=Path, help="a bench --out folder holding report.json")
    r.add_argument("--budgets", type=Path, help="re-check the recorded rows against this budgets YAML")
    x = sub.add_parser(
        "import-xcode",
        help="add the figures of Xcode's Core ML performance report (an iPhone's) to a bench report",
        description="Add Xcode performance reports to the bench report in --out: each REPORT is a YAML file with "
        "the figures Xcode's report shows (model, device, os, compute_units, load_ms, prediction_ms; optional "
        "compile_ms, xcode, ops, target; see the README). The .mlpackage must be one the bench measured in --out. "
        "Rows get the tile latency (median prediction), a derived frame latency (tiles x median) and fps, and no "
        "memory or PSNR; they are checked against --budgets, else the budgets the report recorded. Exit codes: "
        "0 all budgets pass; 1 a budget fails; 2 bad usage or input; 3 a target failed in the recorded run.",
    )
    x.add_argument("reports", nargs="+", type=Path, metavar="REPORT", help="Xcode report YAML file(s)")
    x.add_argument("--out", type=Path, required=True, help="a bench --out folder holding report.json")
    x.add_argument("--budgets", type=Path, help="check every row against this budgets YAML (default: the recorded)")
    x.add_argument(
        "--frame",
        metavar="WxH",
        help="LR frame for the derived frame latency (default: the one the file was benched at)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "import-xcode":
        with exclusive_output(args.out, "device_bench import-xcode", resumable=(RESULTS_NAME,)):
            report = import_reports(list(args.reports), args.out, args.budgets, args.frame)
        log.info("wrote %s (%s)", args.out / "report.md", "PASS" if report["passed"] else "FAIL")
        return report["exit_code"]
    if args.command == "report":
        with exclusive_output(args.folder, "device_bench report"):
            report = render(args.folder, args.budgets)
        log.info("wrote %s (%s)", args.folder / "report.md", "PASS" if report["passed"] else "FAIL")
        return report["exit_code"]
    cfg = BenchConfig(
        artifacts=tuple(args.artifacts),
        out=args.out,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        targets_file=args.targets_file,
        budgets=args.budgets,
        test_set=args.test_set,
        degradation=args.degradation,
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        timeout_s=args.timeout,
        device_python=args.device_python,
        overlap=args.overlap,
        runtime=args.runtime,
        save_images=args.save_images,
        fresh=args.fresh,
        frame=args.frame,
        tiles=args.tiles,
        min_seconds=args.min_seconds,
    )
    with exclusive_output(args.out, "device_bench bench", resumable=(RESULTS_NAME,)):
        report = run_bench(cfg)
    log.info("wrote %s: %s", args.out / "report.md", "all budgets pass" if report["passed"] else "FAIL")
    for f in report["failed_targets"]:  # one line per failed target, the way run_cli reports an error
        log.error("error: %s", one_line(f["reason"]))
    for f in report["failed_budgets"]:
        log.info(
            "  FAIL %s %s on %s: %s %.3f vs limit %.3f",
            f["model"],
            f["artifact"],
            f["target"],
            f["budget"],
            f["value"] if f["value"] is not None else float("nan"),
            f["limit"],
        )
    return report["exit_code"]


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
