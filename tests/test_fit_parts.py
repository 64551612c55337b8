"""The fit's parts on real models and a real trial database: shapes, the shape model, selection, the trial store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.evaluate import model_stats
from compress.intake import ModelSpec, load_model
from compress.pruning.coupling import find_groups
from fit.predict import fit_curve, relative_error
from fit.select import Candidate, binding, nearest, ranked, sparse_bases, violations
from fit.shapes import ShapeSpace
from fit.trials import TrialStore, key_id

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "edsr-tiny-x2" / "model.pt"


@pytest.fixture(scope="module")
def space() -> ShapeSpace:
    loaded = load_model(ModelSpec(checkpoint=CKPT))
    return ShapeSpace(loaded.model, find_groups(loaded.model), loaded.scale, min_channels=4)


def test_shape_widths_round_up_to_the_family_multiple(space: ShapeSpace) -> None:
    assert set(space.shape(0.5, 8).kept.values()) == {16}
    assert set(space.shape(0.375, 8).kept.values()) == {16}  # 12 rounds up to 16
    assert set(space.shape(0.375, 4).kept.values()) == {12}
    assert set(space.shape(0.01, 8).kept.values()) == {8}  # never below one multiple
    assert set(space.shape(0.01, 1).kept.values()) == {4}  # nor below min_channels
    assert space.shape(1.0, 8).dense and not space.shape(0.75, 8).dense
    assert space.shape(0.5, 8).id == space.shape(0.5, 4).id  # the same widths are the same shape
    grid = space.grid(8)
    assert [sorted(set(s.kept.values())) for s in grid] == [[8], [16], [24], [32]]


def test_compact_net_has_the_shapes_accounted_size_and_keeps_the_strongest_channels(space: ShapeSpace) -> None:
    shape = space.shape(0.5, 8)
    compact = space.compact(shape)
    stats = model_stats(compact, 2)
    assert sum(p.numel() for p in compact.parameters()) == shape.params
    assert stats["params"] == shape.params and stats["macs_1280x720"] == shape.macs
    masks = space.keep_masks(shape)
    for g, mask in masks.items():
        kept, dropped = space.scores[g][mask], space.scores[g][~mask]
        assert int(mask.sum()) == 16 and float(kept.min()) >= float(dropped.max())
    out = compact(torch.rand(1, 3, 24, 24))
    assert out.shape == (1, 3, 48, 48)


def test_shape_model_interpolates_between_measured_shapes_and_states_its_leave_one_out_error() -> None:
    ks = [0.25, 0.375, 0.5, 0.75, 1.0]
    curve = fit_curve([(k, 10 + 40 * k) for k in ks])
    assert curve(0.6) == pytest.approx(34.0) and curve(0.5) == pytest.approx(30.0)
    assert curve.loo_error == pytest.approx(0.0, abs=1e-12)
    measured = [(0.25, 116.1), (0.375, 178.9), (0.5, 245.5), (0.75, 647.4), (1.0, 869.5)]  # fit-tiny, ms
    curve = fit_curve(measured)
    assert [curve(k) for k, _ in measured] == pytest.approx([y for _, y in measured])  # exact at every knot
    assert curve(0.625) == pytest.approx((245.5 + 647.4) / 2)
    left_out_16 = 178.9 + (647.4 - 178.9) * (0.5 - 0.375) / (0.75 - 0.375)  # widths 16 from its neighbours
    assert curve.loo_error == pytest.approx((left_out_16 - 245.5) / 245.5)  # the worst interior knot
    assert fit_curve([(0.5, 7.0)])(0.9) == 7.0  # one point: a constant
    assert fit_curve([(0.5, 7.0), (0.5, 9.0)]).knots == ((0.5, 8.0),)  # repeated measurements are averaged
    assert fit_curve([(0.0, 1.0), (1.0, 3.0)]).loo_error is None
    assert relative_error(110.0, 100.0) == pytest.approx(0.1) and relative_error(1.0, 0.0) is None


def test_margin_applies_to_max_and_min_budgets() -> None:
    fig = {"frame_ms_p90": 95.0, "fps": 11.0, "size_bytes": 100 * 1024, "peak_rss_mb": 50.0}
    assert violations({"max_frame_ms": 100}, fig, 0.0) == {}
    miss = violations({"max_frame_ms": 100}, fig, 0.1)  # 95 x 1.1 > 100
    assert set(miss) == {"max_frame_ms"} and miss["max_frame_ms"]["excess"] == pytest.approx(0.045)
    assert set(violations({"min_fps": 10.5}, fig, 0.1)) == {"min_fps"}  # 11 x 0.9 < 10.5
    assert violations({"max_model_kb": 100, "min_psnr_db": 99}, fig, 0.0) == {}  # PSNR is not predicted


def test_ranking_prefers_more_parameters_then_precision_and_names_what_binds(space: ShapeSpace) -> None:
    shapes = space.grid(8)
    limits = {"max_frame_ms": 100.0}

    def cand(shape, precision: str, ms: float) -> Candidate:
        c = Candidate(shape, precision, (64, 64), {"frame_ms_p90": ms})
        c.violations = violations(limits, c.predicted, 0.05)
        return c

    cands = [cand(s, p, ms * (0.8 if p == "int8" else 1.0)) for s, ms in zip(shapes, (40, 70, 110, 200), strict=True)
             for p in ("fp32", "int8")]  # fmt: skip
    best = ranked(cands)
    assert best[0].shape == shapes[2] and best[0].precision == "int8"  # 88 ms: the largest feasible shape
    assert best[1].shape == shapes[1] and best[1].precision == "fp32"
    assert binding(best[0], cands) == ["max_frame_ms"]
    impossible = [cand(s, "fp32", 500 + i) for i, s in enumerate(shapes)]
    assert ranked(impossible) == [] and nearest(impossible).shape == shapes[0]


def test_trial_store_reuses_finished_trials_across_processes(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'trials.db'}"
    calls = []
    store = TrialStore(storage)
    key = {"kind": "measure", "shape": "abc", "tile": [64, 64]}
    assert store.run(key, lambda: calls.append(1) or {"frame_ms_p90": 12.5}, value="frame_ms_p90") == {
        "frame_ms_p90": 12.5
    }
    again = TrialStore(storage)  # another process's view of the same database
    assert again.run(key, lambda: calls.append(2) or {"frame_ms_p90": 99.0}) == {"frame_ms_p90": 12.5}
    assert calls == [1] and again.reused == [key_id(key)] and again.lookup({"kind": "other"}) is None
    with pytest.raises(RuntimeError):
        again.run({"kind": "boom"}, lambda: (_ for _ in ()).throw(RuntimeError("no")))
    assert again.run({"kind": "boom"}, lambda: {"ok": True}) == {"ok": True}  # a failed trial is retried


def test_a_trial_whose_process_was_killed_runs_again(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'trials.db'}"
    key = {"kind": "train", "shape": "xyz"}
    script = textwrap.dedent(
        f"""
        import time
        from fit.trials import TrialStore
        store = TrialStore({storage!r})
        store.run({key!r}, lambda: (print("started", flush=True), time.sleep(600)) and {{}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "started"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = TrialStore(storage, poll_s=0.1)
    t0 = time.monotonic()
    assert store.run(key, lambda: {"psnr_y_db": 33.0}) == {"psnr_y_db": 33.0}
    assert time.monotonic() - t0 < 30 and store.ran == [key_id(key)]
    states = sorted(t.state.name for t in store.study.get_trials())
    assert states == ["COMPLETE", "FAIL"]
    assert json.loads(store.study.get_trials()[-1].user_attrs["result"]) == {"psnr_y_db": 33.0}
    assert np.isfinite(store.study.get_trials()[-1].value)


def test_sparsity_starts_from_the_widest_shape_only_file_size_stops_one_base_per_precision(space: ShapeSpace) -> None:
    shapes = space.grid(8)  # narrowest first
    limits = {"max_frame_ms": 100.0, "max_model_kb": 100.0}

    def cand(shape, precision: str, ms: float, kb: float) -> Candidate:
        c = Candidate(shape, precision, (64, 64), {"frame_ms_p90": ms, "size_bytes": kb * 1024})
        c.violations = violations(limits, c.predicted, 0.05)
        return c

    figures = ((40, 60), (70, 120), (90, 200), (200, 400))  # (ms, KB in fp32) per shape, narrowest first
    cands = [cand(s, p, ms, kb / (4 if p == "int8" else 1)) for s, (ms, kb) in zip(shapes, figures, strict=True)
             for p in ("fp32", "int8")]  # fmt: skip
    best = ranked(cands)[0]
    assert best.shape == shapes[2] and best.precision == "int8"  # 50 KB int8 fits; fp32 needs shapes[0]
    # nothing is wider than the best feasible shape and blocked only by size: the widest is slow, not just big
    assert sparse_bases(cands, best) == []
    fp32_only = [c for c in cands if c.precision == "fp32"]
    bases = sparse_bases(fp32_only, ranked(fp32_only)[0])
    assert [(b.shape, b.precision) for b in bases] == [(shapes[2], "fp32")]
    assert set(bases[0].violations) == {"max_model_kb"}
    assert sparse_bases(fp32_only, None)[0].shape == shapes[2]
