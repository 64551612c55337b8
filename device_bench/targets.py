"""Where models run. A target takes a job folder in and gives a job folder back: files only.

`LocalTarget` runs `runner.py` in a separate process with the device Python (a venv holding only a TFLite
runtime and numpy), so the measured process never contains torch and memory figures are the runner's alone.
ssh and adb targets implement the same three calls: push the job folder, run the runner, pull `<out_dir>`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import signal
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_bench.coreml_engine import COMPUTE_UNITS  # noqa: F401 (the targets file's choices)
from device_bench.runner import EXIT_INVALID
from device_bench.target_config import EntryFields, load_targets_file
from edgesr.errors import BadInput, TargetFailed

log = logging.getLogger("device_bench")

RUNNER = Path(__file__).with_name("runner.py")
# What a runner target copies to the device: the runner, and for Core ML jobs its engine and the MIL executor.
RUNNER_FILES = {name: Path(__file__).with_name(name) for name in ("runner.py", "coreml_engine.py", "mil_exec.py")}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_PYTHON_ENV = "EDGESR_DEVICE_PYTHON"
# Runner error kinds that mean "the user's model is unusable" (exit 2) rather than "the target failed" (exit 3).
MODEL_ERRORS = ("invalid-model", "unsupported-model")


class Target(ABC):
    """A device that can describe a model and run a benchmark job folder."""

    name: str
    emulated: bool  # True for emulators/VMs: their numbers prove correctness and plumbing, never speed
    formats: tuple[str, ...] = ("tflite",)  # the artifact formats it can run; others are skipped with a note
    compute_units: str = "ALL"  # Core ML jobs: MLModel's compute units (targets that run Core ML set it)

    @abstractmethod
    def describe(self, model: Path) -> dict[str, Any]:
        """The model's input/output shapes, tile and scale, and the runtime that would run it."""

    @abstractmethod
    def run(self, job_dir: Path) -> dict[str, Any]:
        """Run `job_dir/job.json`; on return `job_dir/<out_dir>/` holds result.json and the SR .npy outputs."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What the report's environment block says about this target."""


def default_device_python(flag: str | os.PathLike | None = None) -> Path:
    """The device Python: the --device-python flag, else $EDGESR_DEVICE_PYTHON, else <repo>/.venv-device."""
    if flag:
        return Path(flag)
    if os.environ.get(DEVICE_PYTHON_ENV):
        return Path(os.environ[DEVICE_PYTHON_ENV])
    venv = REPO_ROOT / ".venv-device" / "bin" / "python"
    if venv.exists():
        return venv
    raise BadInput(
        f"no device Python: {venv} does not exist (make setup builds it); pass --device-python or set "
        f"{DEVICE_PYTHON_ENV}"
    )


@dataclass
class LocalTarget(Target):
    """This machine, through a separate runner process in the device venv."""

    device_python: Path
    timeout_s: float = 600.0
    runtime: str = "auto"
    name: str = "local"
    emulated: bool = False
    compute_units: str = "ALL"
    formats = ("tflite", "coreml")

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any], base_dir: Path) -> LocalTarget:
        """A second local target from the targets file (`type: local`), e.g. another device venv."""
        f = EntryFields(name, entry, base_dir)
        device_python = f.path("device_python", None, must_exist=False)
        target = cls(
            device_python=device_python if device_python is not None else default_device_python(None),
            timeout_s=f.number("timeout_s", 600.0),
            runtime=f.runtime(),
            name=name,
            emulated=f.flag("emulated", False),
            compute_units=f.choice("compute_units", COMPUTE_UNITS, "ALL"),
        )
        f.check_unknown()
        return target

    def _call(self, args: list[str], what: str, cwd: Path, log_path: Path | None = None) -> str:
        cmd = [str(self.device_python), str(RUNNER), *args, "--runtime", self.runtime]
        log.debug("%s: %s", self.name, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, cwd=cwd)
        except FileNotFoundError:
            raise TargetFailed(f"target {self.name}: device Python {self.device_python} not found") from None
        except PermissionError:
            raise TargetFailed(f"target {self.name}: device Python {self.device_python} is not executable") from None
        except OSError as exc:
            raise TargetFailed(f"target {self.name}: cannot start {self.device_python}: {exc.strerror}") from None
        except subprocess.TimeoutExpired as exc:
            if log_path is not None:
                log_path.write_text(_text(exc.stderr))
            where = f" (log: {log_path})" if log_path is not None else ""
            raise TargetFailed(f"target {self.name}: {what} timed out after {self.timeout_s:g} s{where}") from None
        where = f" (log: {log_path})" if log_path is not None else ""
        if log_path is not None:
            log_path.write_text(proc.stderr)
        check_runner_exit(self.name, what, proc.returncode, proc.stderr, where)
        return proc.stdout

    def describe(self, model: Path) -> dict[str, Any]:
        model = Path(model).resolve()
        out = self._call(["--describe", str(model)], f"describe {model.name}", cwd=model.parent)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TargetFailed(f"target {self.name}: describe printed no JSON: {out[-200:]!r}") from None

    def run(self, job_dir: Path) -> dict[str, Any]:
        job_dir = Path(job_dir).resolve()
        log_path = job_dir / "runner.log"
        self._call(["--job", str(job_dir / "job.json")], f"job {job_dir.name}", cwd=job_dir, log_path=log_path)
        out_dir = job_dir / json.loads((job_dir / "job.json").read_text())["out_dir"]
        try:
            return json.loads((out_dir / "result.json").read_text())
        except (OSError, ValueError) as exc:
            raise TargetFailed(f"target {self.name}: runner wrote no readable result.json ({exc})") from None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "local",
            "emulated": self.emulated,
            "device_python": str(self.device_python),
            "host": platform.node(),
            "runtime_choice": self.runtime,
            "compute_units": self.compute_units,
            "timeout_s": self.timeout_s,
        }


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


