"""Fleets and faults, through the real CLI: several targets in one run, one killed mid-run and one that cannot
start, results on disk as they arrive, resume and --fresh, and the report's sections for all of it.

The targets are local-kind (`type: local` entries in a targets file) whose device Python is a small shell script
in front of the device venv's python: it logs every runner job it starts (so runs are counted, not guessed) and
SIGKILLs itself at the N-th job when told to — the runner process really dies mid-run.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import TILE, find_device_python, run_module
from edgesr.datasets import builtin_hr_images
from edgesr.images import save_png
from edgesr.manifest import sha256

PLOTS = ("psnr_vs_size.png", "psnr_vs_peak_rss.png", "psnr_vs_latency.png")


def wrapper(folder: Path, name: str) -> Path:
    """A device 'python' that appends a line to <name>.calls per runner job and dies at job number <name>.die_at."""
    script = folder / f"python-{name}"
    calls, die_at = folder / f"{name}.calls", folder / f"{name}.die_at"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do\n'
        '  if [ "$a" = "--job" ]; then\n'
        f'    echo job >> "{calls}"\n'
        f'    if [ -f "{die_at}" ] && [ "$(wc -l < "{calls}")" -ge "$(cat "{die_at}")" ]; then kill -KILL $$; fi\n'
        "  fi\n"
        "done\n"
        f'exec "{find_device_python()}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def calls(folder: Path, name: str) -> int:
    path = folder / f"{name}.calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_tflite: tuple[Path, object]) -> dict:
    """Two different .tflite files (edsr-tiny x2, two seeds), two photo crops, wrappers and a targets file."""
    import torch

    from compress.models import create_model
    from convert.tflite import convert_tflite

    root = tmp_path_factory.mktemp("fleet")
    models = root / "models"
    models.mkdir()
    first = models / "seed0.tflite"
    shutil.copyfile(tiny_tflite[0], first)
    torch.manual_seed(1)
    second = models / "seed1.tflite"
    convert_tflite(create_model("edsr-tiny", scale=2).eval(), second, TILE)
    assert sha256(first) != sha256(second)

    photos = root / "photos"
    photos.mkdir()
    hr = dict(builtin_hr_images("sporco"))
    save_png(photos / "monarch.png", hr["monarch"][80:240, 120:280])  # LR 80x80: 2x2 tiles
    save_png(photos / "sail.png", hr["sail"][0:140, 0:140])  # LR 70x70: 2x2 tiles

    bin_dir = root / "bin"
    bin_dir.mkdir()
    targets_file = root / "targets.yaml"
    targets_file.write_text(
        "targets:\n"
        "  flaky:\n"
        "    type: local\n"
        f"    device_python: {wrapper(bin_dir, 'flaky')}\n"
        "    emulated: true\n"
        "  dead:\n"
        "    type: local\n"
        "    device_python: /nonexistent/python\n"
    )
    return {"models": [first, second], "photos": photos, "bin": bin_dir, "targets_file": targets_file, "root": root}


def bench(fleet: dict, out: Path, targets: str, *extra: object) -> subprocess.CompletedProcess:
    return run_module(
        "device_bench",
        "bench",
        *fleet["models"],
        "--out",
        out,
        "--targets",
        targets,
        "--targets-file",
        fleet["targets_file"],
        "--device-python",
        wrapper(fleet["bin"], "local"),
        "--test-set",
        fleet["photos"],
        "--warmup",
        1,
        "--runs",
        2,
        *extra,
    )


def results_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def failed_fleet(fleet: dict) -> dict:
    """local + flaky (SIGKILLed at its 2nd job) + dead (no device Python): exit 3, the others complete."""
    (fleet["bin"] / "flaky.die_at").write_text("2\n")
    out = fleet["root"] / "out"
    proc = bench(fleet, out, "local,flaky,dead")
    return {"proc": proc, "out": out, "report": json.loads((out / "report.json").read_text())}


def test_one_target_killed_mid_run_exits_3_and_the_others_complete(failed_fleet: dict, fleet: dict) -> None:
    proc, report = failed_fleet["proc"], failed_fleet["report"]
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("flaky" in e and "killed by SIGKILL" in e for e in errors), errors
    assert any("dead" in e and "/nonexistent/python not found" in e for e in errors), errors
    assert report["exit_code"] == 3 and report["passed"] is False

    by_target: dict[str, list[str]] = {}
    for row in report["rows"]:
        by_target.setdefault(row["target"], []).append(row["artifact"])
    assert by_target == {"local": ["seed0.tflite", "seed1.tflite"], "flaky": ["seed0.tflite"]}
    for row in report["rows"]:
        assert row["psnr_y_db"] > 5 and row["peak_rss_mb"] > 10 and row["latency_ms_median"] > 0
        assert set(row["per_image"]) == {"monarch", "sail"}
    # the flaky target ran the same file as local: same outputs, same PSNR
    local0, flaky0 = (
        next(r for r in report["rows"] if r["target"] == t and r["artifact"] == "seed0.tflite")
        for t in ("local", "flaky")
    )
    assert flaky0["psnr_y_db"] == local0["psnr_y_db"]

    failed = {f["target"]: f for f in report["failed_targets"]}
    assert set(failed) == {"flaky", "dead"}
    assert "runner killed by SIGKILL" in failed["flaky"]["reason"] and failed["flaky"]["not_run"] == ["seed1--seed1"]
    assert "not found" in failed["dead"]["reason"] and failed["dead"]["not_run"] == ["seed0--seed0", "seed1--seed1"]
    assert calls(fleet["bin"], "local") == 2 and calls(fleet["bin"], "flaky") == 2  # the 2nd one died


def test_every_finished_measurement_is_in_results_jsonl(failed_fleet: dict, fleet: dict) -> None:
    lines = results_lines(failed_fleet["out"])
    assert sorted((r["key"]["target"], r["row"]["artifact"]) for r in lines) == [
        ("flaky", "seed0.tflite"),
        ("local", "seed0.tflite"),
        ("local", "seed1.tflite"),
    ]
    for record in lines:
        key = record["key"]
        assert key["artifact_sha256"] == sha256(
            fleet["models"][0 if record["row"]["artifact"] == "seed0.tflite" else 1]
        )
        assert (key["threads"], key["warmup"], key["runs"], key["tile"], key["overlap"]) == (1, 1, 2, [64, 64], 16)
        assert key["test_set"]["name"] == str(fleet["photos"]) and len(key["test_set"]["sha256"]) == 64
        assert record["row"]["memory"]["load"]["hwm_mb"] > 10 and record["environment"]["name"] == key["target"]


def test_report_lists_failed_targets_emulated_timings_and_plots(failed_fleet: dict) -> None:
    out, report = failed_fleet["out"], failed_fleet["report"]
    md = (out / "report.md").read_text()
    assert "## Failed targets" in md and "- `dead`: target dead: device Python /nonexistent/python not found" in md
    assert "## Target `flaky` (emulated — timings not meaningful) — FAILED" in md
    assert "frame ms median / p90 (emulated — timings not meaningful)" in md
    assert "## Target `local` (real hardware)" in md and "## Target `dead` (real hardware) — FAILED" in md
    assert md.count("### Memory by phase (MiB)") == 2  # local and flaky measured something; dead did not
    assert report["environment"]["flaky"]["emulated"] is True
    for png in PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per target Pareto fronts: on local, whichever of two equally sized files is better is on the size front
    local = [r for r in report["rows"] if r["target"] == "local"]
    best = max(local, key=lambda r: r["psnr_y_db"])
    assert best["pareto"]["psnr_vs_size"] is True


def test_rerun_resumes_and_fresh_reruns(failed_fleet: dict, fleet: dict) -> None:
    out = failed_fleet["out"]
    (fleet["bin"] / "flaky.die_at").unlink()  # the device is back
    before = {name: calls(fleet["bin"], name) for name in ("local", "flaky")}
    proc = bench(fleet, out, "local,flaky")
    assert proc.returncode == 0, proc.stderr
    # only the one measurement that never finished ran again
    assert calls(fleet["bin"], "local") == before["local"] and calls(fleet["bin"], "flaky") == before["flaky"] + 1
    report = json.loads((out / "report.json").read_text())
    assert report["failed_targets"] == [] and len(report["rows"]) == 4
    resumed = sorted((r["target"], r["artifact"]) for r in report["rows"] if r["resumed"])
    assert resumed == [("flaky", "seed0.tflite"), ("local", "seed0.tflite"), ("local", "seed1.tflite")]
    assert len(results_lines(out)) == 4
    assert "Resumed from results.jsonl" in (out / "report.md").read_text()

    # a setting that changes the numbers is a different measurement
    proc = bench(fleet, out, "local", "--runs", 3)
    assert proc.returncode == 0, proc.stderr
    assert calls(fleet["bin"], "local") == before["local"] + 2

    proc = bench(fleet, out, "local,flaky", "--fresh")
    assert proc.returncode == 0, proc.stderr
    assert calls(fleet["bin"], "local") == before["local"] + 4 and calls(fleet["bin"], "flaky") == before["flaky"] + 3
    lines = results_lines(out)
    assert len(lines) == 4 and all(r["key"]["runs"] == 2 for r in lines)  # --fresh replaced the file
    assert not any(r["resumed"] for r in json.loads((out / "report.json").read_text())["rows"])


def test_a_cut_short_line_is_skipped_and_completed(failed_fleet: dict, fleet: dict, tmp_path: Path) -> None:
    """A crash mid-write leaves half a line: resume ignores it and the next append starts a fresh line."""
    out = tmp_path / "out"
    out.mkdir()
    good = (failed_fleet["out"] / "results.jsonl").read_text().splitlines()
    local0 = next(line for line in good if '"target": "local"' in line and "seed0.tflite" in line)
    (out / "results.jsonl").write_text(local0 + "\n" + local0[: len(local0) // 2])
    before = calls(fleet["bin"], "local")
    proc = bench(fleet, out, "local")
    assert proc.returncode == 0, proc.stderr
    assert calls(fleet["bin"], "local") == before + 1  # seed0 resumed, seed1 measured
    assert "unreadable line skipped" in proc.stderr
    text = (out / "results.jsonl").read_text().splitlines()
    assert len(text) == 3 and json.loads(text[2])["row"]["artifact"] == "seed1.tflite"
