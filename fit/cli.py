"""`edgesr fit` (`python -m fit`): a model, targets and per-frame budgets in; per target, the largest channel-pruned
artifact that passes every budget, measured on that target, out.

  edgesr fit --checkpoint checkpoints/edsr-tiny-x2/model.pt --budgets configs/fit-budgets.yaml --out runs/fit
  edgesr fit --checkpoint pretrained:rdn-psnr-small-x2 --budgets b.yaml --targets local,pi-litert \\
      --targets-file .pi/targets.yaml --out runs/fit-rdn --steps 200
  edgesr fit --model nets/sr.py:build --weights sr.pth --budgets b.yaml --out runs/fit-mine

How: shapes first, then training. The L1 cut of the model at each --keeps fraction of every prunable channel
group (widths rounded up to multiples of each --round-to) is converted to TFLite at every --precisions and
workload tile and measured on every target with its untrained weights (latency, memory and size depend on the
shape, not on the weights). Interpolation between the measured shapes, per target, precision and tile, predicts
every shape in between (never beyond); the largest whose predictions meet every budget by --margin is measured
itself if it was only predicted, fine-tuned for --steps (distilled from the unpruned model), converted, measured
on the target, and checked against every budget, min_psnr_db included. A miss the model did not predict tries
the next candidate (--attempts).

When only file size (max_model_kb, max_download_kb) stops a wider shape, that shape is also cut to each
--sparsities weight sparsity in turn and measured sparse-encoded; the smallest sparsity that fits is trained
(magnitude pruning during the fine-tune) beside the narrower dense shape, and the higher measured PSNR wins.

The budgets file is device_bench's (device_bench/budgets.example.yaml), with the workload the fit needs:
  workload: {frame: 480x270, tile: [128, frame]}
  targets: {local: {max_frame_ms: 900, min_psnr_db: 32.5}, pi-litert: {workload: {frame: 96x96, tile: 96}}}

Every conversion, measurement and training run is a trial in an Optuna study (--storage; default
sqlite:///<out>/trials.db): a rerun, after a kill or with other budgets, reuses every finished trial, and an
interrupted fine-tune resumes from its last save. Several machines can work on one fit through one RDB URL.

Writes <out>/fit.json, <out>/fit.md, plots of the shape model per target (fit-<target>.png), and per target that
passes, <out>/<target>/artifact (the convert folder) and <out>/<target>/bench (its bench report).
Exit codes: 0 every target has a passing artifact; 1 some target has none (fit.md names the budget that binds and
the nearest point); 2 bad usage or input; 3 a target failed (unreachable, runner crashed).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from compress.intake import add_model_arguments, spec_from_args
from convert import quiet_converters
from edgesr.errors import ArgumentParser, BadInput, finite_float, run_cli
from edgesr.manifest import exclusive_output
from fit.config import METHODS, FitConfig

log = logging.getLogger("fit")
DEFAULTS = FitConfig.__dataclass_fields__


def _default(name: str) -> object:
    return DEFAULTS[name].default


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(finite_float(x) for x in text.split(",") if x.strip())
    except (ValueError, argparse.ArgumentTypeError):
        raise BadInput(f"{flag}: expected comma-separated finite numbers, got {text[:80]!r}") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"{flag}: expected comma-separated integers, got {text[:80]!r}") from None


def _join(values: object) -> str:
    return ",".join(str(v) for v in values)  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="edgesr fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--budgets", type=Path, required=True, help="budgets YAML with the workload (device_bench format)")
    p.add_argument("--out", type=Path, required=True, help="output folder (fit.json, fit.md, trials, artifacts)")
    p.add_argument("--targets", default=_join(_default("targets")), help="comma-separated target names")
    p.add_argument("--targets-file", type=Path, help="YAML of ssh/adb targets (as device_bench bench takes)")
    p.add_argument("--frame", help="LR frame WxH for every target (overrides the budgets' workload)")
    p.add_argument("--tile", dest="tiles", help="tile sides and/or 'frame', comma-separated (overrides the workload)")
    s = p.add_argument_group("the shape stage")
    s.add_argument(
        "--precisions", default=_join(_default("precisions")), help="TFLite precisions (default %(default)s)"
    )
    s.add_argument("--keeps", default=_join(_default("keeps")), help="keep fractions measured (default %(default)s)")
    s.add_argument(
        "--round-to", default=_join(_default("round_to")), help="width multiples, one family each (default %(default)s)"
    )
    s.add_argument("--min-channels", type=int, default=_default("min_channels"), help="narrowest group width")
    s.add_argument(
        "--margin",
        type=finite_float,
        default=_default("margin"),
        help="headroom predictions must leave (default %(default)s)",
    )
    s.add_argument("--measure-test-set", default=_default("measure_test_set"), help="quality pass of the shape stage")
    t = p.add_argument_group("training the chosen shape")
    t.add_argument(
        "--methods",
        default=_join(_default("methods")),
        help=f"structured methods that compete at the chosen budget ({', '.join(METHODS)}; channel-l1 always; "
        "default %(default)s)",
    )
    t.add_argument(
        "--sparsities",
        default=_join(_default("sparsities")),
        help="weight sparsities tried at the widest shape the other budgets allow when only file size binds "
        "('' never prunes weights; default %(default)s)",
    )
    t.add_argument(
        "--sparse-layers", default=_default("sparse_layers"), help="convs that lose weights (compress's --layers)"
    )
    t.add_argument("--steps", type=int, default=_default("steps"), help="fine-tuning steps per trained candidate")
    t.add_argument("--data", default=_default("data"), help="'bundled' photos or a folder of HR images")
    t.add_argument("--test-set", default=_default("test_set"), help="PSNR of the final artifacts (min_psnr_db)")
    t.add_argument("--degradation", default=_default("degradation"), choices=("pillow", "matlab"))
    t.add_argument("--attempts", type=int, default=_default("attempts"), help="candidates tried per target")
    t.add_argument("--seed", type=int, default=_default("seed"))
    t.add_argument("--device", default=_default("device"), help="training device: auto, cpu, cuda, cuda:N")
    m = p.add_argument_group("measurement")
    m.add_argument("--runs", type=int, default=_default("runs"), help="frames per measurement (at least)")
    m.add_argument("--warmup", type=int, default=_default("warmup"))
    m.add_argument("--min-seconds", type=finite_float, default=_default("min_seconds"))
    m.add_argument("--threads", type=int, default=_default("threads"))
    m.add_argument("--timeout", type=finite_float, default=_default("timeout_s"), help="seconds per target job")
    m.add_argument("--device-python", type=Path, help="the local target's device Python")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<out>/trials.db)")
    return p


def config_from_args(args: argparse.Namespace) -> FitConfig:
    return FitConfig(
        model=spec_from_args(args),
        out=args.out,
        budgets=args.budgets,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        targets_file=args.targets_file,
        frame=args.frame,
        tiles=args.tiles,
        precisions=tuple(x.strip() for x in args.precisions.split(",") if x.strip()),
        keeps=_floats(args.keeps, "--keeps"),
        round_to=_ints(args.round_to, "--round-to"),
        min_channels=args.min_channels,
        margin=args.margin,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        sparsities=_floats(args.sparsities, "--sparsities"),
        sparse_layers=args.sparse_layers,
        steps=args.steps,
        data=args.data,
        test_set=args.test_set,
        measure_test_set=args.measure_test_set,
        degradation=args.degradation,
        runs=args.runs,
        warmup=args.warmup,
        min_seconds=args.min_seconds,
        threads=args.threads,
        attempts=args.attempts,
        seed=args.seed,
        device=args.device,
        storage=args.storage,
        device_python=args.device_python,
        timeout_s=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    quiet_converters()
    from fit import run_fit

    with exclusive_output(cfg.out, "edgesr fit", resumable=("trials.db", "trials/*")):
        record, code = run_fit(cfg)  # every input is validated before slow work; a failed target is exit 3
    for name, t in record["targets"].items():
        if t["status"] == "pass":
            c = t["chosen"]
            log.info(
                "%s: PASS %s (%s), frame %.1f ms p90, peak %.1f MB, %.3f dB -> %s",
                name, c["row"]["model"], c["row"]["artifact"], c["row"]["frame_ms_p90"], c["row"]["peak_rss_mb"],
                c["row"]["psnr_y_db"], c.get("published"),
            )  # fmt: skip
        else:
            log.info("%s: no artifact: %s", name, t["reason"])
    log.info(
        "wrote %s (%d trials run, %d reused)", cfg.out / "fit.md", record["trials"]["ran"], record["trials"]["reused"]
    )
    return code


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
