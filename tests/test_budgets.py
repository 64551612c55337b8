"""Budgets files: strict parsing (one-line errors naming key, file and valid keys) and the pass/margin verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_bench.budgets import BUDGETS, Budgets, check, load_budgets
from edgesr.errors import EXIT_BAD_INPUT, BadInput
from edgesr.workload import Workload

EXAMPLE = Path(__file__).resolve().parent.parent / "device_bench" / "budgets.example.yaml"
ROW = {
    "size_bytes": 512 * 1024,
    "download_bytes": 300 * 1024,
    "peak_rss_mb": 120.0,
    "latency_ms_median": 40.0,
    "frame_ms_median": 800.0,
    "frame_ms_p90": 900.0,
    "fps": 1.25,
    "psnr_y_db": 31.5,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    return path


def test_example_file_and_per_target_override() -> None:
    b = load_budgets(EXAMPLE)
    assert b.defaults == {
        "max_frame_ms": 5000,
        "max_peak_mb": 400,
        "max_model_kb": 600,
        "max_download_kb": 500,
        "min_psnr_db": 30.0,
    }
    assert b.for_target("local") == {**b.defaults, "max_frame_ms": 3000}
    assert b.for_target("pi4") == b.defaults  # a target without an entry gets the defaults
    assert b.workload_for("local") == Workload(frame=(540, 960), tiles=(128,))
    assert b.workload_for("pi") == Workload(frame=(540, 960), tiles=(96,))  # its own tile, the top-level frame
    assert "workload" not in b.for_target("pi")
    # An imported Xcode report's target: its nulls take away what Xcode never measures.
    assert b.for_target("iphone15") == {"max_model_kb": 600, "max_download_kb": 500, "max_frame_ms_median": 2000}


def test_command_line_workload_overrides_the_file() -> None:
    b = load_budgets(EXAMPLE)
    assert b.workload_for("pi", frame="640x360") == Workload(frame=(360, 640), tiles=(96,))
    assert b.workload_for("local", tiles="64,frame") == Workload(frame=(540, 960), tiles=(64, "frame"))
    assert b.workload_for("local", tiles="64,frame").tile_sizes() == [(64, 64), (540, 960)]
    assert Budgets().workload_for("local") == Workload()  # no file: the test images, every artifact's own tile
    with pytest.raises(BadInput, match="tile 'frame' needs the frame size"):
        Budgets().workload_for("local", tiles="frame")


def test_frame_budgets_check_their_row_fields() -> None:
    limits = {"max_frame_ms": 850, "max_frame_ms_median": 850, "min_fps": 1.0, "max_download_kb": 290}
    v = check(Budgets(defaults=limits), "local", ROW)
    assert not v["max_frame_ms"]["pass"] and v["max_frame_ms"]["value"] == 900  # the p90
    assert v["max_frame_ms_median"]["pass"] and v["max_frame_ms_median"]["value"] == 800
    assert v["min_fps"]["pass"] and v["min_fps"]["margin"] == pytest.approx(0.25)
    assert not v["max_download_kb"]["pass"] and v["max_download_kb"]["value"] == 300


def test_old_latency_key_names_its_successor(tmp_path: Path) -> None:
    with pytest.raises(BadInput) as err:
        load_budgets(write(tmp_path, "targets:\n  pi: {max_latency_ms: 100}\n"))
    msg = str(err.value)
    assert "targets.pi.max_latency_ms is now max_tile_ms" in msg and "max_frame_ms" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text, problem",
    [
        ("workload: {frame: 960}\n", "expected WIDTHxHEIGHT"),
        ("workload: {frame: 99999x10}\n", "must be 1..8192"),
        ("workload: {tile: big}\n", "each tile is a side"),
        ("workload: {size: 10}\n", "unknown key 'size' in workload"),
        ("targets:\n  pi: {workload: {tile: '64,64'}}\n", "listed twice"),
        ("workload: [960x540]\n", "must be a mapping"),
    ],
)
def test_bad_workloads(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BadInput, match=problem) as err:
        load_budgets(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_target_override_decides_the_verdict(tmp_path: Path) -> None:
    b = load_budgets(write(tmp_path, "defaults: {max_tile_ms: 30}\ntargets:\n  local: {max_tile_ms: 50}\n"))
    assert check(b, "local", ROW)["max_tile_ms"] == {
        "limit": 50.0,
        "value": 40.0,
        "pass": True,
        "margin": 10.0,
        "delta": -10.0,
        "delta_pct": -20.0,
        "unit": "ms",
    }
    other = check(b, "pi4", ROW)["max_tile_ms"]
    assert not other["pass"] and other["margin"] == pytest.approx(-10.0)


def test_a_target_null_takes_a_default_away_and_a_report_keeps_its_budgets(tmp_path: Path) -> None:
    text = "workload: {frame: 160x120, tile: 64}\ndefaults: {max_tile_ms: 30, min_psnr_db: 30}\n"
    b = load_budgets(write(tmp_path, text + "targets:\n  iphone: {min_psnr_db: null, max_tile_ms: 50}\n"))
    assert b.for_target("iphone") == {"max_tile_ms": 50.0} and b.for_target("pi") == {
        "max_tile_ms": 30.0,
        "min_psnr_db": 30.0,
    }
    assert list(check(b, "iphone", ROW)) == ["max_tile_ms"]
    again = Budgets.from_dict(b.to_dict())  # what import-xcode checks against when no --budgets is given
    assert again.for_target("iphone") == b.for_target("iphone") and again.for_target("pi") == b.for_target("pi")
    assert again.workload_for("iphone") == b.workload_for("iphone")
    with pytest.raises(BadInput, match="defaults.min_psnr_db must be a number"):  # null only in a target's entry
        load_budgets(write(tmp_path, "defaults: {min_psnr_db: null}\n"))


def test_check_units_and_margins() -> None:
    b = Budgets(defaults={"max_model_kb": 500, "max_peak_mb": 100, "min_psnr_db": 32})
    v = check(b, "local", ROW)
    assert v["max_model_kb"]["value"] == 512 and v["max_model_kb"]["margin"] == -12 and not v["max_model_kb"]["pass"]
    assert v["max_peak_mb"]["margin"] == -20 and not v["max_peak_mb"]["pass"]
    assert v["min_psnr_db"]["margin"] == pytest.approx(-0.5) and not v["min_psnr_db"]["pass"]
    # value - limit, also in % of the limit, signed the same way for max and min budgets
    assert v["max_model_kb"]["delta"] == 12 and v["max_model_kb"]["delta_pct"] == pytest.approx(2.4)
    assert v["min_psnr_db"]["delta"] == pytest.approx(-0.5) and v["min_psnr_db"]["delta_pct"] == pytest.approx(-1.5625)
    exact = check(Budgets(defaults={"max_tile_ms": 40}), "local", ROW)["max_tile_ms"]
    assert exact["pass"] and exact["margin"] == 0  # a value exactly at its limit passes


def test_missing_measurement_fails_its_budget() -> None:
    v = check(Budgets(defaults={"min_psnr_db": 20}), "local", {**ROW, "psnr_y_db": None})["min_psnr_db"]
    assert v == {
        "limit": 20.0,
        "value": None,
        "pass": False,
        "margin": None,
        "delta": None,
        "delta_pct": None,
        "unit": "dB",
    }


def test_no_budgets_means_everything_passes(tmp_path: Path) -> None:
    assert check(load_budgets(None), "local", ROW) == {}
    assert check(load_budgets(write(tmp_path, "# nothing yet\n")), "local", ROW) == {}
    assert load_budgets(write(tmp_path, "defaults:\ntargets:\n")).for_target("local") == {}


@pytest.mark.parametrize(
    "text, where, key",
    [
        ("defaults: {max_ram_mb: 100}\n", "defaults", "max_ram_mb"),
        ("targets:\n  local: {max_latency: 10}\n", "targets.local", "max_latency"),
        ("budgets: {max_model_kb: 1}\n", "top-level", "budgets"),
    ],
)
def test_unknown_key_is_one_line_naming_key_file_and_valid_keys(
    tmp_path: Path, text: str, where: str, key: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BadInput) as err:
        load_budgets(path)
    msg = str(err.value)
    assert "\n" not in msg and f"'{key}'" in msg and str(path) in msg and where in msg
    valid = ("workload", "defaults", "targets") if where == "top-level" else tuple(BUDGETS)
    assert all(k in msg for k in valid)
    assert err.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize(
    "value, problem",
    [("fast", "must be a number"), ("true", "must be a number"), ("-5", "must not be negative"), (".nan", "number")],
)
def test_bad_values(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(BadInput, match=problem) as err:
        load_budgets(write(tmp_path, f"defaults:\n  max_peak_mb: {value}\n"))
    assert "max_peak_mb" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("defaults: [1, 2]\n", "must be a mapping"),
        ("targets: [local]\n", "'targets' must map"),
        ("- just\n- a list\n", "expected a mapping"),
        ("defaults: {max_peak_mb: 1\n", "not valid YAML"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(BadInput, match=problem) as err:
        load_budgets(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such budgets file"):
        load_budgets(tmp_path / "nope.yaml")
