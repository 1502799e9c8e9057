"""GGUF export: one GGML type per tensor, written with the ``gguf`` package, metadata and tokenizer copied from
the source model's GGUF file, so llama.cpp and transformers load it.

Type of a quantized unit: the nearest GGML type at or above the unit's bits that holds the artifact's codes
*exactly*: ``Q4_1`` for 2-4 bits and ``Q5_1`` for 5 bits (blocks of 32 columns with an fp16 scale ``d`` and
minimum ``m``: our group's ``d = scale``, ``m = -zero * scale``, the codes copied bit for bit; this needs group
sizes that are multiples of 32), ``Q8_0`` for 6-8 bits (re-quantized from our dequantized weight: a symmetric
int8 grid of 32 columns, an error far below the artifact's own). ``Q2_K``/``Q3_K`` are smaller but their
symmetric sub-block grids cannot hold our asymmetric codes, so using them would add a second rounding;
``gguf`` has no encoder for them either. Every other tensor keeps the source file's type (1-D ones F32).

That exact type is often larger than the unit (a 3-bit layer in groups of 128 takes 3.25 bits per weight in the
artifact and 5 in ``Q4_1``). ``inexact`` says what happens to such units: ``refuse`` (the default) names them and
the size they would grow to, and writes nothing; ``reencode`` encodes each of them with llama.cpp's own quantizer
(``ggml_quantize_chunk``) from its dequantized weight into the GGML type of its width that its rows allow
(:data:`REENCODE_TYPES`: a second rounding, reported per unit with the size change); ``exact`` keeps the codes
and the larger file, and reports the growth.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from bitplan.errors import BitplanError
from bitplan.exports.common import ExportReport, file_hashes, read_artifact_units, register_export
from bitplan.exports.gguf_source import GgufSource, SourceTensor, expert_slice, open_source, safetensors_shapes
from bitplan.hashing import sha256_file
from bitplan.manifest import Manifest
from bitplan.models import resolve_reference
from bitplan.moe import expert_unit
from bitplan.quantizer.formats import GgmlWeight
from bitplan.quantizer.rtn import QuantizedWeight, dequantize_weight

REQUANTIZABLE = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                 gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                 gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q5_1}
BLOCK = 32
T = gguf.GGMLQuantizationType
NORM_PLUS_ONE = ("gemma2", "gemma3")  # transformers' GGUF loader takes 1 from their norm weights: put it back
INEXACT = ("refuse", "reencode", "exact")
# A unit's width -> the GGML types it is re-encoded into, the first its row length allows (K-quants need rows
# divisible by 256; the legacy fallback is the smallest legacy type at or above the width, as llama.cpp's presets
# fall back for such rows).
REENCODE_TYPES = {2: ("Q2_K", "Q4_0"), 3: ("Q3_K", "Q4_0"), 4: ("Q4_K", "Q4_0"), 5: ("Q5_K", "Q5_0"),
                  6: ("Q6_K", "Q8_0"), 7: ("Q8_0",), 8: ("Q8_0",)}


def unit_type(unit: QuantizedWeight) -> T:
    """The GGML type a unit is written as (see the module docstring)."""
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
    """Units whose exact GGML type is larger than the artifact stores them, handled as ``inexact`` says (see the
    module docstring); the units to write, and one row per such unit (its name, format, bytes before and after)."""
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


def source_model(manifest: Manifest) -> Path:
    """The model the artifact was made from, whose metadata and tokenizer a GGUF of it takes: a GGUF file or a
    Hugging Face folder (:mod:`bitplan.exports.gguf_source`), unchanged since (its sha256)."""
    source = None if manifest.run is None else manifest.run.source
    try:
        source_format, path = resolve_reference("" if source is None else source.reference)
    except BitplanError as error:
        raise BitplanError(f"GGUF export copies the tokenizer and metadata from the source model, which cannot be "
                           f"found: {error}") from None
    if source_format not in ("gguf", "hf-folder"):
        raise BitplanError(f"GGUF export takes the tokenizer and metadata from the source model's GGUF file or "
                           f"Hugging Face folder; this artifact's source {source.reference!r} is a {source_format} "
                           "model")
    if source is not None and source.sha256 and source_format == "gguf" and sha256_file(path) != source.sha256:
        raise BitplanError(f"the source model {path} changed since the artifact was made (sha256 differs)")
    return path


@dataclasses.dataclass
class _Layout:
    """The source and where each of our tensors goes in the file."""

    source: GgufSource
    # GGUF tensor name -> its units and their weights: one, or an expert stack's in expert order
    by_unit: dict[str, list[tuple[str, QuantizedWeight | GgmlWeight]]]
    by_float: dict[str | None, torch.Tensor]  # GGUF tensor name -> float tensor

    @property
    def arch(self) -> str:
        return self.source.arch

    @property
    def heads(self) -> dict[str, int]:
        return self.source.heads


def _unit_shape(unit: QuantizedWeight | GgmlWeight) -> tuple[int, ...]:
    return tuple(unit.shape) if isinstance(unit, GgmlWeight) else tuple(unit.codes.shape)


def _layout(manifest: Manifest, units: dict[str, QuantizedWeight | GgmlWeight],
            floats: dict[str, torch.Tensor]) -> _Layout:
    # a tied alias (the head of a tied model) is no tensor of its own: llama.cpp runs the head on token_embd
    shapes = {**{n: tuple(t.shape) for n, t in floats.items() if n not in manifest.tied},
              **{f"{n}.weight": _unit_shape(q) for n, q in units.items()}}
    path = source_model(manifest)
    # a Hugging Face source's tensors are its checkpoint's (a tied checkpoint has no head of its own, so a head
    # chosen as a unit is the file's token_embd, as from a GGUF source), in the artifact's shapes
    source = open_source(path, {n: shapes.get(n, s) for n, s in safetensors_shapes(path).items()} if path.is_dir()
                         else shapes)
    by_unit: dict[str, list[tuple[str, QuantizedWeight | GgmlWeight]]] = {}
    for name in sorted(units, key=_expert_order):
        by_unit.setdefault(source.unit_tensor(name), []).append((name, units[name]))
    layout = _Layout(source=source, by_unit=by_unit, by_float=_float_tensors(source, floats))
    missing = set(layout.by_unit) - {t.name for t in source.tensors}
    if missing:
        raise BitplanError(f"the source has no tensor for units {sorted(missing)[:3]}")
    return layout


# llama.cpp's llama_ftype for a file whose block weights are mostly of a GGML type (llama.h); the file type is a
# label (llama.cpp reads every tensor's own type), shown by its loader as "file type".
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17,
              "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23, "IQ4_NL": 25, "IQ3_S": 26, "IQ2_S": 28,
              "IQ4_XS": 30}


def file_type(units: dict[str, QuantizedWeight | GgmlWeight]) -> int:
    """``general.file_type``: the llama.cpp file type of the GGML type holding most block weights."""
    return file_type_of([(unit.qtype, tuple(unit.shape)) if isinstance(unit, GgmlWeight)
                         else (unit_type(unit).name, tuple(unit.codes.shape)) for unit in units.values()])


def file_type_of(tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """The llama.cpp file type of the GGML type holding most weights among ``(type name, shape)`` block tensors."""
    weight: dict[str, int] = {}
    for name, shape in tensors:
        weight[name] = weight.get(name, 0) + int(np.prod(shape))
    return FILE_TYPES[max(sorted(weight), key=weight.__getitem__)]


def _copy_metadata(writer: Any, source: GgufSource, manifest: Manifest) -> None:
    """Every key of the source but the file type, and who quantized it."""
    for key, value, value_type, sub_type in source.metadata:
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    writer.add_string("general.quantized_by",
                      f"bitplan (artifact manifest {'rtn' if manifest.run is None else manifest.run.quantizer})")


def _expert_order(unit: str) -> tuple[str, int]:
    """Units sorted so that an expert stack's come in expert order."""
    expert = expert_unit(unit)
    return (unit, -1) if expert is None else (f"{expert.stack}.{expert.projection}", expert.expert)


