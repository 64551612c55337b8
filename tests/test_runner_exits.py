"""One classification of runner exits for every target (local subprocess, ssh and adb shells), on real process
exits, and the dependency direction between the device-side packages."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from device_bench.targets import check_runner_exit
from edgesr.errors import BadInput, TargetFailed


def sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True)


def test_a_killed_local_runner_names_the_signal() -> None:
    proc = sh("kill -KILL $$")  # a local subprocess: Python sees -9
    assert proc.returncode == -9
    with pytest.raises(
        TargetFailed, match=r"^target t: job x: runner killed by SIGKILL \(out of memory\?\) \(log: l\)$"
    ):
        check_runner_exit("t", "job x", proc.returncode, proc.stderr, " (log: l)")


def test_a_runner_killed_behind_a_shell_is_128_plus_the_signal() -> None:
    proc = sh("sh -c 'kill -TERM $$'")  # what ssh and adb shell report: the remote shell's 128 + 15
    assert proc.returncode == 143
    with pytest.raises(TargetFailed, match="runner killed by SIGTERM$"):
        check_runner_exit("pi", "describe m", proc.returncode, proc.stderr, shell=True)
    with pytest.raises(TargetFailed, match=r"failed \(exit 143\)"):  # a local process exiting 143 was not killed
        check_runner_exit("local", "describe m", proc.returncode, proc.stderr)


def test_a_missing_device_python_behind_a_shell() -> None:
    proc = sh("/nonexistent/python3 runner.py")
    assert proc.returncode == 127
    with pytest.raises(TargetFailed, match=r"exit 127\): /nonexistent/python3 not found on the device"):
        check_runner_exit("pi", "job j", proc.returncode, proc.stderr, shell=True, python="/nonexistent/python3")


def test_model_errors_are_bad_input_and_other_errors_keep_the_runners_line() -> None:
    bad = sh(
        "echo 'XNNPACK chatter' >&2; "
        "echo 'runner error [invalid-model]: m.tflite: not a valid TFLite model' >&2; exit 2"
    )
    with pytest.raises(BadInput, match="^m.tflite: not a valid TFLite model$"):
        check_runner_exit("t", "describe m", bad.returncode, bad.stderr)
    other = sh("echo 'runner error [failed]: RuntimeError: boom' >&2; exit 1")
    with pytest.raises(TargetFailed, match=r"^target t: job j failed \(exit 1\): RuntimeError: boom$"):
        check_runner_exit("t", "job j", other.returncode, other.stderr, shell=True)
    check_runner_exit("t", "job j", 0, "")  # success returns


def _imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_android_harness_depends_on_nothing_of_device_bench() -> None:
    imported = _imports(REPO / "android_harness")
    assert "device_bench" not in imported and "torch" not in imported and "compress" not in imported
