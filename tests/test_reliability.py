"""Hostile input, one test per class (issue 15): bounded resources, no silent wrong numbers, one-line errors with
their exit code instead of tracebacks, validation before slow work, nothing partial left behind, one run per folder.
`benchmarks/hostile_inputs.py` runs the wider campaign with peak memory per command."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TILE, run_module
from edgesr.datasets import builtin_hr_images
from edgesr.errors import BadInput
from edgesr.images import load_rgb, save_png
from edgesr.manifest import exclusive_output, sha256

CHECKPOINT = REPO / "checkpoints" / "edsr-tiny-x2" / "model.pt"
RADIUS, OVERLAP = 12, 14


def one_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command failed with `code` and said so in exactly one bounded 'error:' line, with no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert max(len(line) for line in proc.stderr.splitlines()) <= 500
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def limited(max_bytes: int):
    """preexec_fn: cap the child's address space, so a command that would allocate without bound dies instead."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory: pytest.TempPathFactory, tiny_tflite: tuple[Path, object]) -> dict:
    """A convert folder (manifest with the measured receptive-field radius) and a 2-photo test folder."""
    root = tmp_path_factory.mktemp("hostile")
    photos = dict(builtin_hr_images("sporco"))
    test_dir = root / "photos"
    test_dir.mkdir()
    save_png(test_dir / "monarch.png", photos["monarch"][80:208, 120:248])
    save_png(test_dir / "kodim23.png", photos["kodim23"][40:168, 300:428])
    conv = root / "convert"
    conv.mkdir()
    shutil.copyfile(tiny_tflite[0], conv / "dense.tflite")
    manifest = {
        "kind": "convert",
        "model": "edsr-tiny-x2-rand",
        "scale": 2,
        "tile": {"height": TILE, "width": TILE, "overlap": OVERLAP, "receptive_field_radius": RADIUS},
        "artifacts": [{"file": "dense.tflite", "format": "tflite", "encoding": "dense", "precision": "fp32"}],
    }
    manifest["artifacts"][0]["sha256"] = sha256(conv / "dense.tflite")
    (conv / "manifest.json").write_text(json.dumps(manifest))
    return {"root": root, "convert": conv, "photos": test_dir}


def bench(env: dict, out: Path, *extra: object, **kwargs) -> subprocess.CompletedProcess:
    args = ["device_bench", "bench", env["convert"], "--out", out, "--test-set", env["photos"], "--runs", 1]
    args += ["--warmup", 0, *extra]
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs
    )


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)  # 10^9 values once expanded


# ------------------------------------------------------------------------------------ unbounded resources


@pytest.mark.parametrize("flag", ["--budgets", "--targets-file"])
def test_a_yaml_alias_bomb_is_refused_without_costing_memory(bench_env: dict, tmp_path: Path, flag: str) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    out = tmp_path / "out"
    proc = bench(bench_env, out, flag, bomb, preexec_fn=limited(1 << 30))  # 1 GB of address space at most
    one_error(proc, 2, str(bomb), "more than 100000 values (aliases expanded)")
    assert not out.exists()


def test_deep_nesting_and_a_huge_file_are_refused(bench_env: dict, tmp_path: Path) -> None:
    deep, huge = tmp_path / "deep.yaml", tmp_path / "huge.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    huge.write_text("max_frame_ms: 1\n# " + "x" * (2 << 20) + "\n")
    one_error(bench(bench_env, tmp_path / "o1", "--budgets", deep), 2, str(deep), "nested deeper")
    one_error(bench(bench_env, tmp_path / "o2", "--budgets", huge), 2, str(huge), "bytes; a budgets file")


