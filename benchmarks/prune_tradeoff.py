"""Benchmark: PSNR and step time of dense, gradual magnitude pruning and IKS at several sparsities, one table.

Every pruned row is a real `python -m compress prune` run from the same dense checkpoint with the same data,
steps, batch, learning rate, seed and layer set (default: the architecture's sparse layers, e.g. EDSR's body
convs, which is what IKS gates), so the rows differ only by method and target. The dense row is the starting
checkpoint itself; its step time is a plain training step of the same model (no pruner), timed in-process.

    python benchmarks/prune_tradeoff.py --checkpoint checkpoints/edsr-tiny-x2/model.pt --steps 1000 \\
        --out runs/bench-prune --jobs 2

Runs are kept in --out/<method>-<target>/ and resumed or reused when re-run (delete the folder to redo one).
This is a benchmark: it prints figures and writes --out/prune_tradeoff.{json,md}; it asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints/edsr-tiny-x2/model.pt")
    p.add_argument("--out", type=Path, default=REPO / "runs/bench-prune")
    p.add_argument("--suite", default="weights", choices=SUITES, help="weights (default) or channels")
    p.add_argument(
        "--targets",
        help="comma list: sparsities (weights suite, default 0.5,0.8,0.9) or kept params "
        "fractions (channels suite, default 0.5,0.3)",
    )
    p.add_argument("--methods", help="methods to compare (default: the suite's)")
    p.add_argument("--weight-sparsity", type=float, default=0.3, help="channels suite: FMP's weight sparsity (0.3)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps per run, every method (default 1000)")
    p.add_argument("--layers", default="default", help="layer set for every method (default: the arch's sparse set)")
    p.add_argument("--test-set", default="sporco")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel; threads are split between them")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--extra", default="", help="extra flags passed to every `compress prune` run, as one string")
    return p.parse_args(argv)


def run_prune(args: argparse.Namespace, method: str, target: float, threads: int) -> dict:
    out = args.out / f"{method}-{target:g}"
    if (out / "manifest.json").exists():
        log.info("reusing %s", out)
    else:
        cmd = [sys.executable, "-m", "compress", "prune", "--checkpoint", str(args.checkpoint), "--method", method]
        if args.suite == "weights":
            cmd += ["--sparsity", str(target), "--layers", args.layers]
        else:
            cmd += ["--params", str(target)]
            cmd += ["--weight-sparsity", str(args.weight_sparsity)] if method == "fmp" else []
        cmd += ["--steps", str(args.steps)]
        cmd += ["--test-set", args.test_set, "--device", args.device, "--out", str(out), *args.extra.split()]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        log.info("running %s", " ".join(cmd))
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "w") as fh:
            r = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = (out / "log.txt").read_text().strip().splitlines()[-1:]
            return {"method": method, "target": target, "error": f"exit {r.returncode}: {' '.join(tail)}"}
    m = read_json(out / "manifest.json")
    run = m["train"]
    done = run["steps"] - run["resumed_from"]
    val_s = m["pruning"].get("validation_seconds", 0.0 if m["pruning"]["method"] != "iks" else None)
    return {
        "method": method,
        "target": target,
        "psnr_y_db": m["psnr_y_db"],
        "ssim_y": m["ssim_y"],
        "sparsity_pruned_layers": m["pruning"]["achieved_sparsity_pruned_layers"],
        "sparsity_all_params": m["stats"]["sparsity_all_params"],
        "nonzeros": m["stats"]["nonzeros"],
        "params": m["stats"]["params"],
        "macs_1280x720": m["stats"]["macs_1280x720"],
        "step_ms": round(1000 * run["seconds"] / done, 1) if done else None,
        "validation_ms_per_step": round(1000 * val_s / done, 1) if done and val_s is not None else None,
        "decays": len(m["pruning"].get("decays", [])),
        "threads": threads,
        "folder": str(out),
    }


def dense_row(args: argparse.Namespace, threads: int) -> dict:
    import torch

    from compress.data import PatchSampler
    from compress.evaluate import evaluate, model_stats
    from compress.intake import ModelSpec, load_model
    from compress.train import TrainConfig, TrainData, train
    from edgesr.datasets import load_test_set, load_training_images

    torch.set_num_threads(threads)
    loaded = load_model(ModelSpec(checkpoint=args.checkpoint))
    model, scale = loaded.model, loaded.scale
    scores = evaluate(model, load_test_set(args.test_set, scale), scale)["mean"]
    stats = model_stats(model, scale)
    cfg = TrainConfig(steps=60, device=args.device)
    images = [img for _, img in load_training_images("bundled")]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(model, TrainData(PatchSampler(images, scale, cfg.lr_patch, cfg.batch_size, 0), scale), cfg, Path(tmp))
        step_ms = 1000 * (time.perf_counter() - t0) / cfg.steps
    return {
        "method": "dense",
        "target": 0.0,
        "psnr_y_db": scores["psnr_y_db"],
        "ssim_y": scores["ssim_y"],
        "sparsity_pruned_layers": 0.0,
        "sparsity_all_params": stats["sparsity_all_params"],
        "nonzeros": stats["nonzeros"],
        "params": stats["params"],
        "macs_1280x720": stats["macs_1280x720"],
        "step_ms": round(step_ms, 1),
        "validation_ms_per_step": 0.0,
        "decays": 0,
        "threads": threads,
        "folder": str(args.checkpoint),
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Pruning trade-off ({args.suite}): {args.checkpoint} on {args.test_set} (Y-PSNR, border = scale), "
        f"{args.steps} steps per run, device {args.device}, "
        + (
            f"layers '{args.layers}'"
            if args.suite == "weights"
            else f"target = kept params fraction, FMP weight sparsity {args.weight_sparsity}"
        ),
        "",
        "| method | target | zeros (pruned layers) | zeros (whole model) | params | non-zeros | GMACs 1280x720 "
        "| Y-PSNR (dB) | SSIM | step (ms) | of which validation (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target']:.0%} | failed: {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['method']} | {r['target']:.0%} | {r['sparsity_pruned_layers']:.2%} | "
            f"{r['sparsity_all_params']:.2%} | {r['params']:,} | {r['nonzeros']:,} | {r['macs_1280x720'] / 1e9:.2f} | "
            f"{r['psnr_y_db']:.3f} | {r['ssim_y']:.4f} | "
            f"{r['step_ms']} | {r['validation_ms_per_step']} |"
        )
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    lines += [
        "",
        f"step (ms): wall time per optimiser step (batch 16, LR patch 32) with {threads} torch thread(s) per run; "
        "dense = plain training steps of the starting model; 'of which validation' is IKS's selection PSNR on the "
        "validation set, amortised per step. Whole model = zero fraction of all parameters.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in (args.targets or SUITES[args.suite]["targets"]).split(",")]
    methods = [m.strip() for m in (args.methods or SUITES[args.suite]["methods"]).split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    rows = [dense_row(args, threads)]
    jobs = [(m, t) for t in targets for m in methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows += list(pool.map(lambda mt: run_prune(args, mt[0], mt[1], threads), jobs))
    text = table(rows, args)
    write_json(args.out / "prune_tradeoff.json", {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}})
    (args.out / "prune_tradeoff.md").write_text(text + "\n")
    print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
