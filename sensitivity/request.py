"""What a sensitivity pass is asked, spelled once: the metric and the settings that shape its numbers.

:class:`SensitivityRequest` is what :func:`sensitivity.api.compute_sensitivity`, every registered metric (through
``MetricInputs.request``), :func:`sensitivity.token_fisher.token_fisher` and
:func:`sensitivity.streamed.streamed_token_fisher` take, instead of each spelling out the same dozen keywords.
What is not an option stays beside it: the model, its units, the calibration batches, the losses (functions of
the model's kind), where the blocks lie, and the progress and cancel callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class Metric(str, Enum):
    """Sensitivity metrics, as named on the command line."""

    OUTPUT_ERROR = "output_error"
    FISHER_OUTPUT_ERROR = "fisher_output_error"
    HUTCHINSON = "hutchinson"
    GWQ = "gwq"
    SLIM_SALIENCE = "slim_salience"
    BAQ = "baq"
    TOKEN_FISHER = "token_fisher"
    TOKEN_TAYLOR = "token_taylor"
    TOKEN_KL = "token_kl"
    TOKEN_TAYLOR_KL = "token_taylor_kl"


HVP_METHODS = ("double_backward", "jvp", "gradient_difference")
PRECISIONS = ("auto", "float32", "bfloat16")  # the token metrics' per-token products (token_fisher.resolve_precision)
DEFAULT_ERROR_BYTES = 4 << 30  # weight errors held at once: all of SmolLM2-135M's 18 bitplan-int ones in bfloat16

Key = Any  # an option key: a bit width (int) or a format name (str)
ErrorFn = Callable[[str, Any], torch.Tensor]  # (unit name, option key) -> weight error dW


@dataclass(frozen=True)
class HutchinsonConfig:
    """Probe settings for the ``hutchinson`` metric."""

    min_probes: int = 4
    max_probes: int = 32
    rel_tol: float = 0.05  # of the summed trace
    # and every unit's trace positive with a median relative standard error of at most this (None: not checked)
    unit_rel_tol: float | None = 0.3
    seed: int = 0
    # "gradient_difference": central difference of two first-order gradients (SDPA attention, first-order memory;
    # 1.9x faster per probe than a PyHessian-style loop on SmolLM2, per-probe totals within 2e-4 of exact,
    # bench/results/sensitivity-hvp-smollm2-2026-11-24.json); "double_backward" (exact, eager attention);
    # "jvp" (forward over reverse; its loss_fn must work under torch.func)
    method: str = "gradient_difference"
    relative_step: float = 1e-3  # gradient_difference's step, relative to the rms of the unit weights

    def __post_init__(self) -> None:
        if self.method not in HVP_METHODS:
            raise ValueError(f"unknown Hessian-vector product method {self.method!r}; choose {HVP_METHODS}")


@dataclass(frozen=True)
class SensitivityRequest:
    """One sensitivity pass's metric and settings.

    Args:
        metric: the metric (a :class:`Metric` or its name).
        bits_options: the candidate bit widths whose RTN errors are measured (at ``group_size`` columns per
            scale), unless ``options`` and ``error_of`` are given.
        options, error_of: per unit its option keys (format names) and ``error_of(name, key) -> dW``, each
            option's real weight error (``decode(encode(W)) - W``); predictions are then keyed by option. Only
            metrics registered with ``takes_errors`` accept them.
        max_error_bytes: the weight errors the token metrics hold at once; fewer means more backward passes over
            the calibration set (:func:`sensitivity.token_fisher.token_fisher`).
        precision: the dtype of the token metrics' per-token products (``auto``, ``float32``, ``bfloat16``).
        hutchinson: the ``hutchinson`` metric's probe settings.
        skip_first_position: the token metrics leave each window's first position (the attention sink) out of the
            second-order sum.
        curvature_stride: with a curvature loss, its second-order pass runs on every ``curvature_stride``-th
            batch; ``None``: the metric's own (``api.CURVATURE_STRIDE`` for ``token_taylor_kl``, else 1).
    """

    metric: Metric
    bits_options: tuple[int, ...] = ()
    group_size: int = 128
    options: Mapping[str, Sequence[Key]] | None = None
    error_of: ErrorFn | None = None
    max_error_bytes: int = DEFAULT_ERROR_BYTES
    precision: str = "auto"
    hutchinson: HutchinsonConfig = field(default_factory=HutchinsonConfig)
    skip_first_position: bool = False
    curvature_stride: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", Metric(self.metric))
        object.__setattr__(self, "bits_options", tuple(self.bits_options))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {self.precision!r}")
        if self.curvature_stride is not None and self.curvature_stride < 1:
            raise ValueError(f"curvature_stride must be at least 1, got {self.curvature_stride}")
        if (self.options is None) != (self.error_of is None):
            raise ValueError("options and error_of go together: give both (each option's weight error) or neither "
                             "(the RTN errors at bits_options)")
