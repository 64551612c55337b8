"""Benchmark: pruning methods side by side at equal steps, against the dense model given the same steps.

Every row is a real `python -m compress` run from the same checkpoint with the same data, steps, batch, seed
and flags, so rows differ only by method, target and the flags of a named variant. The reference is **dense-ft**:
the unpruned model fine-tuned for the same steps with the same loop (`compress train --checkpoint`, at the peak
learning rate the pruned rows use: distilled from itself, so it stays put) and **dense-ft-hr** (the same on HR
patches only, what more training alone gives); every row's Δ is against the better of their means. The untouched
checkpoint is shown too.
With several `--seeds`, each row is the mean over them, and ± is half the range (max − min) / 2.

    python benchmarks/prune_tradeoff.py --steps 2000 --seeds 0,1 --jobs 2 --out runs/bench-weights
    python benchmarks/prune_tradeoff.py --suite channels --targets 0.5 --steps 2000 --seeds 0,1 --jobs 2 \\
        --out runs/bench-channels
    python benchmarks/prune_tradeoff.py --methods magnitude --variant "iks-ref=--method iks --finish reference" \\
        --targets 0.8 --steps 1000 --out runs/bench-iks

A variant is NAME=FLAGS: a row named NAME whose `compress prune` gets FLAGS (which include its --method) on top
of the suite's. Runs are kept in --out/<row>-<target>-s<seed>/ and reused when re-run (delete one to redo it).
This is a benchmark: it prints figures and writes --out/prune_tradeoff.{json,md}; it asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgesr.manifest import read_json, write_json  # noqa: E402

log = logging.getLogger("prune_tradeoff")
SUITES = {
    "weights": {"methods": "magnitude,iks", "targets": "0.5,0.8,0.9"},
    "channels": {"methods": "fmp,channel-only,channel-l1", "targets": "0.5,0.3"},
}
DENSE_FT = "dense-ft"
DENSE_HR = "dense-ft-hr"  # the same fine-tune on HR patches only (--distill 0): what more training alone gives


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints/edsr-tiny-x2/model.pt"))
    p.add_argument("--out", type=Path, default=REPO / "runs/bench-prune")
    p.add_argument("--suite", default="weights", choices=SUITES, help="weights (default) or channels")
    p.add_argument(
        "--targets",
        help="comma list: sparsities (weights suite, default 0.5,0.8,0.9) or kept params "
        "fractions (channels suite, default 0.5,0.3)",
    )
    p.add_argument("--methods", help="methods to compare (default: the suite's); '' for variants only")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS", help="an extra row (repeatable)")
    p.add_argument("--weight-sparsity", type=float, default=0.3, help="channels suite: FMP's weight sparsity (0.3)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps per run, every row (default 1000)")
    p.add_argument("--seeds", default="0", help="comma list of seeds; each row is run once per seed (default 0)")
    p.add_argument("--layers", default="default", help="layer set for every method (default: the arch's sparse set)")
    p.add_argument("--test-set", default="sporco")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel; threads are split between them")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dense-lr", type=float, default=5e-4, help="dense-ft's peak lr (default 5e-4, FINETUNE.lr)")
    p.add_argument("--no-dense-ft", action="store_true", help="skip the dense fine-tune rows")
    p.add_argument("--no-dense-hr", action="store_true", help="skip dense-ft-hr (the dense fine-tune on HR only)")
    p.add_argument("--table-only", action="store_true", help="run nothing: tabulate the runs already in --out")
    p.add_argument("--extra", default="", help="extra flags for every run, dense-ft included, as one string")
    return p.parse_args(argv)


def rows_to_run(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(row name, its own compress flags) for the methods and the variants."""
    methods = args.methods if args.methods is not None else SUITES[args.suite]["methods"]
    rows = [(m.strip(), ["--method", m.strip()]) for m in methods.split(",") if m.strip()]
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip() or "--method" not in flags:
            raise SystemExit(f"--variant {spec!r}: expected NAME=FLAGS with FLAGS holding --method")
        rows.append((name.strip(), shlex.split(flags)))
    return rows


