"""The adb target: a phone (or any board reached over adb) driven through the real `adb` binary.

Two engines, chosen per target in the targets file:
- `benchmark_model` (phones): LiteRT's benchmark_model binary, which the user downloads for their phone and names
  in the targets file, is pushed with the model and per-tile raw inputs, pinned with `taskset`, run with the
  configured threads and delegate, its log parsed and its per-tile outputs pulled and stitched on the host
  (device_bench.benchmark_model_engine);
- `runner` (devices with Python: Linux boards over adb, Termux): device_bench/runner.py and the job folder are
  pushed and run with the device's python, exactly as the ssh target does; result.json and outputs come back.
Each run uses its own folder under `workdir` (`mktemp -d`), removed afterwards, also on failure.

Targets file entry (keys other than `type` are optional unless noted):
    phone:
      type: adb
      serial: 127.0.0.1:5555          # adb -s; host:port serials are `adb connect`ed (connect: false to not)
      adb: adb                        # the adb binary
      adb_server_port: 5037           # adb -P (default: $ANDROID_ADB_SERVER_PORT or 5037)
      engine: benchmark_model         # or runner
      benchmark_model: ~/Downloads/benchmark_model   # host path (required by that engine; relative: to the file)
      python: python3                 # runner engine
      runtime: auto                   # runner engine: ai_edge_litert | tflite_runtime | tensorflow | auto
      env: {PYTHONPATH: /opt/litert}  # extra environment for the device command
      workdir: /data/local/tmp/edgesr
      taskset: f0                     # CPU mask (hex) for benchmark_model; omit to not pin
      threads: 4                      # overrides the bench's --threads on this target
      delegate: xnnpack               # xnnpack | gpu | nnapi | none
      cooldown_s: 0                   # pause before every run after the first (thermal cool-down)
      timeout_s: 600
      emulated: false
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from android_harness.adb import Adb, AdbError
from device_bench.benchmark_model_engine import EngineSettings
from device_bench.benchmark_model_engine import run_job as run_benchmark_model
from device_bench.runner import RUNTIMES
from device_bench.target_config import EntryFields
from device_bench.targets import DEVICE_FACTS, RUNNER, LocalTarget, Target, check_runner_exit, default_device_python
from edgesr.errors import BadInput, TargetFailed

log = logging.getLogger("device_bench")

ENGINES = ("benchmark_model", "runner")
DELEGATES = ("xnnpack", "gpu", "nnapi", "none")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# One shell call for the device facts; every probe degrades to an empty value off Android.
_FACTS_SCRIPT = r"""
echo "model=$(getprop ro.product.model 2>/dev/null)"
echo "android=$(getprop ro.build.version.release 2>/dev/null)"
echo "sdk=$(getprop ro.build.version.sdk 2>/dev/null)"
echo "abi=$(getprop ro.product.cpu.abi 2>/dev/null)"
echo "dt_model=$(tr -d '\000' < /proc/device-tree/model 2>/dev/null)"
echo "os=$( (. /etc/os-release && echo "$PRETTY_NAME") 2>/dev/null)"
echo "machine=$(uname -m 2>/dev/null)"
echo "kernel=$(uname -sr 2>/dev/null)"
echo "cpus=$(grep -c ^processor /proc/cpuinfo 2>/dev/null)"
for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
  [ -r "$f" ] && echo "governor=${f#/sys/devices/system/cpu/}=$(cat "$f")"
