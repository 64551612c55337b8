"""The ssh target against a real OpenSSH server on 127.0.0.1 (this x86 machine plays the device).

The device Python is the device venv's; every result is compared with the local target running the same job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from local_sshd import LocalSSHD, free_port, keygen
from ssh_targets import targets_file

from conftest import find_device_python, run_module
from device_bench.ssh_target import SSHTarget
from device_bench.targets import LocalTarget, make_targets
from edgesr.datasets import load_test_set
from edgesr.errors import BadInput, TargetFailed
from edgesr.images import quantize_uint8, to_float
from edgesr.metrics import sr_scores

OVERLAP = 14
QUOTED = "my \"model\"; v1 $(touch pwned) 'x'.tflite"


def make_job(
    folder: Path,
    model: Path,
    photos: Path,
    *,
    model_name: str = "model.tflite",
    inputs_dir: str = "inputs",
    out_dir: str = "out",
    runs: int = 2,
) -> Path:
    """A runner job folder (the layout bench.write_job produces), with file names of our choosing."""
    (folder / inputs_dir).mkdir(parents=True)
    shutil.copyfile(model, folder / model_name)
    pairs = load_test_set(photos, 2)
    for p in pairs:
        np.save(folder / inputs_dir / f"{p.name}.npy", to_float(p.lr))
    job = {
        "runner_version": 1,
        "model": model_name,
        "inputs": [{"name": p.name, "path": f"{inputs_dir}/{p.name}.npy"} for p in pairs],
        "out_dir": out_dir,
        "overlap": OVERLAP,
        "threads": 1,
        "warmup": 0,
        "runs": runs,
        "runtime": "auto",
    }
    (folder / "job.json").write_text(json.dumps(job))
    return folder


def ssh_target(sshd: LocalSSHD, **overrides: object) -> SSHTarget:
    settings = dict(
        name="box",
        host="127.0.0.1",
        port=sshd.port,
        user=sshd.user,
        identity=sshd.client_key,
        known_hosts=sshd.known_hosts,
        python=find_device_python(),
        timeout_s=120.0,
        connect_timeout_s=5.0,
    )
    settings.update(overrides)
    return SSHTarget(**settings)


def outputs(job_dir: Path, out_dir: str = "out") -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted((job_dir / out_dir).glob("*.npy"))}


def psnr_by_image(job_dir: Path, photos: Path, out_dir: str = "out") -> dict[str, float]:
    hr = {p.name: p.hr for p in load_test_set(photos, 2)}
    return {n: sr_scores(quantize_uint8(sr), hr[n], 2)["psnr_y_db"] for n, sr in outputs(job_dir, out_dir).items()}


# ------------------------------------------------------------------------------------------------ real jobs


def test_job_over_ssh_equals_local_and_leaves_nothing_behind(sshd, photos, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    local_dir = make_job(tmp_path / "local", model, photos)
    remote_dir = make_job(tmp_path / "ssh", model, photos)
    local = LocalTarget(Path(find_device_python()))
    target = ssh_target(sshd)
    try:
        desc = target.describe(model)
        assert desc["tile"] == [64, 64] and desc["scale"] == 2 and desc["runtime"]["name"] == "ai_edge_litert"
        local_result = local.run(local_dir)
        result = target.run(remote_dir)
        info = target.info()
    finally:
        target.close()
    # Same interpreter, same inputs: outputs equal to the bit, so PSNR is exactly equal.
    ours, theirs = outputs(remote_dir), outputs(local_dir)
    assert sorted(ours) == ["kodim23", "monarch"] and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert psnr_by_image(remote_dir, photos) == psnr_by_image(local_dir, photos)
    shapes = [(i["name"], i["sr_shape"], i["tiles"]) for i in result["images"]]
    assert shapes == [(i["name"], i["sr_shape"], i["tiles"]) for i in local_result["images"]]
    assert len(result["latency_ms"]["samples"]) == 2 and result["runtime"] == local_result["runtime"]
    assert (remote_dir / "runner.log").exists() and result["peak_rss_mb"] > 10
    # The per-run folder on the device (TMPDIR of the ssh session) is gone, and so is the control socket folder.
    assert list(sshd.remote_tmp.iterdir()) == []
    assert target._control_dir is None
    assert info["kind"] == "ssh" and info["emulated"] is False and info["runtime"]["name"] == "ai_edge_litert"
    assert info["os"].startswith("Debian") and info["kernel"].startswith("Linux") and info["cpu_governor"]
    assert info["python_version"].count(".") == 2


def test_cli_bench_local_and_ssh_same_psnr(sshd, photos, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    tfile = targets_file(tmp_path, sshd, emulated=True)
    out = tmp_path / "out"
    proc = run_module(
        "device_bench", "bench", model, "--targets", "local,box", "--targets-file", tfile, "--out", out,
        "--test-set", photos, "--overlap", OVERLAP, "--warmup", 0, "--runs", 2,
        "--device-python", find_device_python(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["target"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"local", "box"}
    assert rows["box"]["psnr_y_db"] == rows["local"]["psnr_y_db"]
    assert rows["box"]["per_image"].keys() == rows["local"]["per_image"].keys()
    assert rows["box"]["emulated"] is True and rows["local"]["emulated"] is False
    assert list(sshd.remote_tmp.iterdir()) == []


def test_file_names_with_spaces_quotes_and_semicolons_travel_intact(sshd, photos, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    # The user's names reach the device as the model file, the job folder and the output folder; the inputs'
    # paths are the host's own plain names (the runner refuses any other: test_runner_refuses_odd_input_paths).
    weird = dict(model_name=QUOTED, out_dir='out "dir"; rm -rf ~')
    local_dir = make_job(tmp_path / "local", model, photos, **weird)
    remote_dir = make_job(tmp_path / 'job "ssh"; $HOME', model, photos, **weird)
    named = tmp_path / QUOTED
    shutil.copyfile(model, named)
    target = ssh_target(sshd)
    try:
        assert target.describe(named)["tile"] == [64, 64]
        target.run(remote_dir)
    finally:
        target.close()
    LocalTarget(Path(find_device_python())).run(local_dir)
    ours, theirs = outputs(remote_dir, weird["out_dir"]), outputs(local_dir, weird["out_dir"])
    assert sorted(ours) == ["kodim23", "monarch"] and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    result = json.loads((remote_dir / weird["out_dir"] / "result.json").read_text())
    assert result["model"].endswith(QUOTED)  # the runner on the device opened the file by its exact name
    assert not list(Path.cwd().glob("pwned")) and not list(tmp_path.rglob("pwned"))
    assert list(sshd.remote_tmp.iterdir()) == []


# ------------------------------------------------------------------------------- host keys and ssh config


def test_unknown_host_key_is_refused_by_default_and_accept_new_pins_it(sshd, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    target = ssh_target(sshd, known_hosts=empty)
    with pytest.raises(TargetFailed, match=r"target box: .*host key verification failed for root@127.0.0.1"):
        target.describe(model)
    target.close()
    assert empty.read_text() == ""

    target = ssh_target(sshd, known_hosts=empty, accept_new_host_key=True)
    assert target.describe(model)["scale"] == 2
    target.close()
    assert empty.read_text().split()[1:] == sshd.known_hosts.read_text().split()[1:]  # the server's key, pinned
    strict = ssh_target(sshd, known_hosts=empty)  # verification is back on, with the key now known
    assert strict.describe(model)["scale"] == 2
    strict.close()


def test_changed_host_key_is_refused_even_with_accept_new(sshd, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    other = keygen(tmp_path / "other_host", "not-the-server")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    for accept_new in (False, True):
        target = ssh_target(sshd, known_hosts=wrong, accept_new_host_key=accept_new)
        with pytest.raises(TargetFailed, match="host key of root@127.0.0.1 port .* has CHANGED"):
            target.describe(model)
        target.close()


def test_ssh_config_alias_supplies_port_user_identity_and_known_hosts(sshd, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    config = tmp_path / "ssh config"
    config.write_text(
        f"Host mypi\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    (tmp_path / "targets.yaml").write_text(
        "targets:\n  pi:\n    type: ssh\n    host: mypi\n    ssh_config: ssh config\n"
        f"    python: {find_device_python()}\n"
    )
    [target] = make_targets(["pi"], None, 60.0, "auto", targets_file=tmp_path / "targets.yaml")
    assert isinstance(target, SSHTarget) and (target.port, target.user, target.identity) == (None, None, None)
    assert "-p" not in target.ssh_command("true") and "-i" not in target.ssh_command("true")
    try:
        assert target.describe(model)["tile"] == [64, 64]
    finally:
        target.close()


# ----------------------------------------------------------------------------------------------- failures


def test_unreachable_host_exits_3_through_the_cli(sshd, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    tfile = targets_file(tmp_path, sshd, port=free_port())  # nothing listens there
    proc = run_module("device_bench", "bench", model, "--targets", "box", "--targets-file", tfile, "--out",
                      tmp_path / "out", "--device-python", find_device_python())  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "target box" in errors[0] and "connection refused" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_silent_server_times_out_at_connect_timeout(sshd, tiny_tflite) -> None:
    model, _ = tiny_tflite
    with socket.socket() as silent:  # accepts TCP connections (backlog) but never sends an ssh banner
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = ssh_target(sshd, port=silent.getsockname()[1], connect_timeout_s=2)
        t0 = time.monotonic()
        with pytest.raises(TargetFailed, match="unreachable: root@127.0.0.1 port .* did not answer within 2 s"):
            target.describe(model)
        assert time.monotonic() - t0 < 15
        target.close()


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def remote_runner_pids(sshd: LocalSSHD) -> list[int]:
    """The runner's python processes started through this server (not the `sh -c` wrapping them)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            where = os.readlink(proc / "cwd")
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if where.startswith(str(sshd.remote_tmp)) and len(argv) > 1 and argv[1].endswith(b"runner.py"):
            pids.append(int(proc.name))
    return pids


