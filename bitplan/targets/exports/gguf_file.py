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

The blocks themselves are made in :mod:`bitplan.targets.exports.gguf_blocks`; the importance matrix written beside
the file, in :mod:`bitplan.targets.exports.imatrix`.
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
from bitplan.hashing import sha256_file
from bitplan.quantizer.formats import GgmlWeight
from bitplan.quantizer.rtn import QuantizedWeight
from bitplan.sources.models import resolve_reference
from bitplan.sources.moe import expert_order
from bitplan.targets.exports.common import ExportReport, file_hashes, read_artifact_units, register_export
from bitplan.targets.exports.gguf_blocks import (  # noqa: F401 - every block name stays importable from here
    BLOCK,
    INEXACT,
    REENCODE_TYPES,
    T,
    encode_q4_1,
    encode_q5_1,
    encode_unit,
    permute_rows_for_llama,
    reencode_type,
    resolve_inexact,
    tensor_bytes,
    unit_type,
)
from bitplan.targets.exports.gguf_source import GgufSource, SourceTensor, expert_slice, open_source, safetensors_shapes
from bitplan.targets.exports.imatrix import IMATRIX_FILE, read_imatrix, write_imatrix  # noqa: F401 - re-exported
from bitplan.targets.manifest import Manifest

REQUANTIZABLE = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                 gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                 gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q5_1}
NORM_PLUS_ONE = ("gemma2", "gemma3")  # transformers' GGUF loader takes 1 from their norm weights: put it back


def source_model(manifest: Manifest) -> Path:
    """The model the artifact was made from, whose metadata and tokenizer a GGUF of it takes: a GGUF file or a
    Hugging Face folder (:mod:`bitplan.targets.exports.gguf_source`), unchanged since (its sha256)."""
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
    for name in sorted(units, key=expert_order):
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
