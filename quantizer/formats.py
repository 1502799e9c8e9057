"""Quantization formats as options: a registry of :class:`Format` entries, each with a name, a family,
``legal(shape)``, exact ``bytes(shape)``, ``encode(weight, importance) -> payload`` and ``decode(payload)``.

Families:

* ``bitplan-int``: our packed integer grids, ``int{b}-g{g}`` (asymmetric, fp16 scale and zero per group) and
  ``int{b}-g{g}-sym`` (symmetric around 0), widths 2..8, groups 32, 64, 128; encoded by round to nearest, with
  the salience-calibrated range search when an importance vector is given (asymmetric grids); and
  ``int{b}-g{g}-fzero``, the same bytes with a fractional fp16 zero point on each group's own ``[min, max]``
  (llama.cpp's ``Q4_1`` arithmetic, :func:`~bitplan.quantizer.rtn.quantize_offset`; each group's range trimmed
  at either end where that lowers the importance-weighted error, then refit by weighted least squares,
  :func:`~bitplan.quantizer.rtn.offset_search`);
  and ``int{b}-g{g}-fzero-dq{k}`` (groups 32 and 64, ``k`` 4, 6 or 8), that grid with its scales and zeros
  double-quantized: ``k``-bit codes on each row's own linear grid plus four fp16 values a row (the K-quants'
  quantized scales, QLoRA's double quantization), so groups of 32 cost ``2k / 32`` bits per weight instead of 1;
* ``ggml``: llama.cpp's types, encoded by llama.cpp's own ``ggml_quantize_chunk`` with the importance vector
  (:mod:`bitplan.quantizer.ggml`), decoded by the ``gguf`` package. K-quants and most IQ types need rows
  divisible by 256, the legacy ones by 32: ``legal`` says so.

The importance vector is the diagonal of a layer's calibration input Gram matrix (``llama-imatrix``'s sum of
squared activations per input column). Adding a format is one entry in :data:`FORMATS`.

A job's candidate set is a preset (:data:`PRESETS`) or a comma-separated list of names (:func:`resolve_formats`).
An encoded weight is a :class:`~bitplan.quantizer.rtn.QuantizedWeight` (integer grids) or a :class:`GgmlWeight`
(GGML blocks); :func:`decode_weight` and :func:`encoded_bytes` take either.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGMLQuantizationType as T

from bitplan.quantizer import ggml
from bitplan.quantizer.rtn import QuantizedWeight, dequantize_weight, quantize_offset, quantize_rtn
from bitplan.quantizer.sizes import quantized_bytes, stored_bytes

Shape = tuple[int, int]  # (out_features, in_features)


@dataclass(frozen=True)
class GgmlWeight:
    """A weight stored as GGML blocks: ``payload`` ``(rows, row_bytes)`` uint8 of type ``qtype`` (a name)."""

    qtype: str
    payload: Any  # numpy uint8 array
    shape: Shape

    @property
    def bits(self) -> int:
        return FORMATS[self.qtype].nominal_bits

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
    nominal_bits: int = 0  # the width a pin ``PATTERN=BITS`` names (Q4_K and int4-g32 are both 4)
    needs_importance: bool = False
    ggml_type: Any = None  # the GGMLQuantizationType of a ggml-family format
    grid: tuple[int, int, bool] | None = None  # (bits, group size, symmetric) of an integer grid (GPTQ encodes it)
    scale_bits: int | None = None  # the width of a double-quantized grid's scale and zero codes

    def bits_per_weight(self, shape: Shape = REFERENCE_SHAPE) -> float:
        """Stored bits per weight of a ``shape`` matrix (every scale, zero and header counted)."""
        return 8.0 * self.bytes(shape) / (shape[0] * shape[1])

    def roundtrip(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(encode(weight))``: the weight as the runtime will see it."""
        return self.decode(self.encode(weight, importance))


def encode_gptq(fmt: str, weight: torch.Tensor, gram: torch.Tensor, *, damp: float = 0.01,
                salience: bool = False) -> QuantizedWeight:
    """``weight`` in the integer grid format ``fmt`` by GPTQ (act-order, static groups) on the calibration input
    Gram matrix ``gram``; ``salience``: each group's range by the salience-weighted search (asymmetric grids)."""
    grid = FORMATS[fmt].grid
    if grid is None:
        raise ValueError(f"GPTQ encodes the integer grid formats (int{{b}}-g{{g}}[-sym]), not {fmt!r}")
    bits, group_size, symmetric = grid
    from bitplan.quantizer.gptq import GPTQConfig, quantize_gptq

    return quantize_gptq(weight, gram, bits=bits, group_size=group_size,
                         config=GPTQConfig(damp=damp, salience=salience and not symmetric, symmetric=symmetric))


def _int_format(bits: int, group_size: int, symmetric: bool = False, offset: bool = False,
                scale_bits: int | None = None) -> Format:
    """``int{b}-g{g}``, ``-sym``, ``-fzero`` (``offset``: the fractional zero point, which GPTQ's integer grids
    do not solve for, so its ``grid`` stays ``None``) or ``-fzero-dq{k}`` (its scales and zeros double-quantized
    to ``k``-bit codes per row)."""
    def encode(weight: torch.Tensor, importance: torch.Tensor | None) -> Any:
        if offset:
            return quantize_offset(weight, bits=bits, group_size=group_size, scale_bits=scale_bits,
                                   importance=importance)
        salience = None if symmetric else importance
        return quantize_rtn(weight, bits=bits, group_size=group_size, salience=salience, symmetric=symmetric)

    suffix = "-sym" if symmetric else "-fzero" if offset else ""
    suffix += f"-dq{scale_bits}" if scale_bits is not None else ""
    return Format(name=f"int{bits}-g{group_size}{suffix}", family="bitplan-int", legal=lambda shape: shape[1] >= 1,
                  bytes=lambda shape: quantized_bytes(shape[0], shape[1], bits=bits, group_size=group_size,
                                                      scale_bits=scale_bits),
                  encode=encode, decode=dequantize_weight, nominal_bits=bits,
                  grid=None if offset else (bits, group_size, symmetric), scale_bits=scale_bits)


