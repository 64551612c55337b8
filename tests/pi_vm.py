"""The arm64 Raspberry Pi stand-in for tests marked `vm` (scripts/pi_vm.sh; `make pi-vm` builds and boots it).

  from pi_vm import PiVM, ensure_pi_vm

  @pytest.fixture(scope="module")
  def vm() -> PiVM:
      return ensure_pi_vm()

  def test_x(vm): vm.targets_file, vm.ssh("uname -m"), vm.port, vm.key ...

The fixture boots the VM when it is not running (building it first takes minutes and needs root, so CI runs
`make pi-vm` before the vm tests). A test that kills the VM calls `pi_vm.restart()` afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "pi_vm.sh"
PI_DIR = Path(os.environ.get("PI_DIR", REPO / ".pi"))
START_TIMEOUT_S = 1800  # a first build on a loaded 2-core machine takes ~13 min; a boot ~15-100 s


@dataclass(frozen=True)
class PiVM:
    dir: Path
    port: int
    targets_file: Path  # two ssh targets: pi-litert (ai-edge-litert, numpy 2), pi-tflrt (tflite-runtime, numpy 1.24)
    key: Path
    known_hosts: Path

    def ssh_args(self) -> list[str]:
        return [
            "ssh", "-p", str(self.port), "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "ConnectTimeout=10", "root@127.0.0.1",
        ]  # fmt: skip

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a shell command in the guest as root; output captured as text."""
        return subprocess.run(
            [*self.ssh_args(), command], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def qemu_pid(self) -> int | None:
        try:
            pid = int((self.dir / "vm.pid").read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def kill(self) -> None:
        """Pull the plug: SIGKILL qemu (no clean shutdown), as when a board loses power or drops off the network."""
        pid = self.qemu_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.qemu_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)

    def restart(self) -> None:
        start_vm()


def start_vm() -> None:
    """Build (once) and boot the VM, or confirm it is up; fails the test with the script's message otherwise."""
    proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{SCRIPT} start failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")


def ensure_pi_vm() -> PiVM:
    """The running VM (booted, and built first if needed)."""
    start_vm()
    port = int(os.environ.get("PI_PORT", "2226"))
    return PiVM(PI_DIR, port, PI_DIR / "targets.yaml", PI_DIR / "key", PI_DIR / "known_hosts")
