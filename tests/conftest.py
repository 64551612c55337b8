"""What the test modules share: the repo root, running a stage's CLI, the device python, one converted model,
a real OpenSSH server on 127.0.0.1 and two real photo crops (a module may define its own `photos`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from local_sshd import LocalSSHD, start_sshd

from device_bench.targets import default_device_python
from edgesr.datasets import builtin_hr_images
from edgesr.errors import BadInput
from edgesr.images import save_png

REPO = Path(__file__).resolve().parent.parent
TILE = 64


def run_module(module: str, *args: object, timeout: float = 600, **popen: Any) -> subprocess.CompletedProcess:
    """`python -m <module> args...` from the repo root, as a user runs it; output captured as text."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


def find_device_python() -> str:
    """The device venv's python, found as device_bench finds it. `make test` builds it first: missing fails."""
    try:
        return str(default_device_python())
    except BadInput as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def device_python() -> str:
    return find_device_python()


@pytest.fixture(scope="session")
def tiny_tflite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """edsr-tiny x2 (seeded random init) converted by convert.tflite at a 64x64 NHWC tile, and its torch module."""
    import torch

    from compress.models import create_model
    from convert.tflite import convert_tflite

    torch.manual_seed(0)
    net = create_model("edsr-tiny", scale=2).eval()
    path = tmp_path_factory.mktemp("tiny") / "edsr_tiny_x2_t64.tflite"
    convert_tflite(net, path, TILE)
    return path, net


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> LocalSSHD:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real photo crops (LR 100x130 and 80x70 at x2: 2x3 and 2x2 tiles of 64)."""
    folder = tmp_path_factory.mktemp("photos")
    hr = dict(builtin_hr_images("sporco"))
    save_png(folder / "monarch.png", hr["monarch"][80:280, 120:380])
    save_png(folder / "kodim23.png", hr["kodim23"][40:200, 300:440])
    return folder
