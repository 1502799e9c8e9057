"""Hutchinson traces against the exact Hessian of a tiny model (torch.autograd.functional.hessian)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bitplan.sensitivity.hutchinson import (
    estimate_hessian_traces,
    estimate_traces,
    forward_over_reverse_hvp,
    gradient_difference_hvp,
)


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


def exact_diagonal(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    params = dict(net.named_parameters())

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        patched = {**params, name: flat.reshape(params[name].shape)}
        return nn.functional.cross_entropy(torch.func.functional_call(net, patched, (x,)), y)

    return torch.diagonal(torch.autograd.functional.hessian(loss_of, params[name].detach().reshape(-1)))


def test_diagonal_estimate_matches_the_exact_hessian_diagonal() -> None:
    net, x, y = tiny_net()
    params = {n: p for n, p in net.named_parameters() if n in ("0.weight", "2.weight")}
    loss = nn.functional.cross_entropy(net(x), y)
    estimates = estimate_hessian_traces(loss, params, min_probes=300, max_probes=300, rel_tol=0.0, seed=2,
                                        diagonal=True)
    for name, estimate in estimates.items():
        exact = exact_diagonal(net, x, y, name).double()
        error = (estimate.diagonal.reshape(-1) - exact).abs()
        assert bool((error <= 5 * estimate.diagonal_std_error.reshape(-1) + 1e-7).all()), name
        assert float(estimate.diagonal.sum()) == pytest.approx(estimate.trace, rel=1e-6, abs=1e-9)


def test_forward_over_reverse_equals_double_backward() -> None:
    net, x, y = tiny_net()
    names = ("0.weight", "2.weight")
    params = {n: p for n, p in net.named_parameters() if n in names}

    def loss_of(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        patched = {**dict(net.named_parameters()), **dict(zip(names, weights, strict=True))}
        return nn.functional.cross_entropy(torch.func.functional_call(net, patched, (x,)), y)

    reverse = estimate_hessian_traces(nn.functional.cross_entropy(net(x), y), params, min_probes=5, max_probes=5,
                                      seed=3)
    forward = estimate_traces(forward_over_reverse_hvp(loss_of, list(params.values())), params, min_probes=5,
                              max_probes=5, seed=3)
    for name in names:
        assert forward[name].samples == pytest.approx(reverse[name].samples, rel=1e-5, abs=1e-7)


def test_gradient_difference_matches_the_exact_hessian_vector_product() -> None:
    """Central differences in float64 against H v from the exact Hessian; the weights are restored exactly."""
    net, x, y = tiny_net()
    net = net.double()
    x = x.double()
    name = "2.weight"
    weight = dict(net.named_parameters())[name]
    before = weight.detach().clone()

    def gradient_at() -> list[torch.Tensor]:
        return list(torch.autograd.grad(nn.functional.cross_entropy(net(x), y), [weight]))

    hvp = gradient_difference_hvp(gradient_at, [weight], relative_step=1e-4)
    probe = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = dict(net.named_parameters())

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        patched = {**params, name: flat.reshape(weight.shape)}
        return nn.functional.cross_entropy(torch.func.functional_call(net, patched, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, weight.detach().reshape(-1))
    expected = (hessian @ probe.reshape(-1)).reshape(weight.shape)
    assert torch.allclose(hvp([probe])[0], expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(weight.detach(), before)


def test_gradient_difference_restores_the_weights_when_the_gradient_fails() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    before = weight.detach().clone()

    def failing() -> list[torch.Tensor]:
        raise RuntimeError("out of memory")

    hvp = gradient_difference_hvp(failing, [weight])
    with pytest.raises(RuntimeError, match="out of memory"):
        hvp([torch.ones(3)])
    assert torch.equal(weight.detach(), before)


def test_both_hvp_methods_give_the_same_unit_traces_on_a_tiny_llama() -> None:
    import functools

    from bitplan.sensitivity import HutchinsonConfig, Metric, SensitivityRequest, compute_sensitivity
    from bitplan.sources.models import causal_lm_loss, use_eager_attention
    from bitplan.sources.units import find_units
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    use_eager_attention(model)
    units = find_units(model)
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for method in ("double_backward", "jvp", "gradient_difference"):
        loss_fn = causal_lm_loss if method == "double_backward" else functools.partial(
            causal_lm_loss, graph_from_embeddings=False)
        request = SensitivityRequest(Metric.HUTCHINSON, bits_options=(2, 4), group_size=32,
                                     hutchinson=HutchinsonConfig(min_probes=3, max_probes=3, method=method))
        results[method] = compute_sensitivity(model, units, [tokens], request, loss_fn=loss_fn)
    scale = sum(abs(u.score) for u in results["double_backward"].units)
    for a, b, c in zip(results["double_backward"].units, results["jvp"].units,
                       results["gradient_difference"].units, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-6)
        # float32 central differences: rounding of order eps * |g| / step, small against the summed trace
        assert c.score == pytest.approx(a.score, abs=2e-4 * scale)


def test_per_unit_rule_probes_until_no_unit_trace_is_negative() -> None:
    from bitplan.sensitivity.hutchinson import median_relative_error, units_resolved

    # one tensor with a large positive trace and one whose trace is tiny against its probe noise: the summed
    # trace is resolved after the minimum, the small tensor is not
    big = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    small = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    curvature = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    curvature = 1e-4 * (curvature + curvature.T)  # symmetric, trace 0.0128, large off-diagonal spread
    curvature.fill_diagonal_(2e-4)

    def hvp(probes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [10.0 * probes[0], (curvature @ probes[1].reshape(-1)).reshape(8, 8)]

    params = {"big": big, "small": small}
    summed_only = estimate_traces(hvp, params, min_probes=4, max_probes=200, rel_tol=0.05, seed=3)
    assert len(summed_only["big"].samples) == 4 and summed_only["small"].trace < 0  # noise, not curvature
    per_unit = estimate_traces(hvp, params, min_probes=4, max_probes=200, rel_tol=0.05, unit_rel_tol=0.5, seed=3)
    estimates = list(per_unit.values())
    assert 4 < len(per_unit["big"].samples) < 200
    assert units_resolved(estimates, 0.5) and median_relative_error(estimates) <= 0.5
    negative = dataclasses.replace(per_unit["small"], trace=-1.0)
    assert not units_resolved([per_unit["big"], negative], 0.5)
    assert median_relative_error([per_unit["big"], negative]) == float("inf")


def test_hutchinson_told_each_options_error_scales_that_error_by_the_same_trace() -> None:
    """Options with their own weight error (formats, the salience encoder's widths): HAWQ-V2's prediction is
    ``0.5 tr(H) / numel * ||dW||^2`` of that error, with the traces of the widths-only pass (it raised KeyError:
    the probe settings had shadowed the options)."""
    from bitplan.quantizer.rtn import quantization_error
    from bitplan.sensitivity import HutchinsonConfig, Metric, SensitivityRequest, compute_sensitivity
    from bitplan.sources.models import causal_lm_loss, use_eager_attention
    from bitplan.sources.units import find_units
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    use_eager_attention(model)
    units = find_units(model)
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    config = HutchinsonConfig(min_probes=3, max_probes=3)
    request = SensitivityRequest(Metric.HUTCHINSON, bits_options=(2, 4), group_size=32, hutchinson=config)
    widths = compute_sensitivity(model, units, [tokens], request, loss_fn=causal_lm_loss)

    def error_of(name: str, key: object) -> torch.Tensor:
        bits = {"two": 2, "four": 4, "half-of-two": 2}[str(key)]
        error = quantization_error(units[name].weight.detach().float(), bits=bits, group_size=32)
        return error * 0.5 if key == "half-of-two" else error

    told = compute_sensitivity(model, units, [tokens], dataclasses.replace(
        request, options={name: ["two", "four", "half-of-two"] for name in units}, error_of=error_of),
        loss_fn=causal_lm_loss)
    for plain, unit in zip(widths.units, told.units, strict=True):
        assert unit.score == plain.score
        assert unit.delta_loss["two"] == pytest.approx(plain.delta_loss[2], rel=1e-5)
        assert unit.delta_loss["four"] == pytest.approx(plain.delta_loss[4], rel=1e-5)
        assert unit.delta_loss["half-of-two"] == pytest.approx(0.25 * plain.delta_loss[2], rel=1e-5)
