"""The device-side runner, run for real: a litert-torch .tflite, the device venv in a subprocess, real photos."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, find_device_python
from device_bench.runner import tile_regions
from edgesr.datasets import builtin_hr_images
from edgesr.images import bicubic_downscale, modcrop, to_float

RUNNER = REPO / "device_bench" / "runner.py"
TILE = 64


@pytest.fixture(scope="module")
def model(tiny_tflite: tuple[Path, object]) -> tuple[Path, object]:
    """edsr-tiny x2 (seeded random init) converted with a fixed 64x64 NHWC input, and the torch module."""
    return tiny_tflite


def torch_upscale(net: object, lr: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(lr).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()


def lr_crop(name: str, top: int, left: int, hr_h: int, hr_w: int) -> np.ndarray:
    """A real photo's HR crop, downscaled x2 with the project's Pillow bicubic, as float32 in [0, 1]."""
    hr = dict(builtin_hr_images("sporco"))[name][top : top + hr_h, left : left + hr_w]
    return to_float(bicubic_downscale(modcrop(hr, 2), 2))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The runner with the device Python, from a folder outside the repository."""
    return subprocess.run(
        [find_device_python(), str(RUNNER), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def make_job(folder: Path, model: Path, images: dict[str, np.ndarray], overlap: int, **extra: object) -> Path:
    (folder / "inputs").mkdir(parents=True)
    for name, lr in images.items():
        np.save(folder / "inputs" / f"{name}.npy", lr)
    job = {
        "model": str(model),
        "inputs": [{"name": n, "path": f"inputs/{n}.npy"} for n in images],
        "out_dir": "out",
        "tile": [TILE, TILE],
        "overlap": overlap,
        "scale": 2,
        "threads": 1,
        "warmup": 2,
        "runs": 5,
        "runtime": "auto",
        **extra,
    }
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json"


@pytest.fixture(scope="module")
def tiled_run(model: tuple[Path, object], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One job: a 100x130 LR crop (2x3 tiles at overlap 14) and a 40x50 crop (smaller than the tile)."""
    images = {"monarch": lr_crop("monarch", 80, 120, 200, 260), "small": lr_crop("sail", 10, 10, 80, 100)}
    folder = tmp_path_factory.mktemp("job")
    job = make_job(folder, model[0], images, overlap=14)
    proc = run(["--job", str(job)], cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr
    return {"images": images, "result": json.loads((folder / "out" / "result.json").read_text()), "out": folder / "out"}


def test_tiled_output_equals_whole_image_torch(tiled_run: dict, model: tuple[Path, object]) -> None:
    lr = tiled_run["images"]["monarch"]
    tiled = np.load(tiled_run["out"] / "monarch.npy")
    whole = torch_upscale(model[1], lr)
    assert tiled.shape == whole.shape == (200, 260, 3) and tiled.dtype == np.float32
    info = next(i for i in tiled_run["result"]["images"] if i["name"] == "monarch")
    assert info["tiles"] == 2 * 3 and not info["padded"]
    assert np.abs(tiled - whole).max() < 1e-4


def test_overlap_below_receptive_field_shows_seams(model: tuple[Path, object], tmp_path: Path) -> None:
    """The exactness test has teeth: with overlap 2 (< edsr-tiny's ~12 px radius) tile seams differ visibly."""
    lr = lr_crop("monarch", 80, 120, 200, 260)
    job = make_job(tmp_path / "job", model[0], {"monarch": lr}, overlap=2, warmup=0, runs=1)
    assert run(["--job", str(job)], cwd=tmp_path).returncode == 0
    assert np.abs(np.load(tmp_path / "job" / "out" / "monarch.npy") - torch_upscale(model[1], lr)).max() > 1e-3


def test_small_image_is_padded_and_cropped(tiled_run: dict) -> None:
    info = next(i for i in tiled_run["result"]["images"] if i["name"] == "small")
    assert info["padded"] and info["tiles"] == 1
    assert info["lr_shape"] == [40, 50] and info["sr_shape"] == [80, 100]
    assert np.load(tiled_run["out"] / "small.npy").shape == (80, 100, 3)


def test_result_fields(tiled_run: dict) -> None:
    r = tiled_run["result"]
    assert r["runtime"]["name"] == "ai_edge_litert" and r["runtime"]["version"] == "2.3.0"
    assert r["python"] and r["platform"] and r["machine"]
    assert (r["threads"], r["tile"], r["overlap"], r["stride"], r["scale"]) == (1, [64, 64], 14, [36, 36], 2)
    assert (r["warmup"], r["runs"]) == (2, 5)
    assert r["load_ms"] > 0 and r["first_inference_ms"] > 0
    lat = r["latency_ms"]
    assert len(lat["samples"]) == 5
    assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"] and lat["mean"] > 0
    phases = r["memory"]["phases"]
    assert list(phases) == ["after_import", "after_load", "after_first_inference", "end"]
    for snap in phases.values():
        assert {"VmHWM", "VmRSS", "RssAnon", "RssFile"} <= set(snap)
    assert r["peak_rss_mb"] == phases["end"]["VmHWM"] >= phases["after_import"]["VmHWM"] > 10
    assert r["outputs"] == ["monarch.npy", "small.npy"]
    assert all(img["ms"] > 0 for img in r["images"])


def test_describe_reports_shapes_runtime_and_encoding(model: tuple[Path, object], tmp_path: Path) -> None:
    proc = run(["--describe", str(model[0])], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["tile"] == [64, 64] and d["scale"] == 2 and d["sparse_tensors"] == 0
    assert d["inputs"][0]["shape"] == [1, 64, 64, 3] and d["outputs"][0]["shape"] == [1, 128, 128, 3]
    assert d["runtime"]["name"] == "ai_edge_litert"


@pytest.mark.parametrize("kind", ["truncated", "not_flatbuffer", "missing"])
def test_describe_classifies_invalid_models(kind: str, model: tuple[Path, object], tmp_path: Path) -> None:
    bad = tmp_path / f"{kind}.tflite"
    if kind == "truncated":
        bad.write_bytes(model[0].read_bytes()[: model[0].stat().st_size // 2])
    elif kind == "not_flatbuffer":
        bad.write_bytes(b"not a model at all\n" * 10)
    proc = run(["--describe", str(bad)], cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("runner error")]
    assert len(errors) == 1 and errors[0].startswith("runner error [invalid-model]")
    assert "Traceback" not in proc.stderr


def test_missing_runtime_is_a_clean_failure(model: tuple[Path, object], tmp_path: Path) -> None:
    proc = run(["--describe", str(model[0]), "--runtime", "tflite_runtime"], cwd=tmp_path)
    assert proc.returncode == 3 and "runner error [no-runtime]" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("length", [64, 65, 100, 130, 200, 256, 1000])
@pytest.mark.parametrize("overlap", [0, 14, 16, 31])
def test_tile_regions_partition_the_axis_and_keep_interiors(length: int, overlap: int) -> None:
    regions = tile_regions(length, TILE, overlap)
    assert regions[0][1] == 0 and regions[-1][2] == length and regions[-1][0] == length - TILE
    for (_, _, end), (_, start, _) in itertools.pairwise(regions):
        assert end == start  # contiguous, no gaps or double ownership
    for tile_start, own_from, own_to in regions:
        assert tile_start <= own_from < own_to <= tile_start + TILE
        assert own_from == 0 or own_from - tile_start >= overlap
        assert own_to == length or tile_start + TILE - own_to >= overlap


def test_runner_imports_only_stdlib_numpy_and_runtimes() -> None:
    tree = ast.parse(RUNNER.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy"}, third_party
    assert not {"edgesr", "compress", "convert", "device_bench", "torch"} & imported


def test_device_venv_cannot_see_edgesr(tmp_path: Path) -> None:
    """The runner's other tests pass in this interpreter, so it really needs nothing from the repository."""
    proc = subprocess.run([find_device_python(), "-c", "import edgesr"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'edgesr'" in proc.stderr
