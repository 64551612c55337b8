"""android_harness and the adb target through the REAL adb server (Debian's adb) and a device endpoint.

tests/adb_endpoint.py plays the phone's adbd (no adbd is installable here); by default it runs device commands
on this host, in tests marked `vm` inside the arm64 stand-in (make pi-vm) over ssh. The adb server is a private
one on a free port (adb -P), so a developer's own server and devices are never touched.
"""

from __future__ import annotations

import hashlib
import json
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from android_harness.adb import Adb, AdbError
from conftest import REPO, find_device_python, run_module
from device_bench.adb_target import ADBTarget
from device_bench.artifacts import Artifact
from device_bench.bench import BenchConfig
from device_bench.benchmark_model_engine import TileRecorder
from device_bench.jobs import score_outputs, write_job
from device_bench.targets import LocalTarget
from edgesr.datasets import builtin_hr_images, load_test_set
from edgesr.errors import BadInput, TargetFailed
from edgesr.images import save_png

ENDPOINT = Path(__file__).with_name("adb_endpoint.py")
FAKE_BINARY = Path(__file__).with_name("fake_benchmark_model.py")
ODD = 'my "model"; v1 it\'s.tflite'  # spaces, both quotes and ';'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """A private adb server (the real binary) on a free port; killed afterwards."""
    if shutil.which("adb") is None:
        pytest.fail("the adb binary is missing: apt-get install -y adb")
    port = free_port()
    subprocess.run(["adb", "-P", str(port), "start-server"], check=True, capture_output=True, timeout=30)
    yield port
    subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=30)