def test_job_timeout_fails_kills_the_runner_and_cleans_up(sshd, photos, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    job = make_job(tmp_path / "job", model, photos, runs=10_000_000)
    target = ssh_target(sshd, timeout_s=8)
    with pytest.raises(TargetFailed, match=r"target box: job job timed out after 8 s"):
        target.run(job)
    target.close()
    wait_for(lambda: not remote_runner_pids(sshd), 20)
    assert list(sshd.remote_tmp.iterdir()) == []


def test_runner_killed_on_the_device_is_reported(sshd, photos, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    job = make_job(tmp_path / "job", model, photos, runs=10_000_000)
    target = ssh_target(sshd)
    thread, caught = _run_until_runner_starts(sshd, target, job)
    time.sleep(1)
    for pid in remote_runner_pids(sshd):
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    thread.join(60)
    target.close()
    assert len(caught) == 1 and isinstance(caught[0], TargetFailed), caught
    assert "runner killed by SIGKILL (out of memory?)" in str(caught[0])
    assert list(sshd.remote_tmp.iterdir()) == []


def test_connection_dropped_mid_run_fails_fast(sshd, photos, tiny_tflite, tmp_path) -> None:
    model, _ = tiny_tflite
    job = make_job(tmp_path / "job", model, photos, runs=10_000_000)
    target = ssh_target(sshd)
    thread, caught = _run_until_runner_starts(sshd, target, job)
    runners = remote_runner_pids(sshd)
    t0 = time.monotonic()
    for pid in sshd.session_pids():  # the server side of our connection goes away, as when a device drops off
        os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert time.monotonic() - t0 < 30
    target.close()
    for pid in runners:  # the orphaned runner on "the device" is not ours to keep
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert len(caught) == 1 and isinstance(caught[0], TargetFailed), caught
    assert "connection dropped" in str(caught[0]), caught[0]


def test_a_dead_link_is_a_drop_whatever_the_remote_command_wrote_last(sshd) -> None:
    target = ssh_target(sshd)
    assert target._ssh("echo up", "probe")[:2] == (0, b"up\n")
    for pid in sshd.session_pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not target._master_alive(), 20)
    chatter = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"  # the runtime's last stderr line
    assert target.ssh_failure(chatter).startswith("connection dropped: "), target.ssh_failure(chatter)
    target.close()


def _run_until_runner_starts(sshd, target, job) -> tuple[threading.Thread, list[BaseException]]:
    """Start `target.run(job)` in a thread and return once the runner process exists on the device."""
    caught: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(caught, target.run, job))
    thread.start()
    wait_for(lambda: remote_runner_pids(sshd))
    return thread, caught


