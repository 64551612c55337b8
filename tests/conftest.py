"""Fixtures shared by the test modules: the device venv's python, and one converted test model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TILE = 64


def find_device_python() -> str:
    """The device venv's python. `make test` builds it first, so a missing one is a failure, not a skip."""
    for cand in (os.environ.get("EDGESR_DEVICE_PYTHON"), REPO / ".venv-device" / "bin" / "python"):
        if cand and Path(cand).exists():
            return str(cand)
    pytest.fail("no device venv: run `make setup` (builds .venv-device) or set EDGESR_DEVICE_PYTHON")


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