def test_an_error_about_a_huge_or_multiline_value_is_one_bounded_line(bench_env: dict, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(json.dumps({"defaults": {"max_" + "x" * 200_000 + "\nline two": 1}}))
    line = one_error(bench(bench_env, tmp_path / "out", "--budgets", budgets), 2, str(budgets))
    assert " ... " in line and len(line) <= 420


def test_a_model_too_large_to_build_is_refused_before_it_allocates(tmp_path: Path) -> None:
    args = ["eval", "--model", "edsr-tiny", "--factory-args", '{"scale": 2, "n_feats": 100000}']
    proc = run_module("compress", *args, preexec_fn=limited(1 << 30))  # 360 GB of weights, in 1 GB of memory
    one_error(proc, 2, "edsr-tiny", "parameters", "check its size arguments")


def test_a_fifo_or_device_in_a_test_set_is_refused_without_blocking(bench_env: dict, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(bench_env["photos"], photos)
    os.mkfifo(photos / "fifo.png")  # opening it would wait for a writer forever
    out = tmp_path / "out"
    one_error(bench({**bench_env, "photos": photos}, out), 2, str(photos / "fifo.png"), "not a regular file")
    (photos / "fifo.png").unlink()
    (photos / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    one_error(bench({**bench_env, "photos": photos}, out), 2, str(photos / "zero.png"), "not a regular file")
    assert not out.exists()


def test_a_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 Mpx that compress to a few KB
    assert bomb.stat().st_size < 200_000
    with pytest.raises(BadInput, match=r"bomb.png: 9000x9000 pixels is over the 40 Mpx edgesr reads"):
        load_rgb(bomb)


def test_compress_eval_of_a_large_photo_runs_in_tiles_equal_to_the_whole_image() -> None:
    import torch

    from compress.evaluate import _sr, super_resolve
    from compress.intake import ModelSpec, load_model

    model = load_model(ModelSpec(checkpoint=CHECKPOINT)).model.eval()
    lr = dict(builtin_hr_images("sporco"))["monarch"][:150, :230]
    tiled = super_resolve(model, lr, tile=64)  # 150x230 LR in 64-px tiles: a 3x4 grid
    with torch.no_grad():
        whole = _sr(model, lr)
    assert tiled.shape == whole.shape == (300, 460, 3)
    assert np.abs(tiled - whole).max() < 1e-5
    assert model._edgesr_eval_overlap >= 8  # measured, not assumed


# ------------------------------------------------------------------------------------ silent wrong results


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16_bit_images_are_read_at_their_depth_and_score_as_their_8_bit_version(tmp_path: Path) -> None:
    photo = dict(builtin_hr_images("sporco"))["kodim23"][:96, :128]
    deep = photo.astype(np.uint16) * 257  # the same picture at 16 bits
    folders = {name: tmp_path / name for name in ("eight", "grey16", "rgb16")}
    for folder in folders.values():
        folder.mkdir()
    save_png(folders["eight"] / "kodim23.png", photo)
    _png16_rgb(folders["rgb16"] / "kodim23.png", deep)
    Image.fromarray(deep[..., 1]).save(folders["grey16"] / "kodim23.png")  # mode I;16
    assert np.array_equal(load_rgb(folders["rgb16"] / "kodim23.png"), photo)
    assert np.array_equal(load_rgb(folders["grey16"] / "kodim23.png")[..., 0], photo[..., 1])
    Image.fromarray(photo[..., 1].astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(BadInput, match="floating-point pixels"):
        load_rgb(tmp_path / "float.tiff")

    def psnr(folder: Path) -> float:
        proc = run_module("compress", "eval", "--checkpoint", CHECKPOINT, "--test-set", folder)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stderr.split("kodim23")[1].split()[0])

    assert psnr(folders["rgb16"]) == psnr(folders["eight"]) > 25  # not the 22 dB of a clipped read


def test_an_overlap_below_the_receptive_field_radius_is_refused(bench_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bench(bench_env, out, "--overlap", RADIUS - 1)
    one_error(proc, 2, f"--overlap {RADIUS - 1} is below the receptive-field radius {RADIUS}")
    assert not out.exists()


# ------------------------------------------------------------------------ tracebacks instead of errors


@pytest.mark.parametrize(
    "module,args",
    [
        ("convert", ["--checkpoint", CHECKPOINT, "--out", "{tmp}/o", "--sparse-min", "nan"]),
        ("device_bench", ["bench", "{tmp}/x.tflite", "--out", "{tmp}/o", "--min-seconds", "inf"]),
        ("fit", ["--checkpoint", CHECKPOINT, "--budgets", "{tmp}/b.yaml", "--out", "{tmp}/o", "--margin", "nan"]),
        ("fit", ["--checkpoint", CHECKPOINT, "--budgets", "{tmp}/b.yaml", "--out", "{tmp}/o", "--keeps", "1,nan"]),
        ("compress", ["prune", "--checkpoint", CHECKPOINT, "--out", "{tmp}/o", "--sparsity", "nan"]),
    ],
)
def test_nan_and_infinite_numbers_are_refused_by_every_command(module: str, args: list, tmp_path: Path) -> None:
    proc = run_module(module, *(str(a).format(tmp=tmp_path) for a in args))
    one_error(proc, 2, "finite")
    assert not (tmp_path / "o").exists()


def test_any_garbage_checkpoint_is_a_one_line_bad_input(tmp_path: Path) -> None:
    """Random bytes reach any error inside torch's unpickler (CI once drew an IndexError): every one of 300 seeded
    files, and pickle-looking ones (protocol 2 header, then noise), is BadInput naming the file."""
    from compress.checkpoint import torch_load

    rng = np.random.default_rng(0)
    path = tmp_path / "garbage.pt"
    for n in range(300):
        head = b"\x80\x02" if n % 2 else b""
        path.write_bytes(head + rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        with pytest.raises(BadInput, match="not a readable torch checkpoint") as err:
            torch_load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_checkpoint_content_and_os_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    one_error(run_module("compress", "eval", "--checkpoint", garbage), 2, str(garbage), "not a readable")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_module("convert", "--checkpoint", CHECKPOINT, "--out", blocker / "out", "--tile", 64)
    one_error(proc, 2, str(blocker))


FULL_DISK = {
    "convert": ["convert", "--checkpoint", CHECKPOINT, "--tile", 64],
    "compress prune": ["compress", "prune", "--checkpoint", CHECKPOINT, "--sparsity", 0.5, "--steps", 1]
    + ["--batch-size", 2, "--patch", 12, "--device", "cpu", "--test-set", "butterfly"],
}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI and make test run as root)")
@pytest.mark.parametrize("command", sorted(FULL_DISK))
def test_a_full_disk_is_exit_2_naming_the_output_and_leaves_nothing(tmp_path: Path, command: str) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", disk], check=True)
    try:
        proc = run_module(*FULL_DISK[command], "--out", disk / "out")
        one_error(proc, 2, str(disk / "out"), "No space left on device")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", disk], check=True)


def test_a_duplicate_yaml_key_is_refused_not_silently_overwritten(bench_env: dict, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("defaults:\n  max_peak_mb: 1\n  max_peak_mb: 100000\n")  # which one did the user mean?
    one_error(bench(bench_env, tmp_path / "out", "--budgets", budgets), 2, str(budgets), "max_peak_mb")
    assert not (tmp_path / "out").exists()


def test_a_bad_trial_storage_url_is_refused_before_any_output(tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("defaults:\n  max_frame_ms: 1000\n")
    out = tmp_path / "out"
    args = ["--checkpoint", CHECKPOINT, "--budgets", budgets, "--out", out, "--storage", "not-a-url"]
    one_error(run_module("fit", *args), 2, "--storage", "not-a-url", "is not a database URL")
    assert not out.exists()


# ------------------------------------------------------------------------------ late or partial failure


def test_a_terminated_convert_removes_its_staging_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert", "--checkpoint", str(CHECKPOINT), "--out", str(out), "--tile", "64"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out.is_dir() and any(p.name.startswith(".convert-") for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    time.sleep(1)  # inside the conversion
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr
    assert not out.exists()  # the folder it created, staging inside it, all gone


SWALLOWING_CALLBACK = """
import gc, pathlib, sys, time
from edgesr.errors import run_cli
slept, loops = [], [0]
def slow(*args):  # jax installs a gc callback too: a signal can land in one, or in a __del__
    if not slept:
        slept.append(loops[0])
        pathlib.Path(sys.argv[1]).write_text("in the callback")
        time.sleep(3)
class Finalised:
    def __del__(self):
        slow()
def main(argv):
    if sys.argv[2] == "gc":
        gc.callbacks.append(slow)
    try:
        t0 = time.time()
        while time.time() - t0 < 8:
            gc.collect() if sys.argv[2] == "gc" else Finalised()
            loops[0] += 1
        return 0
    finally:
        pathlib.Path(sys.argv[1]).write_text(f"finally ran, {loops[0] - slept[0]} loop(s) after the signal")
raise SystemExit(run_cli(main, []))
"""


@pytest.mark.parametrize("where", ["gc", "del"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_whose_handler_runs_in_a_callback_still_stops_the_run(tmp_path: Path, sig: int, where: str) -> None:
    script, flag = tmp_path / "swallow.py", tmp_path / "flag"
    script.write_text(SWALLOWING_CALLBACK)
    argv = [sys.executable, str(script), str(flag), where]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.2)  # inside the callback's sleep, not between its open and write
    proc.send_signal(sig)  # Python raises it inside the callback, which cannot propagate it
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), stderr[-2000:]
    # the signal stops the loop where it was and its finally runs (a raise that kept landing in the next callback
    # once let the loop run on for thousands of rounds, up to its end, and then cut the finally's write short)
    assert flag.read_text() in ("finally ran, 0 loop(s) after the signal", "finally ran, 1 loop(s) after the signal")
    assert "Exception ignored" not in stderr


def test_image_names_are_data_spaces_quotes_and_shell_syntax_included(bench_env: dict, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["a b", 'it\'s "q"', "$(touch pwned)", "ünï", "-dash", os.fsdecode(b"caf\xe9 latin-1")]
    crop = load_rgb(bench_env["photos"] / "monarch.png")[:64, :64]
    for name in names:
        save_png(photos / f"{name}.png", crop)
    out = tmp_path / "out"
    proc = bench({**bench_env, "photos": photos}, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = json.loads((out / "report.json").read_text())["rows"]
    assert sorted(row["per_image"]) == sorted(names)
    assert not (REPO / "pwned").exists() and not (out / "pwned").exists()


# ------------------------------------------------------------------------------------------ concurrency


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_lives(bench_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with exclusive_output(out, "the first run"):
        proc = bench(bench_env, out)
        one_error(proc, 2, str(out), "the first run", "is writing into this folder")
        assert not out.exists()
    assert bench(bench_env, out).returncode == 0  # released with the run
