"""What a fit takes: the model, the targets, the budgets with their workloads, and how much to spend. Defaults live
here and only here (the CLI's help reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from compress.intake import ModelSpec
from convert.tflite import PRECISIONS as TFLITE_PRECISIONS
from edgesr.errors import BadInput

# how a chosen budget is reached: channel-l1 (the L1 cut at the chosen widths, what the shape stage measures, then
# distilled fine-tuning) always; fmp, given in --methods, prunes to the same parameter count with its hypernetwork
# channel search (weight sparsity 0: file size is the sparse candidate's job) and competes by measured PSNR
METHODS = ("channel-l1", "fmp")


@dataclass(frozen=True)
class FitConfig:
    model: ModelSpec
    out: Path
    budgets: Path
    targets: tuple[str, ...] = ("local",)
    targets_file: Path | None = None
    frame: str | None = None  # overrides the budgets file's workload frame (WxH) for every target
    tiles: str | None = None  # overrides its tiles ("128,256,frame")
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8-dynamic", "int8")
    keeps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.375, 0.25)  # keep fractions measured in the shape stage
    round_to: tuple[int, ...] = (4, 8)  # width families: channels rounded up to a multiple of each
    min_channels: int = 4
    margin: float = 0.05  # a shape is chosen only when its predicted figures meet every budget by this share
    methods: tuple[str, ...] = ("channel-l1",)
    # weight sparsities probed (ascending) at the widest shape the other budgets allow when only file size binds;
    # () never prunes weights
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    sparse_layers: str = "default"  # which convs lose weights: compress's `--layers` (default: not first and last)
    steps: int = 1000  # the training budget of one candidate (fine-tuning steps)
    data: str = "bundled"
    test_set: str = "sporco"  # PSNR of trained candidates (min_psnr_db)
    measure_test_set: str = "butterfly"  # the quality pass of the shape stage (untrained weights: PSNR unused)
    degradation: str = "pillow"
    runs: int = 5  # frames per measurement (at least)
    warmup: int = 2
    min_seconds: float = 1.0  # and at least this long
    threads: int = 1
    attempts: int = 3  # shapes trained per target when a final measurement misses a budget the model predicted
    seed: int = 0
    device: str = "auto"  # where training runs: auto, cpu, cuda or cuda:N
    storage: str | None = None  # an Optuna storage URL; None: sqlite:///<out>/trials.db
    device_python: Path | None = None
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise BadInput("--targets is empty")
        bad = [p for p in self.precisions if p not in TFLITE_PRECISIONS]
        if bad or not self.precisions:
            raise BadInput(f"--precisions: unknown '{bad[0] if bad else ''}'; known: {', '.join(TFLITE_PRECISIONS)}")
        if not self.keeps or any(not (math.isfinite(k) and 0 < k <= 1) for k in self.keeps):
            raise BadInput(f"--keeps: each keep fraction must be in (0, 1], got {list(self.keeps)}")
        if not self.round_to or any(not 1 <= r <= 256 for r in self.round_to):
            raise BadInput(f"--round-to: each width multiple must be 1..256, got {list(self.round_to)}")
        if any(not (math.isfinite(x) and 0 < x < 1) for x in self.sparsities):
            raise BadInput(f"--sparsities: each weight sparsity must be in (0, 1), got {list(self.sparsities)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise BadInput(f"--methods: unknown '{bad[0]}'; known: {', '.join(METHODS)}")
        if "channel-l1" not in self.methods:
            raise BadInput("--methods must include channel-l1 (the cut the shape stage measures); add others beside it")
        checks = [
            ("margin", math.isfinite(self.margin) and 0 <= self.margin < 1, "in [0, 1)"),
            ("steps", 1 <= self.steps <= 10_000_000, "1..10000000"),
            ("runs", 1 <= self.runs <= 10_000, "1..10000"),
            ("warmup", 0 <= self.warmup <= 1000, "0..1000"),
            ("min_seconds", math.isfinite(self.min_seconds) and 0 <= self.min_seconds <= 3600, "0..3600"),
            ("threads", self.threads >= 1 or self.threads == -1, ">= 1 or -1"),
            ("attempts", 1 <= self.attempts <= 20, "1..20"),
            ("min_channels", 1 <= self.min_channels <= 4096, "1..4096"),
            ("timeout_s", math.isfinite(self.timeout_s) and self.timeout_s > 0, "> 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise BadInput(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)}")
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"{self.out}: --out exists and is not a folder")
        if self.storage is not None:
            check_storage_url(self.storage)


def check_storage_url(url: str) -> None:
    """Refuse an Optuna storage that is not an SQLAlchemy URL (sqlite:///x.db, postgresql://...), before any work."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise BadInput(f"--storage: {url[:200]!r} is not a database URL (e.g. sqlite:///trials.db)") from None
