"""A thin driver around the real `adb` binary: server, devices, connect, serial selection, push, pull, shell.

Everything goes through argument lists (no local shell). Remote commands are one string for the device's shell,
built with `shlex.join`/`shlex.quote`, so file names with spaces, quotes and ';' reach the device intact.

adb's own quirks handled here:
- `adb connect` exits 0 when it fails ("failed to connect to ...", "unable to connect ..."): the text decides.
- `adb shell` keeps stderr separate only with the shell v2 protocol (Android 7+); v1 has one merged stream and no
  exit status, and with v2 a connection that drops mid-command still exits 0. So every command reports its exit
  status on a marker line (stderr with v2, stdout with v1) that `shell` strips; no marker: the connection dropped.
- A network device whose connection dropped stays listed as `offline`; `ensure_online` reconnects it once.
adb's own errors (`error: device offline`, `device '...' not found`, ...) raise `AdbError` (a `TargetFailed`,
exit 3), never a made-up exit code of the remote command.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgesr.errors import TargetFailed

log = logging.getLogger("android_harness")

NETWORK_SERIAL = re.compile(r"^[^\s:]+:\d+$")  # host:port, a device reached with `adb connect`
_ADB_ERROR = re.compile(
    r"^(?:adb: )?error: (device .*not found|device offline|device unauthorized.*|device still \w+.*|"
    r"no devices/emulators found|more than one device/emulator|closed|protocol fault.*|failed to get feature set.*)$",
    re.M,
)
_EXIT_MARK = "__EDGESR_EXIT__"


class AdbError(TargetFailed):
    """adb could not reach or use the device (exit 3)."""


@dataclass(frozen=True)
class AdbDevice:
    """One line of `adb devices -l`: serial, state (device, offline, unauthorized, ...) and key:value details."""

    serial: str
    state: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ShellResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def remote_command(command: str | Sequence[str]) -> str:
    """The device shell's command line: a string is used as written, a list is quoted word by word."""
    return command if isinstance(command, str) else shlex.join(str(c) for c in command)