done
true
"""
UNKNOWN = "unknown"


@dataclass
class ADBTarget(Target):
    """A device reached with adb; see the module docstring for the targets-file keys."""

    name: str
    serial: str | None = None
    adb: str = "adb"
    adb_server_port: int | None = None
    connect: bool | None = None  # None: `adb connect` host:port serials
    engine: str = "benchmark_model"
    benchmark_model: Path | None = None
    python: str = "python3"
    runtime: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/data/local/tmp/edgesr"
    taskset: str | None = None
    threads: int | None = None
    delegate: str = "xnnpack"
    cooldown_s: float = 0.0
    timeout_s: float = 600.0
    emulated: bool = False
    host_python: Path | None = None  # benchmark_model engine: describes models on the host (runner.py --describe)
    _facts: dict[str, Any] | None = field(default=None, init=False, repr=False)
    _binary_on_device: str | None = field(default=None, init=False, repr=False)
    _runs: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"target {self.name}"
        if self.engine not in ENGINES:
            raise BadInput(f"{where}: engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.delegate not in DELEGATES:
            raise BadInput(f"{where}: delegate must be one of {', '.join(DELEGATES)}, got {self.delegate!r}")
        if self.taskset is not None and not re.fullmatch(r"[0-9a-fA-F]+", self.taskset):
            raise BadInput(f"{where}: taskset must be a hexadecimal CPU mask like f0, got {self.taskset!r}")
        if self.threads is not None and (self.threads < 1 and self.threads != -1):
            raise BadInput(f"{where}: threads must be >= 1 (or -1), got {self.threads}")
        if self.cooldown_s < 0 or not self.timeout_s > 0:
            raise BadInput(f"{where}: cooldown_s must be >= 0 and timeout_s > 0")
        if self.runtime != "auto" and self.runtime not in RUNTIMES:
            raise BadInput(f"{where}: runtime must be auto or one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if bad := [k for k in self.env if not _ENV_NAME.match(k)]:
            raise BadInput(f"{where}: env names must be shell identifiers, got {bad}")
        if not self.workdir.startswith("/"):
            raise BadInput(f"{where}: workdir must be an absolute device path, got {self.workdir!r}")
        if self.engine == "benchmark_model":
            if self.benchmark_model is None:
                raise BadInput(f"{where}: engine benchmark_model needs 'benchmark_model:' (its path on this host)")
            if not Path(self.benchmark_model).is_file():
                raise BadInput(f"{where}: benchmark_model binary {self.benchmark_model} does not exist")
        self.client = Adb(serial=self.serial, binary=self.adb, server_port=self.adb_server_port, timeout_s=60.0)

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any], base_dir: Path) -> ADBTarget:
        """An ADBTarget from its targets-file entry; host paths are relative to the file's folder."""
        f = EntryFields(name, entry, base_dir)
        engine = f.text("engine", "benchmark_model")
        target = cls(
            name=name,
            serial=f.text("serial", None),
            adb=f.text("adb", "adb"),
            adb_server_port=f.integer("adb_server_port", None, minimum=1, maximum=65535),
            connect=f.flag("connect", None) if entry.get("connect") is not None else None,
            engine=engine,
            benchmark_model=f.path("benchmark_model", None),
            python=f.text("python", "python3"),
            runtime=f.runtime(),
            env=f.env(),
            workdir=f.text("workdir", "/data/local/tmp/edgesr"),
            taskset=f.text("taskset", None),  # quote it in YAML ('f0'); a bare 10 is read as the mask "10"
            threads=f.integer("threads", None, minimum=-1),
            delegate=f.text("delegate", "xnnpack"),
            cooldown_s=f.number("cooldown_s", 0.0, positive=False),
            timeout_s=f.number("timeout_s", 600.0),
            emulated=f.flag("emulated", False),
        )
        f.check_unknown()
        return target

    # ------------------------------------------------------------------------------------------------- plumbing

    def _fail(self, reason: str) -> TargetFailed:
        return TargetFailed(f"target {self.name}: {reason}")

    def _online(self) -> None:
        try:
            self.client.ensure_online(connect=self.connect is not False)
        except AdbError as exc:
            raise self._fail(str(exc)) from None

    def _env_prefix(self) -> str:
        return "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())

    def _run_dir(self) -> str:
        """A fresh folder under workdir on the device."""
        q = shlex.quote
        try:
            res = self.client.shell(f"mkdir -p {q(self.workdir)} && mktemp -d {q(self.workdir + '/run.XXXXXX')}")
        except AdbError as exc:
            raise self._fail(str(exc)) from None
        path = res.out.strip()
        if res.returncode != 0 or not path.startswith(self.workdir):
            raise self._fail(f"cannot create a run folder under {self.workdir}: {(res.err or res.out).strip()}")
        return path

    def _remove(self, remote: str) -> None:
        try:
            self.client.shell(f"rm -rf {shlex.quote(remote)}", timeout=60)
        except AdbError as exc:  # the run's own error matters more; a dead device cannot be cleaned up
            log.warning("%s: could not remove %s: %s", self.name, remote, exc)

    def _cooldown(self) -> None:
        if self._runs and self.cooldown_s > 0:
            log.info("%s: cooling down %g s", self.name, self.cooldown_s)
            time.sleep(self.cooldown_s)
        self._runs += 1

    def _runner(self, remote: str, args: list[str], log_path: Path | None = None) -> str:
        """Run runner.py in `remote` with the device python; its errors classified like the local target's."""
        cmd = f"cd {shlex.quote(remote)} && {self._env_prefix()}{shlex.join([self.python, 'runner.py', *args])}"
        res = self.client.shell(cmd, timeout=self.timeout_s)
        if log_path is not None:
            log_path.write_bytes(res.stderr)
        check_runner_exit(self.name, "runner", res.returncode, res.err or res.out, shell=True, python=self.python)
        return res.out

    # --------------------------------------------------------------------------------------- Target interface

    def describe(self, model: Path) -> dict[str, Any]:
        model = Path(model).resolve()
        if self.engine == "benchmark_model":  # benchmark_model cannot describe a model: read it on the host
            host = LocalTarget(self.host_python or default_device_python(), timeout_s=self.timeout_s)
            desc = host.describe(model)
            return {**desc, "runtime": {"name": "benchmark_model", "version": UNKNOWN}, "described_on": "host"}
        self._online()
        remote = self._run_dir()
        try:
            self.client.push(RUNNER, f"{remote}/runner.py")
            self.client.push(model, f"{remote}/{model.name}", timeout=self.timeout_s)
            out = self._runner(remote, ["--describe", model.name, "--runtime", self.runtime])
        except AdbError as exc:
            raise self._fail(str(exc)) from None
        finally:
            self._remove(remote)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise self._fail(f"describe printed no JSON: {out[-200:]!r}") from None

    def run(self, job_dir: Path) -> dict[str, Any]:
        job_dir = Path(job_dir).resolve()
        job = json.loads((job_dir / "job.json").read_text())
        self._online()
        self.info()  # device facts before the run, while the device is known to answer
        self._cooldown()
        remote = self._run_dir()
        try:
            if self.engine == "runner":
                return self._run_runner(job_dir, job, remote)
            return self._run_benchmark_model(job_dir, remote)
        except AdbError as exc:
            raise self._fail(str(exc)) from None
        except TargetFailed as exc:
            if str(exc).startswith(f"target {self.name}:"):
                raise
            raise self._fail(str(exc)) from None
        finally:
            self._remove(remote)

    def _run_runner(self, job_dir: Path, job: dict[str, Any], remote: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="edgesr-adb-job-") as tmp:
            pushed = [RUNNER, *(p for p in job_dir.iterdir() if p.name not in (job["out_dir"], "runner.log"))]
            if self.threads is not None:  # the target's thread count wins over the bench's
                (Path(tmp) / "job.json").write_text(json.dumps({**job, "threads": self.threads}))
                pushed = [Path(tmp) / "job.json" if p.name == "job.json" else p for p in pushed]
            self.client.push(pushed, f"{remote}/", timeout=self.timeout_s)
        args = ["--job", "job.json", "--runtime", self.runtime]
        self._runner(remote, args, log_path=job_dir / "runner.log")
        out_dir = job_dir / job["out_dir"]
        self.client.pull_dir(f"{remote}/{job['out_dir']}", out_dir, timeout=self.timeout_s)
        try:
            return json.loads((out_dir / "result.json").read_text())
        except (OSError, ValueError) as exc:
            raise self._fail(f"runner wrote no readable result.json ({exc})") from None

    def _run_benchmark_model(self, job_dir: Path, remote: str) -> dict[str, Any]:
        if self._binary_on_device is None:
            binary = f"{self.workdir}/bin/benchmark_model"
            self.client.shell(f"mkdir -p {shlex.quote(self.workdir + '/bin')}", check=True)
            self.client.push(Path(self.benchmark_model), binary, timeout=self.timeout_s)
            self.client.shell(["chmod", "755", binary], check=True)
            self._binary_on_device = binary
        job = json.loads((job_dir / "job.json").read_text())
        io = self.describe(job_dir / job["model"])
        threads = self.threads if self.threads is not None else int(job["threads"])
        settings = EngineSettings(
            binary=self._binary_on_device,
            threads=threads,
            delegate=self.delegate,
            taskset=self.taskset,
            env_prefix=self._env_prefix(),
            timeout_s=self.timeout_s,
        )
        result = run_benchmark_model(self.client, remote, job_dir, io, settings)
        result["device"] = self.device_facts()
        return result

    def device_facts(self) -> dict[str, Any]:
        """Model, Android version, CPU governor, ... read from the device once; 'unknown' where it has none."""
        if self._facts is not None:
            return self._facts
        raw: dict[str, Any] = {}
        governors: dict[str, str] = {}
        res = self.client.shell(_FACTS_SCRIPT, timeout=60)
        for line in res.out.splitlines():
            key, _, value = line.partition("=")
            if key == "governor":
                cpu, _, gov = value.partition("=")
                governors[cpu.split("/")[0]] = gov.strip()
            elif value.strip():
                raw[key] = value.strip()
        banner = next((d.details for d in self.client.devices() if d.serial == self.serial), {})
        android = raw.get("android")
        self._facts = {
            "device_model": raw.get("model")
            or raw.get("dt_model")
            or banner.get("model", "").replace("_", " ")
            or UNKNOWN,
            "android_version": android or UNKNOWN,
            "android_sdk": raw.get("sdk", UNKNOWN),
            "os": f"Android {android}" if android else raw.get("os", UNKNOWN),
            "abi": raw.get("abi") or raw.get("machine") or UNKNOWN,
            "machine": raw.get("machine", UNKNOWN),
            "kernel": raw.get("kernel", UNKNOWN),
            "cpu_count": int(raw["cpus"]) if raw.get("cpus", "").isdigit() else None,
            "cpu_governor": ",".join(sorted(set(governors.values()))) or UNKNOWN,
            "cpu_governors": governors,
        }
        return self._facts

    def info(self) -> dict[str, Any]:
        try:
            device = self.device_facts()
            adb_version = self.client.version()
        except (AdbError, ValueError) as exc:
            device, adb_version = {"facts_error": str(exc)}, UNKNOWN
        info = {
            "name": self.name,
            "kind": "adb",
            "emulated": self.emulated,
            "serial": self.serial,
            "adb_version": adb_version,
            "engine": self.engine,
            **{key: UNKNOWN for key in DEVICE_FACTS},
            **device,
            "threads": self.threads,
            "cooldown_s": self.cooldown_s,
            "timeout_s": self.timeout_s,
            "workdir": self.workdir,
        }
        if self.engine == "benchmark_model":
            info.update(runtime="benchmark_model", benchmark_model=str(self.benchmark_model))
            info.update(delegate=self.delegate, taskset=self.taskset)
        else:
            info.update(runtime_choice=self.runtime, python=self.python, env=dict(self.env))
        return info
