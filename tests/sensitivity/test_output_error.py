"""Calibration statistics and the measured output error against direct computations on a tiny model."""

from __future__ import annotations

import pytest
import torch

from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.sensitivity import Metric, SensitivityRequest, collect_unit_statistics, compute_sensitivity
from bitplan.sensitivity.api import MODEL_CURVATURE
from bitplan.sensitivity.output_error import predict_output_error
from bitplan.sources.models import causal_lm_loss, causal_lm_sampled_loss, use_eager_attention
from bitplan.sources.units import find_units
from tests.conftest import make_tiny_llama


def captured_io(model: torch.nn.Module, name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit's input activations and the gradient of the summed loss w.r.t. its output."""
    seen: dict[str, torch.Tensor] = {}
    module = model.get_submodule(name)

    def hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["x"] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        output.retain_grad()
        seen["y"] = output

    handle = module.register_forward_hook(hook)
    causal_lm_loss(model, tokens).backward()
    handle.remove()
    return seen["x"], seen["y"].grad.reshape(-1, seen["y"].shape[-1])


def test_statistics_match_direct_computation() -> None:
    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_unit_statistics(model, units, [tokens[:1], tokens[1:]], loss_fn=causal_lm_loss)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        xs, grads = zip(*(captured_io(model, name, tokens[i : i + 1]) for i in range(2)), strict=True)
        x = torch.cat(xs)
        g = torch.cat(grads)
        assert stats[name].tokens == 48
        torch.testing.assert_close(stats[name].gram, x.T @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[name].output_grad_sq, (g ** 2).sum(0), rtol=1e-5, atol=1e-8)


def test_output_error_equals_direct_output_difference() -> None:
    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_unit_statistics(model, units, [tokens])
    name = "model.layers.1.mlp.down_proj"  # in_features 96: a ragged last group at group size 64
    weight = units[name].weight.detach()
    x, _ = captured_io(model, name, tokens)
    predicted = predict_output_error(weight, stats[name], bits_options=[2, 4], group_size=64, fisher=False)
    for bits in (2, 4):
        delta = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=64)) - weight
        direct = float(((x @ delta.T) ** 2).sum()) / x.shape[0]
        assert predicted[bits] == pytest.approx(direct, rel=1e-4)
    assert predicted[2] > predicted[4]


@pytest.mark.parametrize("metric", list(Metric))
def test_every_metric_predicts_more_loss_at_fewer_bits(metric: Metric) -> None:
    model = make_tiny_llama()
    use_eager_attention(model)  # double backward needs eager attention
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    curvature = causal_lm_sampled_loss if metric in MODEL_CURVATURE else None
    result = compute_sensitivity(model, units, [tokens[:1], tokens[1:]],
                                 SensitivityRequest(metric, bits_options=(2, 8), group_size=32),
                                 loss_fn=causal_lm_loss, curvature_loss_fn=curvature)
    assert [u.name for u in result.units] == list(units)
    assert sum(u.delta_loss[2] for u in result.units) > sum(u.delta_loss[8] for u in result.units)
    if metric not in (Metric.TOKEN_TAYLOR, Metric.TOKEN_TAYLOR_KL):  # a (possibly negative) first-order term
        assert sum(u.delta_loss[8] for u in result.units) >= 0


def test_loss_based_metric_needs_a_loss() -> None:
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="needs a loss"):
        compute_sensitivity(model, find_units(model), [torch.zeros(1, 4, dtype=torch.long)],
                            SensitivityRequest(Metric.HUTCHINSON, bits_options=(2,), group_size=32))
