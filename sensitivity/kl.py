"""End-to-end KL divergence of a language model's next-token distribution after quantization.

Not a per-unit predictor: it measures a whole allocation at once, interactions between units included (what no
per-unit anchor sees), so a report can say what a chosen allocation costs and a caller can compare allocations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


@torch.no_grad()
def output_kl(model: nn.Module, units: Mapping[str, nn.Linear], replacements: Mapping[str, torch.Tensor],
              batches: Sequence[torch.Tensor]) -> float:
    """Mean per-token ``KL(p_float || p_quantized)`` (nats) over ``batches`` of token ids, with each unit named in
    ``replacements`` given that weight; the float weights are restored afterwards."""
    float_logprobs = [torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1) for batch in batches]
    originals = {name: units[name].weight.data for name in replacements}
    try:
        for name, weight in replacements.items():
            units[name].weight.data = weight.to(originals[name].dtype)
        total, count = 0.0, 0
        for batch, reference in zip(batches, float_logprobs, strict=True):
            quantized = torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
            total += float((reference.exp() * (reference - quantized)).sum())
            count += reference.shape[0] * reference.shape[1]
    finally:
        for name, weight in originals.items():
            units[name].weight.data = weight
    return total / max(count, 1)
