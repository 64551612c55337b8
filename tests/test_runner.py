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
from device_bench.runner import PHASES, tile_regions
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
    assert r["delegate"]["name"] == "xnnpack" and r["delegate"]["op_resolver"] == "BUILTIN"
    assert any("XNNPACK" in line for line in r["delegate"]["runtime_log"])  # what the runtime itself said
    assert r["outputs"] == ["monarch.npy", "small.npy"]
    assert all(img["ms"] > 0 for img in r["images"])


def test_frame_loop_without_frames_cycles_the_inputs(tiled_run: dict) -> None:
    """No `frames` in the job: the inputs are the frames, cycled for `runs` frames (min_seconds 0)."""
    frame = tiled_run["result"]["frame"]
    assert frame["frames_run"] == 5 and frame["min_seconds"] == 0
    assert frame["frames"] == [
        {"name": "monarch", "lr_shape": [100, 130], "tiles": 6},
        {"name": "small", "lr_shape": [40, 50], "tiles": 1},
    ]
    assert frame["padded"]  # the small input is smaller than the tile
    assert len(frame["ms"]["samples"]) == len(frame["invoke_ms"]["samples"]) == 5
    for total, invoked in zip(frame["ms"]["samples"], frame["invoke_ms"]["samples"], strict=True):
        assert 0 < invoked <= total  # a frame's invokes are part of its time
    assert frame["fps"] == pytest.approx(5 / (sum(frame["ms"]["samples"]) / 1000), rel=1e-3)


def test_frame_loop_runs_at_least_min_seconds(model: tuple[Path, object], tmp_path: Path) -> None:
    """A 200x120 LR frame (3x5 tiles of 64 at overlap 14): the loop goes on past `runs` frames until min_seconds
    of frame time, and every frame has the tile count tile_regions gives."""
    frame = lr_crop("monarch", 0, 0, 240, 400)
    job = make_job(tmp_path / "job", model[0], {"monarch": lr_crop("monarch", 80, 120, 200, 260)}, overlap=14)
    np.save(tmp_path / "job" / "inputs" / "frame.npy", frame)
    spec = json.loads(job.read_text())
    job.write_text(
        json.dumps({**spec, "runs": 2, "min_seconds": 0.5, "frames": [{"name": "f", "path": "inputs/frame.npy"}]})
    )
    assert run(["--job", str(job)], cwd=tmp_path).returncode == 0
    r = json.loads((tmp_path / "job" / "out" / "result.json").read_text())
    tiles = len(tile_regions(120, 64, 14)) * len(tile_regions(200, 64, 14))
    assert r["frame"]["frames"] == [{"name": "f", "lr_shape": [120, 200], "tiles": tiles}] and tiles == 15
    assert sum(r["frame"]["ms"]["samples"]) >= 500 and r["frame"]["frames_run"] >= 2
    assert not r["frame"]["padded"]
    assert [i["name"] for i in r["images"]] == ["monarch"]  # the quality pass still scores the inputs


FIELDS = ("hwm_mb", "rss_mb", "rss_anon_mb", "rss_file_mb")


