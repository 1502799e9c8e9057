"""The quantizers a job can choose, behind one call: a registry of :class:`Quantizer` entries (adding one is
one function plus one :func:`register` line)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitplan.quantizer.gptq import GPTQConfig, quantize_gptq
from bitplan.quantizer.mixed import choose_group_bits, quantize_rtn_mixed
from bitplan.quantizer.rtn import QuantizedWeight, quantize_rtn

# (weight, gram or None, group_bits or None, bits, group_size, damp) -> quantized weight; a ``diagonal_only``
# quantizer gets the Gram matrix's diagonal (the per-column input energy) in the gram's place
QuantizeFn = Callable[[torch.Tensor, "torch.Tensor | None", "list[int] | None", int, int, float], QuantizedWeight]


@dataclass(frozen=True)
class Quantizer:
    """A registered quantizer: its job name, the label the manifest records, whether it needs each unit's
    calibration input Gram matrix, and whether it reads only that matrix's diagonal."""

    name: str
    label: str
    needs_gram: bool
    quantize: QuantizeFn
    diagonal_only: bool = False


QUANTIZER_REGISTRY: dict[str, Quantizer] = {}


def register(name: str, label: str, *, needs_gram: bool, diagonal_only: bool = False
             ) -> Callable[[QuantizeFn], QuantizeFn]:
    """Register ``function`` as the quantizer ``name``."""

    def add(function: QuantizeFn) -> QuantizeFn:
        QUANTIZER_REGISTRY[name] = Quantizer(name=name, label=label, needs_gram=needs_gram, quantize=function,
                                             diagonal_only=diagonal_only)
        return function

    return add


def _rtn(weight: torch.Tensor, salience: torch.Tensor | None, group_bits: list[int] | None, bits: int,
         group_size: int, *, symmetric: bool = False) -> QuantizedWeight:
    if group_bits is not None:
        return quantize_rtn_mixed(weight, group_bits, group_size=group_size, salience=salience, symmetric=symmetric)
    return quantize_rtn(weight, bits=bits, group_size=group_size, salience=salience, symmetric=symmetric)


@register("rtn", "rtn-asymmetric", needs_gram=False)
def _quantize_rtn(weight, gram, group_bits, bits, group_size, damp):  # type: ignore[no-untyped-def]
    return _rtn(weight, None, group_bits, bits, group_size)


@register("rtn-symmetric", "rtn-symmetric", needs_gram=False)
def _quantize_rtn_symmetric(weight, gram, group_bits, bits, group_size, damp):  # type: ignore[no-untyped-def]
    return _rtn(weight, None, group_bits, bits, group_size, symmetric=True)


@register("rtn-salience", "rtn-asymmetric+salience-calibration", needs_gram=True, diagonal_only=True)
def _quantize_rtn_salience(weight, salience, group_bits, bits, group_size, damp):  # type: ignore[no-untyped-def]
    return _rtn(weight, salience, group_bits, bits, group_size)


@register("gptq", "gptq-act-order", needs_gram=True)
def _quantize_gptq(weight, gram, group_bits, bits, group_size, damp):  # type: ignore[no-untyped-def]
    return quantize_gptq(weight, gram, bits=bits, group_size=group_size, group_bits=group_bits,
                         config=GPTQConfig(damp=damp, salience=False))


@register("gptq-salience", "gptq-act-order+salience-calibration", needs_gram=True)
def _quantize_gptq_salience(weight, gram, group_bits, bits, group_size, damp):  # type: ignore[no-untyped-def]
    return quantize_gptq(weight, gram, bits=bits, group_size=group_size, group_bits=group_bits,
                         config=GPTQConfig(damp=damp, salience=True))


QUANTIZERS = tuple(QUANTIZER_REGISTRY)
QUANTIZER_LABELS = {name: q.label for name, q in QUANTIZER_REGISTRY.items()}


def needs_gram(method: str) -> bool:
    """Whether ``method`` needs each unit's calibration input Gram matrix."""
    return _get(method).needs_gram


def needs_whole_gram(method: str) -> bool:
    """Whether ``method`` reads more of a unit's Gram matrix than its diagonal (GPTQ does)."""
    return _get(method).needs_gram and not _get(method).diagonal_only


def _get(method: str) -> Quantizer:
    if method not in QUANTIZER_REGISTRY:
        raise ValueError(f"unknown quantizer {method!r}; choose one of {', '.join(QUANTIZERS)}")
    return QUANTIZER_REGISTRY[method]


def check_method(method: str) -> None:
    _get(method)


def quantize_unit(weight: torch.Tensor, *, method: str, bits: int, group_size: int,
                  gram: torch.Tensor | None = None, damp: float = 0.01, mix_groups: bool = False,
                  salience: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize one linear weight ``(out_features, in_features)`` with ``method``.

    ``rtn``: round to nearest, min/max range. ``rtn-symmetric``: round to nearest on a grid symmetric around 0.
    ``rtn-salience``: round to nearest, each group's range searched
    to minimize the error weighted by the input energy ``diag(H)``. ``gptq``: GPTQ error feedback.
    ``gptq-salience``: GPTQ with the salience-weighted range search. All but ``rtn`` need ``gram``.
    ``mix_groups``: column groups take ``bits - 1``, ``bits`` or ``bits + 1`` bits at the layer's size
    (:func:`quantizer.mixed.choose_group_bits`; needs ``gram``). ``salience``: the Gram matrix's diagonal (the
    per-column input energy), enough in its place for ``rtn-salience`` and ``mix_groups``, which read only that.
    """
    quantizer = _get(method)
    if salience is None and gram is not None:
        salience = torch.diag(gram)
    if (needs_whole_gram(method) and gram is None) or ((quantizer.needs_gram or mix_groups) and salience is None):
        raise ValueError(f"quantizer {method!r}{' with mixed groups' if mix_groups else ''} needs the unit's "
                         f"calibration Gram matrix")
    group_bits = None
    if mix_groups:
        group_bits = choose_group_bits(weight, salience, bits=bits, group_size=group_size)
        if len(set(group_bits)) == 1:
            group_bits = None
    return quantizer.quantize(weight, salience if quantizer.diagonal_only else gram, group_bits, bits, group_size,
                              damp)