class Endpoint:
    """tests/adb_endpoint.py as a separate process: a device for the adb server to connect to."""

    def __init__(self, *args: str, port: int = 0) -> None:
        self.args, self.port, self.proc = args, port, None

    def start(self) -> Endpoint:
        cmd = [sys.executable, str(ENDPOINT), "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        assert "listening on 127.0.0.1:" in line, f"endpoint did not start: {line!r}"
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def device(server: int, *args: str) -> Iterator[tuple[Endpoint, Adb]]:
    """A started, `adb connect`ed endpoint and an Adb client selecting it by serial."""
    ep = Endpoint(*args).start()
    adb = Adb(serial=ep.serial, server_port=server, timeout_s=30)
    try:
        adb.connect()
        yield ep, adb
    finally:
        adb.disconnect()
        ep.stop()


# ------------------------------------------------------------------------------------------ the adb driver


def test_devices_connect_and_serial_selection(server: int) -> None:
    with (
        device(server, "--model", "PhoneA", "--getprop", "ro.product.model=Phone A") as (a, adb_a),
        device(server, "--model", "PhoneB", "--getprop", "ro.product.model=Phone B") as (b, adb_b),
    ):
        listed = {d.serial: d for d in adb_a.devices()}
        assert listed[a.serial].state == "device" and listed[a.serial].details["model"] == "PhoneA"
        assert listed[b.serial].state == "device" and listed[b.serial].details["model"] == "PhoneB"
        assert adb_a.shell("getprop ro.product.model").out == "Phone A\n"
        assert adb_b.shell(["getprop", "ro.product.model"]).out == "Phone B\n"
        with pytest.raises(AdbError, match="more than one device"):
            Adb(server_port=server).shell("true")  # no serial with two devices attached
    closed = free_port()
    with pytest.raises(AdbError, match=f"adb connect 127.0.0.1:{closed}: failed to connect"):
        Adb(serial=f"127.0.0.1:{closed}", server_port=server).connect()  # adb itself exits 0 here
    gone = Adb(serial="emulator-5554", server_port=server)
    assert gone.state() == "missing"
    with pytest.raises(AdbError, match="emulator-5554 is not attached"):
        gone.ensure_online()


@pytest.mark.parametrize("protocol", ["shell_v2", "shell_v1"])
def test_shell_exit_codes_stderr_and_quoting(server: int, protocol: str) -> None:
    with device(server, *(["--no-shell-v2"] if protocol == "shell_v1" else [])) as (_, adb):
        assert ("shell_v2" in adb.features()) == (protocol == "shell_v2")
        res = adb.shell("echo out; echo err >&2; exit 3")
        assert res.returncode == 3
        if protocol == "shell_v2":
            assert (res.out, res.err) == ("out\n", "err\n")
        else:  # v1 has one stream: stderr arrives merged, the exit code through the marker line
            assert sorted(res.out.split()) == ["err", "out"]
        words = ["a b", "it's", 'say "hi"', "x;rm -rf /nonexistent", "$HOME", "`id`"]
        assert adb.shell(["printf", "%s|", *words]).out == "|".join(words) + "|"
        assert adb.shell("exit 0").returncode == 0
        with pytest.raises(AdbError, match=r"failed \(exit 7\): boom"):
            adb.shell("echo boom >&2; exit 7", check=True)


def test_push_pull_odd_names_intact(server: int, tmp_path: Path) -> None:
    src = tmp_path / "host side"
    (src / "sub dir").mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(300_000)  # several sync DATA chunks
    (src / ODD).write_bytes(payload)
    (src / "sub dir" / "a;b 'c'.txt").write_text("small\n")
    remote = str(tmp_path / 'device "side"; x')  # the endpoint's device is this host: remote paths are host paths
    with device(server) as (_, adb):
        adb.shell(["mkdir", "-p", remote], check=True)
        adb.push(src / ODD, f"{remote}/{ODD}")
        adb.push(src / "sub dir", f"{remote}/")
        assert (Path(remote) / ODD).read_bytes() == payload
        sha = adb.shell(["sha256sum", f"{remote}/{ODD}"], check=True).out.split()[0]
        assert sha == hashlib.sha256(payload).hexdigest()
        assert adb.shell(["cat", f"{remote}/sub dir/a;b 'c'.txt"]).out == "small\n"
        back = tmp_path / "back"
        back.mkdir()
        adb.pull(f"{remote}/{ODD}", back / ODD)
        assert (back / ODD).read_bytes() == payload
        adb.pull_dir(remote, back / "tree")
        assert (back / "tree" / ODD).read_bytes() == payload
        assert (back / "tree" / "sub dir" / "a;b 'c'.txt").read_text() == "small\n"
        with pytest.raises(AdbError, match="does not exist"):
            adb.pull(f"{remote}/missing file", back / "x")


def test_timeout_and_offline_device(server: int) -> None:
    port = free_port()
    ep = Endpoint(port=port).start()
    adb = Adb(serial=ep.serial, server_port=server, timeout_s=30)
    try:
        adb.ensure_online()  # connects a host:port serial
        t0 = time.monotonic()
        with pytest.raises(AdbError, match="timed out after 1 s"):
            adb.shell("sleep 20", timeout=1)
        assert time.monotonic() - t0 < 10
        ep.stop()  # the device drops off: the server keeps a stale, offline transport
        deadline = time.monotonic() + 20
        while adb.state() != "offline" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert adb.state() == "offline"
        with pytest.raises(AdbError, match="device offline"):
            adb.shell("true")
        with pytest.raises(AdbError, match="failed to connect|offline"):
            adb.ensure_online()  # nothing listens: reconnecting fails with adb's message
        ep = Endpoint(port=port).start()  # back on the same address: ensure_online reconnects
        adb.ensure_online()
        assert adb.shell("echo back").out == "back\n"
    finally:
        adb.disconnect()
        ep.stop()


def test_connection_dropped_mid_command(server: int) -> None:
    with device(server) as (ep, adb):
        # The bare adb client exits 0 when the device vanishes mid-command (shell v2, no exit packet) ...
        raw = subprocess.Popen(["adb", "-P", str(server), "-s", ep.serial, "shell", "-T", "sleep 20"])
        time.sleep(1)
        ep.stop()
        assert raw.wait(20) == 0
    with device(server) as (ep, adb):
        # ... so the driver's exit marker is what tells a dropped connection from success.
        threading.Timer(1.0, ep.stop).start()
        t0 = time.monotonic()
        with pytest.raises(AdbError, match="connection dropped before the command finished"):
            adb.shell("echo started; sleep 20")
        assert time.monotonic() - t0 < 15


# --------------------------------------------------------------------------------- the adb target, engines


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_tflite: tuple[Path, object]) -> tuple[Path, list]:
    """A bench job folder (edsr-tiny x2 at a 64x64 tile, two photo crops: 2x3 and 2x2 tiles)."""
    root = tmp_path_factory.mktemp("adbjob")
    photos = dict(builtin_hr_images("sporco"))
    test_dir = root / "photos"
    test_dir.mkdir()
    save_png(test_dir / "monarch.png", photos["monarch"][80:280, 120:380])
    save_png(test_dir / "kodim23.png", photos["kodim23"][40:200, 300:440])
    pairs = load_test_set(test_dir, 2)
    model = root / ODD
    shutil.copyfile(tiny_tflite[0], model)
    cfg = BenchConfig(artifacts=(model,), out=root / "out", warmup=1, runs=3)
    artifact = Artifact(path=model, model="edsr-tiny", scale=2, tile=[64, 64], overlap=14)
    return root, pairs, artifact, cfg


