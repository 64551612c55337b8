"""A device reached over ssh (a Raspberry Pi, any Linux board): the same runner file as the local target.

Everything goes through the real OpenSSH client. A job takes four commands over one reused connection
(ControlMaster, with the control socket in a private folder of ours):

  1. `mktemp -d` a fresh folder on the device and unpack a tar stream into it (runner.py + the job folder);
  2. run `<python> runner.py --job job/job.json` there with the configured environment and runtime;
  3. stream `<out_dir>` back as tar and unpack it into the local job folder;
  4. remove the device folder (also when a step failed).

File names travel inside tar streams, so spaces, quotes and `;` never meet a shell; the few paths that do appear
in a remote command (the temp folder, python, out_dir) are `shlex.quote`d, and the command itself runs under
`sh -c` so the device user's login shell does not matter. Host keys are verified (StrictHostKeyChecking=yes) unless
the targets file sets `accept_new_host_key` (accept-new). Options the file leaves out (port, user, identity,
known_hosts) are not passed, so `~/.ssh/config` (or the file's `ssh_config`) decides them, which is how aliases
work. BatchMode, ConnectTimeout and ServerAliveInterval/CountMax make an unreachable or dropped device fail fast.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_bench.target_config import EntryFields
from device_bench.targets import COMPUTE_UNITS, RUNNER_FILES, Target, check_runner_exit
from edgesr.errors import BadInput, TargetFailed

log = logging.getLogger("device_bench")

SSH_FAILED = 255  # what the ssh client exits with when ssh itself failed (the remote command's code otherwise)
_REMOTE_TMP = re.compile(r"^/[^\n]*/edgesr\.[A-Za-z0-9]{6,}$")
# The remote shell reports a runner killed by signal N as 128+N.
_SIGNAL_BASE = 128

# One line of what the device is, read with standard tools; each line is `key=value`, missing facts are skipped.
_FACTS_SCRIPT = r"""
echo "kernel=$(uname -sr)"
echo "machine=$(uname -m)"
echo "hostname=$(uname -n)"
if [ -r /proc/device-tree/model ]; then echo "device_model=$(tr -d '\000' < /proc/device-tree/model)"; fi
m=$(grep -m1 -E '^(model name|Model|Hardware)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
[ -n "$m" ] && echo "cpu_model=$m"
p=$(grep -m1 '^CPU part' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
[ -n "$p" ] && echo "cpu_part=$p"
echo "cpu_count=$(getconf _NPROCESSORS_ONLN 2>/dev/null)"
echo "mem_total_kb=$(awk '/^MemTotal:/{print $2}' /proc/meminfo 2>/dev/null)"
if [ -r /etc/os-release ]; then echo "os=$(. /etc/os-release; echo "$PRETTY_NAME")"; fi
g=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null) && echo "cpu_governor=$g"
command -v vcgencmd >/dev/null 2>&1 && echo "throttled=$(vcgencmd get_throttled 2>&1)"
"""


def _quote_option(value: str | os.PathLike) -> str:
    """An `-o Key=value` value: ssh splits it on whitespace unless double-quoted."""
    text = str(value)
    if '"' in text:
        raise BadInput(f"ssh option value {text!r} must not contain a double quote")
    return f'"{text}"' if re.search(r"\s", text) else text


@dataclass
class SSHTarget(Target):
    """A Linux device with Python and a TFLite runtime, reached with `ssh`."""

    name: str
    host: str
    port: int | None = None
    user: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    ssh_config: Path | None = None
    python: str = "python3"
    runtime: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    server_alive_interval_s: int = 5
    server_alive_count_max: int = 3
    emulated: bool = False
    compute_units: str = "ALL"
    formats = ("tflite", "coreml")

    def __post_init__(self) -> None:
        if not self.host or self.host.startswith("-") or re.search(r"[\s'\"`;|&$]", self.host):
            raise BadInput(f"target {self.name}: host {self.host!r} is not a host name, address or ssh alias")
        if self.user is not None and (self.user.startswith("-") or re.search(r"[\s'\"`;|&$@]", self.user)):
            raise BadInput(f"target {self.name}: user {self.user!r} is not a valid user name")
        self._control_dir: Path | None = None
        self._facts: dict[str, Any] | None = None
        self._runtime_seen: dict[str, Any] | None = None
        self._connected = False  # whether a command has completed over ssh (so a later ssh failure is a drop)

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any], base_dir: Path) -> SSHTarget:
        f = EntryFields(name, entry, base_dir)
        target = cls(
            name=name,
            host=f.text("host"),
            port=f.integer("port", None, minimum=1, maximum=65535),
            user=f.text("user", None),
            identity=f.path("identity", None),
            known_hosts=f.path("known_hosts", None, must_exist=False),
            accept_new_host_key=f.flag("accept_new_host_key", False),
            ssh_config=f.path("ssh_config", None),
            python=f.text("python", "python3"),
            runtime=f.runtime(),
            env=f.env(),
            timeout_s=f.number("timeout_s", 600.0),
            connect_timeout_s=f.number("connect_timeout_s", 10.0),
            server_alive_interval_s=f.integer("server_alive_interval_s", 5, minimum=1),
            server_alive_count_max=f.integer("server_alive_count_max", 3, minimum=1),
            emulated=f.flag("emulated", False),
            compute_units=f.choice("compute_units", COMPUTE_UNITS, "ALL"),
        )
        f.check_unknown()
        return target

    # ------------------------------------------------------------------------------------------- ssh plumbing

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_command(self, remote_command: str) -> list[str]:
        """The full `ssh` argument list that runs `remote_command` (a shell string) on the device."""
        if self._control_dir is None:
            self._control_dir = Path(tempfile.mkdtemp(prefix="edgesr-ssh-"))  # 0700: the control socket is ours
            atexit.register(self.close)
        opts: list[str] = []
        if self.ssh_config is not None:
            opts += ["-F", str(self.ssh_config)]
        if self.port is not None:
            opts += ["-p", str(self.port)]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={_quote_option(self.known_hosts)}"]
        opts += [
            "-o",
            f"StrictHostKeyChecking={'accept-new' if self.accept_new_host_key else 'yes'}",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={max(1, math.ceil(self.connect_timeout_s))}",
            "-o",
            f"ServerAliveInterval={self.server_alive_interval_s}",
            "-o",
            f"ServerAliveCountMax={self.server_alive_count_max}",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={_quote_option(self._control_dir / '%C')}",
            "-o",
            "ControlPersist=60",
            "-T",
        ]
        return ["ssh", *opts, self.destination, remote_command]

    def _ssh(
        self, script: str, what: str, stdin: bytes | None = None, timeout_s: float | None = None
    ) -> tuple[int, bytes, str]:
        """Run a POSIX sh script on the device: (exit code, stdout, stderr). ssh's own failures raise TargetFailed.

        stdout/stderr go to files, not pipes: a ControlPersist master forked by this call must not hold our pipes.
        """
        cmd = self.ssh_command("sh -c " + shlex.quote(script))
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    cmd,
                    input=stdin,
                    stdin=subprocess.DEVNULL if stdin is None else None,
                    stdout=out,
                    stderr=err,
                    timeout=timeout_s,
                )
            except FileNotFoundError:
                raise TargetFailed(f"target {self.name}: the ssh client is not installed (openssh-client)") from None
            except subprocess.TimeoutExpired:
                out.seek(0)
                raise _Timeout(out.read(), timeout_s) from None
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read().decode(errors="replace")
        if proc.returncode == SSH_FAILED:
            raise TargetFailed(f"target {self.name}: {what}: {self.ssh_failure(stderr)}")
        self._connected = True
        return proc.returncode, stdout, stderr

    def ssh_failure(self, stderr: str) -> str:
        """A one-line reason from ssh's stderr when ssh itself failed (exit 255)."""
        text = " ".join(stderr.split())
        where = f"{self.destination}" + (f" port {self.port}" if self.port else "")
        checks = [
            ("REMOTE HOST IDENTIFICATION HAS CHANGED", f"host key of {where} has CHANGED (known_hosts mismatch)"),
            (
                "Host key verification failed",
                f"host key verification failed for {where} (unknown or changed key; "
                "add it to known_hosts or set accept_new_host_key: true)",
            ),
            ("Permission denied", f"authentication failed for {where} ({_last_line(stderr)})"),
            ("Could not resolve hostname", f"unreachable: cannot resolve host {self.host}"),
            ("Connection refused", f"unreachable: connection refused by {where}"),
            ("timed out", f"unreachable: {where} did not answer within {self.connect_timeout_s:g} s"),
            ("No route to host", f"unreachable: no route to {where}"),
            ("Network is unreachable", f"unreachable: network unreachable for {where}"),
            ("not responding", f"connection dropped: {where} stopped responding"),
            ("closed by remote host", f"connection dropped: closed by {where}"),
            ("Connection reset", f"connection dropped: reset by {where}"),
            ("Broken pipe", f"connection dropped: broken pipe to {where}"),
            ("Connection closed", f"connection dropped: closed by {where}"),
        ]
        for needle, reason in checks:
            if needle in text:
                return reason
        # No message of ssh's own: stderr is empty or only the remote command's (the runtime's chatter). Whether the
        # shared connection is still up tells a dropped link from a killed remote shell, whatever stderr ends with.
        if (self._connected or not text) and not self._master_alive():
            return f"connection dropped: the ssh connection to {where} closed mid-command"
        if not text:
            return f"the session on {where} ended without an exit status (remote shell killed?)"
        return f"ssh to {where} failed: {_last_line(stderr)}"

    def _master_alive(self) -> bool:
        """Whether the shared (ControlMaster) connection is still up."""
        check = [*self.ssh_command("true")[:-2], "-O", "check", self.destination]
        try:
            return subprocess.run(check, stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def close(self) -> None:
        """Stop the shared connection and remove its private control folder."""
        if self._control_dir is None:
            return
        control = [*self.ssh_command("true")[:-2], "-O", "exit", self.destination]
        try:
            subprocess.run(control, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self._control_dir, ignore_errors=True)
        self._control_dir = None

    # ------------------------------------------------------------------------------------------ remote folder

    def _make_remote_dir(
        self, files: dict[str, Path], folders: dict[str, Path], what: str, skip: set[str] | frozenset = frozenset()
    ) -> str:
        """A fresh `mktemp -d` folder on the device holding `files` and `folders` (name in the folder -> local)."""
        stream = _tar(files, folders, skip)
        script = 'd=$(mktemp -d "${TMPDIR:-/tmp}/edgesr.XXXXXXXX") || exit 90; echo "$d"; tar -xf - -C "$d" || exit 91'
        try:
            rc, out, err = self._ssh(script, what, stdin=stream)
        except _Timeout as exc:
            lines = exc.stdout.decode(errors="replace").splitlines()
            if lines and _REMOTE_TMP.match(lines[0].strip()):
                self._remove_remote_dir(lines[0].strip())
            raise TargetFailed(
                f"target {self.name}: {what}: copying to the device timed out after {exc.timeout_s:g} s"
            ) from None
        lines = out.decode(errors="replace").splitlines()
        remote = lines[0].strip() if lines else ""
        if remote and not _REMOTE_TMP.match(remote):
            raise TargetFailed(f"target {self.name}: {what}: mktemp gave an unexpected path {remote!r}")
        if rc != 0:
            if remote:
                self._remove_remote_dir(remote)
            step = "mktemp -d" if rc == 90 else "tar -x (is tar installed, is the disk full?)"
            raise TargetFailed(f"target {self.name}: {what}: {step} failed on the device: {_last_line(err)}")
        return remote

    def _remove_remote_dir(self, remote: str) -> None:
        if not _REMOTE_TMP.match(remote):  # never rm -rf anything but our own mktemp folder
            return
        try:
            rc, _, err = self._ssh(f"rm -rf -- {shlex.quote(remote)}", "cleanup", timeout_s=60)
            if rc != 0:
                log.warning("%s: could not remove %s on the device: %s", self.name, remote, _last_line(err))
        except (TargetFailed, _Timeout) as exc:
            log.warning("%s: could not remove %s on the device: %s", self.name, remote, exc)

    def _runner_command(self, runner: str, args: list[str]) -> str:
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in self.env.items())
        argv = [self.python, runner, *args, "--runtime", self.runtime]
        return ("env " + env + " " if env else "") + " ".join(shlex.quote(a) for a in argv)

    def _check_runner_exit(self, rc: int, stderr: str, what: str, log_path: Path | None) -> None:
        where = f" (log: {log_path})" if log_path is not None else ""
        check_runner_exit(self.name, what, rc, stderr, where, shell=True, python=self.python)

    # ----------------------------------------------------------------------------------------- Target calls

    def describe(self, model: Path) -> dict[str, Any]:
        model = Path(model)
        what = f"describe {model.name}"
        remote = self._make_remote_dir({**RUNNER_FILES, model.name: model}, {}, what)  # tar takes a folder too
        try:
            script = f"cd {shlex.quote(remote)} || exit 92; " + self._runner_command(
                "runner.py", ["--describe", model.name]
            )
            rc, out, err = self._ssh(script, what)
        except _Timeout as exc:
            raise TargetFailed(f"target {self.name}: {what} timed out after {exc.timeout_s:g} s") from None
        finally:
            self._remove_remote_dir(remote)
        self._check_runner_exit(rc, err, what, None)
        try:
            desc = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TargetFailed(f"target {self.name}: describe printed no JSON: {out[-200:]!r}") from None
        self._runtime_seen = desc.get("runtime")
        return desc

    def run(self, job_dir: Path) -> dict[str, Any]:
        job_dir = Path(job_dir).resolve()
        job = json.loads((job_dir / "job.json").read_text())
        out_name = str(job["out_dir"])
        if Path(out_name).is_absolute() or ".." in Path(out_name).parts:
            raise BadInput(
                f"{job_dir / 'job.json'}: out_dir must be a relative folder inside the job, got {out_name!r}"
            )
        what = f"job {job_dir.name}"
        log_path = job_dir / "runner.log"
        # The job folder without what a previous run left in it (its outputs and log).
        skip = {f"job/{Path(out_name).parts[0]}", "job/runner.log"}
        remote = self._make_remote_dir(dict(RUNNER_FILES), {"job": job_dir}, what, skip)
        try:
            # The runner runs in the background so its pid is known (to kill it on a timeout); `wait` gives its
            # exit code, 128+N if a signal killed it.
            script = (
                f"cd {shlex.quote(remote)}/job || exit 92; "
                + self._runner_command("../runner.py", ["--job", "job.json"])
                + ' & pid=$!; echo "edgesr-runner-pid=$pid"; wait "$pid"'
            )
            try:
                rc, _, err = self._ssh(script, what)
            except _Timeout as exc:
                self._kill_runner(exc.stdout)
                raise TargetFailed(f"target {self.name}: {what} timed out after {exc.timeout_s:g} s") from None
            log_path.write_text(err)
            self._check_runner_exit(rc, err, what, log_path)
            self._pull(remote, out_name, job_dir, what)
        finally:
            self._remove_remote_dir(remote)
        try:
            return json.loads((job_dir / out_name / "result.json").read_text())
        except (OSError, ValueError) as exc:
            raise TargetFailed(f"target {self.name}: runner wrote no readable result.json ({exc})") from None

    def _kill_runner(self, stdout: bytes) -> None:
        m = re.search(rb"edgesr-runner-pid=(\d+)", stdout or b"")
        if not m:
            return
        try:
            self._ssh(f"kill -9 {int(m.group(1))} 2>/dev/null", "kill the timed-out runner", timeout_s=30)
        except (TargetFailed, _Timeout) as exc:
            log.warning("%s: could not kill the runner on the device: %s", self.name, exc)

    def _pull(self, remote: str, out_name: str, job_dir: Path, what: str) -> None:
        """Stream `<remote>/job/<out_name>` back into `job_dir/<out_name>` (replaced whole, never half-written)."""
        try:
            rc, stream, err = self._ssh(
                f"tar -cf - -C {shlex.quote(remote + '/job')} -- {shlex.quote(out_name)}", f"{what}: pull outputs"
            )
        except _Timeout as exc:
            raise TargetFailed(
                f"target {self.name}: {what}: pulling outputs timed out after {exc.timeout_s:g} s"
            ) from None
        if rc != 0:
            raise TargetFailed(f"target {self.name}: {what}: pulling {out_name} failed: {_last_line(err)}")
        staging = Path(tempfile.mkdtemp(dir=job_dir, prefix=".pull."))
        try:
            try:
                with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
                    tar.extractall(staging, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise TargetFailed(f"target {self.name}: {what}: bad output stream from the device ({exc})") from None
            dest = job_dir / out_name
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / out_name, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def facts(self) -> dict[str, Any]:
        """Device facts read over ssh once: kernel, model, CPU, OS, governor, memory, Python version."""
        if self._facts is None:
            script = _FACTS_SCRIPT + f'echo "python_version=$({self._runner_python_version()} 2>&1 | tail -n 1)"\n'
            rc, out, err = self._ssh(script, "read device facts", timeout_s=max(60.0, self.connect_timeout_s * 3))
            facts: dict[str, Any] = {}
            for line in out.decode(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep and value.strip():
                    facts[key.strip()] = value.strip()
            if facts.get("cpu_count", "").isdigit():
                facts["cpu_count"] = int(facts["cpu_count"])
            if "mem_total_kb" in facts and facts["mem_total_kb"].isdigit():
                facts["mem_total_mb"] = round(int(facts.pop("mem_total_kb")) / 1024, 1)
            facts.setdefault("cpu_governor", "unknown")
            self._facts = facts
        return self._facts

    def _runner_python_version(self) -> str:
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in self.env.items())
        cmd = f"{shlex.quote(self.python)} -c 'import platform; print(platform.python_version())'"
        return ("env " + env + " " if env else "") + cmd

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "kind": "ssh",
            "emulated": self.emulated,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "device_python": self.python,
            "runtime_choice": self.runtime,
            "compute_units": self.compute_units,
            "env": dict(self.env),
            "timeout_s": self.timeout_s,
        }
        if self._runtime_seen is not None:
            info["runtime"] = self._runtime_seen
        try:
            info.update(self.facts())
        except (TargetFailed, _Timeout) as exc:
            info["facts_error"] = str(exc)
        return info


class _Timeout(Exception):
    """An ssh call ran past its limit (the local ssh process was killed); stdout so far is kept."""

    def __init__(self, stdout: bytes, timeout_s: float) -> None:
        super().__init__(f"timed out after {timeout_s:g} s")
        self.stdout, self.timeout_s = stdout, timeout_s


def _tar(files: dict[str, Path], folders: dict[str, Path], skip: set[str] | frozenset = frozenset()) -> bytes:
    """An uncompressed tar stream: each file and folder under the given name, owner-neutral; `skip`: names left out."""
    buf = io.BytesIO()

    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.name in skip or any(info.name.startswith(s + "/") for s in skip):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in files.items():
            tar.add(path, arcname=name, filter=neutral)
        for name, path in folders.items():
            tar.add(path, arcname=name, filter=neutral)
    return buf.getvalue()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
