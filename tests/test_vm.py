"""device_bench over ssh against the arm64 Raspberry Pi stand-in (`make pi-vm`; run with `pytest -m vm`).

The VM is a full-system qemu cortex-a72 guest: real aarch64 kernels and runtimes; its timings mean nothing, and
the report must say so. fp32 outputs are NOT bit-identical to x86 for EDSR: the aarch64 (NEON) and x86 (AVX)
kernels sum in a different order, with or without XNNPACK (measured: max |diff| 5.7e-7 with ai-edge-litert,
1.2e-7 with tflite-runtime, on values around 1.0). So the tests assert float32 rounding noise (|diff| <= 2e-6),
8-bit outputs within 1 level on at most 0.1% of the values, and PSNR equal to 1e-3 dB (measured: 7e-7 dB).
Full-int8 files: ai-edge-litert in the VM gives the local outputs to float rounding (0 LSB); tflite-runtime
2.14.0, an older runtime release, differs by up to 3 LSB of the int8 output with equal PSNR.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pi_vm import PiVM, ensure_pi_vm

from conftest import REPO, find_device_python, run_module
from device_bench.report import EMULATED_NOTE
from edgesr.datasets import builtin_hr_images
from edgesr.images import quantize_uint8, save_png

pytestmark = pytest.mark.vm
OVERLAP = 14
PI_TARGETS = {"pi-litert": ("ai_edge_litert", "2.3.0"), "pi-tflrt": ("tflite_runtime", "2.14.0")}


@pytest.fixture(scope="module")
def vm() -> PiVM:
    return ensure_pi_vm()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real photo crops, LR 64x64 (1 tile) and 64x100 (2 tiles): emulation costs ~10 s per 64x64 tile."""
    folder = tmp_path_factory.mktemp("photos")
    hr = dict(builtin_hr_images("sporco"))
    save_png(folder / "monarch.png", hr["monarch"][80:208, 120:248])
    save_png(folder / "kodim23.png", hr["kodim23"][40:168, 300:500])
    return folder


def bench_args(model: Path, pi: PiVM, out: Path, photos: Path, targets: str, runs: int) -> list[object]:
    return [
        "bench", model, "--targets", targets, "--targets-file", pi.targets_file, "--out", out, "--test-set", photos,
        "--overlap", OVERLAP, "--warmup", 0, "--runs", runs, "--device-python", find_device_python(),
    ]  # fmt: skip


def output_files(job_out) -> dict[str, str]:
    """The runner's SR file per image name (files are named by the host, never by the user's image names)."""
    return {img["name"]: img["output"] for img in json.loads((job_out / "result.json").read_text())["images"]}