# The device facts every remote target reports under these keys (info(); the report shows them first): what the
# device is, its OS and kernel, CPU and governor (a powersave governor halves the speed), memory.
DEVICE_FACTS = ("device_model", "os", "kernel", "machine", "cpu_model", "cpu_count", "cpu_governor", "mem_total_mb")
SHELL_SIGNAL_BASE = 128  # a POSIX shell (ssh, adb shell) reports a child killed by signal N as 128 + N
SHELL_NOT_FOUND = 127


def check_runner_exit(
    target: str, what: str, rc: int, stderr: str, where: str = "", shell: bool = False, python: str | None = None
) -> None:
    """The one classification of a runner's exit, for every target: 0 returns; exit 2 with a model error kind is
    BadInput (the model is unusable: exit 2 for the command); a runner killed by a signal (a negative code from a
    local subprocess, 128 + N through a remote shell) is TargetFailed naming the signal (SIGKILL: "out of
    memory?"); a shell's 127 is the device Python missing; anything else is TargetFailed with the runner's own
    one-line error. `where` (e.g. " (log: ...)") is appended to the message."""
    if rc == 0:
        return
    kind, reason = runner_error(stderr)
    if rc == EXIT_INVALID and kind in MODEL_ERRORS:
        raise BadInput(reason)
    signum = -rc if rc < 0 else (rc - SHELL_SIGNAL_BASE if shell and rc > SHELL_SIGNAL_BASE else None)
    if signum is not None:
        try:
            sig = signal.Signals(signum).name
        except ValueError:
            sig = f"signal {signum}"
        hint = " (out of memory?)" if sig == "SIGKILL" else ""
        raise TargetFailed(f"target {target}: {what}: runner killed by {sig}{hint}{where}")
    if shell and rc == SHELL_NOT_FOUND and python:
        reason = f"{python} not found on the device ({reason})"
    raise TargetFailed(f"target {target}: {what} failed (exit {rc}): {reason}{where}")


def runner_error(stderr: str) -> tuple[str, str]:
    """(kind, message) from the runner's one-line error; the runtime's own chatter on stderr is skipped."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("runner error ["):
            kind, _, message = line[len("runner error [") :].partition("]: ")
            return kind, message
    return "failed", lines[-1][:300] if lines else "no error message"


# Targets that need no targets file.
TARGET_KINDS = ("local",)
# `type:` in the targets file -> "module:Class" (imported on use; each class has from_config(name, entry, base_dir)).
TARGET_TYPES: dict[str, str] = {
    "local": "device_bench.targets:LocalTarget",
    "ssh": "device_bench.ssh_target:SSHTarget",
    "adb": "device_bench.adb_target:ADBTarget",
}


def target_class(kind: str) -> type[Target]:
    module_name, _, class_name = TARGET_TYPES[kind].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_targets(
    names: list[str],
    device_python: str | os.PathLike | None,
    timeout_s: float,
    runtime: str,
    targets_file: str | os.PathLike | None = None,
) -> list[Target]:
    """Targets by name: `local` is built in; other names come from the targets file (see target_config).

    An entry that sets no `timeout_s` or `runtime` gets the command line's.
    """
    entries = load_targets_file(targets_file) if targets_file is not None else {}
    targets: list[Target] = []
    for name in dict.fromkeys(names):
        if name in entries:
            entry = entries[name]
            if entry["type"] not in TARGET_TYPES:
                raise BadInput(
                    f"{targets_file}: target {name}: unknown type {entry['type']!r}; known: {', '.join(TARGET_TYPES)}"
                )
            try:
                targets.append(
                    target_class(entry["type"]).from_config(
                        name, {"timeout_s": timeout_s, "runtime": runtime, **entry}, Path(targets_file).parent
                    )
                )
            except BadInput as exc:
                raise BadInput(f"{targets_file}: {exc}") from None
        elif name in TARGET_KINDS:
            targets.append(LocalTarget(default_device_python(device_python), timeout_s=timeout_s, runtime=runtime))
        else:
            available = [*TARGET_KINDS, *entries]
            hint = "" if targets_file is not None else " (remote targets are named in a --targets-file)"
            raise BadInput(f"unknown target '{name}'; available: {', '.join(available)}{hint}")
    return targets
