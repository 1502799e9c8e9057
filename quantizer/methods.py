"""The quantizers a job can choose, behind one call."""

from __future__ import annotations

import torch

from quantizer.gptq import GPTQConfig, quantize_gptq
from quantizer.rtn import QuantizedWeight, quantize_rtn

QUANTIZERS = ("rtn", "rtn-salience", "gptq", "gptq-salience")
QUANTIZER_LABELS = {"rtn": "rtn-asymmetric", "rtn-salience": "rtn-asymmetric+salience-calibration",
                    "gptq": "gptq", "gptq-salience": "gptq+salience-calibration"}


def needs_gram(method: str) -> bool:
    """Whether ``method`` needs each unit's calibration input Gram matrix."""
    check_method(method)
    return method != "rtn"


def check_method(method: str) -> None:
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {method!r}; choose one of {', '.join(QUANTIZERS)}")


def quantize_unit(weight: torch.Tensor, *, method: str, bits: int, group_size: int,
                  gram: torch.Tensor | None = None, damp: float = 0.01) -> QuantizedWeight:
    """Quantize one linear weight ``(out_features, in_features)`` with ``method``.

    ``rtn``: round to nearest, min/max range. ``rtn-salience``: round to nearest, each group's range searched
    to minimize the error weighted by the input energy ``diag(H)``. ``gptq``: GPTQ error feedback.
    ``gptq-salience``: GPTQ with the salience-weighted range search. All but ``rtn`` need ``gram``.
    """
    if needs_gram(method) and gram is None:
        raise ValueError(f"quantizer {method!r} needs the unit's calibration Gram matrix")
    if method == "rtn":
        return quantize_rtn(weight, bits=bits, group_size=group_size)
    if method == "rtn-salience":
        return quantize_rtn(weight, bits=bits, group_size=group_size, salience=torch.diag(gram))
    config = GPTQConfig(damp=damp, salience=method == "gptq-salience")
    return quantize_gptq(weight, gram, bits=bits, group_size=group_size, config=config)