@dataclass
class Adb:
    """The `adb` client for one device (`serial`; None: the only device attached)."""

    serial: str | None = None
    binary: str = "adb"
    server_port: int | None = None  # adb -P (default: $ANDROID_ADB_SERVER_PORT or 5037)
    timeout_s: float = 60.0
    _features: frozenset[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.serial is not None and not self.serial.strip():
            raise ValueError("adb serial is empty")

    @property
    def is_network(self) -> bool:
        return self.serial is not None and bool(NETWORK_SERIAL.match(self.serial))

    def _argv(self, args: Sequence[str], select: bool) -> list[str]:
        argv = [self.binary]
        if self.server_port is not None:
            argv += ["-P", str(self.server_port)]
        if select and self.serial is not None:
            argv += ["-s", self.serial]
        return argv + [str(a) for a in args]

    def run(
        self, args: Sequence[str], timeout: float | None = None, select: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `adb [-P port] [-s serial] args...`; the adb binary missing or a timeout raise AdbError."""
        argv = self._argv(args, select)
        timeout = self.timeout_s if timeout is None else timeout
        log.debug("adb: %s", shlex.join(argv))
        try:
            return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise AdbError(f"adb binary '{self.binary}' not found (apt-get install adb, or set 'adb:')") from None
        except PermissionError:
            raise AdbError(f"adb binary '{self.binary}' is not executable") from None
        except subprocess.TimeoutExpired:
            raise AdbError(f"adb {args[0]} on {self.where} timed out after {timeout:g} s") from None

    @property
    def where(self) -> str:
        return f"device {self.serial}" if self.serial else "the attached device"

    def _check(self, proc: subprocess.CompletedProcess[bytes], what: str) -> str:
        text = (proc.stdout + proc.stderr).decode(errors="replace")
        if proc.returncode != 0:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            raise AdbError(f"adb {what} on {self.where} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        return text

    # -------------------------------------------------------------------------------------------- server, devices

    def version(self) -> str:
        out = self._check(self.run(["version"], select=False), "version")
        m = re.search(r"Version (\S+)", out)
        return m.group(1) if m else out.splitlines()[0]

    def start_server(self) -> None:
        self._check(self.run(["start-server"], select=False), "start-server")

    def devices(self) -> list[AdbDevice]:
        """`adb devices -l`, parsed."""
        out = self._check(self.run(["devices", "-l"], select=False), "devices")
        found = []
        for line in out.splitlines():
            if not line.strip() or line.startswith(("List of devices", "*")):
                continue
            serial, state, *rest = line.split()
            found.append(AdbDevice(serial, state, dict(item.split(":", 1) for item in rest if ":" in item)))
        return found

    def connect(self, address: str | None = None) -> None:
        """`adb connect`; it exits 0 even when it fails, so the message decides."""
        address = address or self.serial
        if address is None:
            raise ValueError("connect needs a host:port address")
        out = self._check(self.run(["connect", address], select=False), "connect").strip()
        if not re.search(r"^(already )?connected to ", out, re.M):
            raise AdbError(f"adb connect {address}: {out.splitlines()[-1] if out else 'no answer'}")
        self._features = None

    def disconnect(self, address: str | None = None) -> None:
        self.run(["disconnect", address or self.serial or ""], select=False)

    def state(self) -> str:
        """device, offline, unauthorized, ... or 'missing' when adb does not know the serial."""
        proc = self.run(["get-state"])
        if proc.returncode == 0:
            return proc.stdout.decode().strip()
        text = proc.stderr.decode(errors="replace")
        if "offline" in text:
            return "offline"
        if "unauthorized" in text:
            return "unauthorized"
        return "missing"

    def ensure_online(self, connect: bool = True) -> None:
        """Make sure the device answers: a network device that is missing or offline is (re)connected once."""
        state = self.state()
        if state != "device" and connect and self.is_network:
            if state == "offline":  # a stale transport: the server only recovers after disconnect + connect
                self.disconnect()
            log.info("adb: connecting %s (state %s)", self.serial, state)
            self.connect()
            state = self.state()
        if state != "device":
            hint = {
                "missing": "not attached (adb devices lists it?)",
                "unauthorized": "not authorized (accept the prompt)",
            }
            raise AdbError(f"adb: {self.where} is {hint.get(state, state)}")

    def features(self) -> frozenset[str]:
        if self._features is None:
            out = self._check(self.run(["features"]), "features")
            self._features = frozenset(line.strip() for line in out.splitlines() if line.strip())
        return self._features

    # ---------------------------------------------------------------------------------------------------- shell

    def shell(self, command: str | Sequence[str], timeout: float | None = None, check: bool = False) -> ShellResult:
        """Run a command in the device's shell: its exit code, stdout and (shell v2) stderr.

        `check`: a non-zero exit raises AdbError with the command's last stderr line."""
        cmd = shown = remote_command(command)
        v2 = "shell_v2" in self.features()
        # The command's exit status travels on a marker line (stderr with v2, the only stream with v1): v1 has no
        # exit status at all, and with v2 a connection that drops mid-command makes the adb client exit 0.
        cmd = f"(\n{cmd}\n); __rc=$?; printf '\\n{_EXIT_MARK}%d\\n' $__rc >&{2 if v2 else 1}; exit $__rc"
        # -T: no pty (raw bytes, separate stderr); v1-only devices refuse it ("only supports allocating a pty").
        proc = self.run(["shell", "-T", cmd] if v2 else ["shell", cmd], timeout=timeout)
        if (m := _ADB_ERROR.search(proc.stderr.decode(errors="replace"))) and proc.returncode != 0:
            raise AdbError(f"adb shell on {self.where}: {m.group(1)}")
        stream = proc.stderr if v2 else proc.stdout
        head, sep, tail = stream.rpartition(f"\n{_EXIT_MARK}".encode())
        if not sep or not tail.strip().isdigit():
            raise AdbError(f"adb shell on {self.where}: the connection dropped before the command finished")
        code = int(tail.split()[0])
        if v2:
            result = ShellResult(code, proc.stdout, head)
        else:  # v1 runs under a pty, which turns "\n" into "\r\n"
            result = ShellResult(code, head.replace(b"\r\n", b"\n").removesuffix(b"\r"), proc.stderr)
        if check and result.returncode != 0:
            lines = [line for line in (result.err or result.out).splitlines() if line.strip()]
            last = lines[-1].strip() if lines else "no output"
            raise AdbError(f"{self.where}: `{shown[:120]}` failed (exit {result.returncode}): {last}")
        return result

    # ---------------------------------------------------------------------------------------------- push / pull

    def push(self, local: Path | Sequence[Path], remote: str, timeout: float | None = None) -> None:
        """`adb push`: one file to a full remote path, or several files/folders into an existing remote folder."""
        sources = [local] if isinstance(local, (str, Path)) else list(local)
        self._check(self.run(["push", *map(str, sources), remote], timeout=timeout), f"push to {remote!r}")

    def pull(self, remote: str, local: Path, timeout: float | None = None) -> None:
        """`adb pull` of one remote file to a local file path."""
        self._check(self.run(["pull", remote, str(local)], timeout=timeout), f"pull of {remote!r}")

    def pull_dir(self, remote_dir: str, local_dir: Path, timeout: float | None = None) -> None:
        """Copy a remote folder to `local_dir` (replaced if present); adb pull nests it under the target's name."""
        local_dir = Path(local_dir)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
        try:
            self._check(self.run(["pull", remote_dir, str(staging)], timeout=timeout), f"pull of {remote_dir!r}")
            (pulled,) = list(staging.iterdir())
            if local_dir.exists():
                shutil.rmtree(local_dir)
            pulled.rename(local_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
