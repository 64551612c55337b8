"""A real OpenSSH server on 127.0.0.1 for tests: throwaway keys, the config of emulation.md §3, one per session.

It logs the current user in with a throwaway client key; sessions get TMPDIR set to a folder of ours, so a test can
see what a target leaves behind in the device's temp folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_openssh() -> None:
    """Install openssh-server/-client via apt when missing (CI: see the notes; root only)."""
    if SSHD.exists() and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server", "openssh-client"],
        check=True,
        env=env,
    )


def keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at `path`; returns the public key line's 'type base64' part."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@dataclass
class LocalSSHD:
    root: Path
    port: int
    proc: subprocess.Popen
    client_key: Path
    known_hosts: Path  # pins this server's host key for 127.0.0.1:port
    remote_tmp: Path  # TMPDIR of every session
    user: str

    def session_pids(self) -> list[int]:
        """Pids of the per-connection sshd processes (children of the listener)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_sshd(root: Path) -> LocalSSHD:
    ensure_openssh()
    root.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(root / "host_key", "edgesr-test-host")
    keygen(root / "client_key", "edgesr-test-client")
    shutil.copyfile(root / "client_key.pub", root / "authorized_keys")
    remote_tmp = root / "remote-tmp"
    remote_tmp.mkdir()
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile {root / 'sshd.pid'}\n"
        f"Subsystem sftp internal-sftp\nSetEnv TMPDIR={remote_tmp}\nMaxSessions 50\nMaxStartups 50\n"
    )
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation folder; missing without systemd
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")], stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.1)
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    return LocalSSHD(root, port, proc, root / "client_key", known_hosts, remote_tmp, user)
