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

    @property
    def span(self) -> tuple[float, float]:
        """The share of the whole job this stage stands for: (start, end) fractions."""
        return STAGE_SPAN[self]


STAGE_SPAN: dict[Stage, tuple[float, float]] = {
    Stage.LOAD: (0.0, 0.05), Stage.CALIBRATION_STATISTICS: (0.05, 0.6), Stage.BLOCK_STATISTICS: (0.6, 0.75),
    Stage.TOKEN_FISHER: (0.05, 0.75), Stage.HUTCHINSON_PROBES: (0.05, 0.75), Stage.PREDICTED_ERROR: (0.75, 0.8),
    Stage.QUANTIZE: (0.8, 0.92), Stage.KL_REFINEMENT: (0.92, 0.94), Stage.QUALITY: (0.94, 0.96),
    Stage.WRITE: (0.96, 0.97),
    Stage.KL_CHECK: (0.97, 1.0), Stage.PERPLEXITY: (0.0, 1.0),
}


def overall_fraction(stage: str, done: int, total: int) -> float:
    """The fraction of the whole job done at ``done`` of ``total`` steps of ``stage`` (an unknown stage is an
    error: every stage has its span)."""
    low, high = Stage(stage).span
    return low + (high - low) * (min(done, total) / max(total, 1))