def run_one(args: argparse.Namespace, name: str, flags: list[str], target: float, seed: int, threads: int) -> dict:
    out = args.out / f"{name}-{target:g}-s{seed}"
    if (out / "manifest.json").exists():
        log.info("reusing %s", out)
    elif args.table_only:
        return {"row": name, "target": target, "seed": seed, "missing": True}
    else:
        common = ["--checkpoint", args.checkpoint, "--steps", str(args.steps), "--seed", str(seed)]
        common += ["--test-set", args.test_set, "--device", args.device, "--out", str(out)]
        if name in (DENSE_FT, DENSE_HR):
            cmd = ["train", *common, "--lr", str(args.dense_lr), *(["--distill", "0"] if name == DENSE_HR else [])]
        else:
            method = flags[flags.index("--method") + 1]
            weights = method in ("magnitude", "iks")
            cmd = ["prune", *common, *flags]
            if args.suite == "weights" or weights:
                cmd += ["--sparsity", str(target), "--layers", args.layers]
            else:
                cmd += ["--params", str(target)]
                cmd += ["--weight-sparsity", str(args.weight_sparsity)] if method == "fmp" else []
        cmd = [sys.executable, "-m", "compress", *cmd, *shlex.split(args.extra)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        log.info("running %s", shlex.join(cmd))
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.log", "w") as fh:
            r = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = (out.parent / f"{out.name}.log").read_text().strip().splitlines()[-1:]
            return {"row": name, "target": target, "seed": seed, "error": f"exit {r.returncode}: {' '.join(tail)}"}
    m = read_json(out / "manifest.json")
    run, pruning = m["train"], m.get("pruning") or {}
    done = run["steps"] - run["resumed_from"]
    return {
        "row": name,
        "target": target,
        "seed": seed,
        "psnr_y_db": m["psnr_y_db"],
        "ssim_y": m["ssim_y"],
        "sparsity_pruned_layers": pruning.get("achieved_sparsity_pruned_layers", 0.0),
        "nonzeros": m["stats"]["nonzeros"],
        "params": m["stats"]["params"],
        "macs_1280x720": m["stats"]["macs_1280x720"],
        "step_ms": round(1000 * run["seconds"] / done, 1) if done else None,
        "threads": threads,
        "folder": str(out),
    }


def start_row(args: argparse.Namespace) -> dict:
    """The checkpoint as it is (no steps), for context."""
    from compress.evaluate import evaluate, model_stats
    from compress.intake import ModelSpec, load_model
    from edgesr.datasets import load_test_set

    loaded = load_model(ModelSpec(checkpoint=Path(args.checkpoint)))
    scores = evaluate(loaded.model, load_test_set(args.test_set, loaded.scale), loaded.scale)["mean"]
    stats = model_stats(loaded.model, loaded.scale)
    return {"row": "checkpoint", "target": 0.0, "seed": None, "psnr_y_db": scores["psnr_y_db"],
            "ssim_y": scores["ssim_y"], "sparsity_pruned_layers": 0.0, "nonzeros": stats["nonzeros"],
            "params": stats["params"], "macs_1280x720": stats["macs_1280x720"], "step_ms": None}  # fmt: skip


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (row, target): the mean over seeds, half the range, and Δ against dense-ft's mean."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["row"], r["target"]), []).append(r)
    dense = {
        name: statistics.fmean(r["psnr_y_db"] for r in rows if r["row"] == name and "error" not in r)
        for name in (DENSE_FT, DENSE_HR)
        if any(r["row"] == name and "error" not in r for r in rows)
    }
    ref = max(dense.values()) if dense else None  # the better dense fine-tune: what the same steps could give
    out = []
    for (name, target), rs in groups.items():
        psnr = [r["psnr_y_db"] for r in rs]
        mean = statistics.fmean(psnr)
        steps = [r["step_ms"] for r in rs if r["step_ms"] is not None]
        out.append({
            "row": name, "target": target, "seeds": [r["seed"] for r in rs], "psnr_y_db": mean,
            "spread_db": (max(psnr) - min(psnr)) / 2, "delta_db": None if ref is None else mean - ref,
            "ssim_y": statistics.fmean(r["ssim_y"] for r in rs),
            "sparsity_pruned_layers": statistics.fmean(r["sparsity_pruned_layers"] for r in rs),
            "nonzeros": round(statistics.fmean(r["nonzeros"] for r in rs)),
            "params": round(statistics.fmean(r["params"] for r in rs)),
            "macs_1280x720": statistics.fmean(r["macs_1280x720"] for r in rs),
            "step_ms": round(statistics.fmean(steps), 1) if steps else None,
        })  # fmt: skip
    return out


def table(summary: list[dict], errors: list[dict], args: argparse.Namespace, threads: int) -> str:
    lines = [
        f"Pruning trade-off ({args.suite}): {args.checkpoint} on {args.test_set} (Y-PSNR, border = scale), "
        f"{args.steps} steps per run, seeds {args.seeds}, device {args.device}, layers '{args.layers}'"
        + (f", FMP weight sparsity {args.weight_sparsity}" if args.suite == "channels" else "")
        + (f", extra flags '{args.extra}'" if args.extra else ""),
        "",
        "| row | target | zeros (pruned layers) | params | non-zeros | GMACs 1280x720 | Y-PSNR (dB) "
        "| Δ vs best dense-ft (dB) | SSIM | step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        delta = "—" if r["delta_db"] is None else f"{r['delta_db']:+.3f}"
        spread = f" ± {r['spread_db']:.3f}" if len(r["seeds"]) > 1 else ""
        lines.append(
            f"| {r['row']} | {r['target']:g} | {r['sparsity_pruned_layers']:.2%} | {r['params']:,} | "
            f"{r['nonzeros']:,} | {r['macs_1280x720'] / 1e9:.2f} | {r['psnr_y_db']:.3f}{spread} | {delta} | "
            f"{r['ssim_y']:.4f} | {r['step_ms'] if r['step_ms'] is not None else '—'} |"
        )
    for e in errors:
        lines.append(f"| {e['row']} | {e['target']:g} | failed (seed {e['seed']}): {e['error']} |" + " |" * 7)
    lines += [
        "",
        f"target: the sparsity (weights suite) or the kept fraction of non-zero parameters (channels suite). "
        f"dense-ft: the checkpoint fine-tuned for the same {args.steps} steps with the same loop at peak lr "
        f"{args.dense_lr:g} (distilled from itself, as the pruned rows are: it stays where it is); dense-ft-hr: the "
        "same on HR patches only (--distill 0): what the same steps give the unpruned model. Δ is against the "
        "better of the two. checkpoint: as shipped, no steps. Y-PSNR: mean over seeds, ± half the range. "
        f"step (ms): wall time per optimiser step (batch 16, LR patch 32 unless --extra says otherwise) with "
        f"{threads} torch thread(s) per run and {args.jobs} run(s) at once.",
        "",
        "Commands: " + " ".join(shlex.quote(a) for a in sys.argv),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in (args.targets or SUITES[args.suite]["targets"]).split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = []  # seed by seed: a partial run already holds every row once
    for s in seeds:
        jobs += [] if args.no_dense_ft else [(DENSE_FT, [], 0.0, s)]
        jobs += [] if args.no_dense_ft or args.no_dense_hr else [(DENSE_HR, [], 0.0, s)]
        jobs += [(name, flags, t, s) for t in targets for name, flags in rows_to_run(args)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda j: run_one(args, *j, threads), jobs))
    missing = [r for r in runs if r.pop("missing", False)]
    runs = [r for r in runs if r not in missing]
    errors = [r for r in runs if "error" in r]
    summary = aggregate([start_row(args), *runs])
    text = table(summary, errors, args, threads)
    if missing:
        text += "\n\nNot run (--table-only): " + ", ".join(
            f"{r['row']} {r['target']:g} seed {r['seed']}" for r in missing
        )
    record = {"summary": summary, "runs": runs, "args": {k: str(v) for k, v in vars(args).items()}}
    write_json(args.out / "prune_tradeoff.json", record)
    (args.out / "prune_tradeoff.md").write_text(text + "\n")
    print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
