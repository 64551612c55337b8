"""Benchmark: one model through every stage — prune with several methods, evaluate, convert, bench — one table.

For each `--runs` entry NAME=FLAGS (the `compress prune` flags of one method), this runs, as a user would:
`python -m compress prune --checkpoint CKPT FLAGS`, `python -m compress eval` of the result with both LR
degradations (Pillow and MATLAB bicubic), `python -m convert` to TFLite and Core ML (fp32, dense and sparse), and
finally one `python -m device_bench bench` over every converted folder (the unpruned model's too) on the local
target. Finished steps are reused when re-run (delete a folder to redo it). It prints a Markdown table and writes
it to <out>/pipeline_table.md with the raw figures in pipeline_table.json; it asserts nothing.

    python benchmarks/pipeline_table.py --checkpoint pretrained:rdn-psnr-small-x2 --out runs/rdn-table \\
        --run "magnitude 80%=--method magnitude --sparsity 0.8 --layers default --steps 400" \\
        --run "channel-l1 50%=--method channel-l1 --params 0.5 --steps 400"
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgesr.manifest import read_json, write_json  # noqa: E402

log = logging.getLogger("pipeline_table")
MEAN_LINE = re.compile(r"^mean\s+([0-9.]+) dB\s+SSIM ([0-9.]+)\s+\(bicubic ([0-9.]+) dB\)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--checkpoint", required=True, help="the model every run starts from (any compress intake)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run", action="append", default=[], help="NAME=compress prune flags (repeat)")
    p.add_argument("--test-set", default="sporco", help="compress eval's test set (default sporco)")
    p.add_argument("--tile", type=int, default=128, help="convert --tile (default 128)")
    p.add_argument("--bench-test-set", default="butterfly", help="device_bench's test set (default butterfly)")
    p.add_argument("--bench-runs", type=int, default=10, help="device_bench --runs (default 10)")
    p.add_argument("--jobs", type=int, default=2, help="prune runs in parallel, one torch thread each (default 2)")
    return p.parse_args(argv)


def _run(cmd: list[str], log_path: Path) -> None:
    log.info("running %s", shlex.join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as fh:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"exit {r.returncode}: {' '.join(tail)} ({log_path})")


def _eval(model: str, test_set: str, degradation: str, folder: Path) -> dict:
    path = folder / f"eval-{degradation}.json"
    if not path.exists():
        cmd = [sys.executable, "-m", "compress", "eval", "--checkpoint", model, "--test-set", test_set]
        _run(cmd + ["--degradation", degradation], folder / f"eval-{degradation}.log")
        for line in (folder / f"eval-{degradation}.log").read_text().splitlines():
            if m := MEAN_LINE.match(line.strip()):
                write_json(path, {"psnr_y_db": float(m[1]), "ssim_y": float(m[2]), "bicubic_psnr_y_db": float(m[3])})
    return read_json(path)


def stage(args: argparse.Namespace, name: str, flags: str | None) -> dict:
    """prune (unless `flags` is None: the unpruned model), eval twice, convert; the row's figures."""
    folder = args.out / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    folder.mkdir(parents=True, exist_ok=True)
    model = args.checkpoint
    row: dict = {"name": name, "flags": flags, "folder": str(folder)}
    if flags is not None:
        model = str(folder / "pruned" / "model.pt")
        if not Path(model).exists():
            cmd = [sys.executable, "-m", "compress", "prune", "--checkpoint", args.checkpoint, *shlex.split(flags)]
            _run(cmd + ["--test-set", args.test_set, "--out", str(folder / "pruned")], folder / "prune.log")
        m = read_json(folder / "pruned" / "manifest.json")
        row.update(steps=m["train"]["steps"], seconds=m["train"]["seconds"], lr=m["train"]["config"]["lr"])
    for degradation in ("pillow", "matlab"):
        row[degradation] = _eval(model, args.test_set, degradation, folder)
    if not (folder / "convert" / "manifest.json").exists():
        cmd = [sys.executable, "-m", "convert", "--checkpoint", model, "--formats", "tflite,coreml"]
        _run(cmd + ["--tile", str(args.tile), "--name", name, "--out", str(folder / "convert")], folder / "convert.log")
    c = read_json(folder / "convert" / "manifest.json")
    row["artifacts"] = {
        a["file"]: {
            "size_bytes": a["size_bytes"],
            "nonzeros": a["weights"]["nonzeros"],
            "conv_weights": a["weights"]["conv_weights"],
            "max_abs_error": a["parity"]["max_abs_error"],
            "quality_psnr_y_db": (a.get("quality") or {}).get("psnr_y_db"),
        }
        for a in c["artifacts"]
    }
    return row