def _ggml_format(qtype: T) -> Format:
    def legal(shape: Shape) -> bool:
        return shape[1] % ggml.block_size(qtype) == 0

    return Format(name=qtype.name, family="ggml", legal=legal,
                  bytes=lambda shape: shape[0] * ggml.row_bytes(qtype, shape[1]),
                  encode=lambda weight, importance: GgmlWeight(
                      qtype.name, ggml.quantize_ggml(weight, qtype, importance), tuple(weight.shape)),
                  decode=lambda payload: ggml.dequantize_ggml(payload.payload, qtype),
                  needs_importance=ggml.requires_importance(qtype), nominal_bits=_nominal_bits(qtype.name),
                  ggml_type=qtype)


def _nominal_bits(name: str) -> int:
    """Q4_K -> 4, IQ3_XXS -> 3, Q8_0 -> 8."""
    return int(re.match(r"I?Q(\d)", name).group(1))  # type: ignore[union-attr]


GGML_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS,
              T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S)


def _build() -> dict[str, Format]:
    formats = [_int_format(bits, group, symmetric) for bits in range(2, 9) for group in (32, 64, 128)
               for symmetric in (False, True)]
    formats += [_int_format(bits, group, offset=True) for bits in range(2, 9) for group in (32, 64, 128)]
    formats += [_int_format(bits, group, offset=True, scale_bits=k) for bits in range(2, 9) for group in (32, 64)
                for k in (4, 6, 8)]
    formats += [_ggml_format(qtype) for qtype in GGML_TYPES]
    return {f.name: f for f in formats}


FORMATS: dict[str, Format] = _build()


def scale_bits_of(name: str | None) -> int | None:
    """The width of a stored unit's double-quantized scale codes (format ``int{b}-g{g}-fzero-dq{k}``), else
    ``None`` (any other format, or none recorded)."""
    known = FORMATS.get(name) if name else None
    return None if known is None else known.scale_bits


def legal_formats(names: list[str], shape: Shape) -> list[Format]:
    """The formats among ``names`` that can store a ``shape`` matrix exactly."""
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}; `bitplan formats --json` lists them")
    return [FORMATS[n] for n in names if FORMATS[n].legal(shape)]


GGUF_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# A preset maps to format names; "bitplan-default" is the job's own candidate widths at its group size, encoded
# by its quantizer (the behaviour without --formats), so it maps to None.
PRESETS: dict[str, tuple[str, ...] | None] = {
    "bitplan-default": None,
    "bitplan-int": tuple(f"int{b}-g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)),
    # bitplan-int's grids that its allocations chose on SmolLM2 (bench/results/pipeline-smollm2-*), one width
    # each above 4 bits, the 4-bit fractional-zero grid in groups of 32 (a Q4_1 source's own grid) and that grid
    # with its scales double-quantized at 3 and 4 bits (a quarter to 3/8 of a bit per weight for groups of 32): the
    # set measured in bench/results/pipeline-smollm2-bitplan-mix-double-quantized-2026-12-06.json
    "bitplan-mix": ("int2-g128", "int3-g128", "int3-g64", "int3-g32-fzero-dq4", "int4-g128", "int4-g32-fzero-dq4",
                    "int4-g32-fzero-dq6", "int4-g32-fzero", "int5-g128", "int6-g128", "int8-g128"),
    "gguf-k": ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", *GGUF_LEGACY),
    "gguf-legacy": GGUF_LEGACY,
    # what transformers' compressed-tensors integration loads and vLLM's WNA16 kernels (Marlin/Machete, GPTQ
    # Marlin's table: 4 and 8 bits, groups 32/64/128, symmetric) serve: the compressed-tensors target's set
    "ct-wna16": tuple(f"int{b}-g{g}-sym" for b in (4, 8) for g in (32, 64, 128)),
    "gguf-all": tuple(f.name for f in FORMATS.values() if f.family == "ggml"),
}


def resolve_formats(value: str | None) -> tuple[str, ...] | None:
    """A preset name or a comma-separated list of format names -> the format names (``None``: the job's own
    candidate widths, as without ``--formats``). Raises ``ValueError`` naming what is unknown."""
    if value is None or value.strip() in ("", "bitplan-default"):
        return None
    if value.strip() in PRESETS:
        return PRESETS[value.strip()]
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format {unknown[0] if unknown else value!r}; give a preset "
                         f"({', '.join(PRESETS)}) or format names from `bitplan formats`")
    return names


def decode_weight(encoded: QuantizedWeight | GgmlWeight) -> torch.Tensor:
    """The float32 weight an encoded one stands for (what the runtime computes with)."""
    if isinstance(encoded, GgmlWeight):
        return FORMATS[encoded.qtype].decode(encoded)
    return dequantize_weight(encoded)


def encoded_bytes(encoded: QuantizedWeight | GgmlWeight) -> int:
    """Stored bytes of an encoded weight (what ``Format.bytes`` predicted for its shape)."""
    if isinstance(encoded, GgmlWeight):
        return int(encoded.payload.nbytes)
    return stored_bytes(encoded)