def fresh_job(root: Path, name: str, pairs: list, artifact: Artifact, cfg: BenchConfig) -> Path:
    job_dir = root / "jobs" / name
    write_job(job_dir, artifact, pairs, cfg)
    return job_dir


@pytest.fixture(scope="module")
def local_reference(job: tuple) -> tuple[dict[str, np.ndarray], dict]:
    """The local target's SR output per image name, and its scores, on the same job."""
    root, pairs, artifact, cfg = job
    job_dir = fresh_job(root, "local", pairs, artifact, cfg)
    result = LocalTarget(Path(find_device_python())).run(job_dir)
    return sr_outputs(result, job_dir), score_outputs(result, job_dir / "out", pairs, 2)


def sr_outputs(result: dict, job_dir: Path) -> dict[str, np.ndarray]:
    """The runner's SR arrays by the user's image name (its files are named by the host, not by the user)."""
    return {img["name"]: np.load(job_dir / "out" / img["output"]) for img in result["images"]}


def test_runner_engine_matches_local_target(server: int, job: tuple, local_reference: tuple, tmp_path: Path) -> None:
    root, pairs, artifact, cfg = job
    workdir = tmp_path / "data local; 'tmp'"
    with device(server, "--getprop", "ro.product.model=Pixel 7", "--getprop", "ro.build.version.release=14") as (ep, _):
        target = ADBTarget.from_config(
            "phone",
            {"type": "adb", "serial": ep.serial, "adb_server_port": server, "engine": "runner",
             "python": find_device_python(), "workdir": str(workdir), "timeout_s": 300},
            REPO,
        )  # fmt: skip
        desc = target.describe(artifact.path)
        assert desc["tile"] == [64, 64] and desc["scale"] == 2
        job_dir = fresh_job(root, "adb-runner", pairs, artifact, cfg)
        result = target.run(job_dir)
        info = target.info()
    scores = score_outputs(result, job_dir / "out", pairs, 2)
    ours, (ref_out, ref_scores) = sr_outputs(result, job_dir), local_reference
    for p in pairs:
        assert scores[p.name]["psnr_y_db"] == ref_scores[p.name]["psnr_y_db"]
        np.testing.assert_array_equal(ours[p.name], ref_out[p.name])
    assert sorted(workdir.iterdir()) == []  # the per-run folder is gone
    assert info["device_model"] == "Pixel 7" and info["android_version"] == "14" and info["os"] == "Android 14"
    assert info["kind"] == "adb" and info["engine"] == "runner" and info["cpu_governor"]


