"""`<out>/results.jsonl`: every finished measurement, appended as it arrives, and what makes two the same (the
key a re-run resumes by)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgesr.datasets import SRPair
from edgesr.workload import Workload

if TYPE_CHECKING:
    from device_bench.artifacts import Artifact
    from device_bench.bench import BenchConfig
    from device_bench.targets import Target

log = logging.getLogger("device_bench")

RESULTS_NAME = "results.jsonl"


def test_set_fingerprint(pairs: list[SRPair]) -> str:
    """sha256 of the test images as measured (names, HR and LR pixels): a changed image is a new measurement."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(os.fsencode(p.name) + b"\0" + str(p.hr.shape).encode() + p.hr.tobytes() + p.lr.tobytes())
    return h.hexdigest()


def measurement_key(
    target: Target, a: Artifact, cfg: BenchConfig, test_set_sha: str, workload: Workload
) -> dict[str, Any]:
    """What makes two measurements the same: the target, the file and every setting that changes the numbers."""
    return {
        "frame": list(workload.frame) if workload.frame else None,
        "min_seconds": cfg.min_seconds,
        "target": target.name,
        "artifact_sha256": a.sha256,
        "threads": cfg.threads,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "tile": a.tile,
        "overlap": a.overlap,
        "test_set": {"name": str(cfg.test_set), "sha256": test_set_sha},
        "runtime": str(getattr(target, "runtime", None) or cfg.runtime),
        "runtime_requirements": a.runtime_requirements,
        **({"compute_units": target.compute_units} if a.format == "coreml" else {}),
    }


def key_id(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


class ResultsLog:
    """`<out>/results.jsonl`: one JSON line {key, row, environment, finished} per finished measurement, appended
    under a lock and flushed + fsynced as it arrives. A line cut short by a crash is skipped when read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict[str, Any]]:
        """The recorded measurements by key (a later line for the same key wins)."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[key_id(record["key"])] = record
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: unreadable line skipped (cut short by an interrupted run?)", self.path, n)
        return records

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._lock, open(self.path, "a+b") as fh:
            if fh.tell() > 0:  # "a+" starts at the end: complete a line an interrupted run left unterminated
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
