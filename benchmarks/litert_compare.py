"""Benchmark: edgesr's device runner against Google's own `litert-benchmark` on the same files, side by side.

For every .tflite (bare files or convert output folders), interleaved for --rounds rounds:
  - `litert-benchmark --model F --num_threads T --warmup_runs W --num_runs R` (ai-edge-litert's tool, the
    CompiledModel API, random inputs), under `/usr/bin/time -v`;
  - edgesr's runner on a job for the same file (Interpreter API, a real photo crop as the timed tile; the same
    threads, warm-up and runs), under `/usr/bin/time -v`.
It prints, per file, the medians of one invoke from both tools and their ratio (runner / litert-benchmark), and
the ratio of the runner's own peak RSS figure (VmHWM over the whole run, `run_peak_rss_mb`) to /usr/bin/time's
maximum resident set size of the same process (the kernel's ru_maxrss). The goal is both within 5 %. It asserts
nothing; --out keeps the raw figures as JSON.

    python benchmarks/litert_compare.py runs/demo/convert runs/demo/convert-unpruned --rounds 3 --out runs/litert

The runner measures memory per phase by resetting VmHWM (clear_refs) where the kernel allows it, else with one
process per phase; it is run both ways (`memory_phases` auto and process), and both figures are printed against
/usr/bin/time's.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device_bench.artifacts import resolve_artifacts  # noqa: E402
from device_bench.bench import BenchConfig  # noqa: E402
from device_bench.jobs import write_job  # noqa: E402
from device_bench.targets import default_device_python  # noqa: E402
from edgesr.datasets import load_test_set  # noqa: E402
from edgesr.manifest import provenance, write_json  # noqa: E402

log = logging.getLogger("litert_compare")
RUNNER = REPO / "device_bench" / "runner.py"
MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("artifacts", nargs="+", type=Path, help=".tflite files or convert output folders")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per file (default 3)")
    p.add_argument("--runs", type=int, default=50, help="timed invokes per tool and round (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed invokes first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both tools (default 1)")
    p.add_argument("--device-python", type=Path, help="the device venv's python (default .venv-device)")
    p.add_argument("--out", type=Path, help="write the raw figures to <out>/litert_compare.json")
    return p.parse_args(argv)


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run under GNU time -v: the process and its maximum resident set size in MiB."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    m = MAX_RSS.search(proc.stderr)
    if not m:
        raise RuntimeError("/usr/bin/time printed no maximum resident set size")
    return proc, int(m[1]) / 1024


def litert_benchmark(python: Path, model: Path, args: argparse.Namespace, tmp: Path) -> dict:
    tool = python.parent / "litert-benchmark"
    result = tmp / "litert.json"
    cmd = [str(tool), f"--model={model}", f"--num_threads={args.threads}", f"--warmup_runs={args.warmup}"]
    _, max_rss = timed([*cmd, f"--num_runs={args.runs}", f"--result_json={result}"])
    lat = json.loads(result.read_text())["latency"]
    return {"median_ms": lat["median_ms"], "mean_ms": lat["avg_ms"], "time_max_rss_mb": max_rss}


def edgesr_runner(python: Path, job_dir: Path, memory_phases: str) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    (job_dir / "job.json").write_text(json.dumps({**job, "memory_phases": memory_phases}))
    _, max_rss = timed([str(python), str(RUNNER), "--job", str(job_dir / "job.json")])
    r = json.loads((job_dir / "out" / "result.json").read_text())
    return {
        "median_ms": r["latency_ms"]["median"],
        "mean_ms": r["latency_ms"]["mean"],
        "run_peak_rss_mb": r["run_peak_rss_mb"],
        "time_max_rss_mb": max_rss,
        "method": r["memory"]["method"],
        "runtime": f"{r['runtime']['name']} {r['runtime']['version']}",
        "delegate": r["delegate"]["name"],
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    python = default_device_python(args.device_python)
    artifacts, _ = resolve_artifacts(tuple(args.artifacts), None)
    figures = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for a in artifacts:
            if a.runtime_requirements.get("xnnpack") is False:
                log.info("%s: skipped (XNNPACK cannot run it; litert-benchmark has no switch for that)", a.key)
                continue
            job_dir = tmp / a.key
            cfg = BenchConfig(
                artifacts=(a.path,), out=tmp, threads=args.threads, warmup=args.warmup, runs=args.runs, min_seconds=0
            )
            write_job(job_dir, a, load_test_set("butterfly", a.scale or 2)[:1], cfg)
            rounds = []
            for i in range(args.rounds):  # interleaved, so drifts (thermal, other load) hit both tools alike
                theirs = litert_benchmark(python, a.path, args, tmp)
                ours = edgesr_runner(python, job_dir, "auto")
                ours_process = edgesr_runner(python, job_dir, "process")
                rounds.append({"litert": theirs, "runner": ours, "runner_process": ours_process})
                log.info(
                    "%s round %d: runner %.2f ms, litert-benchmark %.2f ms",
                    a.key,
                    i + 1,
                    ours["median_ms"],
                    theirs["median_ms"],
                )
            figures.append({"artifact": a.key, "file": str(a.path), "tile": a.tile, "rounds": rounds})
    lines = [
        f"litert_compare: {args.rounds} interleaved rounds, {args.threads} thread(s), {args.warmup} warm-up + "
        f"{args.runs} timed invokes per tool and round; medians over rounds of each round's median",
        "",
        "| artifact | runner ms | litert-benchmark ms | ratio | runner peak MiB (clear_refs) | time max RSS MiB "
        "| ratio | runner peak MiB (process) | time max RSS MiB | ratio | litert-benchmark max RSS MiB |",
        "|" + "---|" * 11,
    ]
    for f in figures:

        def med(tool: str, key: str, f: dict = f) -> float:
            return statistics.median(r[tool][key] for r in f["rounds"])

        theirs_rss = med("litert", "time_max_rss_mb")
        ours, theirs = med("runner", "median_ms"), med("litert", "median_ms")
        peak, rss = med("runner", "run_peak_rss_mb"), med("runner", "time_max_rss_mb")
        ppeak, prss = med("runner_process", "run_peak_rss_mb"), med("runner_process", "time_max_rss_mb")
        f["summary"] = {
            "latency_ratio": ours / theirs,
            "peak_ratio_clear_refs": peak / rss,
            "peak_ratio_process": ppeak / prss,
        }
        lines.append(
            f"| {f['artifact']} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.3f} | {peak:.1f} | {rss:.1f} "
            f"| {peak / rss:.3f} | {ppeak:.1f} | {prss:.1f} | {ppeak / prss:.3f} | {theirs_rss:.1f} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("rounds", "runs", "warmup", "threads")}
        write_json(
            args.out / "litert_compare.json", {"settings": settings, "provenance": provenance(), "files": figures}
        )
        (args.out / "litert_compare.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
