"""Measured layer-output error of quantizing a unit at each candidate bit width.

For a weight ``W`` quantized to ``W_q`` with ``dW = W_q - W`` and calibration inputs with
``H = sum_t x_t x_t^T`` over ``N`` tokens, the summed squared output error is ``tr(dW H dW^T)``. Two predicted
loss increases follow from it:

* ``output_error``: ``tr(dW H dW^T) / N`` (mean squared output error per token);
* ``fisher_output_error``: ``0.5 / N * sum_o F_o [dW H dW^T]_oo`` with ``F_o = sum_t g_{t,o}^2 / N``, the
  empirical Fisher of the token loss with respect to output channel ``o`` (ModelOpt's ``sum g^2 (Y - Y_q)^2``
  with the gradient energy averaged over tokens per channel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity.activations import UnitStatistics


def row_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``diag(dW H dW^T)``: ``(out_features,)`` summed squared output error per output channel."""
    return ((delta @ gram) * delta).sum(dim=1)


def predict_output_error(
    weight: torch.Tensor,
    stats: UnitStatistics,
    *,
    bits_options: Sequence[int],
    group_size: int,
    fisher: bool,
    errors: Mapping[Any, torch.Tensor] | None = None,
) -> dict[Any, float]:
    """Predicted loss increase of RTN-quantizing ``weight (out, in)`` at each bit width in ``bits_options`` (or of
    each given weight error, keyed as ``errors`` is)."""
    if fisher and stats.output_grad_sq is None:
        raise ValueError("fisher_output_error needs output gradients; collect statistics with a loss function")
    tokens = max(stats.tokens, 1)
    weight = weight.detach()
    if errors is None:
        errors = {bits: quantization_error(weight, bits=bits, group_size=group_size) for bits in bits_options}
    result = {}
    for bits, delta in errors.items():
        rows = row_error(delta.float(), stats.gram)
        if stats.output_grad_sq is not None and fisher:
            value = 0.5 * float((stats.output_grad_sq / tokens * rows).sum()) / tokens
        else:
            value = float(rows.sum()) / tokens
        result[bits] = max(value, 0.0)
    return result