def test_both_runtimes_in_the_vm_match_the_local_outputs_to_float_rounding(
    vm: PiVM, photos, tiny_tflite, tmp_path
) -> None:
    model, _ = tiny_tflite
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = run_module("device_bench", *bench_args(model, vm, out, photos, "local,pi-litert,pi-tflrt", 1), timeout=2400)
    print(f"bench local + 2 VM targets: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["target"]: r for r in report["rows"]}
    assert set(rows) == {"local", *PI_TARGETS}
    local_out = out / rows["local"]["job_dir"] / "out"
    for name, (runtime, version) in PI_TARGETS.items():
        row = rows[name]
        job_out = out / row["job_dir"] / "out"
        files = output_files(job_out)
        assert sorted(files) == ["kodim23", "monarch"] and files == output_files(local_out)
        for f in files.values():
            ours, theirs = np.load(job_out / f), np.load(local_out / f)
            diff = np.abs(ours - theirs)
            levels = np.abs(quantize_uint8(ours).astype(int) - quantize_uint8(theirs).astype(int))
            print(f"{name} {f}: max |diff| {diff.max():.3g}, {int((diff > 0).sum())} of {diff.size} values differ, "
                  f"{int((levels > 0).sum())} differ after 8-bit quantization")  # fmt: skip
            assert ours.shape == theirs.shape and diff.max() <= 2e-6, (name, f, diff.max())
            assert levels.max() <= 1 and (levels > 0).mean() <= 1e-3, (name, f)
        assert row["psnr_y_db"] == pytest.approx(rows["local"]["psnr_y_db"], abs=1e-3)
        for image, scores in row["per_image"].items():
            assert scores["psnr_y_db"] == pytest.approx(rows["local"]["per_image"][image]["psnr_y_db"], abs=1e-3)
        assert row["emulated"] is True and row["runtime"]["name"] == runtime and row["runtime"]["version"] == version
        result = json.loads((job_out / "result.json").read_text())
        assert result["machine"] == "aarch64"
        assert result["numpy"].startswith("2." if runtime == "ai_edge_litert" else "1.24")
        memory = result["memory"]
        for phase in ("load", "first_inference", "steady"):
            figures = memory[phase]
            assert {"hwm_mb", "rss_mb", "rss_anon_mb", "rss_file_mb"} <= set(figures), (name, phase, figures)
            assert 0 < figures["rss_anon_mb"] <= figures["rss_mb"] <= figures["hwm_mb"] <= result["peak_rss_mb"]
        assert memory["method"] in ("clear_refs reset", "process per phase")
        env = report["environment"][name]
        assert env["emulated"] is True and env["kind"] == "ssh" and env["cpu_part"] == "0xd08"
        assert env["kernel"].startswith("Linux") and env["machine"] == "aarch64" and env["os"].startswith("Debian")
    assert rows["local"]["emulated"] is False
    md = (out / "report.md").read_text()
    assert EMULATED_NOTE in md and "pi-litert" in md and "pi-tflrt" in md


@pytest.fixture(scope="module")
def tiny_int8(tiny_tflite, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The tiny model as full-int8 TFLite (calibrated on real LR patches, float32 I/O), and its output LSB: the
    scale of the int8 tensor the last DEQUANTIZE reads (EDSR's bilinear skip is then added in float32)."""
    from ai_edge_litert import schema_py_generated as schema

    from conftest import TILE
    from convert.calibration import calibration_patches
    from convert.tflite import tflite_bytes

    _, net = tiny_tflite
    data = tflite_bytes(net, TILE, "int8", calibration_patches(TILE))
    path = tmp_path_factory.mktemp("int8") / "edsr_tiny_x2_t64_int8.tflite"
    path.write_bytes(data)
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sg = model.subgraphs[0]
    dequantize = [i for i, c in enumerate(model.operatorCodes) if c.builtinCode == schema.BuiltinOperator.DEQUANTIZE]
    last = [op for op in sg.operators if op.opcodeIndex in dequantize][-1]
    return path, float(sg.tensors[last.inputs[0]].quantization.scale[0])


def test_int8_outputs_in_the_vm_are_within_one_lsb_of_the_local_outputs(vm: PiVM, photos, tiny_int8, tmp_path) -> None:
    """Same runtime (ai-edge-litert 2.3.0 on both sides): within 1 LSB of the int8 output. tflite-runtime 2.14.0 is
    another runtime release, whose int8 kernels requantize differently (measured: up to 3 LSB on a third of the
    values); its outputs are held to 4 LSB and 0.05 dB of PSNR, and the difference is printed."""
    model, lsb = tiny_int8
    out = tmp_path / "out"
    proc = run_module("device_bench", *bench_args(model, vm, out, photos, "local,pi-litert,pi-tflrt", 1), timeout=2400)
    assert proc.returncode == 0, proc.stderr
    rows = {r["target"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    local_out = out / rows["local"]["job_dir"] / "out"
    for name, (runtime, _) in PI_TARGETS.items():
        same_runtime = runtime == rows["local"]["runtime"]["name"]
        job_out = out / rows[name]["job_dir"] / "out"
        files = output_files(job_out)
        assert sorted(files) == ["kodim23", "monarch"] and files == output_files(local_out)
        for f in files.values():
            ours, theirs = np.load(job_out / f), np.load(local_out / f)
            diff = np.abs(ours - theirs)
            print(f"{name} {f}: max |diff| {diff.max():.3g} = {diff.max() / lsb:.2f} LSB (LSB {lsb:.3g}), "
                  f"{int((diff > 0).sum())} of {diff.size} values differ")  # fmt: skip
            allowed = (1 if same_runtime else 4) * lsb + 2e-6  # + float32 rounding of the bilinear skip
            assert ours.shape == theirs.shape and diff.max() <= allowed, (name, f, diff.max() / lsb)
        print(f"{name}: Y-PSNR {rows[name]['psnr_y_db']:.4f} dB, local {rows['local']['psnr_y_db']:.4f} dB")
        assert rows[name]["psnr_y_db"] == pytest.approx(rows["local"]["psnr_y_db"], abs=1e-3 if same_runtime else 0.05)


def test_killing_the_vm_mid_run_fails_that_target_with_exit_3(vm: PiVM, photos, tiny_tflite, tmp_path) -> None:
    """Runs last: it pulls the VM's plug, then boots it again for whatever runs after."""
    model, _ = tiny_tflite
    out = tmp_path / "out"
    # 200 timed runs: seconds on x86, half an hour emulated, so the VM job is surely mid-run when it dies.
    cmd = [
        sys.executable,
        "-m",
        "device_bench",
        *map(str, bench_args(model, vm, out, photos, "local,pi-litert", 200)),
    ]
    bench = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while vm.ssh("pgrep -f 'runner.py --job'", timeout=60).returncode != 0:
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the runner never started in the VM"
            time.sleep(2)
        time.sleep(3)
        t_kill = time.monotonic()
        vm.kill()
        stdout, stderr = bench.communicate(timeout=900)
        print(f"bench ended {time.monotonic() - t_kill:.1f} s after the VM was killed")
    finally:
        if bench.poll() is None:
            bench.kill()
        vm.restart()
    assert bench.returncode == 3, stderr
    report = json.loads((out / "report.json").read_text())
    [failed] = report["failed_targets"]
    assert failed["target"] == "pi-litert" and "connection dropped" in failed["reason"], failed
    assert "pi-litert" in stderr and "connection dropped" in stderr and "Traceback" not in stderr
    [row] = report["rows"]  # the local target finished everything, and its row is complete
    assert row["target"] == "local" and row["runs"] == 200 and len(row["latency_samples_ms"]) == 200
    assert set(row["per_image"]) == {"kodim23", "monarch"} and np.isfinite(row["psnr_y_db"])
    files = output_files(out / row["job_dir"] / "out")
    assert sorted(files) == ["kodim23", "monarch"]
    assert sorted(p.name for p in (out / row["job_dir"] / "out").glob("*.npy")) == sorted(files.values())
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [entry["row"]["target"] for entry in lines] == ["local"]