def _float_tensors(source: GgufSource, floats: dict[str, torch.Tensor]) -> dict[str | None, torch.Tensor]:
    """GGUF tensor name -> the float tensor written there (an expert stack's float tensors stacked)."""
    grouped: dict[str | None, list[tuple[int, str]]] = {}
    for hf_name in floats:
        merged = expert_slice(hf_name)
        grouped.setdefault(source.gguf_name(hf_name), []).append((-1 if merged is None else merged[1], hf_name))
    return {name: floats[members[-1][1]] if name is None or members[0][0] < 0
            else torch.stack([floats[member] for _, member in sorted(members)])
            for name, members in grouped.items()}


def _stack_tensor(layout: _Layout, name: str) -> tuple[Any, Any, tuple[int, ...], list[dict[str, Any]]]:
    """A tensor's GGML type, encoded blocks, shape and report rows: one unit's, or an expert stack's (its experts'
    blocks one after another, shape ``(experts, rows, columns)``, all in one type)."""
    parts = [_unit_tensor(layout, unit_name, unit) for unit_name, unit in layout.by_unit[name]]
    qtype, data, shape, _ = parts[0]
    if len(parts) == 1:
        return qtype, data, shape, [parts[0][3]]
    if len({part[0] for part in parts}) > 1:
        raise BitplanError(f"the experts of {name} have different types; llama.cpp stores them as one tensor of one "
                           "type")
    return qtype, np.stack([part[1] for part in parts]), (len(parts), *shape), [part[3] for part in parts]


