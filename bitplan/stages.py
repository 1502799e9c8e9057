"""The stages a job reports progress in, each with its share of the whole job (``span``), next to the progress
callback type. Every ``on_progress(stage, done, total)`` call in the pipeline and the sensitivity metrics names
a :class:`Stage`, so the worker's overall fraction never meets a stage it does not know."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

ProgressFn = Callable[[str, int, int], None]


class Stage(str, Enum):
    """A pipeline stage as it crosses the API (job ``progress.stage``, event data)."""

    LOAD = "load"
    CALIBRATION_STATISTICS = "calibration statistics"
    BLOCK_STATISTICS = "block statistics"
    TOKEN_FISHER = "token Fisher"
    HUTCHINSON_PROBES = "hutchinson probes"
    PREDICTED_ERROR = "predicted error"
    QUANTIZE = "quantize"
    KL_REFINEMENT = "kl refinement"
    QUALITY = "quality"
    WRITE = "write"
    KL_CHECK = "kl check"
    PERPLEXITY = "perplexity"
    LATENCY_TABLE = "latency table"  # measuring this machine's latency table (once per machine and model)
    LATENCY_CHECK = "latency check"  # timing the written GGUF

    @property
    def span(self) -> tuple[float, float]:
        """The share of the whole job this stage stands for: (start, end) fractions."""
        return STAGE_SPAN[self]


STAGE_SPAN: dict[Stage, tuple[float, float]] = {  # from SmolLM2 at 3.5 bpw on 2 cores: ~10% start and load
    Stage.LOAD: (0.0, 0.1), Stage.CALIBRATION_STATISTICS: (0.1, 0.6), Stage.BLOCK_STATISTICS: (0.6, 0.8),
    Stage.TOKEN_FISHER: (0.1, 0.85), Stage.HUTCHINSON_PROBES: (0.1, 0.8), Stage.PREDICTED_ERROR: (0.8, 0.85),
    Stage.QUANTIZE: (0.85, 0.9), Stage.KL_REFINEMENT: (0.9, 0.92), Stage.QUALITY: (0.92, 0.96),
    Stage.WRITE: (0.96, 0.97), Stage.KL_CHECK: (0.97, 1.0), Stage.PERPLEXITY: (0.0, 1.0),
    Stage.LATENCY_TABLE: (0.05, 0.1), Stage.LATENCY_CHECK: (0.97, 0.98),
}


def overall_fraction(stage: str, done: int, total: int) -> float:
    """The fraction of the whole job done at ``done`` of ``total`` steps of ``stage`` (an unknown stage is an
    error: every stage has its span)."""
    low, high = Stage(stage).span
    return low + (high - low) * (min(done, total) / max(total, 1))
