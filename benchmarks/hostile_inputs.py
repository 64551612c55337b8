"""A campaign of hostile inputs and faults against the edgesr CLIs; prints one markdown table, the bug list.

Each case writes a bad input (a YAML alias bomb, a checkpoint of random bytes, a 16-bit PNG, a full disk, a
SIGTERM mid-run, two runs into one folder, ...) into its own folder and runs one command line against it, as a
user would, and checks the promises every edgesr command makes about bad input:

- the documented exit code (0 ok, 1 budget/check failed, 2 bad usage or input, 3 a target failed, 130
  interrupted);
- exactly one line on stderr starting "error: " that names the file or flag, at most 500 characters;
- no Python traceback;
- a peak RSS under 1 GB (measured by /usr/bin/time; a watchdog kills a process tree over 3 GB);
- nothing partial left behind: no new files or folders after a failure, no hidden staging folders
  (`.convert-*`, `.tiles-*`) after anything;
- where a case says so: failing early (validation before training), and a right figure when it exits 0 (a 16-bit
  PNG must score what its 8-bit version scores).

    python benchmarks/hostile_inputs.py --out results.json      # every case; the table on stdout
    python benchmarks/hostile_inputs.py --only yaml             # the cases whose class, input or command match
    python benchmarks/hostile_inputs.py --list                  # the cases, not run

Inputs are small (the shipped edsr-tiny x2, 48x48 PNGs, at most 2 training steps) and every command runs with
OMP_NUM_THREADS=1. Progress goes to stderr, the table to stdout, the full results (argv, exit codes, stderr head
and tail, RSS, leftovers) to --out as JSON. It asserts nothing and fixes nothing: a FAIL row is a bug to file.
Run it in the foreground (or under a shell with job control): `nohup ... &` from a plain script makes the whole
tree ignore SIGINT, and the Ctrl-C cases then measure nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
EDGESR = str(Path(PYTHON).parent / "edgesr")
CKPT = REPO / "checkpoints" / "edsr-tiny-x2" / "model.pt"
TIME = "/usr/bin/time"

MAX_ERROR_CHARS = 500  # the promise: one error line of at most this many characters
MAX_RSS_MB = 1024  # the promise: peak memory of the process
KILL_RSS_MB = 3 * 1024  # the watchdog kills a process tree above this
FLOOD_LINE_CHARS = 1000  # any stderr line longer than this is a flood, error line or not
READ_BACK = 64 * 1024  # bytes of stdout/stderr read back from each end
DEFAULT_TIMEOUT = 240.0
POLL_S = 0.2

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}

PRUNE_FAST = ["--steps", "1", "--batch-size", "2", "--patch", "12", "--device", "cpu"]
PRUNE_LONG = ["--steps", "200", "--batch-size", "4", "--patch", "16", "--device", "cpu"]
BENCH_FAST = ["--warmup", "1", "--runs", "3", "--min-seconds", "0"]
CONVERT_FAST = ["--formats", "tflite", "--tile", "32"]
FIT_FAST = [
    "--precisions", "fp32", "--keeps", "1", "--round-to", "8", "--steps", "1", "--runs", "1", "--warmup", "0",
    "--min-seconds", "0", "--test-set", "butterfly", "--measure-test-set", "butterfly", "--sparsities", "",
]  # fmt: skip
FIT_BUDGETS = "workload: {frame: 64x64, tile: 64}\ntargets:\n  local: {max_model_kb: 100000}\n"
STAGING = (".convert-*", ".tiles-*")


# ------------------------------------------------------------------------------------------------ inputs


def pattern(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A deterministic textured uint8 image: gradients plus a sinusoid, so SR has something to do."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [
        128 + 60 * np.sin(x / 3.0) + 40 * np.cos(y / 5.0),
        (x * 5 + y * 2) % 256,
        128 + 100 * np.sin((x + y) / 7.0),
    ]
    img = np.stack(planes[:channels], axis=-1)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png_rows(path: Path, width: int, height: int, channels: int, bit_depth: int, rows: Iterable[bytes]) -> None:
    """A PNG written row by row (filter 0), without Pillow: any bit depth, any size, constant memory."""
    color_type = {1: 0, 3: 2}[channels]
    comp = zlib.compressobj(6)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)))
        pending = bytearray()
        for row in rows:
            pending += comp.compress(b"\x00" + row)
            if len(pending) > 1 << 20:
                fh.write(png_chunk(b"IDAT", bytes(pending)))
                pending.clear()
        pending += comp.flush()
        fh.write(png_chunk(b"IDAT", bytes(pending)))
        fh.write(png_chunk(b"IEND", b""))


def write_png16(path: Path, img: np.ndarray) -> None:
    """A 16-bit PNG (grey HxW or RGB HxWx3) from a uint16 array."""
    channels = 1 if img.ndim == 2 else img.shape[2]
    rows = (img[y].astype(">u2").tobytes() for y in range(img.shape[0]))
    write_png_rows(path, img.shape[1], img.shape[0], channels, 16, rows)


def write_zero_png(path: Path, side: int) -> None:
    """A `side` x `side` black 8-bit grey PNG: tiny on disk, huge once decoded."""
    row = bytes(side)
    write_png_rows(path, side, side, 1, 8, (row for _ in range(side)))


def yaml_bomb(levels: int = 10, width: int = 9) -> str:
    """A flow sequence of "billion laughs" anchors: the last one expands to width**levels strings."""
    parts = [f"&l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return f"[{', '.join(parts)}]"


def nested(depth: int = 10000) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------------ cases


class Skip(Exception):
    """A case that cannot run here (no mount, a fixture failed); the table says why."""


@dataclass
class Shared:
    """Campaign-wide inputs, made once on first use: a test photo folder, a converted .tflite folder, bomb PNGs."""

    root: Path
    made: dict[str, Path] = field(default_factory=dict)

    def photos(self) -> Path:
        """One 48x48 RGB PNG."""
        if "photos" not in self.made:
            folder = self.root / "photos"
            folder.mkdir()
            Image.fromarray(pattern(48, 48)).save(folder / "tex.png")
            self.made["photos"] = folder
        return self.made["photos"]

    def converted(self) -> Path:
        """The shipped checkpoint converted to TFLite at a 32 px tile (overlap 13), made by convert itself."""
        if "converted" not in self.made:
            out = self.root / "converted"
            argv = [PYTHON, "-m", "convert", "--checkpoint", str(CKPT), *CONVERT_FAST, "--out", str(out)]
            log(f"fixture: {short(argv)}")
            proc = subprocess.run(argv, cwd=self.root, env=ENV, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0 or not (out / "dense.tflite").is_file():
                raise Skip(f"fixture convert failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            self.made["converted"] = out
        return self.made["converted"]

    def bomb(self, side: int) -> Path:
        key = f"bomb{side}"
        if key not in self.made:
            path = self.root / f"zeros-{side}x{side}.png"
            write_zero_png(path, side)
            self.made[key] = path
        return self.made[key]


@dataclass
class Ctx:
    """What a case's setup, action and check share: its folder, the campaign inputs, notes for the report."""

    dir: Path
    shared: Shared
    names: list[str] = field(default_factory=list)  # extra strings the error line may name
    allowed: list[str] = field(default_factory=list)  # glob patterns (relative to dir) that may be left
    notes: dict[str, Any] = field(default_factory=dict)
    teardown: list[Callable[[], None]] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def folder(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Proc:
    """One finished process: exit code, what it printed (both ends), its memory and time."""

    argv: list[str]
    exit: int | None
    wall_s: float
    stdout: str
    stderr: str
    stderr_bytes: int
    longest_line: int
    rss_mb: float | None
    tree_peak_mb: float
    killed: str | None


@dataclass
class Case:
    cls: str
    input: str
    setup: Callable[[Ctx], list[str]]
    expect: tuple[int, ...] = (2,)
    names: tuple[str, ...] = ()  # the error line must contain one of these (or of ctx.names)
    check: Callable[[Ctx, Proc], list[str]] | None = None  # extra problems, e.g. a wrong figure on exit 0
    during: Callable[[Ctx, Launched], None] | None = None  # an action while it runs (a signal, a removal)
    timeout: float = DEFAULT_TIMEOUT
    max_wall: float | None = None  # a failure later than this is "late" (validation after the work)
    twin: bool = False  # the same command twice at once; promise: one runs (0), the other refuses (2)
    error_line: bool = True  # a non-zero exit must come with one "error:" line
    forbid: tuple[str, ...] = ()  # words the error line must not use (a misleading reason)


def cmd(module: str, *args: object) -> list[str]:
    return [PYTHON, "-m", module, *map(str, args)]


# --- setups shared by several cases


def budgets_case(text: str | bytes, name: str = "budgets.yaml") -> Callable[[Ctx], list[str]]:
    """device_bench bench on the converted model with a hostile --budgets file."""

    def setup(ctx: Ctx) -> list[str]:
        budgets = ctx.write(name, text)
        conv = ctx.shared.converted()
        return cmd(
            "device_bench",
            "bench",
            conv,
            *BENCH_FAST,
            "--test-set",
            ctx.shared.photos(),
            "--budgets",
            budgets,
            "--out",
            ctx.path("out"),
        )

    return setup


def targets_case(text: str, target: str = "box") -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        tfile = ctx.write("targets.yaml", text)
        conv = ctx.shared.converted()
        return cmd(
            "device_bench",
            "bench",
            conv,
            *BENCH_FAST,
            "--test-set",
            ctx.shared.photos(),
            "--targets",
            target,
            "--targets-file",
            tfile,
            "--out",
            ctx.path("out"),
        )

    return setup


def bench_case(*flags: object, test_set: Callable[[Ctx], Path] | None = None) -> Callable[[Ctx], list[str]]:
    """device_bench bench on the converted model with extra (hostile) flags or a hostile test set."""

    def setup(ctx: Ctx) -> list[str]:
        conv = ctx.shared.converted()
        photos = test_set(ctx) if test_set else ctx.shared.photos()
        return cmd("device_bench", "bench", conv, *BENCH_FAST, "--test-set", photos, *flags, "--out", ctx.path("out"))

    return setup


def failed_target_case(*flags: object) -> Callable[[Ctx], list[str]]:
    """bench_case where the target cannot run: the FAIL report in --out is the documented output."""
    inner = bench_case(*flags)

    def setup(ctx: Ctx) -> list[str]:
        ctx.allowed += ["out", "out/*", "out/**"]
        return inner(ctx)

    return setup


def convert_case(*flags: object, checkpoint: Callable[[Ctx], Path] | None = None) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        ckpt = checkpoint(ctx) if checkpoint else CKPT
        base = {"--formats": "tflite", "--tile": "32"}
        for i, flag in enumerate(flags):
            if flag in base and i + 1 < len(flags):
                base.pop(flag)
        fixed = [x for kv in base.items() for x in kv]
        return cmd("convert", "--checkpoint", ckpt, *fixed, *flags, "--out", ctx.path("out"))

    return setup


def eval_case(
    test_set: Callable[[Ctx], Path] | None = None, checkpoint: Callable[[Ctx], Path] | None = None, *flags: object
) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        ckpt = checkpoint(ctx) if checkpoint else CKPT
        photos = test_set(ctx) if test_set else ctx.shared.photos()
        return cmd("compress", "eval", "--checkpoint", ckpt, "--test-set", photos, *flags)

    return setup


def prune_case(*flags: object, fast: bool = True) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        base = PRUNE_FAST if fast else PRUNE_LONG
        names = {str(f) for f in flags if str(f).startswith("--")}
        kept: list[str] = []
        for i in range(0, len(base), 2):
            if base[i] not in names:
                kept += base[i : i + 2]
        test = [] if "--test-set" in names else ["--test-set", str(ctx.shared.photos())]
        return cmd(
            "compress",
            "prune",
            "--checkpoint",
            CKPT,
            "--sparsity",
            "0.5",
            *kept,
            *test,
            *flags,
            "--out",
            ctx.path("out"),
        )

    return setup


def fit_case(*flags: object, budgets: str = FIT_BUDGETS) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        bfile = ctx.write("budgets.yaml", budgets)
        names = {str(f) for f in flags if str(f).startswith("--")}
        kept: list[str] = []
        for i in range(0, len(FIT_FAST), 2):
            if FIT_FAST[i] not in names:
                kept += FIT_FAST[i : i + 2]
        return cmd("fit", "--checkpoint", CKPT, "--budgets", bfile, *kept, *flags, "--out", ctx.path("out"))

    return setup


# --- inputs written by setups


def folder_with(images: dict[str, np.ndarray | Callable[[Path], None]]) -> Callable[[Ctx], Path]:
    """A test-set folder: name -> an array (saved with Pillow) or a writer called with the path."""

    def make(ctx: Ctx) -> Path:
        folder = ctx.folder("set")
        for name, img in images.items():
            if callable(img):
                img(folder / name)
            else:
                Image.fromarray(img).save(folder / name)
        return folder

    return make


def bomb_set(side: int) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        folder = ctx.folder("set")
        shutil.copyfile(ctx.shared.bomb(side), folder / "bomb.png")
        return folder

    return make


def large_photo(ctx: Ctx) -> Path:
    """One 6000x4000 RGB PNG: smooth gradients with a little texture (compresses to a few MB)."""
    folder = ctx.folder("set")
    h, w = 4000, 6000
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (0.6 * y + 0.4 * x).astype(np.uint8)
    img[..., 1] = (0.5 * x + 0.5 * (255 - y)).astype(np.uint8)
    img[..., 2] = ((x + y) * 0.5).astype(np.uint8) ^ ((np.arange(w)[None, :] // 8) % 2 * 16).astype(np.uint8)
    Image.fromarray(img).save(folder / "large.png", compress_level=1)
    return folder


FUNNY = ("a b.png", "q'u\"ote.png", "$(touch pwned).png", "new\nline.png", "ünï©ødé-画像.png", "-rf.png", "[x]*.png")


def funny_names(ctx: Ctx) -> Path:
    folder = ctx.folder("set")
    img = Image.fromarray(pattern(48, 48))
    for name in FUNNY:
        img.save(folder / name, format="PNG")
    return folder


def non_utf8_name(ctx: Ctx) -> Path:
    folder = ctx.folder("set")
    Image.fromarray(pattern(48, 48)).save(os.fsdecode(os.fsencode(str(folder)) + b"/\xff\xfe-latin1-\xe9.png"), "PNG")
    return folder


# --- checks


def eval_psnr(text: str) -> float | None:
    found = re.findall(r"^mean\s+([-+0-9.eE]+|inf|nan) dB", text, re.M)
    return float(found[-1]) if found else None


def reference_eval(ctx: Ctx, folder: Path) -> float:
    """compress eval's mean Y-PSNR on `folder` (the reference an equivalent image must match); not measured."""
    proc = subprocess.run(
        cmd("compress", "eval", "--checkpoint", CKPT, "--test-set", folder),
        cwd=ctx.dir,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    psnr = eval_psnr(proc.stderr + proc.stdout)
    if proc.returncode != 0 or psnr is None:
        raise Skip(f"reference eval failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}")
    return psnr


def reference_bench(ctx: Ctx, folder: Path) -> float:
    out = ctx.path("ref-out")
    argv = cmd("device_bench", "bench", ctx.shared.converted(), *BENCH_FAST, "--test-set", folder, "--out", out)
    proc = subprocess.run(argv, cwd=ctx.dir, env=ENV, capture_output=True, text=True, timeout=600)
    try:
        return float(json.loads((out / "report.json").read_text())["rows"][0]["psnr_y_db"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise Skip(f"reference bench failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}") from None


def same_figure(got: float | None, ref: float, what: str) -> list[str]:
    if got is None:
        return [f"exit 0 but no {what} figure in the output"]
    if not abs(got - ref) <= 0.1:
        return [f"silent wrong result: {what} {got:.3f} dB, the same image as 8-bit scores {ref:.3f} dB"]
    return []


def eval_matches(ctx: Ctx, proc: Proc) -> list[str]:
    """On exit 0, compress eval's mean PSNR must equal its PSNR on the 8-bit reference images (within 0.1 dB)."""
    got = eval_psnr(proc.stderr + proc.stdout)
    ctx.notes["psnr_y_db"] = got
    if proc.exit != 0:
        return []
    return same_figure(got, ctx.notes["reference_psnr_y_db"], "Y-PSNR")


def bench_matches(ctx: Ctx, proc: Proc) -> list[str]:
    got = None
    try:
        got = float(json.loads(ctx.path("out/report.json").read_text())["rows"][0]["psnr_y_db"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    ctx.notes["psnr_y_db"] = got
    if proc.exit != 0:
        return []
    return same_figure(got, ctx.notes["reference_psnr_y_db"], "bench Y-PSNR")


def sixteen_bit(kind: str, tool: str) -> Callable[[Ctx], list[str]]:
    """A 16-bit PNG (grey or RGB, v8 * 257 so its 8-bit value is unambiguous) beside its 8-bit twin as reference."""

    def setup(ctx: Ctx) -> list[str]:
        img8 = pattern(48, 48, 1)[..., 0] if kind == "grey" else pattern(48, 48)
        ref = ctx.folder("ref8")
        Image.fromarray(img8).save(ref / "img.png")
        test = ctx.folder("set")
        if kind == "grey-8-vs-rgb":  # the same grey image as 8-bit L and as RGB with three equal channels
            grey = pattern(48, 48, 1)[..., 0]
            Image.fromarray(grey).save(test / "img.png")
            Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(ref / "img.png")
        else:
            write_png16(test / "img.png", img8.astype(np.uint16) * 257)
        if tool == "eval":
            ctx.notes["reference_psnr_y_db"] = reference_eval(ctx, ref)
            return cmd("compress", "eval", "--checkpoint", CKPT, "--test-set", test)
        ctx.notes["reference_psnr_y_db"] = reference_bench(ctx, ref)
        return cmd(
            "device_bench", "bench", ctx.shared.converted(), *BENCH_FAST, "--test-set", test, "--out", ctx.path("out")
        )

    return setup


def all_images_scored(count: int) -> Callable[[Ctx, Proc], list[str]]:
    def check(ctx: Ctx, proc: Proc) -> list[str]:
        if proc.exit != 0:
            return []
        try:
            report = json.loads(ctx.path("out/report.json").read_text())
            images = sum(len(v) for v in report["test_set"]["images"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return ["exit 0 but out/report.json unreadable"]
        return [] if images == count else [f"exit 0 but {images} of {count} images scored"]

    return check


def eval_all_images(count: int) -> Callable[[Ctx, Proc], list[str]]:
    def check(ctx: Ctx, proc: Proc) -> list[str]:
        if proc.exit != 0:
            return []
        rows = [ln for ln in proc.stderr.splitlines() if re.search(r"\d dB\s+SSIM", ln) and not ln.startswith("mean")]
        return [] if len(rows) >= count else [f"exit 0 but {len(rows)} of {count} images listed"]

    return check


def file_unchanged(name: str, content: str) -> Callable[[Ctx, Proc], list[str]]:
    def check(ctx: Ctx, proc: Proc) -> list[str]:
        path = ctx.path(name)
        try:
            same = path.is_file() and path.read_text() == content
        except OSError:
            same = False
        return [] if same else [f"{name} (a regular file given as --out) was changed or removed"]

    return check


# --- actions while a process runs


def signal_on_staging(sig: int, group: bool) -> Callable[[Ctx, Launched], None]:
    """Once a hidden staging folder appears in <dir>/out, send `sig` to the command (or its process group)."""

    def act(ctx: Ctx, run: Launched) -> None:
        out = ctx.path("out")
        while run.popen.poll() is None:
            if out.is_dir() and any(any(out.glob(p)) for p in STAGING):
                time.sleep(0.5)  # let it write into the staging folder
                try:
                    if group:
                        os.killpg(run.popen.pid, sig)
                    else:
                        os.kill(run.child_pid(), sig)
                except (ProcessLookupError, TypeError):
                    return
                ctx.notes["signal_sent_after_s"] = round(time.monotonic() - run.started, 2)
                return
            time.sleep(0.05)
        ctx.notes["signal_sent_after_s"] = None

    return act


def vanish_on_staging(ctx: Ctx, run: Launched) -> None:
    """Once convert stages into <dir>/out, remove the whole out folder under it."""
    out = ctx.path("out")
    while run.popen.poll() is None:
        if out.is_dir() and any(any(out.glob(p)) for p in STAGING):
            time.sleep(0.5)
            for _ in range(5):
                shutil.rmtree(out, ignore_errors=True)
                if not out.exists():
                    break
            ctx.notes["removed_after_s"] = round(time.monotonic() - run.started, 2)
            return
        time.sleep(0.05)
    ctx.notes["removed_after_s"] = None


def needs_action(key: str) -> Callable[[Ctx, Proc], list[str]]:
    def check(ctx: Ctx, proc: Proc) -> list[str]:
        return [] if ctx.notes.get(key) is not None else ["the command ended before its staging folder appeared"]

    return check


# --- mounts (full disk, read-only file system)


def mount_tmpfs(ctx: Ctx, name: str, size: str, read_only: bool = False) -> Path:
    if os.geteuid() != 0:
        raise Skip("not run: cannot mount (not root)")
    where = ctx.folder(name)
    opts = f"size={size},mode=0755" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Skip(f"not run: cannot mount ({proc.stderr.strip()[:120]})")
    ctx.teardown.append(lambda: subprocess.run(["umount", "-l", str(where)], capture_output=True))
    return where


def full_disk(tool: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        size = {"convert": "256k", "prune": "256k", "bench": "64k"}[tool]
        conv = ctx.shared.converted() if tool == "bench" else None
        disk = mount_tmpfs(ctx, "disk", size)
        out = disk / "out"
        ctx.names += ["disk/out", "No space"]
        if tool == "convert":
            return cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", out)
        if tool == "prune":
            return cmd(
                "compress",
                "prune",
                "--checkpoint",
                CKPT,
                "--sparsity",
                "0.5",
                *PRUNE_FAST,
                "--test-set",
                ctx.shared.photos(),
                "--out",
                out,
            )
        return cmd("device_bench", "bench", conv, *BENCH_FAST, "--test-set", ctx.shared.photos(), "--out", out)

    return setup


def read_only_fs(ctx: Ctx) -> list[str]:
    ro = mount_tmpfs(ctx, "ro", "64k", read_only=True)
    ctx.names += ["ro/out", "ro"]
    return cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", ro / "out")


def unwritable_parent(tool: str) -> Callable[[Ctx], list[str]]:
    """--out under a read-only folder: chmod 0555 for a normal user; as root (chmod binds nobody) a regular file
    as the parent, `somefile/sub`."""

    def setup(ctx: Ctx) -> list[str]:
        if os.geteuid() == 0:
            parent = ctx.write("somefile", "not a folder\n")
            ctx.notes["how"] = "root: a regular file as the parent"
        else:
            parent = ctx.folder("locked")
            parent.chmod(0o555)
            ctx.teardown.append(lambda: parent.chmod(0o755))
            ctx.notes["how"] = "chmod 0555"
        out = parent / "sub"
        ctx.names += [parent.name]
        if tool == "convert":
            return cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", out)
        if tool == "prune":
            return cmd(
                "compress",
                "prune",
                "--checkpoint",
                CKPT,
                "--sparsity",
                "0.5",
                *PRUNE_FAST,
                "--test-set",
                ctx.shared.photos(),
                "--out",
                out,
            )
        return cmd(
            "device_bench",
            "bench",
            ctx.shared.converted(),
            *BENCH_FAST,
            "--test-set",
            ctx.shared.photos(),
            "--out",
            out,
        )

    return setup


OUT_FILE_TEXT = "a regular file, not a folder\n"


def out_is_file(tool: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        out = ctx.write("out", OUT_FILE_TEXT)
        if tool == "convert":
            return cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", out)
        if tool == "prune":
            return cmd(
                "compress",
                "prune",
                "--checkpoint",
                CKPT,
                "--sparsity",
                "0.5",
                *PRUNE_FAST,
                "--test-set",
                ctx.shared.photos(),
                "--out",
                out,
            )
        if tool == "fit":
            return cmd(
                "fit",
                "--checkpoint",
                CKPT,
                "--budgets",
                ctx.write("budgets.yaml", FIT_BUDGETS),
                *FIT_FAST,
                "--out",
                out,
            )
        return cmd(
            "device_bench",
            "bench",
            ctx.shared.converted(),
            *BENCH_FAST,
            "--test-set",
            ctx.shared.photos(),
            "--out",
            out,
        )

    return setup


# --- checkpoints


def ckpt_bytes(data: bytes, name: str = "model.pt") -> Callable[[Ctx], Path]:
    return lambda ctx: ctx.write(name, data)


def ckpt_torch(obj_kind: str) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        import torch

        obj: Any = [1, 2, 3] if obj_kind == "list" else torch.zeros(4, 4)
        path = ctx.path("model.pt")
        torch.save(obj, path)
        return path

    return make


def ckpt_zip(ctx: Ctx) -> Path:
    import zipfile

    path = ctx.path("model.pt")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "a zip file, not a torch checkpoint\n")
        zf.writestr("data/0", os.urandom(256))
    return path


def ckpt_sparse(ctx: Ctx) -> Path:
    """An 8 GB sparse file of zeros (takes no disk)."""
    path = ctx.path("model.pt")
    with open(path, "wb") as fh:
        fh.truncate(8 << 30)
    return path


def link_to(target: str, name: str) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        path = ctx.path(name)
        path.symlink_to(target)
        return path

    return make


def bench_manifest(artifacts: list[dict[str, Any]] | Any, extra_file: str | None = None) -> Callable[[Ctx], list]:
    """A convert-style folder whose manifest.json is hostile (path traversal, wrong types)."""

    def setup(ctx: Ctx) -> list[str]:
        conv = ctx.shared.converted()
        folder = ctx.folder("artifacts")
        manifest = json.loads((conv / "manifest.json").read_text())
        if isinstance(artifacts, list) and artifacts and isinstance(artifacts[0], dict):
            manifest["artifacts"] = artifacts
        else:
            manifest = artifacts
        shutil.copyfile(conv / "dense.tflite", folder / "dense.tflite")
        if extra_file:
            ctx.write(f"artifacts/{extra_file}", os.urandom(4096))
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return cmd(
            "device_bench", "bench", folder, *BENCH_FAST, "--test-set", ctx.shared.photos(), "--out", ctx.path("out")
        )

    return setup


def good_then_garbage(ctx: Ctx) -> list[str]:
    garbage = ctx.write("zz-garbage.tflite", os.urandom(8192))
    return cmd(
        "device_bench",
        "bench",
        ctx.shared.converted(),
        garbage,
        *BENCH_FAST,
        "--test-set",
        ctx.shared.photos(),
        "--out",
        ctx.path("out"),
    )


def fifo_set(ctx: Ctx) -> Path:
    folder = ctx.folder("set")
    Image.fromarray(pattern(48, 48)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    return folder


def loop_set(ctx: Ctx) -> Path:
    folder = ctx.folder("set")
    Image.fromarray(pattern(48, 48)).save(folder / "a.png")
    (folder / "loop.png").symlink_to("loop.png")
    return folder


def dir_as_image_set(ctx: Ctx) -> Path:
    folder = ctx.folder("set")
    Image.fromarray(pattern(48, 48)).save(folder / "a.png")
    (folder / "b.png").mkdir()
    return folder


def dev_zero_set(ctx: Ctx) -> Path:
    folder = ctx.folder("set")
    (folder / "zero.png").symlink_to("/dev/zero")
    return folder


def report_folder(content: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        ctx.write("bench/report.json", content)
        return cmd("device_bench", "report", ctx.path("bench"))

    return setup


def twin_bench(ctx: Ctx) -> list[str]:
    ctx.names += ["out"]
    return cmd(
        "device_bench",
        "bench",
        ctx.shared.converted(),
        *BENCH_FAST,
        "--test-set",
        ctx.shared.photos(),
        "--fresh",
        "--out",
        ctx.path("out"),
    )


def twin_convert(ctx: Ctx) -> list[str]:
    ctx.names += ["out"]
    return cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", ctx.path("out"))


def twin_prune(ctx: Ctx) -> list[str]:
    ctx.names += ["out"]
    return cmd(
        "compress",
        "prune",
        "--checkpoint",
        CKPT,
        "--sparsity",
        "0.5",
        "--steps",
        "20",
        "--batch-size",
        "2",
        "--patch",
        "12",
        "--device",
        "cpu",
        "--test-set",
        ctx.shared.photos(),
        "--out",
        ctx.path("out"),
    )


def sigint_prune(ctx: Ctx) -> list[str]:
    ctx.allowed += ["out", "out/train_state.pt"]  # the documented resume state
    return cmd(
        "compress",
        "prune",
        "--checkpoint",
        CKPT,
        "--sparsity",
        "0.5",
        *PRUNE_LONG,
        "--save-every",
        "5",
        "--test-set",
        ctx.shared.photos(),
        "--out",
        ctx.path("out"),
    )


def sigint_after(seconds: float) -> Callable[[Ctx, Launched], None]:
    def act(ctx: Ctx, run: Launched) -> None:
        deadline = run.started + seconds
        while run.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if run.popen.poll() is None:
            os.killpg(run.popen.pid, signal.SIGINT)
            ctx.notes["signal_sent_after_s"] = round(time.monotonic() - run.started, 2)
        else:
            ctx.notes["signal_sent_after_s"] = None

    return act


def funny_out(ctx: Ctx) -> list[str]:
    out = ctx.path("out $(touch pwned) 'q\"\nü")
    return cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", out)


def ssh_injection(ctx: Ctx) -> list[str]:
    tfile = ctx.write(
        "targets.yaml",
        "targets:\n  box:\n    type: ssh\n    host: '-oProxyCommand=touch pwned'\n    connect_timeout_s: 5\n",
    )
    ctx.names += ["host", "box"]
    return cmd(
        "device_bench",
        "bench",
        ctx.shared.converted(),
        *BENCH_FAST,
        "--test-set",
        ctx.shared.photos(),
        "--targets",
        "box",
        "--targets-file",
        tfile,
        "--timeout",
        "30",
        "--out",
        ctx.path("out"),
    )


def cases() -> list[Case]:
    bomb = yaml_bomb()
    big_string = "a" * (50 << 20)
    ur, sw, tb, lp, ose, cc = (
        "unbounded resources",
        "silent wrong result",
        "traceback instead of error",
        "late or partial failure",
        "OS errors",
        "concurrency",
    )
    grey = pattern(48, 48, 1)[..., 0]
    return [
        # ---------------------------------------------------------------- unbounded resources
        Case(
            ur,
            "budgets file: YAML billion-laughs alias bomb (9^10 strings)",
            budgets_case(f"defaults:\n  max_peak_mb: {bomb}\n"),
            names=("budgets.yaml",),
        ),
        Case(
            ur,
            "targets file: YAML billion-laughs alias bomb as an ssh host",
            targets_case(f"targets:\n  box:\n    type: ssh\n    host: {bomb}\n"),
            names=("targets.yaml",),
        ),
        Case(
            ur,
            "fit budgets: YAML billion-laughs alias bomb",
            fit_case(budgets=f"workload: {{frame: 64x64, tile: 64}}\ntargets:\n  local:\n    max_model_kb: {bomb}\n"),
            names=("budgets.yaml",),
        ),
        Case(
            ur,
            "budgets file: one 50 MB string value",
            budgets_case(f"defaults:\n  max_peak_mb: {big_string}\n"),
            names=("budgets.yaml",),
        ),
        Case(
            ur,
            "budgets file: 10000 nested [[[...]]]",
            budgets_case(f"defaults:\n  max_peak_mb: {nested()}\n"),
            names=("budgets.yaml",),
        ),
        Case(
            ur, "targets file: 10000 nested [[[...]]]", targets_case(f"targets: {nested()}\n"), names=("targets.yaml",)
        ),
        Case(
            ur,
            "fit budgets: 10000 nested [[[...]]]",
            fit_case(budgets=f"targets: {nested()}\n"),
            names=("budgets.yaml",),
        ),
        Case(
            ur,
            "budgets file: symlink to /dev/zero",
            lambda ctx: budgets_via(ctx, link_to("/dev/zero", "budgets.yaml")(ctx)),
            names=("budgets.yaml",),
            timeout=60,
            forbid=("no such",),
        ),
        Case(ur, "convert --tile 100000", convert_case("--tile", "100000"), names=("--tile",)),
        Case(
            ur,
            "convert --tile frame --frame 100000x100000",
            convert_case("--tile", "frame", "--frame", "100000x100000"),
            names=("--frame", "100000x100000"),
        ),
        Case(
            ur,
            "device_bench --frame 100000x100000",
            bench_case("--frame", "100000x100000"),
            names=("--frame", "100000x100000"),
        ),
        Case(ur, "fit --frame 100000x100000", fit_case("--frame", "100000x100000"), names=("--frame", "100000x100000")),
        Case(
            ur,
            "compress eval: test set of one 6000x4000 PNG (goal: < 1 GB)",
            eval_case(large_photo),
            expect=(0, 2),
            names=("large.png",),
        ),
        Case(
            ur,
            "compress eval: 30000x30000 grey PNG bomb (0.9 Gpx, ~1 MB file)",
            eval_case(bomb_set(30000)),
            names=("bomb.png",),
        ),
        Case(
            ur,
            "compress eval: 13000x13000 grey PNG, under Pillow's bomb limit (169 Mpx)",
            eval_case(bomb_set(13000)),
            expect=(0, 2),
            names=("bomb.png",),
        ),
        Case(
            ur,
            "device_bench --test-set: 30000x30000 PNG bomb",
            bench_case(test_set=bomb_set(30000)),
            names=("bomb.png",),
        ),
        Case(
            ur,
            "compress prune --data: 30000x30000 PNG bomb as training data",
            lambda ctx: prune_case("--data", bomb_set(30000)(ctx))(ctx),
            names=("bomb.png",),
        ),
        Case(ur, "compress prune --patch 100000", prune_case("--patch", "100000"), names=("--patch", "patch")),
        Case(
            ur,
            "compress prune --batch-size 100000000",
            prune_case("--batch-size", "100000000"),
            expect=(0, 2),
            names=("--batch-size", "batch"),
        ),
        Case(
            ur,
            "compress eval --model edsr-tiny --factory-args n_feats 100000 (360 GB of weights)",
            lambda ctx: cmd(
                "compress",
                "eval",
                "--model",
                "edsr-tiny",
                "--factory-args",
                '{"scale": 2, "n_feats": 100000}',
                "--test-set",
                ctx.shared.photos(),
            ),
            names=("n_feats", "--factory-args", "edsr-tiny"),
        ),
        Case(
            ur,
            "convert --factory-args: 50000 nested JSON arrays",
            lambda ctx: cmd(
                "convert",
                "--model",
                "edsr-tiny",
                "--factory-args",
                nested(50000),
                *CONVERT_FAST,
                "--out",
                ctx.path("out"),
            ),
            names=("--factory-args",),
        ),
        Case(
            ur,
            "convert --checkpoint: 8 GB sparse file of zeros",
            convert_case(checkpoint=ckpt_sparse),
            names=("model.pt",),
        ),
        Case(
            ur,
            "convert --checkpoint: symlink to /dev/zero",
            convert_case(checkpoint=link_to("/dev/zero", "model.pt")),
            names=("model.pt",),
            timeout=60,
            forbid=("no such",),
        ),
        Case(
            ur,
            "device_bench --test-set: an image that is a symlink to /dev/zero",
            bench_case(test_set=dev_zero_set),
            names=("zero.png",),
            timeout=60,
        ),
        Case(
            ur,
            "device_bench --test-set: an image that is a FIFO (no writer)",
            bench_case(test_set=fifo_set),
            names=("b.png",),
            timeout=45,
        ),
        # ---------------------------------------------------------------- silent wrong results
        Case(
            sw,
            "compress eval: 16-bit grey PNG vs the same image 8-bit",
            sixteen_bit("grey", "eval"),
            expect=(0, 2),
            names=("img.png", "16"),
            check=eval_matches,
        ),
        Case(
            sw,
            "compress eval: 16-bit RGB PNG vs the same image 8-bit",
            sixteen_bit("rgb", "eval"),
            expect=(0, 2),
            names=("img.png", "16"),
            check=eval_matches,
        ),
        Case(
            sw,
            "compress eval: 8-bit grey PNG vs the same image as RGB",
            sixteen_bit("grey-8-vs-rgb", "eval"),
            expect=(0, 2),
            names=("img.png",),
            check=eval_matches,
        ),
        Case(
            sw,
            "device_bench: 16-bit grey PNG vs the same image 8-bit",
            sixteen_bit("grey", "bench"),
            expect=(0, 2),
            names=("img.png", "16"),
            check=bench_matches,
        ),
        Case(
            sw,
            "device_bench: 16-bit RGB PNG vs the same image 8-bit",
            sixteen_bit("rgb", "bench"),
            expect=(0, 2),
            names=("img.png", "16"),
            check=bench_matches,
        ),
        Case(
            sw,
            "device_bench --overlap 2 (receptive-field radius 12)",
            bench_case("--overlap", "2"),
            names=("--overlap", "overlap"),
        ),
        Case(sw, "device_bench --overlap -1", bench_case("--overlap", "-1"), names=("--overlap", "overlap")),
        Case(
            sw,
            "budgets file: duplicate key (max_peak_mb 1, then 100000)",
            budgets_case("defaults:\n  max_peak_mb: 1\n  max_peak_mb: 100000\n"),
            names=("max_peak_mb",),
        ),
        Case(
            sw,
            "compress eval: a 1x1 PNG in the test set",
            eval_case(folder_with({"tiny.png": pattern(1, 1)})),
            names=("tiny.png",),
        ),
        Case(
            sw,
            "device_bench: a 2x2 PNG in the test set",
            bench_case(test_set=folder_with({"tiny.png": pattern(2, 2)})),
            names=("tiny.png",),
        ),
        Case(
            sw,
            "compress eval: 8-bit grey image beside an RGB one (mixed modes)",
            eval_case(folder_with({"grey.png": grey, "rgb.png": pattern(48, 48)})),
            expect=(0,),
            check=eval_all_images(2),
        ),
        # ---------------------------------------------------------------- tracebacks
        Case(
            tb,
            "convert --checkpoint: 4 KB of random bytes",
            convert_case(checkpoint=ckpt_bytes(os.urandom(4096))),
            names=("model.pt",),
        ),
        Case(tb, "convert --checkpoint: empty file", convert_case(checkpoint=ckpt_bytes(b"")), names=("model.pt",)),
        Case(
            tb,
            "convert --checkpoint: a zip that is not a torch checkpoint",
            convert_case(checkpoint=ckpt_zip),
            names=("model.pt",),
        ),
        Case(
            tb,
            "compress eval --checkpoint: torch.save of a list",
            eval_case(checkpoint=ckpt_torch("list")),
            names=("model.pt",),
        ),
        Case(
            tb,
            "compress eval --checkpoint: torch.save of a tensor",
            eval_case(checkpoint=ckpt_torch("tensor")),
            names=("model.pt",),
        ),
        Case(
            tb,
            "compress eval --checkpoint: a folder",
            eval_case(checkpoint=lambda ctx: ctx.folder("model.pt")),
            names=("model.pt",),
        ),
        Case(
            tb,
            "convert --checkpoint: .pt2 of garbage",
            convert_case(checkpoint=ckpt_bytes(os.urandom(4096), "model.pt2")),
            names=("model.pt2",),
        ),
        Case(tb, "compress prune --steps nan", prune_case("--steps", "nan"), names=("--steps",)),
        Case(tb, "compress prune --sparsity nan", prune_case("--sparsity", "nan"), names=("--sparsity", "sparsity")),
        Case(tb, "compress prune --sparsity 1.5", prune_case("--sparsity", "1.5"), names=("--sparsity", "sparsity")),
        Case(tb, "compress prune --lr inf", prune_case("--lr", "inf"), names=("--lr", "lr")),
        Case(tb, "compress prune --lr nan", prune_case("--lr", "nan"), names=("--lr", "lr")),
        Case(tb, "compress prune --batch-size 0", prune_case("--batch-size", "0"), names=("--batch-size", "batch")),
        Case(tb, "compress prune --device tpu9", prune_case("--device", "tpu9"), names=("--device", "tpu9")),
        Case(
            tb,
            "compress prune --device cuda:7 (no CUDA here)",
            prune_case("--device", "cuda:7"),
            names=("--device", "cuda:7"),
        ),
        Case(
            tb,
            "compress eval --model edsr-tiny --factory-args scale 0",
            lambda ctx: cmd(
                "compress",
                "eval",
                "--model",
                "edsr-tiny",
                "--factory-args",
                '{"scale": 0}',
                "--test-set",
                ctx.shared.photos(),
            ),
            names=("scale", "--factory-args"),
        ),
        Case(tb, "convert --tile 0", convert_case("--tile", "0"), names=("--tile",)),
        Case(tb, "convert --tile -5", convert_case("--tile", "-5"), names=("--tile",)),
        Case(
            tb,
            "convert --tile 48,frame without --frame",
            convert_case("--tile", "48,frame"),
            names=("--frame", "frame"),
        ),
        Case(
            tb, "convert --precision fp32,int3", convert_case("--precision", "fp32,int3"), names=("--precision", "int3")
        ),
        Case(tb, "device_bench --runs 0", bench_case("--runs", "0"), names=("--runs",)),
        Case(tb, "device_bench --timeout nan", bench_case("--timeout", "nan"), names=("--timeout",)),
        Case(tb, "device_bench --min-seconds -1", bench_case("--min-seconds", "-1"), names=("--min-seconds",)),
        Case(
            tb,
            "device_bench --device-python /nonexistent",
            failed_target_case("--device-python", "/nonexistent/python"),
            expect=(2, 3),  # a target that cannot run is exit 3 with a FAIL report (README: exit codes)
            names=("/nonexistent/python", "--device-python"),
        ),
        Case(
            tb,
            "device_bench: a .tflite of random bytes",
            lambda ctx: cmd(
                "device_bench",
                "bench",
                ctx.write("junk.tflite", os.urandom(8192)),
                *BENCH_FAST,
                "--test-set",
                ctx.shared.photos(),
                "--out",
                ctx.path("out"),
            ),
            names=("junk.tflite",),
        ),
        Case(tb, "device_bench: manifest.json that is a JSON list", bench_manifest([1, 2]), names=("manifest.json",)),
        Case(
            tb,
            "device_bench: manifest artifact '../../../../etc/hostname' (path traversal)",
            bench_manifest(
                [{"file": "../../../../etc/hostname", "format": "tflite", "encoding": "dense", "precision": "fp32"}]
            ),
            names=("manifest.json", "etc/hostname"),
        ),
        Case(
            tb,
            "device_bench --budgets: non-UTF-8 bytes",
            budgets_case(b"defaults:\n  max_peak_mb: \xff\xfe\x00\n"),
            names=("budgets.yaml",),
        ),
        Case(
            tb,
            "device_bench --budgets: !!python/object/apply tag (os.system)",
            budgets_case("defaults: !!python/object/apply:os.system ['touch pwned']\n"),
            names=("budgets.yaml",),
        ),
        Case(
            tb,
            "device_bench report: report.json truncated",
            report_folder('{"rows": [{"model": '),
            names=("report.json",),
        ),
        Case(
            tb, "device_bench report: report.json is a JSON list", report_folder("[1, 2, 3]\n"), names=("report.json",)
        ),
        Case(tb, "fit --margin nan", fit_case("--margin", "nan"), names=("--margin",)),
        Case(tb, "fit --margin -0.5", fit_case("--margin", "-0.5"), names=("--margin",)),
        Case(tb, "fit --keeps 0,1.5", fit_case("--keeps", "0,1.5"), names=("--keeps",)),
        Case(tb, "fit --steps -1", fit_case("--steps", "-1"), names=("--steps",)),
        Case(tb, "fit --storage not-a-url", fit_case("--storage", "not-a-url"), names=("--storage", "not-a-url")),
        Case(tb, "edgesr (umbrella) nosuchstage", lambda ctx: [EDGESR, "nosuchstage"], names=("nosuchstage",)),
        # ---------------------------------------------------------------- OS errors
        Case(ose, "convert --out under a read-only parent", unwritable_parent("convert")),
        Case(ose, "compress prune --out under a read-only parent", unwritable_parent("prune")),
        Case(ose, "device_bench --out under a read-only parent", unwritable_parent("bench")),
        Case(
            ose,
            "convert --out /proc/hostile-out",
            lambda ctx: cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", "/proc/hostile-out"),
            names=("/proc/hostile-out",),
        ),
        Case(
            ose,
            "convert --out an existing regular file",
            out_is_file("convert"),
            names=("out",),
            check=file_unchanged("out", OUT_FILE_TEXT),
        ),
        Case(
            ose,
            "compress prune --out an existing regular file",
            out_is_file("prune"),
            names=("out",),
            check=file_unchanged("out", OUT_FILE_TEXT),
        ),
        Case(
            ose,
            "device_bench --out an existing regular file",
            out_is_file("bench"),
            names=("out",),
            check=file_unchanged("out", OUT_FILE_TEXT),
        ),
        Case(
            ose,
            "fit --out an existing regular file",
            out_is_file("fit"),
            names=("out",),
            check=file_unchanged("out", OUT_FILE_TEXT),
        ),
        Case(
            ose,
            "convert: --out removed while it stages",
            lambda ctx: cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", ctx.path("out")),
            names=("out",),
            during=vanish_on_staging,
            check=needs_action("removed_after_s"),
        ),
        Case(ose, "convert into a full disk (256 KB tmpfs)", full_disk("convert")),
        Case(ose, "compress prune into a full disk (256 KB tmpfs)", full_disk("prune")),
        Case(ose, "device_bench bench into a full disk (64 KB tmpfs)", full_disk("bench")),
        Case(ose, "convert into a read-only file system", read_only_fs),
        Case(
            ose,
            "device_bench --test-set: a symlink loop named loop.png",
            bench_case(test_set=loop_set),
            names=("loop.png",),
        ),
        Case(
            ose,
            "device_bench --test-set: a folder named b.png",
            bench_case(test_set=dir_as_image_set),
            expect=(0, 2),
            names=("b.png",),
        ),
        Case(ose, "device_bench ssh target host '-oProxyCommand=touch pwned'", ssh_injection, expect=(2,), timeout=90),
        # ---------------------------------------------------------------- late or partial failure
        Case(
            lp,
            "compress prune --steps 200 --test-set missing folder",
            lambda ctx: prune_case("--test-set", ctx.path("nope"), fast=False)(ctx),
            names=("nope",),
            max_wall=15,
        ),
        Case(
            lp,
            "compress prune --steps 200 --test-set empty folder",
            lambda ctx: prune_case("--test-set", ctx.folder("empty"), fast=False)(ctx),
            names=("empty",),
            max_wall=15,
        ),
        Case(
            lp,
            "compress prune --steps 200 --test-set folder with a text file named x.png",
            lambda ctx: prune_case(
                "--test-set", folder_with({"x.png": lambda p: p.write_text("not a png")})(ctx), fast=False
            )(ctx),
            names=("x.png",),
            max_wall=15,
        ),
        Case(
            lp,
            "compress prune --steps 200 --data empty folder",
            lambda ctx: prune_case("--data", ctx.folder("empty"), fast=False)(ctx),
            names=("empty",),
            max_wall=15,
        ),
        Case(
            lp,
            "fit --steps 200 --test-set missing folder",
            lambda ctx: fit_case("--steps", "200", "--test-set", ctx.path("nope"))(ctx),
            names=("nope",),
            max_wall=15,
        ),
        Case(
            lp,
            "device_bench: a good model, then a .tflite of random bytes",
            good_then_garbage,
            names=("zz-garbage.tflite",),
            max_wall=15,
        ),
        Case(
            lp,
            "device_bench --test-set: names with spaces, quotes, $(...), newline, non-ASCII, -rf, [x]*",
            bench_case(test_set=funny_names),
            expect=(0, 2),
            check=all_images_scored(len(FUNNY)),
        ),
        Case(
            lp,
            "compress eval --test-set: the same funny names",
            eval_case(funny_names),
            expect=(0, 2),
            check=eval_all_images(len(FUNNY)),
        ),
        Case(
            lp,
            "device_bench --test-set: a non-UTF-8 file name",
            bench_case(test_set=non_utf8_name),
            expect=(0, 2),
            check=all_images_scored(1),
        ),
        Case(lp, "convert --out named 'out $(touch pwned) 'q\"<newline>ü'", funny_out, expect=(0,)),
        Case(
            lp,
            "convert: SIGTERM once it stages",
            lambda ctx: cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", ctx.path("out")),
            expect=(130, 143),
            during=signal_on_staging(signal.SIGTERM, group=False),
            check=needs_action("signal_sent_after_s"),
            error_line=False,
        ),
        Case(
            lp,
            "convert: SIGINT (Ctrl-C to the group) once it stages",
            lambda ctx: cmd("convert", "--checkpoint", CKPT, *CONVERT_FAST, "--out", ctx.path("out")),
            expect=(130,),
            during=signal_on_staging(signal.SIGINT, group=True),
            check=needs_action("signal_sent_after_s"),
            error_line=False,
        ),
        Case(
            lp,
            "compress prune --steps 200: SIGINT after 8 s",
            sigint_prune,
            expect=(130,),
            during=sigint_after(8.0),
            check=needs_action("signal_sent_after_s"),
            error_line=False,
        ),
        # ---------------------------------------------------------------- concurrency
        Case(cc, "two device_bench bench at once into the same --out", twin_bench, twin=True, expect=(0, 2)),
        Case(cc, "two converts at once into the same --out", twin_convert, twin=True, expect=(0, 2)),
        Case(cc, "two compress prune at once into the same --out", twin_prune, twin=True, expect=(0, 2)),
    ]


def budgets_via(ctx: Ctx, path: Path) -> list[str]:
    return cmd(
        "device_bench",
        "bench",
        ctx.shared.converted(),
        *BENCH_FAST,
        "--test-set",
        ctx.shared.photos(),
        "--budgets",
        path,
        "--out",
        ctx.path("out"),
    )


# ------------------------------------------------------------------------------------------------ running


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def children(pid: int) -> list[int]:
    """`pid`'s descendants, from /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Launched:
    """A command started under /usr/bin/time, in its own session, with a memory watchdog."""

    def __init__(self, argv: list[str], cwd: Path, logs: Path, timeout: float) -> None:
        self.argv, self.timeout = argv, timeout
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path, self.time_path = logs / "stdout", logs / "stderr", logs / "time"
        self.killed: str | None = None
        self.tree_peak_kb = 0
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                [TIME, "-f", "%M", "-o", str(self.time_path), *argv],
                cwd=cwd,
                env=ENV,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.watchdog = threading.Thread(target=self._watch, daemon=True)
        self.watchdog.start()

    def child_pid(self) -> int | None:
        kids = children(self.popen.pid)
        return kids[0] if kids else None

    def _watch(self) -> None:
        while self.popen.poll() is None:
            tree = [self.popen.pid, *children(self.popen.pid)]
            total = sum(rss_kb(p) for p in tree)
            self.tree_peak_kb = max(self.tree_peak_kb, total)
            if total > KILL_RSS_MB * 1024:
                self.killed = f"killed: > {KILL_RSS_MB // 1024} GB"
                self.kill_tree()
                return
            time.sleep(POLL_S)

    def kill_tree(self) -> None:
        pids = [self.popen.pid, *children(self.popen.pid)]
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except OSError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def finish(self) -> Proc:
        try:
            self.popen.wait(timeout=max(0.0, self.started + self.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.killed = self.killed or f"timeout after {self.timeout:.0f} s"
            self.kill_tree()
            self.popen.wait()
        wall = time.monotonic() - self.started
        self.watchdog.join(timeout=2)
        for pid in children(self.popen.pid):  # a daemon the command left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        total, longest = line_stats(self.stderr_path)
        return Proc(
            argv=self.argv,
            exit=self.popen.returncode,
            wall_s=round(wall, 2),
            stdout=ends(self.stdout_path),
            stderr=ends(self.stderr_path),
            stderr_bytes=total,
            longest_line=longest,
            rss_mb=time_rss_mb(self.time_path),
            tree_peak_mb=round(self.tree_peak_kb / 1024, 1),
            killed=self.killed,
        )


def ends(path: Path) -> str:
    """The first and last READ_BACK bytes of a file, as text."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= 2 * READ_BACK:
            data = fh.read()
        else:
            head = fh.read(READ_BACK)
            fh.seek(size - READ_BACK)
            data = head + f"\n[... {size - 2 * READ_BACK} bytes ...]\n".encode() + fh.read()
    return data.decode("utf-8", "replace")


def line_stats(path: Path) -> tuple[int, int]:
    """(total bytes, longest line in characters, counted as bytes) of a file of any size, read in chunks."""
    total = longest = current = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
            parts = chunk.split(b"\n")
            current += len(parts[0])
            if len(parts) > 1:
                longest = max(longest, current, *(len(p) for p in parts[1:-1]))
                current = len(parts[-1])
    return total, max(longest, current)


def time_rss_mb(path: Path) -> float | None:
    try:
        last = path.read_text().strip().splitlines()[-1]
        return round(int(last) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """relative path -> (is a folder, size, mtime_ns) of everything under `root` (symlinks not followed)."""
    seen: dict[str, tuple[bool, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            is_dir = os.path.isdir(full) and not os.path.islink(full)
            seen[os.path.relpath(full, root)] = (is_dir, st.st_size, st.st_mtime_ns)
    return seen


def leftovers(before: dict, after: dict, allowed: list[str], succeeded: bool) -> list[str]:
    """New (and, after a failure, changed) paths, top-most only; after a success only hidden ones and injection
    markers."""
    new = [p for p in after if p not in before]
    changed = [p for p in after if p in before and not after[p][0] and after[p] != before[p]]
    found = []
    for p in sorted(new):
        if any(fnmatch.fnmatch(p, pat) for pat in allowed):
            continue
        parts = p.split(os.sep)
        hidden = any(part.startswith(".") for part in parts)
        if succeeded and not hidden and os.path.basename(p) != "pwned":  # an output named 'pwned' is no marker
            continue
        if any(p.startswith(q + os.sep) for q in found):
            continue
        found.append(p)
    if not succeeded:
        found += [f"{p} (changed)" for p in sorted(changed)]
    return found


def traceback_info(text: str) -> tuple[str | None, str | None]:
    """(the exception line, the innermost frame in edgesr's own code as file:line) of the last traceback."""
    at = text.rfind("Traceback (most recent call last):")
    if at < 0:
        return None, None
    block = text[at:].splitlines()[1:]
    exc = next((ln for ln in block if ln and not ln[0].isspace() and not ln.startswith("During handling")), None)
    where = None
    for m in re.finditer(r'File "([^"]+)", line (\d+)', text[at:]):
        path = Path(m.group(1))
        try:
            rel = path.resolve().relative_to(REPO)
        except (ValueError, OSError):
            continue
        if not rel.parts or rel.parts[0].startswith(".venv"):
            continue
        where = f"{rel}:{m.group(2)}"
    return exc, where


def traceback_text(text: str, max_lines: int = 60) -> str | None:
    """The last traceback block, at most `max_lines` lines, for the JSON results."""
    at = text.rfind("Traceback (most recent call last):")
    return None if at < 0 else "\n".join(text[at:].splitlines()[:max_lines])


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def judge_one(case: Case, ctx: Ctx, proc: Proc, expect: tuple[int, ...], left: list[str]) -> list[str]:
    """Every broken promise of one process, as short reasons."""
    reasons = []
    if proc.killed:
        reasons.append(proc.killed)
    if proc.exit not in expect:
        reasons.append(f"exit {proc.exit}, expected {'/'.join(map(str, expect))}")
    errs = error_lines(proc.stderr)
    names = [*case.names, *ctx.names]
    if proc.exit not in (0, None) and case.error_line and not proc.killed:
        if not errs:
            reasons.append("no 'error:' line")
        elif len(errs) > 1:
            reasons.append(f"{len(errs)} 'error:' lines")
    if errs:
        if len(errs[-1]) > MAX_ERROR_CHARS:
            reasons.append(f"error line of {len(errs[-1])} chars")
        if names and proc.exit != 0 and not any(n in errs[-1] for n in names):
            reasons.append(f"error line names none of {', '.join(map(repr, names))}")
        reasons += [f"misleading error line: says {word!r}" for word in case.forbid if word in errs[-1]]
    if proc.longest_line > FLOOD_LINE_CHARS:
        reasons.append(f"stderr line of {proc.longest_line} chars ({proc.stderr_bytes} bytes in all)")
    exc, where = traceback_info(proc.stderr)
    if exc or "Traceback (most recent call last)" in proc.stderr:
        reasons.append(f"traceback: {(exc or '?')[:100]}" + (f" at {where}" if where else ""))
    rss = max(proc.rss_mb or 0.0, 0.0)
    if rss > MAX_RSS_MB:
        reasons.append(f"peak RSS {rss:.0f} MB")
    if left:
        reasons.append(f"left behind: {', '.join(left[:4])}" + (" ..." if len(left) > 4 else ""))
    if case.max_wall is not None and proc.exit not in (0, None) and proc.wall_s > case.max_wall:
        reasons.append(f"failed late, after {proc.wall_s:.0f} s (limit {case.max_wall:.0f} s)")
    return reasons


def run_case(index: int, case: Case, shared: Shared, root: Path) -> dict[str, Any]:
    cdir = root / "cases" / f"{index:02d}"
    cdir.mkdir(parents=True)
    ctx = Ctx(dir=cdir, shared=shared)
    base = {"#": index, "class": case.cls, "input": case.input}
    started = time.monotonic()
    try:
        try:
            argv = case.setup(ctx)
        except Skip as skip:
            return {**base, "verdict": "not run", "reasons": [str(skip)], "command": None}
        before = snapshot(cdir)
        logs = root / "logs" / f"{index:02d}"
        try:
            runs = [Launched(argv, cdir, logs / "a", case.timeout)]
            if case.twin:
                runs.append(Launched(argv, cdir, logs / "b", case.timeout))
        except OSError as exc:
            return {**base, "verdict": "not run", "reasons": [f"cannot start it: {exc}"], "command": short(argv, root)}
        action = None
        if case.during:
            action = threading.Thread(target=case.during, args=(ctx, runs[0]), daemon=True)
            action.start()
        procs = [r.finish() for r in runs]
        if action:
            action.join(timeout=5)
        after = snapshot(cdir)
    finally:
        for undo in reversed(ctx.teardown):
            undo()
    succeeded = any(p.exit == 0 for p in procs)
    left = leftovers(before, after, ctx.allowed, succeeded)
    if case.twin:
        reasons = judge_twin(case, ctx, procs, left)
    else:
        reasons = judge_one(case, ctx, procs[0], case.expect, left)
        if case.check:
            reasons += case.check(ctx, procs[0])
    main = max(procs, key=lambda p: p.exit or 0) if case.twin else procs[0]
    exc, where = traceback_info(main.stderr)
    errs = error_lines(main.stderr)
    return {
        **base,
        "command": short(argv, root),
        "argv": argv,
        "expected": list(case.expect),
        "exit": [p.exit for p in procs] if case.twin else main.exit,
        "error_line": errs[-1] if errs else None,
        "error_lines": len(errs),
        "longest_stderr_line": max(p.longest_line for p in procs),
        "stderr_bytes": max(p.stderr_bytes for p in procs),
        "traceback": exc is not None,
        "traceback_exception": exc,
        "traceback_where": where,
        "traceback_text": traceback_text(main.stderr),
        "peak_rss_mb": max((p.rss_mb or 0.0) for p in procs) if any(p.rss_mb for p in procs) else None,
        "tree_peak_rss_mb": max(p.tree_peak_mb for p in procs),
        "wall_s": max(p.wall_s for p in procs),
        "case_s": round(time.monotonic() - started, 1),
        "killed": next((p.killed for p in procs if p.killed), None),
        "leftovers": left,
        "notes": ctx.notes,
        "verdict": "FAIL" if reasons else "ok",
        "reasons": reasons,
        "stderr_tail": [p.stderr[-3000:] for p in procs],
        "stdout_tail": [p.stdout[-1000:] for p in procs],
    }


def judge_twin(case: Case, ctx: Ctx, procs: list[Proc], left: list[str]) -> list[str]:
    """Two identical runs at once: one must finish (0), the other refuse (2) with an error naming the folder."""
    reasons = []
    codes = sorted(p.exit if p.exit is not None else -999 for p in procs)
    if codes != [0, 2]:
        what = "both exited 0 (both wrote into the same folder)" if codes == [0, 0] else f"exits {codes}"
        reasons.append(f"{what}, expected one 0 and one 2")
    for label, proc in zip("ab", procs, strict=True):
        expect = (0, 2)
        sub = judge_one(dataclasses.replace(case, twin=False), ctx, proc, expect, [])
        reasons += [f"run {label}: {r}" for r in sub]
    if left:
        reasons.append(f"left behind: {', '.join(left[:4])}")
    return reasons


# ------------------------------------------------------------------------------------------------ report


def short(argv: list[str], root: Path | None = None) -> str:
    """The command line as a user would type it: `python` for the venv's, $T for the campaign folder."""
    words = ["python" if w == PYTHON else "edgesr" if w == EDGESR else w for w in argv]
    text = shlex.join(words)
    if root is not None:
        text = text.replace(str(root), "$T")
    return text.replace(str(REPO) + "/", "").replace("\n", "\\n")


def cell(text: object, limit: int | None = None) -> str:
    s = "" if text is None else str(text)
    s = s.replace("\n", "\\n").replace("|", "\\|")
    if limit and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "#",
        "class",
        "input",
        "command",
        "exit (expected/got)",
        "error line",
        "longest stderr line",
        "traceback",
        "peak RSS MB",
        "partial output left",
        "verdict",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r["verdict"] == "not run":
            row = [r["#"], r["class"], r["input"], "", "", "", "", "", "", "", f"not run: {r['reasons'][0]}"]
        else:
            got = "+".join(map(str, r["exit"])) if isinstance(r["exit"], list) else r["exit"]
            expected = (
                "+".join(map(str, r["expected"])) if isinstance(r["exit"], list) else "/".join(map(str, r["expected"]))
            )
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
            if r["killed"]:
                rss += f" ({r['killed']})"
            verdict = "ok" if r["verdict"] == "ok" else "FAIL: " + "; ".join(r["reasons"])
            row = [
                r["#"],
                r["class"],
                r["input"],
                cell(r["command"], 110),
                f"{expected} / {got}",
                cell(r["error_line"], 120),
                r["longest_stderr_line"],
                "yes" if r["traceback"] else "no",
                rss,
                ", ".join(r["leftovers"]) or "none",
                verdict,
            ]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, help="write the full results here as JSON")
    parser.add_argument("--only", help="run only the cases whose class or input contain this (case-insensitive)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    selected = list(enumerate(cases(), 1))
    if args.only:
        needle = args.only.lower()
        selected = [(i, c) for i, c in selected if needle in f"{c.cls} {c.input}".lower()]
    if args.list:
        for i, c in selected:
            print(f"{i:3d}  {c.cls:28s} {c.input}")
        return 0

    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="hostile-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        log(f"campaign folder {root}; {len(selected)} cases")
        shared = Shared(root)
        for n, (i, case) in enumerate(selected, 1):
            result = run_case(i, case, shared, root)
            results.append(result)
            extra = f" ({result['wall_s']:.1f} s)" if "wall_s" in result else ""
            log(f"[{n}/{len(selected)}] #{i} {result['verdict']}{extra}: {case.input}")
    elapsed = time.monotonic() - started
    fails = sum(r["verdict"] == "FAIL" for r in results)
    print(table(results))
    print(
        f"\n{len(results)} cases: {len(results) - fails - sum(r['verdict'] == 'not run' for r in results)} ok, "
        f"{fails} FAIL, {sum(r['verdict'] == 'not run' for r in results)} not run; {elapsed / 60:.1f} min"
    )
    if args.out:
        meta = {"elapsed_s": round(elapsed, 1), "python": PYTHON, "euid": os.geteuid(), "repo": str(REPO)}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
