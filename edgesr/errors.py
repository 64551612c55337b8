"""Errors users see, and the exit codes every edgesr command shares.

A command raises one of these for anything the user can fix; `run_cli` turns it into a one-line message on
stderr and the documented exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, NoReturn

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
    _terminate_by_unwinding()
    try:
        return main(argv)
    except EdgesrError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # no space, read-only, a folder that vanished: the path and the OS's reason, exit 2
        print(f"error: {one_line(os_error_text(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"terminated by {exc.name}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        if captured is not None and captured.count:
            logging.getLogger("edgesr").info("(%d library warning(s) logged to %s)", captured.count, captured.path)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised where the program was, so every `finally` (staging folders, temp files,
    child processes) runs before the command exits with 128 + the signal number."""

    signum = 0

    def __init__(self, signum: int | None = None) -> None:
        signum = self.signum if signum is None else signum
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


_BY_SIGNAL: dict[int, type[Terminated]] = {}


def _terminated_class(signum: int) -> type[Terminated]:
    """Terminated for one signal as a class of its own that takes no argument: what an asynchronous raise needs."""
    if signum not in _BY_SIGNAL:
        _BY_SIGNAL[signum] = type(f"Terminated{signal.Signals(signum).name}", (Terminated,), {"signum": signum})
    return _BY_SIGNAL[signum]


def _terminate_by_unwinding() -> None:
    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second signal of the kind kills at once
        raise _terminated_class(signum)()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, handler)
        sys.unraisablehook = _reraise_swallowed_signals(sys.unraisablehook)


def _reraise_swallowed_signals(previous: Callable[..., object]) -> Callable[..., object]:
    """A signal whose handler ran inside a callback Python cannot propagate from (a gc callback, `__del__`, a
    weakref finaliser; jax installs a gc callback) would be printed as "Exception ignored" and the run would go on
    to exit 0. This hook raises it again at the main thread's next Python line outside such a callback: a trace
    function does it, since an exception a trace function raises propagates from the traced frame. The callback's
    code is remembered (with every gc callback's), so the raise never lands in it again; one that swallows it for
    the first time runs this hook again, which learns it too. (An asynchronous exception set from a helper thread
    would land at the next check of the interpreter, which in a gc-heavy loop is the next callback, again and
    again: it stopped such a run seconds late or not at all.)"""
    swallowers: set[CodeType] = set()

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if (
            not isinstance(exc, Terminated | KeyboardInterrupt)
            or threading.current_thread() is not threading.main_thread()
        ):
            previous(unraisable)
            return
        tb = unraisable.exc_traceback
        if tb is not None:
            swallowers.add(tb.tb_frame.f_code)
        swallowers.update(code for code in map(_code_of, gc.callbacks) if code is not None)
        kind = type(exc) if isinstance(exc, KeyboardInterrupt) else _terminated_class(exc.signum)
        _raise_at_next_line(kind, swallowers | {hook.__code__}, sys._getframe(1))

    return hook


def _code_of(function: object) -> CodeType | None:
    function = getattr(function, "__func__", function)  # a bound method's function
    return getattr(function, "__code__", None)


def _raise_at_next_line(kind: type[BaseException], skip: set[CodeType], frame: FrameType | None) -> None:
    """Raise `kind` from the current thread's next traced event (a line or a call) whose stack holds no code in
    `skip`; then put back whatever trace function was there before (a debugger's, coverage's)."""
    before, armed = sys.gettrace(), []

    def in_skipped(f: FrameType | None) -> bool:
        while f is not None:
            if f.f_code in skip:
                return True
            f = f.f_back
        return False

    def tracer(f: FrameType, event: str, arg: object) -> Any:
        if not armed or event not in ("call", "line"):
            return None if not armed else tracer
        if in_skipped(f):
            return None if event == "call" else tracer
        for traced in armed:
            traced.f_trace = None
        armed.clear()
        sys.settrace(before)
        raise kind()

    while frame is not None:  # the frames already running get line events; new ones get call events
        frame.f_trace = tracer
        armed.append(frame)
        frame = frame.f_back
    sys.settrace(tracer)


MAX_MESSAGE_CHARS = 400  # an error line is one line of at most this many characters, whatever the input held


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` as one line (whitespace runs, newlines included, become one space) of at most `limit` characters; a
    longer one keeps its start and end around an ellipsis (the file name leads, the reason often ends)."""
    if len(text) > 64 * limit:  # a message holding a huge value: never join gigabytes just to cut them
        text = text[: 32 * limit] + " ... " + text[-32 * limit :]
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


def first_line(exc: BaseException) -> str:
    """'ValueError: feats must be even' (bounded): an exception from code not ours, for a one-line error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{exc.__class__.__name__}: {first[:200]}" if first else exc.__class__.__name__


def os_error_text(exc: OSError) -> str:
    """An OSError as the user should read it: the path(s) and the OS's reason ("No space left on device")."""
    reason = exc.strerror or exc.__class__.__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else f"{reason} ({exc})"


# Loggers whose records stay on the console: edgesr's packages, and the root logger (which the converters' own
# progress uses; convert filters that separately).
OWN_LOGGERS = frozenset({"edgesr", "compress", "convert", "device_bench", "fit", "android_harness", "root", "py"})


def warnings_log_path() -> Path:
    """Where third-party warnings go: $EDGESR_LOG, else <cache>/logs/warnings.log (EDGESR_CACHE or ~/.cache/edgesr)."""
    if os.environ.get("EDGESR_LOG"):
        return Path(os.environ["EDGESR_LOG"])
    return cache_root() / "logs" / "warnings.log"


def cache_root() -> Path:
    """edgesr's per-user cache (fetched weights, logs, output locks): $EDGESR_CACHE, else ~/.cache/edgesr."""
    return Path(os.environ.get("EDGESR_CACHE") or Path.home() / ".cache" / "edgesr").expanduser()


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


def finite_float(text: str) -> float:
    """argparse type for a float flag: NaN and infinities are refused (they pass every range check unnoticed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:80]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text[:80]!r}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the edgesr conventions: no abbreviated flags, and a usage error is a BadInput (one line
    through `run_cli`, exit 2) instead of the whole usage block."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{message} (see {self.prog} --help)")
