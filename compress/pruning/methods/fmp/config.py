"""FMP's and channel-only meta pruning's configs: every default of the search, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from compress.flags import option, require
from compress.pruning.budget import ChannelBudget

INITS = ("pretrained", "scratch")
WEIGHTS_FROM = ("channel-lock", "start")
WEIGHT_SCORES = ("mean-u-abs-w", "u")
CHANNEL_INITS = ("auto", "ones", "l1")
FINETUNE_FROM = ("search", "checkpoint")
CHANNEL_PROX = ("global", "group")


@dataclass(frozen=True)
class ChannelOnlyConfig(ChannelBudget):
    """Channel-only meta pruning (DHP-style: FMP's structured half, no weight indicators)."""

    embedding_dim: int = option(8, "hypernetwork embedding size m (DHP: 8)")
    lambda_channel: float = option(
        0.0, "prox strength on the channel vectors (0: calibrated to the median |dL/dz| of the first check)"
    )
    channel_lr: float = option(
        0.0, "SGD lr of the channel vectors (0: 2 / (lambda-channel x search steps): an undefended one dies mid-search)"
    )
    search_lr_scale: float = option(0.0, "the search's lr = --lr x this (0: 1 / embedding-dim)")
    channel_threshold: float = option(5e-3, "T: a channel with |z| below it is pruned (DHP)")
    min_channels: int = option(4, "never prune a channel group below this many channels (DHP: 4)")
    check_every: int = option(0, "steps between mask checks (0: steps / 40)")
    search_fraction: float = option(0.1, "most of the steps the search may use; the rest fine-tunes")
    init: str = option("pretrained", "hypernetwork init: pretrained (reproduces the weights) or scratch", choices=INITS)
    channel_init: str = option(
        "auto",
        "init pretrained: z starts at 1 (ones), or at each channel's L1 filter norm / its group's mean (l1: the prox "
        "then reaches the weak channels first); the hypernetwork reproduces the weights either way. auto: l1 with "
        "init pretrained; init scratch draws z itself (DHP)",
        choices=CHANNEL_INITS,
    )
    channel_prox: str = option(
        "global",
        "what a channel's gradient must keep up with to survive the prox: the median over all searched channels "
        "(global, DHP), or over its own group's (group: every group's z gradients divided by their median over "
        "the calibration, so a residual stream, which collects every block's gradient, is not favoured for that; "
        "needs --lambda-channel 0)",
        choices=CHANNEL_PROX,
    )
    layers: str = option("auto", "layers that get hypernetworks: auto (every conv in a prunable group) or globs")
    finetune_from: str = option(
        "checkpoint",
        "what the compact net fine-tunes from: the searched net's final kernels and parameters, or (checkpoint) "
        "the checkpoint's own weights under the search's channel and weight masks",
        choices=FINETUNE_FROM,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("embedding_dim", "min_channels"):
            require(getattr(self, f) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        require(self.check_every >= 0, "check_every", f"must be >= 0, got {self.check_every}")
        for f in ("lambda_channel", "channel_lr", "search_lr_scale"):
            require(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")
        require(self.channel_threshold > 0, "channel_threshold", f"must be > 0, got {self.channel_threshold}")
        require(0.0 < self.search_fraction < 1.0, "search_fraction", f"must be in (0, 1), got {self.search_fraction}")
        require(self.init in INITS, "init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        require(self.channel_init in CHANNEL_INITS, "channel_init", f"must be one of {', '.join(CHANNEL_INITS)}")
        require(self.channel_init != "l1" or self.init == "pretrained", "channel_init", "l1 needs --init pretrained")
        require(self.channel_prox in CHANNEL_PROX, "channel_prox", f"must be one of {', '.join(CHANNEL_PROX)}")
        require(
            self.channel_prox == "global" or self.lambda_channel == 0, "channel_prox", "group needs --lambda-channel 0"
        )
        require(self.finetune_from in FINETUNE_FROM, "finetune_from", f"must be one of {', '.join(FINETUNE_FROM)}")

    @property
    def method(self) -> str:
        return "channel-only"


@dataclass(frozen=True)
class FMPConfig(ChannelOnlyConfig):
    """FMP: the channel search plus weight indicators (weight_sparsity 0 is channel-only)."""

    weight_sparsity: float | None = option(None, "zero fraction wanted in the compact net's hypernetwork convs")
    lambda_weight: float = option(1e-4, "L1 strength on the weight indicators")
    indicator_lr: float = option(
        0.0, "SGD lr of the weight indicators (0: 2 / (lambda-weight x search steps they get))"
    )
    weights_from: str = option(
        "channel-lock",
        "when the indicators start: once the channels lock (staged) or at the start (joint)",
        choices=WEIGHTS_FROM,
    )
    rewind: bool = option(
        True, "staged: at the weight lock, rewind the net to the channel lock with the chosen weight mask"
    )
    weight_score: str = option(
        "mean-u-abs-w",
        "the weight lock cuts the lowest mean indicator x |W|, or the lowest indicator (u)",
        choices=WEIGHT_SCORES,
    )
    weight_threshold: float = option(5e-3, "T_w: an indicator below it is dead")
    weight_ramp: float = option(
        0.0,
        "share of the fine-tune steps over which the searched weight mask closes (cubic, the smallest |W| of its "
        "dead weights first); 0: at once",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.weight_sparsity is not None, "weight_sparsity", "is needed by --method fmp (or use channel-only)")
        ws = self.weight_sparsity
        require(0.0 <= ws < 1.0, "weight_sparsity", f"must be in [0, 1), got {ws}")
        require(self.lambda_weight >= 0, "lambda_weight", f"must be >= 0, got {self.lambda_weight}")
        require(self.indicator_lr >= 0, "indicator_lr", f"must be >= 0, got {self.indicator_lr}")
        require(self.weight_threshold > 0, "weight_threshold", f"must be > 0, got {self.weight_threshold}")
        require(0.0 <= self.weight_ramp < 1.0, "weight_ramp", f"must be in [0, 1), got {self.weight_ramp}")
        require(self.weight_score in WEIGHT_SCORES, "weight_score", f"must be one of {', '.join(WEIGHT_SCORES)}")
        require(self.weights_from in WEIGHTS_FROM, "weights_from", f"must be one of {', '.join(WEIGHTS_FROM)}")

    @property
    def method(self) -> str:
        return "fmp" if self.weight_sparsity else "channel-only"


def search_lr_scale(config: ChannelOnlyConfig) -> float:
    """The search's lr relative to the loop's: the hypernetwork moves a kernel element about `embedding_dim`
    times faster than a plain weight at the same lr (DHP searched at 1e-4), hence 1/m by default."""
    return config.search_lr_scale or 1.0 / config.embedding_dim