def _capture(caught: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        caught.append(exc)


# --------------------------------------------------------------------------------------------- targets file


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"port": "twenty"}, "target box: field 'port' must be an integer"),
        ({"prot": 22}, "target box: unknown field(s) prot"),
        ({"runtime": "onnx"}, "target box: field 'runtime' 'onnx' is not one of"),
        ({"identity": "no/such/key"}, "target box: field 'identity' names"),
        ({"host": "-oProxyCommand=evil"}, "is not a host name"),
        ({"type": "telnet"}, "target box: unknown type 'telnet'"),
        ({"env": {"A B": "1"}}, "field 'env' has an invalid variable name"),
    ],
)
def test_bad_targets_file_is_one_line_exit_2(sshd, tiny_tflite, tmp_path, entry, needle) -> None:
    model, _ = tiny_tflite
    tfile = targets_file(tmp_path, sshd, **entry)
    proc = run_module("device_bench", "bench", model, "--targets", "box", "--targets-file", tfile, "--out",
                      tmp_path / "out", "--device-python", find_device_python())  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and str(tfile) in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_target_name_and_missing_file(tmp_path) -> None:
    with pytest.raises(BadInput, match="unknown target 'pi'; available: local .*--targets-file"):
        make_targets(["pi"], None, 60.0, "auto")
    with pytest.raises(BadInput, match="no such targets file"):
        make_targets(["pi"], None, 60.0, "auto", targets_file=tmp_path / "nope.yaml")
    (tmp_path / "t.yaml").write_text("targets: [1, 2]\n")
    with pytest.raises(BadInput, match="expected a mapping 'targets:'"):
        make_targets(["pi"], None, 60.0, "auto", targets_file=tmp_path / "t.yaml")


def test_file_entries_get_the_command_line_defaults_and_runtime_spellings(sshd, tmp_path) -> None:
    tfile = targets_file(tmp_path, sshd, runtime="tflite-runtime", env={"PYTHONPATH": "/opt/x y"})
    [t] = make_targets(["box"], None, 42.0, "auto", targets_file=tfile)
    assert (t.runtime, t.timeout_s, t.env, t.emulated) == ("tflite_runtime", 42.0, {"PYTHONPATH": "/opt/x y"}, False)
    assert t._runner_command("runner.py", []) == (
        f"env 'PYTHONPATH=/opt/x y' {find_device_python()} runner.py --runtime tflite_runtime"
    )
    (tmp_path / "local.yaml").write_text(
        f"targets:\n  cpu2:\n    type: local\n    device_python: {find_device_python()}\n"
    )
    [local] = make_targets(["cpu2"], None, 5.0, "auto", targets_file=tmp_path / "local.yaml")
    assert isinstance(local, LocalTarget) and (local.name, local.timeout_s) == ("cpu2", 5.0)
