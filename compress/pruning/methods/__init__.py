"""The pruning methods: one module each, one config dataclass (its defaults) and one entry point.

`METHODS` is the only place the CLI and the benchmarks learn what exists. Every entry point has the signature
`run(model, data, train_cfg, out, config, resume) -> (pruned model, record)`: it trains for `train_cfg.steps` in
`out`, resumes an interrupted run, and returns the model with plain layers (exact zeros, fewer channels) and the
record the checkpoint manifest keeps under "pruning" (its "runs" entry holds each training phase's summary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compress.pruning.methods import channel_l1, fmp, iks, magnitude


@dataclass(frozen=True)
class Method:
    config: type
    run: Callable
    summary: str
    structured: bool  # removes channels (the compact net has other shapes) rather than only zeroing weights


METHODS: dict[str, Method] = {
    "magnitude": Method(
        magnitude.MagnitudeConfig, magnitude.run, "gradual magnitude pruning of weights (Zhu & Gupta)", False
    ),
    "iks": Method(iks.IKSConfig, iks.run, "individual kernel sparsity: learned thresholds (Luo et al.)", False),
    "fmp": Method(fmp.FMPConfig, fmp.run, "flexible meta pruning: channels and weights via a hypernetwork", True),
    "channel-only": Method(
        fmp.ChannelOnlyConfig, fmp.run_channel_only, "meta pruning of channels only (DHP-style)", True
    ),
    "channel-l1": Method(channel_l1.ChannelL1Config, channel_l1.run, "L1-norm channel pruning (Li et al.)", True),
}
