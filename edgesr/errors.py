"""Errors users see, and the exit codes every edgesr command shares.

A command raises one of these for anything the user can fix; `run_cli` turns it into a one-line message on
stderr and the documented exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

EXIT_OK = 0
EXIT_BUDGET_FAILED = 1  # device_bench: at least one budget failed (also: a command's own check failed)
EXIT_BAD_INPUT = 2  # bad usage or bad input file
EXIT_TARGET_FAILED = 3  # device_bench: a target could not produce its measurements


class EdgesrError(Exception):
    """An error with a message meant for the user and the exit code that goes with it."""

    exit_code = EXIT_BAD_INPUT


class BadInput(EdgesrError):
    """A file, flag or config the user gave is missing or wrong (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(EdgesrError):
    """A verification the command runs did not hold, e.g. converter parity (exit 1)."""

    exit_code = EXIT_BUDGET_FAILED


class TargetFailed(EdgesrError):
    """A device target could not run or report (exit 3)."""

    exit_code = EXIT_TARGET_FAILED


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`, mapping edgesr errors to one line on stderr and their exit code. Python warnings
    (the converters and their dependencies raise many) go to a log file, not the console (`warnings_log`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    captured = capture_warnings()
    try:
        return main(argv)
    except EdgesrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if captured is not None and captured.count:
            logging.getLogger("edgesr").info("(%d library warning(s) logged to %s)", captured.count, captured.path)


# Loggers whose records stay on the console: edgesr's packages, and the root logger (which the converters' own
# progress uses; convert filters that separately).
OWN_LOGGERS = frozenset({"edgesr", "compress", "convert", "device_bench", "fit", "android_harness", "root", "py"})


def warnings_log_path() -> Path:
    """Where third-party warnings go: $EDGESR_LOG, else <cache>/logs/warnings.log (EDGESR_CACHE or ~/.cache/edgesr)."""
    if os.environ.get("EDGESR_LOG"):
        return Path(os.environ["EDGESR_LOG"])
    cache = Path(os.environ.get("EDGESR_CACHE") or Path.home() / ".cache" / "edgesr")
    return cache / "logs" / "warnings.log"


class _CountingFileHandler(logging.FileHandler):
    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.path, self.count = path, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        super().emit(record)


def capture_warnings() -> _CountingFileHandler | None:
    """Send Python warnings (`warnings.warn`, through the `py.warnings` logger) to the warnings log, each with the
    time and the command, and keep them off the console. None (warnings stay on the console) if it cannot be
    opened."""
    path = warnings_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _CountingFileHandler(path)
    except OSError:
        return None
    command = " ".join(Path(sys.argv[0]).parts[-2:]) if sys.argv and sys.argv[0] else "edgesr"
    handler.setFormatter(logging.Formatter(f"%(asctime)s {command}: %(message)s"))
    logging.captureWarnings(True)
    wlog = logging.getLogger("py.warnings")
    wlog.handlers[:] = [handler]
    wlog.propagate = False

    def third_party_to_file(record: logging.LogRecord) -> bool:
        """Libraries' own log records below ERROR (torchao's "Failed to load ...", ...) go to the file too."""
        if record.name.split(".")[0] in OWN_LOGGERS or record.levelno >= logging.ERROR:
            return True
        handler.handle(record)
        return False

    for console in logging.getLogger().handlers:
        console.addFilter(third_party_to_file)
    return handler


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the edgesr conventions: no abbreviated flags, and a usage error is a BadInput (one line
    through `run_cli`, exit 2) instead of the whole usage block."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{message} (see {self.prog} --help)")
