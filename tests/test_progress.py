"""Progress off a terminal: a few log lines (every 10 %), not thousands of carriage-return redraws."""

from __future__ import annotations

import logging

import pytest

from edgesr.progress import progress


def test_log_lines_every_tenth_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesr")
    bar = progress(range(5, 100), desc="train[x]", total=100, initial=5, unit="step")  # pytest's stderr: no TTY
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(l1="0.0100")
    assert seen == list(range(5, 100))
    lines = [r.getMessage() for r in caplog.records if r.name == "edgesr"]
    assert len(lines) == 10 and all("\r" not in line for line in lines)
    assert lines[0].startswith("train[x]: 10/100 step (10%)") and lines[-1].startswith("train[x]: 100/100 step (100%)")
    assert lines[-1].endswith("l1=0.0100")


def test_counting_by_hand_and_disabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesr")
    bar = progress(None, desc="bench", total=3, unit="run")
    for _ in range(3):
        bar.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "bench: 1/3 run (33%)",
        "bench: 2/3 run (66%)",
        "bench: 3/3 run (100%)",
    ]
    caplog.clear()
    assert list(progress(range(3), desc="quiet", disable=True)) == [0, 1, 2] and not caplog.records


def test_library_warnings_go_to_the_log_file_not_the_console(tmp_path) -> None:
    """A command's own lines stay on the console; Python warnings and libraries' log records below ERROR go to
    $EDGESR_LOG, and one line says how many."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import logging, warnings\n"
        "from edgesr.errors import run_cli\n"
        "def main(argv):\n"
        "    warnings.warn('a deprecated thing', FutureWarning)\n"
        "    logging.getLogger('torchao').warning('Failed to load a CUDA kernel')\n"
        "    logging.getLogger('torchao').error('a real library error')\n"
        "    logging.getLogger('convert').info('wrote the manifest')\n"
        "    return 0\n"
        "raise SystemExit(run_cli(main, []))\n"
    )
    log = tmp_path / "w.log"
    env = {**os.environ, "EDGESR_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "wrote the manifest" in proc.stderr and "a real library error" in proc.stderr
    assert "deprecated" not in proc.stderr and "CUDA kernel" not in proc.stderr
    assert f"(2 library warning(s) logged to {log})" in proc.stderr
    text = log.read_text()
    assert "a deprecated thing" in text and "Failed to load a CUDA kernel" in text