def kernel_resets_peak() -> bool:
    """Checked here independently of the runner: raise this process's VmHWM, write 5 to clear_refs, re-read."""
    code = (
        "import mmap\n"
        "def hwm():\n"
        "    s = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        "    return int(s['VmHWM'].split()[0]), int(s['VmRSS'].split()[0])\n"
        "m = mmap.mmap(-1, 64 << 20)\n"
        "for i in range(0, 64 << 20, 4096): m[i] = 1\n"
        "m.close(); before = hwm()\n"
        "try:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "except OSError:\n"
        "    pass\n"
        "after = hwm(); print(before[0] - before[1] > 32768 and after[0] - after[1] < 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() == "True"


WORKLOAD_PHASES = (*PHASES, "frames", "baseline")  # start through the frame loop; "images" is the quality pass


def check_phases(result: dict, reset: bool) -> None:
    memory, peak, run_peak = result["memory"], result["peak_rss_mb"], result["run_peak_rss_mb"]
    for phase in (*WORKLOAD_PHASES, "images"):
        figures = memory[phase]
        assert set(figures) == set(FIELDS) and all(figures[f] > 0 for f in FIELDS), (phase, figures)
        assert figures["rss_mb"] <= figures["hwm_mb"] + 0.01  # current <= peak since the phase began
        assert figures["rss_anon_mb"] + figures["rss_file_mb"] <= figures["rss_mb"] + 0.01
        assert figures["hwm_mb"] <= run_peak + 0.01  # no phase peaks above the whole run
    assert peak == pytest.approx(max(memory[p]["hwm_mb"] for p in WORKLOAD_PHASES), abs=0.01)
    assert run_peak == pytest.approx(max(peak, memory["images"]["hwm_mb"]), abs=0.01)
    # by the first inference the model (arena, weights) costs anonymous memory above the interpreter's baseline
    assert memory["first_inference"]["rss_anon_mb"] > memory["baseline"]["rss_anon_mb"] + 1
    if not reset:  # peaks from process start: each phase's includes the ones before it
        assert memory["load"]["hwm_mb"] <= memory["first_inference"]["hwm_mb"] <= memory["steady"]["hwm_mb"] + 0.01
        assert memory["steady"]["hwm_mb"] <= memory["frames"]["hwm_mb"] + 0.01
        assert memory["frames"]["hwm_mb"] == pytest.approx(peak, abs=0.01)  # the frame loop ends the workload
    assert memory["source"].startswith("/proc/self/status VmHWM") and memory["unit"] == "MiB"


def test_memory_phases_with_the_peak_reset(tiled_run: dict, tmp_path: Path) -> None:
    r = tiled_run["result"]
    reset = kernel_resets_peak()
    probe = run(["--check-peak-reset"], cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == str(reset).lower()
    assert r["memory"]["method"] == ("clear_refs reset" if reset else "process per phase")
    check_phases(r, reset)
    if reset:  # a reset phase's peak is its own: the steady invokes peak below the images phase's buffers
        assert r["memory"]["hwm_scope"] == "phase"
        assert r["memory"]["steady"]["hwm_mb"] < r["memory"]["images"]["hwm_mb"]


def test_process_per_phase_without_xnnpack(model: tuple[Path, object], tiled_run: dict, tmp_path: Path) -> None:
    """Forced fallback method and runtime_requirements {xnnpack: false}: phases from their own processes, no
    default delegate, and the same SR output as whole-image torch."""
    lr = tiled_run["images"]["monarch"]
    job = make_job(
        tmp_path / "job",
        model[0],
        {"monarch": lr},
        overlap=14,
        warmup=1,
        runs=2,
        memory_phases="process",
        runtime_requirements={"xnnpack": False},
    )
    proc = run(["--job", str(job)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "job" / "out" / "result.json").read_text())
    assert r["memory"]["method"] == "process per phase"
    assert r["memory"]["hwm_scope"] == "process start through the phase"
    check_phases(r, reset=False)
    assert r["delegate"] == {
        "name": "none",
        "op_resolver": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
        "xnnpack_requested": False,
        "runtime_log": [],
    }
    assert "XNNPACK" not in proc.stderr  # the runtime never created the delegate
    assert np.abs(np.load(tmp_path / "job" / "out" / "monarch.npy") - torch_upscale(model[1], lr)).max() < 1e-4


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("memory_phases", "sometimes", "'memory_phases' must be auto, clear_refs or process"),
        ("runtime_requirements", {"xnnpack": "no"}, "'runtime_requirements' must be an object"),
    ],
)
def test_bad_memory_and_delegate_fields(
    model: tuple[Path, object], tmp_path: Path, field: str, value: object, needle: str
) -> None:
    lr = np.zeros((70, 70, 3), np.float32)
    job = make_job(tmp_path / "job", model[0], {"z": lr}, overlap=14, **{field: value})
    proc = run(["--job", str(job)], cwd=tmp_path)
    assert proc.returncode == 2 and "runner error [bad-job]" in proc.stderr and needle in proc.stderr


@pytest.mark.parametrize("rel", ["../escape.npy", "in 'puts'; x/a.npy", "/abs/a.npy", "a b.npy", ""])
def test_runner_refuses_odd_input_paths(model: tuple[Path, object], tmp_path: Path, rel: str) -> None:
    job = make_job(tmp_path / "job", model[0], {"z": np.zeros((70, 70, 3), np.float32)}, overlap=14)
    spec = json.loads(job.read_text())
    spec["inputs"] = [{"name": "a name with 'quotes'; and spaces", "path": rel}]
    job.write_text(json.dumps(spec))
    proc = run(["--job", str(job)], cwd=tmp_path)
    assert proc.returncode == 2 and "needs a 'name' and a plain relative 'path'" in proc.stderr
    assert not (tmp_path / "job" / "out").exists()


def test_user_names_are_data_and_outputs_take_the_input_file_name(model: tuple[Path, object], tmp_path: Path) -> None:
    job = make_job(tmp_path / "job", model[0], {"z": np.zeros((70, 70, 3), np.float32)}, overlap=14)
    spec = json.loads(job.read_text())
    spec["inputs"] = [{"name": "kodim 23; rm -rf ~ 'x'", "path": "inputs/z.npy"}]
    job.write_text(json.dumps(spec))
    proc = run(["--job", str(job)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "job" / "out" / "result.json").read_text())
    assert [(i["name"], i["output"]) for i in result["images"]] == [("kodim 23; rm -rf ~ 'x'", "z.npy")]
    assert sorted(p.name for p in (tmp_path / "job" / "out").iterdir()) == ["result.json", "z.npy"]


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
