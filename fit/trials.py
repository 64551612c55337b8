"""The fit's trial store: every measurement and training run is an Optuna trial keyed by what determines it.

Why Optuna: its storage is a tested, concurrent trial database (SQLite by default, any SQLAlchemy URL such as
`postgresql://...` so several machines can work on one fit), with states (running, complete, failed) and
attributes, and its ask/tell interface lets the fit, not a sampler, decide what to run. A trial's `key` attribute
is the canonical JSON of what determines its result (model digest, shape, precision, tile, target, workload,
settings); a rerun finds the complete trial of a key and reuses its `result` instead of running it again.

A trial left RUNNING by a process that died (killed, out of power) is failed and rerun: on this host when its
process is gone, from anywhere when it has not finished within `stale_after_s`. A trial another live process is
running is waited for, not duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesr.errors import BadInput, first_line

log = logging.getLogger("fit")

STUDY_NAME = "edgesr-fit"


def key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(key_text(key).encode()).hexdigest()[:16]


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'trials.db').absolute()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrialStore:
    """Cached, resumable runs on an Optuna study: `run(key, work)` returns the stored result or runs `work()`."""

    def __init__(self, storage: str, poll_s: float = 5.0, stale_after_s: float = 6 * 3600) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self.storage = storage
        from sqlalchemy.exc import SQLAlchemyError

        try:
            self.study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True)
        except (SQLAlchemyError, ImportError) as exc:  # an unreachable server, a missing driver
            raise BadInput(f"--storage {storage[:200]}: cannot open the trial database: {first_line(exc)}") from None
        self.poll_s, self.stale_after_s = poll_s, stale_after_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.reused: list[str] = []
        self.ran: list[str] = []

    def _find(self, kid: str) -> tuple[Any, list[Any]]:
        from optuna.trial import TrialState

        complete, running = None, []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("key_id") != kid:
                continue
            if t.state == TrialState.COMPLETE:
                complete = t
            else:
                running.append(t)
        return complete, running

    def _abandoned(self, trial: Any) -> bool:
        """A running trial nobody will finish: its process on this host is gone, or it is older than the limit."""
        host, _, pid = str(trial.user_attrs.get("owner", "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            return True
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return time.time() - started > self.stale_after_s

    def lookup(self, key: dict[str, Any]) -> dict[str, Any] | None:
        complete, _ = self._find(key_id(key))
        return None if complete is None else json.loads(complete.user_attrs["result"])

    def run(self, key: dict[str, Any], work: Callable[[], dict[str, Any]], value: str | None = None) -> dict[str, Any]:
        """The result of `key`: from the store when a trial of it completed, else `work()` (stored on success).
        `value` names the result field recorded as the trial's objective value (for Optuna's own tools)."""
        from optuna.trial import TrialState

        kid = key_id(key)
        while True:
            complete, running = self._find(kid)
            if complete is not None:
                self.reused.append(kid)
                return json.loads(complete.user_attrs["result"])
            live = []
            for t in running:
                if self._abandoned(t):
                    log.info(
                        "trial %s (%s) was abandoned by %s: running it again", t.number, kid, t.user_attrs["owner"]
                    )
                    self.study.tell(t.number, state=TrialState.FAIL)
                else:
                    live.append(t)
            if not live:
                break
            log.info("trial %s is running in %s: waiting for it", kid, live[0].user_attrs.get("owner"))
            time.sleep(self.poll_s)
        trial = self.study.ask()
        trial.set_user_attr("key_id", kid)
        trial.set_user_attr("key", key_text(key))
        trial.set_user_attr("owner", self.owner)
        try:
            result = work()
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("result", json.dumps(result, default=str))
        figure = result.get(value) if value else None
        self.study.tell(trial, float(figure) if isinstance(figure, (int, float)) else 0.0)
        self.ran.append(kid)
        return result
