"""Hutchinson estimate of the loss-Hessian trace per parameter block (HAWQ-V2).

``tr(H_u) = E_v[v_u^T (H v)_u]`` and ``diag(H) = E_v[v * Hv]`` for Rademacher probes ``v``. ``H v`` comes
from differentiating ``g . v`` where ``g`` is the gradient built with ``create_graph=True`` (double backward,
one graph reused by every probe), from ``torch.func.jvp`` of ``torch.func.grad`` (forward over reverse), or from
a central difference of two first-order gradients (no second-order graph at all). Samples are returned so
callers get an error bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from bitplan.sensitivity.activations import check_stop
from bitplan.stages import Stage

ProgressFn = Callable[[str, int, int], None]


HvpFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # probes (one per parameter) -> Hessian times probes


@dataclass(frozen=True)
class TraceEstimate:
    """Mean of the probe samples, its standard error, the samples themselves, and optionally the per-element
    diagonal estimate ``mean(v * Hv)`` with its standard error."""

    trace: float
    std_error: float
    samples: tuple[float, ...]
    diagonal: torch.Tensor | None = None
    diagonal_std_error: torch.Tensor | None = None


def _summarize(samples: list[float]) -> TraceEstimate:
    n = len(samples)
    mean = sum(samples) / n
    var = sum((s - mean) ** 2 for s in samples) / (n - 1) if n > 1 else float("inf")
    return TraceEstimate(trace=mean, std_error=math.sqrt(var / n), samples=tuple(samples))


def units_resolved(estimates: list[TraceEstimate], unit_rel_tol: float) -> bool:
    """Whether per-tensor traces are good enough to rank: none negative (a trace of a loss Hessian at a minimum is
    not; a negative mean is probe noise), and the median relative standard error at most ``unit_rel_tol``."""
    return not any(e.trace < 0 for e in estimates) and median_relative_error(estimates) <= unit_rel_tol


def median_relative_error(estimates: list[TraceEstimate]) -> float:
    """The median over tensors of ``std_error / trace`` (infinite for a trace that is not positive)."""
    relative = sorted(e.std_error / e.trace if e.trace > 0 else math.inf for e in estimates)
    return relative[len(relative) // 2]


def double_backward_hvp(loss: torch.Tensor, tensors: list[torch.Tensor]) -> HvpFn:
    """Reverse-over-reverse (PyHessian style): one gradient graph (``create_graph=True``) reused by every probe."""
    grads = torch.autograd.grad(loss, tensors, create_graph=True)

    def hvp(probes: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(grads, tensors, grad_outputs=probes, retain_graph=True))

    return hvp


def forward_over_reverse_hvp(loss_of: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
                             tensors: list[torch.Tensor]) -> HvpFn:
    """Forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad(loss_of)`` at ``tensors`` (one forward and
    one backward with dual numbers per probe, no retained second-order graph)."""
    primals = tuple(t.detach() for t in tensors)
    gradient = torch.func.grad(loss_of)

    def hvp(probes: list[torch.Tensor]) -> list[torch.Tensor]:
        _, tangent_out = torch.func.jvp(gradient, (primals,), (tuple(probes),))
        return list(tangent_out)

    return hvp


GradientFn = Callable[[], list[torch.Tensor]]  # the loss gradient at the tensors' current values


def gradient_difference_hvp(gradient_at: GradientFn, tensors: list[torch.Tensor], *, relative_step: float = 1e-3
                            ) -> HvpFn:
    """Central difference of gradients: ``H v = (g(w + h v) - g(w - h v)) / 2h + O(h^2)``.

    Two first-order backward passes per probe and no second-order graph, so it runs with any attention kernel
    (SDPA included) at first-order memory. ``h = relative_step * rms(w)`` over all ``tensors`` (one step for all
    of them, so the cross terms between tensors are those of ``H`` itself); the tensors are perturbed in place
    and restored from a copy after every probe, also when the gradient raises.
    """
    originals = [t.detach().clone() for t in tensors]
    squares = sum(float(t.double().pow(2).sum()) for t in originals)
    count = sum(t.numel() for t in originals)
    step = relative_step * math.sqrt(squares / max(count, 1))
    if step <= 0:
        raise ValueError("gradient-difference HVP needs nonzero tensors (the step is relative to their size)")

    def gradient_with(probes: list[torch.Tensor], sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for tensor, original, v in zip(tensors, originals, probes, strict=True):
                tensor.copy_(original).add_(v, alpha=sign * step)
        try:
            return [g.detach() for g in gradient_at()]
        finally:
            with torch.no_grad():
                for tensor, original in zip(tensors, originals, strict=True):
                    tensor.copy_(original)

    def hvp(probes: list[torch.Tensor]) -> list[torch.Tensor]:
        plus = gradient_with(probes, 1.0)
        minus = gradient_with(probes, -1.0)
        return [(p - m) / (2 * step) for p, m in zip(plus, minus, strict=True)]

    return hvp


def estimate_hessian_traces(
    loss: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    **options: object,
) -> dict[str, TraceEstimate]:
    """Estimate ``tr(d^2 loss / d p^2)`` for every tensor in ``params`` by double backward.

    Args:
        loss: scalar with a graph to every tensor in ``params`` (which must require grad).
        params: name -> parameter tensor.
        options: as for :func:`estimate_traces`.
    """
    tensors = [params[n] for n in params]
    return estimate_traces(double_backward_hvp(loss, tensors), params, **options)  # type: ignore[arg-type]


def _rademacher_probes(tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One probe per tensor, entries -1 or +1 in the tensor's dtype, drawn from ``generator`` in order."""
    return [
        (torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8).to(t.dtype) * 2 - 1) for t in tensors
    ]


