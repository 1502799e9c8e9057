"""How a unit of the artifact becomes GGML blocks in a GGUF file (:mod:`bitplan.targets.exports.gguf_file` writes them):
the exact GGML type of an integer-grid unit (:func:`unit_type`: ``Q4_1``/``Q5_1`` hold our codes bit for bit,
``Q8_0`` re-quantizes), its encoding, the bytes of a tensor in a type, and what happens to a unit whose exact type
is larger than the artifact stores it (:func:`resolve_inexact`: refused, re-encoded by llama.cpp's quantizer, or
kept exactly)."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import torch

from bitplan.errors import BitplanError
from bitplan.quantizer.formats import GgmlWeight
from bitplan.quantizer.rtn import QuantizedWeight, dequantize_weight
from bitplan.targets.manifest import Manifest

BLOCK = 32
T = gguf.GGMLQuantizationType
INEXACT = ("refuse", "reencode", "exact")
# A unit's width -> the GGML types it is re-encoded into, the first its row length allows (K-quants need rows
# divisible by 256; the legacy fallback is the smallest legacy type at or above the width, as llama.cpp's presets
# fall back for such rows).
REENCODE_TYPES = {2: ("Q2_K", "Q4_0"), 3: ("Q3_K", "Q4_0"), 4: ("Q4_K", "Q4_0"), 5: ("Q5_K", "Q5_0"),
                  6: ("Q6_K", "Q8_0"), 7: ("Q8_0",), 8: ("Q8_0",)}


def unit_type(unit: QuantizedWeight) -> T:
    """The GGML type a unit is written as (see :mod:`bitplan.targets.exports.gguf_file`'s docstring)."""
    exact = unit.group_size % BLOCK == 0 and unit.codes.shape[1] % BLOCK == 0
    if exact and unit.bits <= 4:
        return T.Q4_1
    if exact and unit.bits == 5:
        return T.Q5_1
    return T.Q8_0


def tensor_bytes(shape: tuple[int, ...], qtype: T) -> int:
    """Bytes of a tensor of ``shape`` (numpy order, last dimension contiguous) stored as ``qtype``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape))
    if count % block_size:
        raise BitplanError(f"a tensor of shape {shape} does not divide into {qtype.name} blocks of {block_size}")
    return count // block_size * type_size


def reencode_type(bits: int, columns: int) -> T:
    """The GGML type a unit of ``bits`` with rows of ``columns`` is re-encoded into (:data:`REENCODE_TYPES`)."""
    for name in REENCODE_TYPES[min(max(bits, 2), 8)]:
        if columns % gguf.GGML_QUANT_SIZES[T[name]][0] == 0:
            return T[name]
    raise BitplanError(f"no GGML type holds rows of {columns} columns at {bits} bits (legacy types need rows "
                       f"divisible by {BLOCK})")


def resolve_inexact(manifest: Manifest, units: dict[str, QuantizedWeight | GgmlWeight], inexact: str
                    ) -> tuple[dict[str, QuantizedWeight | GgmlWeight], list[dict[str, Any]]]:
    """Units whose exact GGML type is larger than the artifact stores them, handled as ``inexact`` says (see
    :mod:`bitplan.targets.exports.gguf_file`'s docstring); the units to write, and one row per such unit (its name,
    format, bytes before and after)."""
    if inexact not in INEXACT:
        raise BitplanError(f"inexact must be one of {', '.join(INEXACT)}, got {inexact!r}", param="inexact")
    stored = {u.name: int(u.bytes) for u in manifest.units}
    rows, result = [], dict(units)
    for name, unit in units.items():
        if isinstance(unit, GgmlWeight):
            continue
        shape = tuple(unit.codes.shape)
        exact = tensor_bytes(shape, unit_type(unit))
        if exact <= stored.get(name, exact):
            continue
        row = {"name": name, "from": f"int{unit.bits}-g{unit.group_size}", "artifact_bytes": stored[name],
               "exact_type": unit_type(unit).name, "exact_bytes": exact}
        if inexact == "reencode":
            qtype = reencode_type(unit.bits, shape[1])
            from bitplan.quantizer.ggml import quantize_ggml

            payload = quantize_ggml(dequantize_weight(unit), qtype)
            result[name] = GgmlWeight(qtype.name, payload, shape)  # type: ignore[arg-type]
            row.update({"type": qtype.name, "bytes": int(payload.nbytes)})
        else:
            row.update({"type": row["exact_type"], "bytes": exact})
        rows.append(row)
    if rows and inexact == "refuse":
        before, after = sum(r["artifact_bytes"] for r in rows), sum(r["exact_bytes"] for r in rows)
        examples = "; ".join(f"{r['name']} ({r['from']}, {r['artifact_bytes']} bytes) would take "
                             f"{r['exact_type']} ({r['exact_bytes']} bytes)" for r in rows[:3])
        raise BitplanError(
            f"{len(rows)} of {len(units)} layers cannot be stored exactly in a GGML type at their size: {examples}; "
            f"together {before} -> {after} bytes (+{100 * (after - before) / max(before, 1):.0f}%). Give "
            f"--inexact reencode to re-encode them with llama.cpp's quantizer at their width (a second rounding), "
            f"or --inexact exact to keep their codes in the larger file; or plan with --target gguf, which chooses "
            f"among GGML types from the start", param="inexact")
    return result, rows


def _block_params(unit: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes as ``(out, n_blocks, 32)`` uint8 and each block's fp16 ``d`` and ``m`` as ``(out, n_blocks, 2)`` bytes."""
    out_features, in_features = unit.codes.shape
    n_blocks = in_features // BLOCK
    group_of_block = torch.arange(n_blocks) * BLOCK // unit.group_size
    scale = unit.scales.float()[:, group_of_block]
    minimum = -(unit.zeros.float()[:, group_of_block] * scale)
    d = scale.half().numpy().view(np.uint8).reshape(out_features, n_blocks, 2)
    m = minimum.half().numpy().view(np.uint8).reshape(out_features, n_blocks, 2)
    return unit.codes.numpy().reshape(out_features, n_blocks, BLOCK), d, m


def encode_q4_1(unit: QuantizedWeight) -> np.ndarray:
    """``(out, in / 32 * 20)`` uint8: per block ``d`` fp16, ``m`` fp16, 16 bytes of nibbles (value ``k`` in the low
    nibble of byte ``k``, value ``k + 16`` in its high nibble)."""
    codes, d, m = _block_params(unit)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([d, m, qs], axis=-1).reshape(codes.shape[0], -1)


def encode_q5_1(unit: QuantizedWeight) -> np.ndarray:
    """``(out, in / 32 * 24)`` uint8: ``d``, ``m``, the 32 fifth bits little-endian in 4 bytes, then the low
    nibbles as in Q4_1."""
    codes, d, m = _block_params(unit)
    qh = np.packbits((codes >> 4) & 1, axis=-1, bitorder="little")
    qs = (codes[..., :16] & 0x0F) | ((codes[..., 16:] & 0x0F) << 4)
    return np.concatenate([d, m, qh, qs], axis=-1).reshape(codes.shape[0], -1)


def encode_unit(unit: QuantizedWeight, qtype: T) -> np.ndarray:
    if qtype is T.Q4_1:
        return encode_q4_1(unit)
    if qtype is T.Q5_1:
        return encode_q5_1(unit)
    return gguf.quants.quantize(dequantize_weight(unit).numpy(), qtype)


def permute_rows_for_llama(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k projections (rotary pairs interleaved); transformers'
    GGUF loader undoes it. Works on any tensor with one row per output feature (codes, scales, zeros)."""
    rows = tensor.shape[0]
    return tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)