def _unit_tensor(layout: _Layout, unit_name: str, unit: QuantizedWeight | GgmlWeight
                 ) -> tuple[Any, Any, tuple[int, ...], dict[str, Any]]:
    """A unit's GGML type, encoded blocks, shape and report row. A unit already in a GGML type keeps its blocks
    byte for byte (rows permuted for llama's q/k, which moves whole rows of blocks)."""
    name = layout.source.unit_tensor(unit_name)
    kind = name.split(".")[-2]
    if isinstance(unit, GgmlWeight):
        payload = unit.payload
        if layout.arch == "llama" and kind in layout.heads:
            payload = permute_rows_for_llama(torch.from_numpy(payload), layout.heads[kind]).numpy()
        qtype = T[unit.qtype]
        row = {"name": unit_name, "gguf_name": name, "bits": unit.bits, "type": unit.qtype,
               "bytes": int(payload.nbytes)}
        return qtype, np.ascontiguousarray(payload), unit.shape, row
    if layout.arch == "llama" and kind in layout.heads:
        heads = layout.heads[kind]
        unit = dataclasses.replace(unit, codes=permute_rows_for_llama(unit.codes, heads),
                                   scales=permute_rows_for_llama(unit.scales, heads),
                                   zeros=permute_rows_for_llama(unit.zeros, heads))
    qtype = unit_type(unit)
    shape = tuple(unit.codes.shape)
    row = {"name": unit_name, "gguf_name": name, "bits": unit.bits, "type": qtype.name,
           "bytes": tensor_bytes(shape, qtype)}
    return qtype, encode_unit(unit, qtype), shape, row


def unchanged_from_source(source_tensor: SourceTensor, tensor: torch.Tensor, arch: str) -> bool:
    """Whether the artifact's float ``tensor`` is the source GGUF's tensor as loaded (dequantized, Gemma's norms
    less 1, rounded to the artifact's dtype), so the file takes the source's bytes as they are: the source's
    type and values exactly, without a second rounding (and without re-encoding a 262k-row embedding)."""
    if source_tensor.data is None or source_tensor.tensor_type is None:
        return False
    try:
        values = torch.from_numpy(np.array(gguf.quants.dequantize(source_tensor.data, source_tensor.tensor_type),
                                           dtype=np.float32))
    except NotImplementedError:
        return False
    if arch in NORM_PLUS_ONE and source_tensor.name.endswith("norm.weight"):
        values = values - 1
    return tuple(values.shape) == tuple(tensor.shape) and torch.equal(values.to(tensor.dtype), tensor)


