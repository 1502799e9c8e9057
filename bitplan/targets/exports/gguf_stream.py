"""A GGUF file written tensor by tensor from a lazy Hugging Face folder: the header and every tensor's info
first (types and sizes follow from the plan), then each tensor's data as it is encoded, one block's weights in
memory at a time. What :func:`bitplan.targets.exports.gguf_file.export_gguf` writes from a packed artifact, without the
packed artifact and without the whole model.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from bitplan.errors import BitplanError
from bitplan.quantizer.formats import GgmlWeight
from bitplan.sources.lazy import LazyModel
from bitplan.targets.exports.gguf_file import (
    FILE_TYPES,
    NORM_PLUS_ONE,
    file_type_of,
    float_type,
    permute_rows_for_llama,
    tensor_bytes,
)
from bitplan.targets.exports.gguf_source import GgufSource, open_source

EncodeFn = Callable[[str, torch.Tensor], GgmlWeight]  # (unit name, float32 weight) -> its chosen GGML encoding


@dataclass
class StreamedGguf:
    """What was written: the file, its bytes, the unit tensors' bytes, and one row per unit."""

    path: Path
    file_bytes: int
    unit_bytes: int
    units: list[dict[str, Any]] = field(default_factory=list)


def write_gguf_streamed(lazy: LazyModel, folder: Path, out: Path, *, chosen: dict[str, str], encode: EncodeFn,
                        stack_name: str, on_tensor: Callable[[int, int], None] | None = None) -> StreamedGguf:
    """Write ``out`` from the lazy model of the Hugging Face folder ``folder``: each unit (a module name in
    ``chosen``, which gives its GGML type) encoded by ``encode`` while its block is materialized, every other
    tensor read from the store and written as :func:`float_type` says. The file appears whole or not at all."""
    shapes = {name: lazy.store.shape(name) for name in lazy.store.names()}
    source = open_source(folder, shapes)
    members = source.sources_of(shapes)
    stacked = source.tensor_shapes(shapes)
    units_of = _units_by_tensor(source, chosen, members)
    plan = []
    for tensor in source.tensors:
        units = units_of.get(tensor.name, [])
        shape = stacked[tensor.name]
        qtype = T[chosen[units[0]]] if units else float_type(tensor.name, shape)
        plan.append(PlannedTensor(tensor.name, members[tensor.name], shape, qtype, units))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(staging, source.arch)
    try:
        _header(writer, source, chosen, plan)
        rows = _tensors(writer, lazy, source, plan, encode, stack_name, on_tensor)
        writer.close()
        os.replace(staging, out)
    finally:
        if staging.exists():
            staging.unlink()
    return StreamedGguf(path=out, file_bytes=out.stat().st_size, unit_bytes=sum(r["bytes"] for r in rows),
                        units=rows)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its name, the checkpoint tensors it holds (an expert stack's, in expert order),
    its shape (rows first), its GGML type and the units encoded into it (none for a float tensor)."""

    name: str
    hf_names: list[str]
    shape: tuple[int, ...]
    qtype: T
    units: list[str]


def _units_by_tensor(source: GgufSource, chosen: dict[str, str],
                     members: dict[str, list[str]]) -> dict[str, list[str]]:
    """GGUF tensor name -> the units it holds, in the order of its checkpoint tensors; a stack's units must be
    all of its experts, in one type."""
    units_of: dict[str, list[str]] = {}
    for unit in chosen:
        name = source.unit_tensor(unit)
        if name is None or name not in members:
            raise BitplanError(f"the source has no GGUF tensor for unit {unit!r}")
        units_of.setdefault(name, []).append(unit)
    for name, units in units_of.items():
        order = {hf_name.removesuffix(".weight"): index for index, hf_name in enumerate(members[name])}
        if sorted(units, key=lambda u: order.get(u, -1)) != [h.removesuffix(".weight") for h in members[name]]:
            raise BitplanError(f"{name} holds {len(members[name])} checkpoint tensors, but the units "
                               f"{units[:3]} do not match them one for one (a stack takes all its experts)")
        units.sort(key=order.__getitem__)
        if len({chosen[unit] for unit in units}) > 1:
            raise BitplanError(f"the experts of {name} were given different types; llama.cpp stores them as one "
                               "tensor of one type (tie them)")
    return units_of


def _header(writer: Any, source: GgufSource, chosen: dict[str, str], plan: list[PlannedTensor]) -> None:
    for key, value, value_type, sub_type in source.metadata:
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    writer.add_string("general.quantized_by", "bitplan (streamed)")
    writer.add_file_type(file_type_of([(t.qtype.name, t.shape) for t in plan if t.qtype.name in FILE_TYPES]))
    for tensor in plan:
        shape, qtype = tensor.shape, tensor.qtype
        if qtype in (T.F32, T.F16):
            dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
            writer.add_tensor_info(tensor.name, shape, dtype, tensor_bytes(shape, qtype))
        else:
            writer.add_tensor_info(tensor.name, gguf.quants.quant_shape_to_byte_shape(shape, qtype),
                                   np.dtype(np.uint8), tensor_bytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _tensors(writer: Any, lazy: LazyModel, source: GgufSource, plan: list[PlannedTensor], encode: EncodeFn,
             stack_name: str, on_tensor: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    """Each tensor's data in the file's order; a unit's block is materialized while its tensors are written."""
    modules = dict(lazy.model.named_modules())
    open_block: list[str | None] = [None]
    rows: list[dict[str, Any]] = []
    try:
        for index, tensor in enumerate(plan):
            if tensor.units:
                data = _encoded(tensor, lazy, modules, source, encode, stack_name, open_block, rows)
            else:
                data = _float_data(tensor, lazy, source)
            if data.nbytes != tensor_bytes(tensor.shape, tensor.qtype):
                raise BitplanError(f"{tensor.name}: {data.nbytes} bytes against the "
                                   f"{tensor_bytes(tensor.shape, tensor.qtype)} planned")
            writer.write_tensor_data(data)
            if on_tensor is not None:
                on_tensor(index + 1, len(plan))
    finally:
        if open_block[0] is not None:
            lazy.release(modules[open_block[0]])
    return rows


def _encoded(tensor: PlannedTensor, lazy: LazyModel, modules: dict[str, Any], source: GgufSource,
             encode: EncodeFn, stack_name: str, open_block: list[str | None],
             rows: list[dict[str, Any]]) -> np.ndarray:
    """The blocks of ``tensor``'s units (an expert stack's one after another, as llama.cpp lays out a 3-D
    tensor), their block materialized (``open_block`` holds the one that is)."""
    block = _block_prefix(tensor.units[0], stack_name)
    if block != open_block[0]:
        if open_block[0] is not None:
            lazy.release(modules[open_block[0]])
        lazy.materialize(block, modules[block])
        open_block[0] = block
    payloads = []
    kind = tensor.name.split(".")[-2]
    for unit in tensor.units:
        encoded = encode(unit, modules[unit].weight.detach().float())
        if encoded.qtype != tensor.qtype.name:
            raise BitplanError(f"{unit} was encoded as {encoded.qtype}, planned as {tensor.qtype.name}")
        payload = encoded.payload
        if source.arch == "llama" and kind in source.heads:
            payload = permute_rows_for_llama(torch.from_numpy(payload), source.heads[kind]).numpy()
        payloads.append(np.ascontiguousarray(payload))
        rows.append({"name": unit, "gguf_name": tensor.name, "type": tensor.qtype.name,
                     "bytes": int(payload.nbytes)})
    return payloads[0] if len(payloads) == 1 else np.concatenate(payloads, axis=0)


def _float_data(tensor: PlannedTensor, lazy: LazyModel, source: GgufSource) -> np.ndarray:
    """A tensor that is no unit, read from the store (an expert stack's tensors stacked) and converted."""
    parts = [lazy.store.get(hf_name).float() for hf_name in tensor.hf_names]
    value = parts[0] if len(parts) == 1 else torch.stack(parts)
    if source.arch in NORM_PLUS_ONE and tensor.name.endswith("norm.weight"):
        value = value + 1  # transformers' Gemma RMSNorm scales by (1 + w); llama.cpp's by w
    return gguf.quants.quantize(value.numpy(), tensor.qtype)  # type: ignore[no-any-return]


def _block_prefix(unit: str, stack_name: str) -> str:
    prefix = stack_name + "."
    if not unit.startswith(prefix):
        raise BitplanError(f"unit {unit!r} is outside the block stack {stack_name!r}")
    return prefix + unit[len(prefix):].split(".")[0]