def test_cli_bench_with_adb_target_from_targets_file(server: int, job: tuple, tmp_path: Path) -> None:
    """`device_bench bench --targets local,phone --targets-file ...`: the adb row's PSNR is the local row's; a
    phone that cannot be reached fails alone with exit 3."""
    root, _, artifact, _ = job
    with device(server) as (ep, _):
        targets = tmp_path / "targets.yaml"
        targets.write_text(
            "targets:\n  phone:\n    type: adb\n"
            f"    serial: '{ep.serial}'\n    adb_server_port: {server}\n    engine: runner\n"
            f"    python: '{find_device_python()}'\n    workdir: '{tmp_path / 'device wd'}'\n"
            f"  ghost:\n    type: adb\n    serial: '127.0.0.1:{free_port()}'\n    adb_server_port: {server}\n"
            "    engine: runner\n"
        )
        out = tmp_path / "bench out"
        proc = run_module(
            "device_bench", "bench", artifact.path, "--targets", "local,phone", "--targets-file", targets,
            "--test-set", root / "photos", "--overlap", 14, "--warmup", 1, "--runs", 2, "--out", out,
            "--device-python", find_device_python(),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["target"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"local", "phone"}
    assert rows["phone"]["psnr_y_db"] == rows["local"]["psnr_y_db"]
    assert rows["phone"]["per_image"].keys() == rows["local"]["per_image"].keys() == {"kodim23", "monarch"}
    ghost = run_module(
        "device_bench", "bench", artifact.path, "--targets", "local,ghost", "--targets-file", targets,
        "--test-set", root / "photos", "--overlap", 14, "--warmup", 1, "--runs", 2, "--out", tmp_path / "ghost out",
        "--device-python", find_device_python(),
    )  # fmt: skip
    assert ghost.returncode == 3, ghost.stderr[-2000:]
    assert "target ghost: adb connect 127.0.0.1:" in ghost.stderr and "failed to connect" in ghost.stderr
    report = json.loads((tmp_path / "ghost out" / "report.json").read_text())
    assert [r["target"] for r in report["rows"]] == ["local"]


def test_device_dropping_mid_run_fails_the_target(server: int, job: tuple, tmp_path: Path) -> None:
    root, pairs, artifact, cfg = job
    hang = tmp_path / "hanging python"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    with device(server) as (ep, _):
        target = ADBTarget.from_config(
            "phone",
            {"type": "adb", "serial": ep.serial, "adb_server_port": server, "engine": "runner", "python": str(hang),
             "workdir": str(tmp_path / "wd")},
            REPO,
        )  # fmt: skip
        threading.Timer(3.0, ep.stop).start()
        t0 = time.monotonic()
        with pytest.raises(TargetFailed, match="^target phone: .*connection dropped before the command finished"):
            target.run(fresh_job(root, "adb-drop", pairs, artifact, cfg))
        assert time.monotonic() - t0 < 25


def install_fake_binary(folder: Path, python: str) -> Path:
    """The benchmark_model test double with the given interpreter in its #! line."""
    binary = folder / "benchmark_model"
    lines = FAKE_BINARY.read_text().splitlines(keepends=True)
    binary.write_text(f"#!{python}\n" + "".join(lines))
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    return binary


def test_benchmark_model_engine_end_to_end(server: int, job: tuple, local_reference: tuple, tmp_path: Path) -> None:
    root, pairs, artifact, cfg = job
    binary = install_fake_binary(tmp_path, find_device_python())
    workdir = tmp_path / 'dev ice; "wd"'
    with device(server) as (ep, _):
        target = ADBTarget.from_config(
            "phone",
            {"type": "adb", "serial": ep.serial, "adb_server_port": server, "engine": "benchmark_model",
             "benchmark_model": str(binary), "workdir": str(workdir), "taskset": "1", "threads": 1,
             "delegate": "xnnpack", "cooldown_s": 0.2},
            REPO,
        )  # fmt: skip
        job_dir = fresh_job(root, "adb-bm", pairs, artifact, cfg)
        t0 = time.monotonic()
        result = target.run(job_dir)
        first_run_s = time.monotonic() - t0
        info = target.info()
    scores = score_outputs(result, job_dir / "out", pairs, 2)
    _, ref_scores = local_reference
    for p in pairs:  # real outputs of the model, tiled on the host, run "on the device", stitched on the host
        assert scores[p.name]["psnr_y_db"] == ref_scores[p.name]["psnr_y_db"]  # same interpreter and kernels
    # The binary was pushed to <workdir>/bin and run once per tile (2x3 + 2x2), pinned by taskset to CPU 0.
    calls = [json.loads(line) for line in (workdir / "bin" / "benchmark_model.calls.jsonl").read_text().splitlines()]
    assert len(calls) == 6 + 4 and all(c["affinity"] == [0] for c in calls)
    timed, rest = calls[0]["argv"], [c["argv"] for c in calls[1:]]
    remote = timed[0].removeprefix("--graph=").rsplit("/", 1)[0]
    assert remote.startswith(str(workdir) + "/run.")
    assert timed == [
        f"--graph={remote}/model.tflite",
        "--num_threads=1",
        "--num_runs=3",
        "--warmup_runs=1",
        "--use_xnnpack=true",
        "--input_layer=serving_default_args_0",
        "--input_layer_shape=1,64,64,3",
        f"--input_layer_value_files=serving_default_args_0:{remote}/tiles/tile0.raw",
        f"--output_filepath={remote}/out/tile0.raw",
        "--report_peak_memory_footprint=true",
    ]
    assert [a for a in rest[0] if a.startswith(("--num_runs", "--warmup", "--min_secs"))] == [
        "--num_runs=1",
        "--warmup_runs=0",
        "--min_secs=0",
        "--warmup_min_secs=0",
    ]
    assert sorted(a[-1] for a in rest) == sorted(f"--output_filepath={remote}/out/tile{k}.raw" for k in range(1, 10))
    # Every figure of the tool's log made it into the result; the raw log is kept.
    bm = result["benchmark_model"]
    assert set(bm["latency_ms"]) == {"init", "first", "warmup_avg", "avg", "min", "max", "std", "median", "p5", "p95"}
    assert set(bm["memory_mb"]) == {"init_delta", "overall_delta", "peak", "vm_rss", "rss_anon", "rss_file_shmem"}
    # The tool runs at least num_runs and at least min_secs (1 s; warm-up 0.5 s): the result has the real counts.
    assert bm["runs"]["inference"] >= 3 and bm["runs"]["warmup"] >= 1 and bm["model_size_mb"] > 0
    assert (result["runs"], result["warmup"]) == (bm["runs"]["inference"], bm["runs"]["warmup"])
    assert result["latency_ms"]["median"] == bm["latency_ms"]["median"] and result["latency_ms"]["p90"] is None
    assert result["delegate"] == {"name": "xnnpack", "flags": ["--use_xnnpack=true"]}
    assert result["peak_rss_mb"] == bm["memory_mb"]["peak"] > 10
    assert "INFO: Inference timings in us: Init:" in (job_dir / "benchmark_model.log").read_text()
    assert {img["name"]: img["tiles"] for img in result["images"]} == {"monarch": 6, "kodim23": 4}
    assert info["runtime"] == "benchmark_model" and info["delegate"] == "xnnpack" and info["taskset"] == "1"
    assert info["android_version"] == "unknown" and info["device_model"] == "FakeArm64"  # no getprop off Android
    assert sorted(p.name for p in workdir.iterdir()) == ["bin"] and first_run_s > 0


def test_tile_recorder_reuses_the_runner_tiler() -> None:
    io = {"tile": [8, 8], "scale": 2}
    rec = TileRecorder(io, overlap=2)
    lr = np.random.default_rng(1).random((11, 13, 3), dtype=np.float32)
    rec.upscale(lr)
    assert len(rec.tiles) == 2 * 3 and all(t.shape == (8, 8, 3) for t in rec.tiles)
    rec.outputs = [np.repeat(np.repeat(t, 2, 0), 2, 1) for t in rec.tiles]  # nearest-neighbour "model"
    sr, n, padded = rec.upscale(np.zeros_like(lr))
    np.testing.assert_array_equal(sr, np.repeat(np.repeat(lr, 2, 0), 2, 1))
    assert (n, padded) == (6, False)


def test_config_errors_and_unreachable_device(tmp_path: Path, server: int) -> None:
    binary = tmp_path / "bm"
    binary.write_text("x")
    ok = {"type": "adb", "serial": "127.0.0.1:1", "benchmark_model": "bm", "adb_server_port": server}
    target = ADBTarget.from_config("phone", ok, tmp_path)
    assert target.benchmark_model == binary and target.delegate == "xnnpack" and target.taskset is None
    assert ADBTarget.from_config("p", {**ok, "taskset": 10}, tmp_path).taskset == "10"  # YAML reads a bare 10 as int
    for entry, needle in [
        ({**ok, "delegate": "npu"}, "delegate must be one of"),
        ({**ok, "taskset": "f0; reboot"}, "hexadecimal"),
        ({**ok, "benchmark_model": "missing"}, "which does not exist"),
        ({**ok, "engine": "apk"}, "engine must be one of"),
        ({**ok, "threads": "four"}, "'threads' must be an integer"),
        ({**ok, "colour": "red"}, "unknown field"),
        ({**ok, "env": {"BAD-NAME": "1"}}, "invalid variable name"),
        ({k: v for k, v in ok.items() if k != "benchmark_model"}, "needs 'benchmark_model:'"),
    ]:
        with pytest.raises(BadInput, match=needle):
            ADBTarget.from_config("phone", entry, tmp_path)
    port = free_port()
    dead = ADBTarget.from_config("phone", {**ok, "serial": f"127.0.0.1:{port}", "engine": "runner"}, tmp_path)
    with pytest.raises(TargetFailed, match=f"target phone: adb connect 127.0.0.1:{port}: failed to connect"):
        dead.describe(binary)


# ------------------------------------------------------------------------------------------- arm64 stand-in


@pytest.mark.vm
def test_runner_engine_in_arm64_vm(server: int, job: tuple, local_reference: tuple) -> None:
    """Through the real adb server, the endpoint runs every command and file operation inside the arm64 VM."""
    from pi_vm import ensure_pi_vm

    vm = ensure_pi_vm()
    root, pairs, artifact, cfg = job
    args = ["--ssh-port", str(vm.port), "--ssh-key", str(vm.key), "--ssh-known-hosts", str(vm.known_hosts)]
    with device(server, *args) as (ep, adb):
        assert adb.shell("uname -m").out.strip() == "aarch64"
        target = ADBTarget.from_config(
            "pi-adb",
            {"type": "adb", "serial": ep.serial, "adb_server_port": server, "engine": "runner", "python": "python3",
             "runtime": "ai-edge-litert", "env": {"PYTHONPATH": "/opt/litert"}, "workdir": "/tmp/edgesr adb; 'x'",
             "emulated": True, "timeout_s": 1800},
            REPO,
        )  # fmt: skip
        job_dir = fresh_job(root, "adb-vm", pairs, artifact, cfg)
        result = target.run(job_dir)
        info = target.info()
        leftovers = adb.shell(["ls", "-A", "/tmp/edgesr adb; 'x'"]).out.split()
    assert result["machine"] == "aarch64" and result["runtime"]["name"] == "ai_edge_litert"
    scores = score_outputs(result, job_dir / "out", pairs, 2)
    ours, (ref_out, ref_scores) = sr_outputs(result, job_dir), local_reference
    for p in pairs:
        # arm64 and x86 XNNPACK kernels accumulate fp32 in different orders: outputs agree to ~1e-6, and the PSNR
        # of the 8-bit quantized result to ~1e-6 dB (measured: 8.4e-7 dB), not bit for bit.
        diff = np.abs(ours[p.name] - ref_out[p.name]).max()
        assert diff < 1e-4, f"{p.name}: max |arm64 - x86| = {diff}"
        assert scores[p.name]["psnr_y_db"] == pytest.approx(ref_scores[p.name]["psnr_y_db"], abs=1e-4)
    assert info["emulated"] is True and info["machine"] == "aarch64" and leftovers == []
    assert info["android_version"] == "unknown" and info["os"].startswith("Debian")
