"""Hutchinson estimate of the loss-Hessian trace per parameter block (HAWQ-V2).

``tr(H_u) = E_v[v_u^T (H v)_u]`` for Rademacher probes ``v``; ``H v`` comes from differentiating
``g . v`` where ``g`` is the gradient built with ``create_graph=True`` (double backward). One gradient graph
is built per call and reused by every probe. Samples are returned so callers get an error bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from sensitivity.activations import check_stop

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TraceEstimate:
    """Mean of the probe samples, its standard error, and the samples themselves."""

    trace: float
    std_error: float
    samples: tuple[float, ...]


def _summarize(samples: list[float]) -> TraceEstimate:
    n = len(samples)
    mean = sum(samples) / n
    var = sum((s - mean) ** 2 for s in samples) / (n - 1) if n > 1 else float("inf")
    return TraceEstimate(trace=mean, std_error=math.sqrt(var / n), samples=tuple(samples))


def estimate_hessian_traces(
    loss: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    min_probes: int = 4,
    max_probes: int = 32,
    rel_tol: float = 0.05,
    seed: int = 0,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, TraceEstimate]:
    """Estimate ``tr(d^2 loss / d p^2)`` for every tensor in ``params``.

    Probing stops after ``min_probes`` once the standard error of the summed trace is below ``rel_tol`` of its
    magnitude, or at ``max_probes``.

    Args:
        loss: scalar with a graph to every tensor in ``params`` (which must require grad).
        params: name -> parameter tensor.
    """
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
    names = list(params)
    tensors = [params[n] for n in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    totals: list[float] = []
    for probe in range(max_probes):
        check_stop(should_stop, "Hutchinson probes")
        probes = [
            (torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8).to(t.dtype) * 2 - 1) for t in tensors
        ]
        hvps = torch.autograd.grad(grads, tensors, grad_outputs=probes, retain_graph=True)
        total = 0.0
        for name, v, hv in zip(names, probes, hvps, strict=True):
            value = float((v * hv).sum())
            samples[name].append(value)
            total += value
        totals.append(total)
        if on_progress is not None:
            on_progress("hutchinson probes", probe + 1, max_probes)
        if probe + 1 >= min_probes:
            summary = _summarize(totals)
            if summary.std_error <= rel_tol * abs(summary.trace):
                break
    return {name: _summarize(values) for name, values in samples.items()}