def bench(args: argparse.Namespace, rows: list[dict]) -> dict:
    out = args.out / "bench"
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "device_bench", "bench", *[str(Path(r["folder"]) / "convert") for r in rows]]
        cmd += ["--targets", "local", "--test-set", args.bench_test_set, "--runs", str(args.bench_runs)]
        _run(cmd + ["--out", str(out)], args.out / "bench.log")
    return read_json(out / "report.json")


def table(args: argparse.Namespace, rows: list[dict], report: dict) -> str:
    by = {(r["model"], r["file"] if "file" in r else r.get("artifact")): r for r in report.get("rows", [])}
    lines = [
        f"`{args.checkpoint}` through every stage. Y-PSNR: `compress eval` on {args.test_set} (torch, whole images, "
        "border = scale), LR by Pillow / MATLAB bicubic. Files: `convert --formats tflite,coreml --tile "
        f"{args.tile}` (fp32); parity = max abs error vs torch on a photo tile (TFLite in ai-edge-litert, Core ML in "
        f"edgesr's MIL executor). Bench: `device_bench bench --targets local --test-set {args.bench_test_set} "
        f"--runs {args.bench_runs}` (1 thread, XNNPACK, {args.tile}-px tiles; median tile latency; peak RSS = the "
        "runner process's VmHWM).",
        "",
        "| model | Y-PSNR Pillow / MATLAB (dB) | file | size (KB) | non-zeros | parity | tile latency (ms) "
        "| peak RSS (MB) | bench Y-PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = f"{r['pillow']['psnr_y_db']:.3f} / {r['matlab']['psnr_y_db']:.3f}"
        for i, (file, a) in enumerate(r["artifacts"].items()):
            b = by.get((r["name"], file), {})
            lat = b.get("latency_ms_median")
            rss = b.get("peak_rss_mb")
            bp = b.get("psnr_y_db")
            lines.append(
                f"| {r['name'] if i == 0 else ''} | {psnr if i == 0 else ''} | {file} | {a['size_bytes'] / 1024:.1f} "
                f"| {a['nonzeros']:,} | {a['max_abs_error']:.1e} | {'-' if lat is None else f'{lat:.1f}'} "
                f"| {'-' if rss is None else f'{rss:.1f}'} | {'-' if bp is None else f'{bp:.3f}'} |"
            )
    bic = rows[0]["pillow"]["bicubic_psnr_y_db"], rows[0]["matlab"]["bicubic_psnr_y_db"]
    lines += ["", f"Bicubic on the same images: {bic[0]:.3f} / {bic[1]:.3f} dB. Core ML files are not benched (Linux)."]
    lines += [""] + [f"- {r['name']}: `compress prune --checkpoint {args.checkpoint} {r['flags']}`" for r in rows[1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [("unpruned", None)] + [tuple(r.split("=", 1)) for r in args.run]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda nr: stage(args, nr[0], nr[1]), runs))
    report = bench(args, rows)
    text = table(args, rows, report)
    write_json(args.out / "pipeline_table.json", {"rows": rows, "bench": report.get("rows", [])})
    (args.out / "pipeline_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
