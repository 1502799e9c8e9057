"""Per-group predicted loss increase against a direct loop over groups."""

from __future__ import annotations

import pytest
import torch

from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.sensitivity.activations import UnitStatistics
from bitplan.sensitivity.groups import group_output_error


@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("in_features, group_size", [(64, 16), (70, 32)])
def test_group_error_equals_direct_loop(fisher: bool, in_features: int, group_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, in_features, generator=gen)
    x = torch.randn(40, in_features, generator=gen)
    stats = UnitStatistics(gram=x.T @ x, tokens=40, output_grad_sq=torch.rand(5, generator=gen))
    result = group_output_error(weight, stats, bits_options=(2, 4), group_size=group_size, fisher=fisher)
    n_groups = -(-in_features // group_size)
    assert result.shape == (5 * n_groups, 2)
    for column, bits in enumerate((2, 4)):
        delta = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=group_size)) - weight
        for o in range(5):
            scale = 0.5 * float(stats.output_grad_sq[o]) / 40 / 40 if fisher else 1 / 40
            for g in range(n_groups):
                cols = range(g * group_size, min((g + 1) * group_size, in_features))
                expected = scale * sum(float(stats.gram[i, i]) * float(delta[o, i]) ** 2 for i in cols)
                assert float(result[o * n_groups + g, column]) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert (result[:, 0] >= result[:, 1]).float().mean() > 0.9  # fewer bits, more error (almost always)


@pytest.mark.parametrize("metric", ["gwq", "slim_salience", "baq"])
def test_group_shares_add_up_to_the_unit_prediction(metric: str) -> None:
    from bitplan.sensitivity.groups import group_sensitivity
    from bitplan.sensitivity.weight_metrics import predict_baq, predict_gwq, predict_slim_salience

    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 70, generator=gen)
    x = torch.randn(50, 70, generator=gen)
    stats = UnitStatistics(gram=x.T @ x, tokens=50, output_grad_sq=torch.rand(5, generator=gen),
                           weight_grad_sq=torch.rand(5, 70, generator=gen), batches=2)
    groups = group_sensitivity(metric, weight, stats, bits_options=(2, 3, 4), group_size=32)
    assert groups.shape == (5 * 3, 3)
    predictor = {"gwq": predict_gwq, "slim_salience": predict_slim_salience, "baq": predict_baq}[metric]
    unit = predictor(weight, stats, bits_options=(2, 3, 4), group_size=32)
    for column, bits in enumerate((2, 3, 4)):
        assert float(groups[:, column].sum()) == pytest.approx(unit[bits], rel=1e-6)
