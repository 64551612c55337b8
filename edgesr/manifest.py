"""Manifests and atomic writes: how stages hand files to each other without leaving half-written output.

Every stage writes its artifacts and a `manifest.json` beside them. A manifest is a plain JSON object with a
`kind` ("checkpoint", "convert", "bench"), `created` (UTC ISO time), `edgesr_version`, `versions` of the tools
involved, and stage-specific fields. Artifacts are recorded with their size and sha256.
"""

from __future__ import annotations

import collections.abc
import contextlib
import datetime as _dt
import errno
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgesr import __version__
from edgesr.errors import BadInput, Terminated, cache_root

MANIFEST_NAME = "manifest.json"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on error remove it.

    Works for files and for directories (a `.mlpackage` is a folder).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInput(f"{path.parent}: output folder does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BadInput(f"{path.parent}: output folder is not writable")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")) if is_dir else None
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        tmp = Path(name)
    target = tmp / path.name if is_dir else tmp
    try:
        try:
            yield target
        except Exception as exc:
            raise as_write_error(exc, path) from exc
        if not is_dir:  # mkstemp creates 0600; give the file the permissions a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        if is_dir:
            if path.exists():
                shutil.rmtree(path)
            os.replace(target, path)
        else:
            os.replace(tmp, path)
    finally:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive_output(out_dir: str | os.PathLike, command: str, resumable: tuple[str, ...] = ()) -> Iterator[None]:
    """Hold `out_dir` for this run: a second edgesr run into the same folder is refused (BadInput) while this one
    lives, instead of both writing. The lock is a file in the cache, not in `out_dir`, so a refused or failed run
    leaves nothing in the folder; the kernel drops it when the process ends, however it ends.

    A folder this run created is removed again when the run fails on bad input, an OS error (a full disk) or a
    signal, unless it holds something a rerun resumes from (a file matching one of the `resumable` globs)."""
    import fcntl

    resolved = Path(out_dir).expanduser().resolve()
    existed = resolved.exists()
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (hashlib.sha256(os.fsencode(resolved)).hexdigest()[:24] + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another edgesr run"
            raise BadInput(
                f"{out_dir}: {holder} is writing into this folder; wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command} (pid {os.getpid()})".encode(), 0)
        try:
            yield
        except (BadInput, OSError, KeyboardInterrupt, Terminated):
            if not existed and resolved.is_dir() and not any(any(resolved.glob(g)) for g in resumable):
                shutil.rmtree(resolved, ignore_errors=True)
            raise
    finally:
        os.close(fd)


def as_write_error(exc: Exception, path: Path) -> Exception:
    """What to raise for `exc` from writing `path`: an OSError naming `path` when the OS's own had no file name,
    or when a library (torch.save, Core ML, the converters) failed its own way on a full disk; else `exc`."""
    if isinstance(exc, OSError):
        if exc.filename is None and exc.errno is not None:
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
        return exc
    if not isinstance(exc, BadInput) and _nearly_full(path if path.is_dir() else path.parent):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return exc


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed, with a trailing newline."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# What a config (budgets, targets) file may hold: it is read whole, so a hostile one must not cost memory. Anchors
# and aliases are allowed, but a value is counted each time an alias repeats it (a "billion laughs" file is refused).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 50
MAX_JSON_BYTES = 256 << 20  # manifests and reports edgesr wrote; a bigger one is not one of ours


def read_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    """A YAML document, or BadInput naming the file when it is missing, not YAML, or too big to be a config
    (`what`: e.g. "budgets file"): over MAX_YAML_BYTES, MAX_YAML_VALUES values (aliases expanded) or
    MAX_YAML_DEPTH levels."""
    import yaml

    path = _bounded_file(path, what, MAX_YAML_BYTES)
    try:
        doc = yaml.load(path.read_text(), Loader=_strict_loader())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise BadInput(f"{path}: nested deeper than a {what} can be (at most {MAX_YAML_DEPTH} levels)") from None
    _check_yaml_extent(doc, path, what)
    return doc


def _strict_loader() -> type:
    """yaml's SafeLoader, refusing a key given twice in one mapping (safe_load keeps the last one silently, so
    `max_peak_mb: 1` followed by `max_peak_mb: 100000` would pass a budget the user meant to set)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            keys = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden: not a repeat
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, collections.abc.Hashable):
                    if key in keys:
                        mark = key_node.start_mark
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {str(key)[:80]!r} given twice in one mapping", mark
                        )
                    keys.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def _check_yaml_extent(doc: Any, path: Path, what: str) -> None:
    """BadInput if `doc` has more than MAX_YAML_VALUES values (each alias use counted again) or is deeper than
    MAX_YAML_DEPTH; the walk stops at the limit, so it costs no more than that."""
    stack, seen = [(doc, 1)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise BadInput(f"{path}: more than {MAX_YAML_VALUES} values (aliases expanded); not a {what}")
        if depth > MAX_YAML_DEPTH:
            raise BadInput(f"{path}: nested deeper than a {what} can be (at most {MAX_YAML_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _bounded_file(path: str | os.PathLike, what: str, limit: int) -> Path:
    """`path` if it is a file of at most `limit` bytes, else a one-line BadInput."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: {'not a regular file' if path.exists() else 'no such ' + what}")
    size = path.stat().st_size
    if size > limit:
        raise BadInput(f"{path}: {size} bytes; a {what} here is at most {limit} bytes")
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = _bounded_file(path, "file", MAX_JSON_BYTES)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BadInput(f"{path}: nested too deep to be an edgesr file") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return obj


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder (its files' relative paths and contents, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(os.fsencode(f.relative_to(path)) + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or total size of the files in a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions, plus Python and the platform."""
    out = {"python": platform.python_version(), "platform": platform.platform(), "edgesr": __version__}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@functools.cache
def provenance() -> dict[str, Any]:
    """Where a result comes from: the edgesr git commit and whether the tree had uncommitted changes (None outside
    a git checkout), the host name and platform."""
    repo = Path(__file__).resolve().parent.parent
    commit = dirty = None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "dirty": dirty, "host": platform.node(), "platform": platform.platform()}


def new_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """A manifest skeleton: kind, creation time, edgesr version and provenance, then the stage's own fields."""
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    return {"kind": kind, "created": now, "edgesr_version": __version__, "provenance": provenance(), **fields}
