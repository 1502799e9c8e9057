"""Quantization formats as options: a registry of :class:`Format` entries, each with a name, a family,
``legal(shape)``, exact ``bytes(shape)``, ``encode(weight, importance) -> payload`` and ``decode(payload)``.

Families:

* ``bitplan-int``: our packed integer grids, ``int{b}-g{g}`` (asymmetric, fp16 scale and zero per group) and
  ``int{b}-g{g}-sym`` (symmetric around 0), widths 2..8, groups 32, 64, 128; encoded by round to nearest, with
  the salience-calibrated range search when an importance vector is given (asymmetric grids);
* ``ggml``: llama.cpp's types, encoded by llama.cpp's own ``ggml_quantize_chunk`` with the importance vector
  (:mod:`bitplan.quantizer.ggml`), decoded by the ``gguf`` package. K-quants and most IQ types need rows
  divisible by 256, the legacy ones by 32: ``legal`` says so.

The importance vector is the diagonal of a layer's calibration input Gram matrix (``llama-imatrix``'s sum of
squared activations per input column). Adding a format is one entry in :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGMLQuantizationType as T

from bitplan.quantizer import ggml
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.quantizer.sizes import quantized_bytes

Shape = tuple[int, int]  # (out_features, in_features)
REFERENCE_SHAPE = (4096, 4096)


@dataclass(frozen=True)
class Format:
    """One way to store a weight matrix."""

    name: str
    family: str
    legal: Callable[[Shape], bool]
    bytes: Callable[[Shape], int]
    encode: Callable[[torch.Tensor, "torch.Tensor | None"], Any]
    decode: Callable[[Any], torch.Tensor]
    needs_importance: bool = False

    def bits_per_weight(self, shape: Shape = REFERENCE_SHAPE) -> float:
        """Stored bits per weight of a ``shape`` matrix (every scale, zero and header counted)."""
        return 8.0 * self.bytes(shape) / (shape[0] * shape[1])

    def roundtrip(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(encode(weight))``: the weight as the runtime will see it."""
        return self.decode(self.encode(weight, importance))


def _int_format(bits: int, group_size: int, symmetric: bool) -> Format:
    def encode(weight: torch.Tensor, importance: torch.Tensor | None) -> Any:
        salience = None if symmetric else importance
        return quantize_rtn(weight, bits=bits, group_size=group_size, salience=salience, symmetric=symmetric)

    return Format(name=f"int{bits}-g{group_size}{'-sym' if symmetric else ''}", family="bitplan-int",
                  legal=lambda shape: shape[1] >= 1,
                  bytes=lambda shape: quantized_bytes(shape[0], shape[1], bits=bits, group_size=group_size),
                  encode=encode, decode=dequantize_weight)


def _ggml_format(qtype: T) -> Format:
    def legal(shape: Shape) -> bool:
        return shape[1] % ggml.block_size(qtype) == 0

    return Format(name=qtype.name, family="ggml", legal=legal,
                  bytes=lambda shape: shape[0] * ggml.row_bytes(qtype, shape[1]),
                  encode=lambda weight, importance: ggml.quantize_ggml(weight, qtype, importance),
                  decode=lambda payload: ggml.dequantize_ggml(payload, qtype),
                  needs_importance=ggml.requires_importance(qtype))


GGML_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS,
              T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S)


def _build() -> dict[str, Format]:
    formats = [_int_format(bits, group, symmetric) for bits in range(2, 9) for group in (32, 64, 128)
               for symmetric in (False, True)]
    formats += [_ggml_format(qtype) for qtype in GGML_TYPES]
    return {f.name: f for f in formats}


FORMATS: dict[str, Format] = _build()


def legal_formats(names: list[str], shape: Shape) -> list[Format]:
    """The formats among ``names`` that can store a ``shape`` matrix exactly."""
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}; `bitplan formats --json` lists them")
    return [FORMATS[n] for n in names if FORMATS[n].legal(shape)]
