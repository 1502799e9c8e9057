"""Hutchinson traces against the exact Hessian of a tiny model (torch.autograd.functional.hessian)."""

from __future__ import annotations

import torch
from torch import nn

from sensitivity.hutchinson import estimate_hessian_traces


def tiny_net() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return net, torch.randn(16, 5), torch.randint(0, 3, (16,))


def exact_traces(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    result = {}
    for name in ("0.weight", "2.weight"):
        params = dict(net.named_parameters())

        def loss_of(flat: torch.Tensor, name: str = name) -> torch.Tensor:
            patched = {**params, name: flat.reshape(params[name].shape)}
            logits = torch.func.functional_call(net, patched, (x,))
            return nn.functional.cross_entropy(logits, y)

        hessian = torch.autograd.functional.hessian(loss_of, params[name].detach().reshape(-1))
        result[name] = float(torch.diagonal(hessian).sum())
    return result


def test_trace_matches_exact_hessian_within_error_bar() -> None:
    net, x, y = tiny_net()
    exact = exact_traces(net, x, y)
    params = {n: p for n, p in net.named_parameters() if n in exact}
    loss = nn.functional.cross_entropy(net(x), y)
    estimates = estimate_hessian_traces(loss, params, min_probes=400, max_probes=400, rel_tol=0.0, seed=1)
    for name, value in exact.items():
        estimate = estimates[name]
        assert len(estimate.samples) == 400
        assert abs(estimate.trace - value) <= 4 * estimate.std_error + 1e-6, (name, estimate.trace, value)


def test_stopping_rule_stops_early_on_an_easy_problem() -> None:
    weight = torch.randn(3, 3, requires_grad=True)
    loss = (weight ** 2).sum()  # Hessian 2*I: every Rademacher probe gives exactly the trace, 18
    estimates = estimate_hessian_traces(loss, {"w": weight}, min_probes=3, max_probes=50, rel_tol=0.01)
    assert len(estimates["w"].samples) == 3
    assert estimates["w"].trace == 18.0 and estimates["w"].std_error == 0.0