def _converged(totals: list[float], samples: dict[str, list[float]], rel_tol: float,
               unit_rel_tol: float | None) -> bool:
    """Whether the summed trace is within ``rel_tol`` and, with ``unit_rel_tol``, every tensor's trace resolved."""
    summary = _summarize(totals)
    return summary.std_error <= rel_tol * abs(summary.trace) and (
        unit_rel_tol is None or units_resolved([_summarize(v) for v in samples.values()], unit_rel_tol))


def _with_diagonal(summary: TraceEstimate, sums: torch.Tensor, squares: torch.Tensor) -> TraceEstimate:
    """``summary`` with the diagonal ``mean(v * Hv)`` and its standard error from the running sums."""
    n = len(summary.samples)
    mean = sums / n
    variance = (squares / n - mean**2).clamp_min(0) * n / max(n - 1, 1)
    return TraceEstimate(summary.trace, summary.std_error, summary.samples, mean, (variance / n).sqrt())


def estimate_traces(
    hvp: HvpFn,
    params: Mapping[str, torch.Tensor],
    *,
    min_probes: int = 4,
    max_probes: int = 32,
    rel_tol: float = 0.05,
    unit_rel_tol: float | None = None,
    seed: int = 0,
    diagonal: bool = False,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, TraceEstimate]:
    """Hutchinson with Rademacher probes through ``hvp``.

    Probing stops after ``min_probes`` once the standard error of the summed trace is below ``rel_tol`` of its
    magnitude and, with ``unit_rel_tol``, each tensor's own trace is resolved too (:func:`units_resolved`), or
    at ``max_probes``. With ``diagonal``, every element's ``mean(v * Hv)`` (an unbiased estimate of the Hessian
    diagonal) and its standard error are returned too.
    """
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
    names = list(params)
    tensors = [params[n] for n in names]
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names} if diagonal else {}
    squares = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names} if diagonal else {}
    totals: list[float] = []
    for probe in range(max_probes):
        check_stop(should_stop, "Hutchinson probes")
        probes = _rademacher_probes(tensors, generator)
        total = 0.0
        for name, v, hv in zip(names, probes, hvp(probes), strict=True):
            product = (v * hv).detach()
            value = float(product.sum())
            samples[name].append(value)
            total += value
            if diagonal:
                sums[name] += product.double()
                squares[name] += product.double() ** 2
        totals.append(total)
        if on_progress is not None:
            on_progress(Stage.HUTCHINSON_PROBES, probe + 1, max_probes)
        if probe + 1 >= min_probes and _converged(totals, samples, rel_tol, unit_rel_tol):
            break
    return {name: _with_diagonal(_summarize(values), sums[name], squares[name]) if diagonal else _summarize(values)
            for name, values in samples.items()}