def _add_tensors(writer: Any, layout: _Layout) -> tuple[int, list[dict[str, Any]]]:
    """Every tensor of the source, ours in its place; the predicted tensor bytes and one row per unit."""
    predicted = 0
    unit_rows = []
    for source_tensor in layout.source.tensors:
        name = source_tensor.name
        if name in layout.by_unit:
            qtype, data, shape, rows = _stack_tensor(layout, name)
            unit_rows.extend(rows)
        elif name in layout.by_float:
            if unchanged_from_source(source_tensor, layout.by_float[name], layout.arch):
                assert source_tensor.data is not None
                predicted += int(source_tensor.n_bytes)  # the source's own bytes: exact, and no re-encoding
                writer.add_tensor(name, source_tensor.data, raw_shape=None, raw_dtype=source_tensor.tensor_type)
                continue
            tensor = layout.by_float[name].float()
            if layout.arch in NORM_PLUS_ONE and "norm.weight" in name:
                tensor = tensor + 1  # transformers' Gemma RMSNorm scales by (1 + w); llama.cpp's by w
            qtype = source_tensor.tensor_type if source_tensor.tensor_type in REQUANTIZABLE else T.F16
            if float_type(name, tuple(tensor.shape)) == T.F32:
                qtype = T.F32
            shape = tuple(tensor.shape)
            data = gguf.quants.quantize(tensor.numpy(), qtype)
        else:  # a tensor of the source that the model does not hold as a parameter (rope_freqs, ...)
            if source_tensor.data is None:
                raise BitplanError(f"the artifact has no tensor for {name!r}")
            predicted += int(source_tensor.n_bytes)
            writer.add_tensor(name, np.asarray(source_tensor.data), raw_shape=None, raw_dtype=source_tensor.tensor_type)
            continue
        predicted += tensor_bytes(shape, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    return predicted, unit_rows


@register_export("gguf")
def export_gguf(artifact: Path, out: Path, inexact: str = "refuse") -> ExportReport:
    """Write ``out`` (a ``.gguf`` file) from the artifact at ``artifact``; units no GGML type holds exactly at
    their size are handled as ``inexact`` says (refused by default)."""
    if out.suffix != ".gguf":
        raise BitplanError(f"a GGUF export is one file; give --out a path ending in .gguf, got {out}")
    manifest, units, floats = read_artifact_units(artifact)
    layout = _layout(manifest, units, floats)  # the source GGUF first: without it nothing else matters
    units, inexact_rows = resolve_inexact(manifest, units, inexact)
    layout.by_unit = {gguf: [(name, units[name]) for name, _ in members] for gguf, members in layout.by_unit.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(staging, layout.arch)
    _copy_metadata(writer, layout.source, manifest)
    writer.add_file_type(file_type(units))
    predicted, unit_rows = _add_tensors(writer, layout)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        written = sum(int(t.n_bytes) for t in gguf.GGUFReader(staging).tensors)
        os.replace(staging, out)
    finally:
        if staging.exists():
            staging.unlink()
    quantized = sum(row["bytes"] for row in unit_rows)
    return ExportReport(format="gguf", path=str(out), bytes=written, predicted_bytes=predicted,
                        file_bytes=out.stat().st_size, sha256=file_hashes([out]),
                        artifact_bytes=int(manifest.achieved.bytes), units=unit_rows,
                        notes=[f"quantized units: {quantized} bytes in GGML blocks "
                               f"({8 * quantized / manifest.achieved.numel:.4f} bits per weight) against the "
                               f"artifact's {manifest.achieved.bytes} "
                               f"({manifest.achieved.bits_per_weight:.4f}): units in GGML formats keep their "
                               f"blocks byte for byte", *_inexact_notes(inexact, inexact_rows),
                               "bytes counts every tensor of the file (embeddings and norms too)"],
                        inexact=inexact_rows)


def _inexact_notes(inexact: str, rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    before, after = sum(r["artifact_bytes"] for r in rows), sum(r["bytes"] for r in rows)
    how = ("re-encoded by llama.cpp's quantizer from their dequantized weights (a second rounding)"
           if inexact == "reencode" else "written exactly in a larger type")
    return [f"{len(rows)} integer-grid units no GGML type holds exactly at their size were {how}: {before} -> "
            f"{after} bytes ({100 * (after - before) / max(before, 1):+.1f}%); see 'inexact'"]


# What a whole-file budget leaves aside for ``general.quantized_by``, the file type and tensor padding beyond the
# source file's own: the file is measured after writing, and a file over its budget is an error.
FILE_BUDGET_MARGIN = 4096


def file_overhead(source: Path, unit_names: list[str]) -> int:
    """Bytes of a GGUF written from ``source`` that are not the units' tensors (metadata, tokenizer, the other
    tensors, padding), from the source file itself plus :data:`FILE_BUDGET_MARGIN`."""
    if source.is_dir():
        return hf_file_overhead(source, unit_names)
    reader = gguf.GGUFReader(source)
    model = open_source(source)
    wanted = {model.unit_tensor(n) for n in unit_names}
    units_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name in wanted)
    return source.stat().st_size - units_bytes + FILE_BUDGET_MARGIN


def float_type(name: str, shape: tuple[int, ...]) -> T:
    """The GGML type a Hugging Face source's tensor that is no unit is written in (F32 norms and vectors, else F16),
    as :func:`_add_tensors` writes it."""
    return T.F32 if len(shape) == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")) else T.F16


def hf_file_overhead(folder: Path, unit_names: list[str]) -> int:
    """:func:`file_overhead` of a Hugging Face folder: the GGUF header as written (metadata, vocabulary, every
    tensor's info, written to a scratch file and measured), every other tensor in the type it will be written in
    with its alignment padding, an alignment's padding per unit tensor, and :data:`FILE_BUDGET_MARGIN`."""
    shapes = safetensors_shapes(folder)
    source = open_source(folder, shapes)
    by_gguf = source.tensor_shapes(shapes)
    wanted = {source.unit_tensor(n) for n in unit_names}
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        writer = gguf.GGUFWriter(path, source.arch)
        for key, value, value_type, sub_type in source.metadata:
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
        data = 0
        for tensor in source.tensors:
            shape = by_gguf[tensor.name]
            qtype = T.F16 if tensor.name in wanted else float_type(tensor.name, shape)
            size = tensor_bytes(shape, qtype)
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float16 if qtype == T.F16 else np.float32), size)
            if tensor.name not in wanted:
                data += -(-size // alignment) * alignment
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = path.stat().st_size
    return header + data + (alignment - 1) * len(wanted) + FILE_BUDGET_MARGIN


IMATRIX_FILE = "model.imatrix.gguf"  # beside the gguf target's model.gguf


class _ImatrixWriter(gguf.GGUFWriter):  # type: ignore[misc]
    def add_architecture(self) -> None:
        return None  # an importance matrix names no architecture (as llama.cpp's own files)


def write_imatrix(out: Path, source: Path, importance: dict[str, torch.Tensor], *, tokens: int, chunk_size: int,
                  dataset: str, unit_tokens: dict[str, int] | None = None) -> None:
    """The importance vectors the job's encoders used, as the GGUF importance matrix ``llama-imatrix`` writes and
    ``llama-quantize --imatrix`` reads: per weight tensor (by its name in ``source``, the GGUF the file goes
    with) ``NAME.in_sum2``, the sum over calibration tokens of each input column's square, and ``NAME.counts``,
    the number of tokens (llama.cpp divides one by the other); ``general.type`` ``imatrix``, the calibration
    text's name in ``imatrix.datasets``, its windows as chunks. An expert stack (one 3-D tensor) has one row of
    sums per expert and one count each: the tokens routed to it (``unit_tokens``, else ``tokens``)."""
    model = open_source(source, {f"{unit}.weight": (0,) for unit in importance})
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    writer = _ImatrixWriter(staging, "")
    try:
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, max(tokens // max(chunk_size, 1), 1))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        named: dict[str, list[str]] = {}
        for unit in sorted(importance, key=_expert_order):
            named.setdefault(model.unit_tensor(unit), []).append(unit)
        for name, units in sorted(named.items()):
            sums = np.stack([importance[u].detach().float().numpy().astype(np.float32) for u in units])
            counts = np.array([[(unit_tokens or {}).get(u, tokens)] for u in units], dtype=np.float32)
            writer.add_tensor(f"{name}.in_sum2", sums[0] if len(units) == 1 else sums)
            writer.add_tensor(f"{name}.counts", counts[0] if len(units) == 1 else counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    finally:
        if staging.exists():
            staging.unlink()


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An importance matrix file as llama.cpp's quantizer reads it: tensor name -> ``in_sum2 / counts``."""
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    means = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            counts = tensors[name[: -len(".in_sum2")] + ".counts"]
            means[name[: -len(".in_sum2")]] = values / (counts[0] if values.ndim == 1 else counts.reshape(-1, 1))
    return means
