"""One (target, artifact) measurement's files and figures: the job folder a target runs, the scores of the SR
outputs it sends back (the shared metrics: 8 bit, Y channel, border = scale) and the report row."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_bench.artifacts import Artifact
from device_bench.targets import Target
from edgesr.datasets import SRPair, lr_degradation
from edgesr.errors import TargetFailed
from edgesr.images import DEGRADATIONS, quantize_uint8, save_png, to_float
from edgesr.manifest import sha256, write_json
from edgesr.metrics import mean_scores, sr_scores
from edgesr.workload import Workload, format_size, make_frame

if TYPE_CHECKING:
    from device_bench.bench import BenchConfig


def write_job(
    job_dir: Path,
    a: Artifact,
    pairs: list[SRPair],
    cfg: BenchConfig,
    workload: Workload | None = None,
    compute_units: str = "ALL",
) -> None:
    """A self-contained job folder: model, LR inputs (.npy float32 HxWx3 in [0, 1]), the workload's frame and
    job.json. With a frame size, the frame is made from the first test image (centre crop or mirrored out);
    without one, the frame loop cycles through the test images as they are."""
    if job_dir.exists():
        shutil.rmtree(job_dir)
    (job_dir / "inputs").mkdir(parents=True)
    model = "model.mlpackage" if a.format == "coreml" else "model.tflite"
    if a.format == "coreml":
        shutil.copytree(a.path, job_dir / model)
    else:
        shutil.copyfile(a.path, job_dir / model)
    files = [f"inputs/{i:04d}.npy" for i in range(len(pairs))]  # the user's image names travel as data only
    for p, file in zip(pairs, files, strict=True):
        np.save(job_dir / file, to_float(p.lr))
    job = {
        "runner_version": 1,
        "model": model,
        "inputs": [{"name": p.name, "path": file} for p, file in zip(pairs, files, strict=True)],
        "out_dir": "out",
        "tile": a.tile,
        "overlap": a.overlap,
        "scale": a.scale,
        "threads": cfg.threads,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "runtime": cfg.runtime,
        "runtime_requirements": a.runtime_requirements,
        "min_seconds": cfg.min_seconds,
    }
    if a.format == "coreml":
        job["compute_units"] = compute_units
    if workload is not None and workload.frame is not None:
        name = f"frame-{format_size(workload.frame)}"
        np.save(job_dir / "inputs" / "frame.npy", make_frame(to_float(pairs[0].lr), workload.frame))
        job["frames"] = [{"name": name, "path": "inputs/frame.npy"}]
    write_json(job_dir / "job.json", job)


def score_outputs(result: dict[str, Any], out_dir: Path, pairs: list[SRPair], scale: int) -> dict[str, Any]:
    """Per-image Y-PSNR/SSIM (plus the runner's timing) of the SR .npy files the runner wrote."""
    by_name = {img["name"]: img for img in result["images"]}
    per_image = {}
    for p in pairs:
        if p.name not in by_name:
            raise TargetFailed(f"runner result lacks image {p.name}")
        path = out_dir / by_name[p.name]["output"]
        try:
            sr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TargetFailed(f"{path}: unreadable SR output ({exc})") from None
        if sr.shape != p.hr.shape:
            raise TargetFailed(f"{path}: SR output {sr.shape} but the HR image is {p.hr.shape}")
        img = by_name[p.name]
        per_image[p.name] = {
            **sr_scores(quantize_uint8(sr), p.hr, scale),
            "ms": img["ms"],
            "tiles": img["tiles"],
            "padded": img["padded"],
        }
    return per_image


def make_row(
    a: Artifact,
    target: Target,
    result: dict[str, Any],
    per_image: dict[str, Any],
    test_set: str,
    degradation: str = "pillow",
) -> dict:
    mean = mean_scores([{k: s[k] for k in ("psnr_y_db", "ssim_y")} for s in per_image.values()])
    torch_psnr = a.source.get("psnr_y_db")
    same_set = torch_psnr is not None and str(a.source.get("test_set")) == str(test_set)
    if same_set:  # same images only if the LR was made the same way (a source without "degradation" used Pillow)
        source_degradation = str(a.source.get("degradation") or "pillow")
        same_set = source_degradation in DEGRADATIONS and lr_degradation(
            test_set, a.scale, source_degradation
        ) == lr_degradation(test_set, a.scale, degradation)
    lat = result["latency_ms"]
    frame = frame_figures(result, lat["median"])
    memory = result.get("memory") or {}  # engines other than the runner may measure fewer phases
    delegate = result.get("delegate") or {}
    return {
        "model": a.model,
        "format": a.format,
        "encoding": a.encoding,
        "precision": a.precision,
        "artifact": a.path.name,
        "artifact_path": str(a.path),
        "sha256": a.sha256 or sha256(a.path),
        "target": target.name,
        "emulated": target.emulated,
        # the runner's word on its own timings (Core ML's reference executor: not meaningful)
        "timings_meaningful": bool(result.get("timings_meaningful", True)),
        "timing_note": result.get("timing_note"),
        "compute_units": result.get("compute_units"),
        "os_version": result.get("os_version"),
        "size_bytes": a.size_bytes,
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_after_import_mb": (memory.get("baseline") or {}).get("hwm_mb"),
        "latency_ms_median": lat["median"],
        "latency_ms_p90": lat["p90"],
        "latency_ms_mean": lat["mean"],
        "latency_ms_min": lat["min"],
        "load_ms": result["load_ms"],
        "first_inference_ms": result["first_inference_ms"],
        "image_ms_mean": float(np.mean([s["ms"] for s in per_image.values()])),
        "psnr_y_db": mean["psnr_y_db"],
        "ssim_y": mean["ssim_y"],
        "per_image": per_image,
        "torch_psnr_y_db": torch_psnr,
        "torch_test_set": a.source.get("test_set"),
        "psnr_delta_vs_torch_db": mean["psnr_y_db"] - torch_psnr if same_set else None,
        "scale": a.scale,
        "tile": result["tile"],
        "overlap": result["overlap"],
        "threads": result["threads"],
        "warmup": result["warmup"],
        "runs": result["runs"],
        "runtime": {"name": result["runtime"]["name"], "version": result["runtime"]["version"]},
        "delegate": delegate.get("name", "unknown"),
        "runtime_requirements": a.runtime_requirements,
        "padded_images": [name for name, s in per_image.items() if s["padded"]],
        "latency_samples_ms": lat["samples"],
        **frame,
        "download_bytes": a.download_bytes(),
        "memory": memory,
    }


def frame_figures(result: dict[str, Any], tile_median_ms: float) -> dict[str, Any]:
    """The frame loop's figures as row fields (None for engines that run no frames), with how a frame's time
    compares with its tiles' invokes: `frame_vs_tiles_pct` = frame median / (tiles x tile median) - 1, and the
    stitching share: the median of each frame's time outside invoke()."""
    frame = result.get("frame")
    if not frame:
        return {k: None for k in ("frame_ms_median", "frame_ms_p90", "fps", "frame_size", "tiles_per_frame")}
    ms, invoke = frame["ms"], frame["invoke_ms"]
    tiles = [f["tiles"] for f in frame["frames"]]
    per_tile_total = sum(tiles) / len(tiles) * tile_median_ms
    outside = [f - i for f, i in zip(ms["samples"], invoke["samples"], strict=True)]
    return {
        "frame_size": frame["frames"][0]["lr_shape"] if len(frame["frames"]) == 1 else None,
        "frame_images": [f["name"] for f in frame["frames"]],
        "tiles_per_frame": tiles[0] if len(set(tiles)) == 1 else sum(tiles) / len(tiles),
        "frames_run": frame["frames_run"],
        "min_seconds": frame["min_seconds"],
        "frame_ms_median": ms["median"],
        "frame_ms_p90": ms["p90"],
        "frame_ms_mean": ms["mean"],
        "frame_ms_samples": ms["samples"],
        "frame_invoke_ms_median": invoke["median"],
        "frame_outside_invoke_ms_median": float(np.median(outside)),
        "frame_vs_tiles_pct": (ms["median"] / per_tile_total - 1) * 100 if per_tile_total else None,
        "fps": frame["fps"],
        "frame_padded": frame["padded"],
        "run_peak_rss_mb": result.get("run_peak_rss_mb"),
    }


def environment(target: Target, result: dict[str, Any]) -> dict[str, Any]:
    keys = ("runtime", "python", "platform", "machine", "cpu_count", "numpy")
    return {**target.info(), **{k: result.get(k) for k in keys}}


def save_images(folder: Path, out_dir: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for img in result["images"]:
        save_png(folder / f"{img['name']}.png", quantize_uint8(np.load(out_dir / img["output"])))
