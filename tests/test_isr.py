"""idealo ISR psnr-small x2, as `make setup` fetched it: it loads into RDN exactly as Keras runs it, beats bicubic on
real photos, and the cache and the loader refuse altered or foreign files with one-line errors.

The Keras reference runs in a subprocess (TensorFlow imported once for the module, and kept out of this process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from compress import pretrained
from compress.evaluate import evaluate, evaluate_bicubic
from compress.models import create_model, model_spec
from compress.models.isr import load_isr_rdn
from conftest import REPO, run_module
from edgesr.datasets import load_test_set
from edgesr.errors import BadInput
from edgesr.images import to_float

NAME = "rdn-psnr-small-x2"
MAX_ABS_VS_KERAS = 1e-5
MIN_GAIN_DB = 2.0  # research/data.md B measured +2.99 dB mean on sporco (35.19 vs 32.20)

KERAS_REFERENCE = """
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import keras
model = keras.models.load_model(sys.argv[1], compile=False)  # Keras 3 reads the legacy tf.keras 2.3 .h5 as is
x = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict(x[None], verbose=0)[0])
print(f"keras {keras.__version__} tensorflow {tf.__version__} params {model.count_params()}")
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def h5() -> Path:
    try:
        return pretrained.path(NAME)
    except BadInput as exc:  # `make test` runs `make setup`, which fetches it
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def loaded(h5: Path):
    return load_isr_rdn(h5)


@pytest.fixture(scope="module")
def sporco():
    return load_test_set("sporco", 2)


def one_line_bad_input(call, match: str) -> str:
    with pytest.raises(BadInput, match=match) as exc:
        call()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_loads_as_rdn_small(loaded, h5: Path) -> None:
    model, info = loaded
    assert model_spec(model) == model_spec(create_model("rdn-small", scale=2))
    assert info["params"] == 2_619_635 and info["tensors"] == 96
    assert info["arch"] == {"C": 3, "D": 10, "G": 64, "G0": 64, "scale": 2, "upscaling": "nearest",
                            "upn_channels": [64, 32]}  # fmt: skip
    assert info["sha256"] == pretrained.REGISTRY[NAME].sha256 and info["source"] == str(h5.resolve())


def test_matches_keras_on_a_photo_crop(loaded, h5: Path, sporco, tmp_path: Path, record_property) -> None:
    model, _ = loaded
    monarch = next(p for p in sporco if p.name == "monarch")
    crop = to_float(monarch.lr[80:128, 100:164])  # 48x64 LR, non-square so an H/W swap would show
    np.save(tmp_path / "x.npy", crop)
    # Keras picks the format by extension, and it must read the very file we load.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", KERAS_REFERENCE, str(h5), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "params 2619635" in proc.stdout
    keras_sr = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        ours = model(torch.from_numpy(crop).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert ours.shape == keras_sr.shape == (96, 128, 3)
    err = float(np.abs(ours - keras_sr).max())
    record_property("max_abs_vs_keras", err)
    print(f"\nmax abs error vs Keras ({proc.stdout.strip()}): {err:.3g}")
    assert err <= MAX_ABS_VS_KERAS, f"max abs error vs Keras {err:.3g} > {MAX_ABS_VS_KERAS}"
    assert float(np.abs(keras_sr).max()) > 0.5  # a real image came out, not zeros


def test_beats_bicubic_on_sporco(loaded, sporco, record_property) -> None:
    model, _ = loaded
    sr, bic = evaluate(model, sporco, 2), evaluate_bicubic(sporco, 2)
    rows = [(n, sr["per_image"][n]["psnr_y_db"], bic["per_image"][n]["psnr_y_db"]) for n in sr["per_image"]]
    mean, mean_bic = sr["mean"]["psnr_y_db"], bic["mean"]["psnr_y_db"]
    table = "\n".join(f"  {n:8s} {a:6.2f} {b:6.2f}" for n, a, b in rows)
    print(f"\nsporco x2 Y-PSNR (ISR psnr-small, bicubic):\n{table}\n  {'mean':8s} {mean:6.2f} {mean_bic:6.2f}")
    record_property("sporco_psnr_y_db", {"model": sr, "bicubic": bic})
    assert all(a > b for _, a, b in rows), table
    assert mean >= mean_bic + MIN_GAIN_DB, table


def test_corrupted_cached_copy_is_refused(h5: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESR_CACHE", str(tmp_path))
    msg = one_line_bad_input(lambda: pretrained.path(NAME), "is missing")
    assert "run `make setup` (fetches it from the npm registry)" in msg
    copy = pretrained.cache_dir() / pretrained.REGISTRY[NAME].filename
    copy.parent.mkdir(parents=True)
    shutil.copy(h5, copy)
    assert pretrained.path(NAME) == copy
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the weights
    copy.write_bytes(bytes(data))
    msg = one_line_bad_input(lambda: pretrained.path(NAME), "fail their sha256 check")
    assert "run `make setup`" in msg


def test_cli_path_and_cached_fetch_stay_offline(h5: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "pretrained" / pretrained.REGISTRY[NAME].filename
    copy.parent.mkdir()
    shutil.copy(h5, copy)
    monkeypatch.setenv("EDGESR_CACHE", str(tmp_path))
    for var in ("HTTPS_PROXY", "https_proxy"):  # a dead proxy: were fetch to download anything, it would fail
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    fetched = run_module("compress.pretrained", "fetch", timeout=60)
    found = run_module("compress.pretrained", "path", NAME, timeout=60)
    copy.unlink()
    missing = run_module("compress.pretrained", "path", NAME, timeout=60)
    assert fetched.returncode == 0 and "cached" in fetched.stderr, fetched.stderr
    assert found.returncode == 0 and found.stdout.strip() == str(copy), found.stderr
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().count("\n") == 0 and "make setup" in missing.stderr, missing.stderr


def test_non_isr_and_broken_files_are_refused(h5: Path, tmp_path: Path) -> None:
    dense = tmp_path / "dense.h5"  # a Keras-layout weights file of some other model
    with h5py.File(dense, "w") as f:
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [b"dense"]
        layer = g.create_group("dense")
        layer.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        layer.create_dataset("dense/kernel:0", data=np.zeros((4, 2), np.float32))
        layer.create_dataset("dense/bias:0", data=np.zeros(2, np.float32))
    msg = one_line_bad_input(lambda: load_isr_rdn(dense), "not an idealo ISR RDN file")
    assert msg.startswith(str(dense))

    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    one_line_bad_input(lambda: load_isr_rdn(plain), "not a Keras weights file")

    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    one_line_bad_input(lambda: load_isr_rdn(text), "not a readable Keras .h5 file")
    one_line_bad_input(lambda: load_isr_rdn(tmp_path / "absent.h5"), "no such file")

    big = tmp_path / "big.h5"  # 1.2 GB declared, a few kB on disk: refused before anything is read
    with h5py.File(big, "w") as f:
        f.create_dataset("big", shape=(300_000_000,), dtype="f4")
    one_line_bad_input(lambda: load_isr_rdn(big), "over the 1 GiB limit")

    wrong = tmp_path / "wrong.h5"  # the real file with one kernel of the wrong width
    shutil.copy(h5, wrong)
    with h5py.File(wrong, "r+") as f:
        layer = f["model_weights/F_2_2"]
        del layer["F_2_2/kernel:0"]
        layer.create_dataset("F_2_2/kernel:0", data=np.zeros((3, 3, 96, 64), np.float32))
    one_line_bad_input(lambda: load_isr_rdn(wrong), r"F_2_2/kernel has shape \(64, 96, 3, 3\) as rdbs.1.convs.1.weight")
