"""A targets file for the tests' local OpenSSH server (the `sshd` fixture in conftest)."""

from __future__ import annotations

import json
from pathlib import Path

from local_sshd import LocalSSHD

from conftest import find_device_python


def targets_file(folder: Path, sshd: LocalSSHD, **entry: object) -> Path:
    base = {
        "type": "ssh",
        "host": "127.0.0.1",
        "port": sshd.port,
        "user": sshd.user,
        "identity": str(sshd.client_key),
        "known_hosts": str(sshd.known_hosts),
        "python": find_device_python(),
        "connect_timeout_s": 5,
    }
    base.update(entry)
    path = folder / "targets.yaml"
    path.write_text(json.dumps({"targets": {"box": base}}))  # JSON is YAML
    return path
