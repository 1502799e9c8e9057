"""A job's glue for mixture-of-experts models (:mod:`bitplan.sources.moe`): the routing measured on the calibration
windows, pins for experts no window reached, and the report's bytes by kind and tokens per expert."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.job.planning import stacks_experts
from bitplan.report.kinds import written_bytes_by_kind
from bitplan.sources.moe import SAFE_EXPERT_BITS, RoutingReport, measure_routing, unreached_pins
from bitplan.spec import JobSpec


def routing_of_windows(model: nn.Module, tokens: torch.Tensor | None) -> RoutingReport | None:
    """The tokens each expert of a whole ``model`` sees over the calibration ``tokens (windows, seq_len)``, one
    window at a time (``None`` without experts or windows)."""
    if tokens is None:
        return None
    return measure_routing(model, lambda: [model(window) for window in torch.split(tokens, 1)])


def with_unreached_pinned(spec: JobSpec, routing: RoutingReport | None, units: Iterable[str]) -> JobSpec:
    """``spec`` with the units of unreached experts pinned (:func:`bitplan.sources.moe.unreached_pins`)."""
    pins = unreached_pins(routing, units, spec.widths, stacked=stacks_experts(spec))
    if not pins:
        return spec
    return dataclasses.replace(spec, allocation=dataclasses.replace(
        spec.allocation, pinned=tuple(spec.allocation.pinned) + pins))


VLLM_MOE_RULE = ("MoE in compressed-tensors: every routed expert and projection of the model shares one format here "
                 "(per-expert tensors, as the model's checkpoints name them): transformers 5.25 reads all of a model's "
                 "experts with one config group and dequantizes them to float as it merges them into its fused "
                 "experts, and vLLM's fused MoE kernel runs a layer's experts with one scheme")


def reported(result: Any, routing: RoutingReport | None) -> Any:
    """A run's result with the bytes by kind of what it wrote and, for a MoE model, its routing (and a warning
    naming the experts no calibration token reached)."""
    kinds = written_bytes_by_kind(Path(result.artifact))
    if routing is None:
        return dataclasses.replace(result, bytes_by_kind=kinds)
    warnings = list(result.warnings)
    if result.target == "compressed-tensors":
        warnings.append(VLLM_MOE_RULE)
    if routing.unreached:
        how = "take their stack's format" if result.target != "bitplan" else f"are pinned to {SAFE_EXPERT_BITS} bits"
        warnings.append(f"{len(routing.unreached)} experts saw no calibration token ({routing.unreached[:4]}...): "
                        f"their statistics are empty; they {how}. More or longer calibration windows reach them.")
    return dataclasses.replace(result, bytes_by_kind=kinds, experts=routing.to_json(), warnings=warnings)

