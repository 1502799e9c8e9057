"""The quantizers a job can choose, behind one call."""

from __future__ import annotations

import torch

from quantizer.gptq import GPTQConfig, quantize_gptq
from quantizer.mixed import choose_group_bits, quantize_rtn_mixed
from quantizer.rtn import QuantizedWeight, quantize_rtn

QUANTIZERS = ("rtn", "rtn-symmetric", "rtn-salience", "gptq", "gptq-salience")
QUANTIZER_LABELS = {"rtn": "rtn-asymmetric", "rtn-symmetric": "rtn-symmetric",
                    "rtn-salience": "rtn-asymmetric+salience-calibration", "gptq": "gptq-act-order",
                    "gptq-salience": "gptq-act-order+salience-calibration"}


def needs_gram(method: str) -> bool:
    """Whether ``method`` needs each unit's calibration input Gram matrix."""
    check_method(method)
    return method not in ("rtn", "rtn-symmetric")


def check_method(method: str) -> None:
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {method!r}; choose one of {', '.join(QUANTIZERS)}")


def quantize_unit(weight: torch.Tensor, *, method: str, bits: int, group_size: int,
                  gram: torch.Tensor | None = None, damp: float = 0.01, mix_groups: bool = False) -> QuantizedWeight:
    """Quantize one linear weight ``(out_features, in_features)`` with ``method``.

    ``rtn``: round to nearest, min/max range. ``rtn-symmetric``: round to nearest on a grid symmetric around 0.
    ``rtn-salience``: round to nearest, each group's range searched
    to minimize the error weighted by the input energy ``diag(H)``. ``gptq``: GPTQ error feedback.
    ``gptq-salience``: GPTQ with the salience-weighted range search. All but ``rtn`` need ``gram``.
    ``mix_groups``: column groups take ``bits - 1``, ``bits`` or ``bits + 1`` bits at the layer's size
    (:func:`quantizer.mixed.choose_group_bits`; needs ``gram``).
    """
    if (needs_gram(method) or mix_groups) and gram is None:
        raise ValueError(f"quantizer {method!r}{' with mixed groups' if mix_groups else ''} needs the unit's "
                         f"calibration Gram matrix")
    group_bits = None
    if mix_groups:
        group_bits = choose_group_bits(weight, torch.diag(gram), bits=bits, group_size=group_size)
        if len(set(group_bits)) == 1:
            group_bits = None
    if method.startswith("gptq"):
        config = GPTQConfig(damp=damp, salience=method == "gptq-salience")
        return quantize_gptq(weight, gram, bits=bits, group_size=group_size, group_bits=group_bits, config=config)
    salience = torch.diag(gram) if method == "rtn-salience" else None
    symmetric = method == "rtn-symmetric"
    if group_bits is not None:
        return quantize_rtn_mixed(weight, group_bits, group_size=group_size, salience=salience, symmetric=symmetric)
    return quantize_rtn(weight, bits=bits, group_size=group_size, salience=salience, symmetric=symmetric)
