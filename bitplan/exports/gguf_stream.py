"""A GGUF file written tensor by tensor from a lazy Hugging Face folder: the header and every tensor's info
first (types and sizes follow from the plan), then each tensor's data as it is encoded, one block's weights in
memory at a time. What :func:`bitplan.exports.gguf_file.export_gguf` writes from a packed artifact, without the
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
from bitplan.exports.gguf_file import (
    FILE_TYPES,
    NORM_PLUS_ONE,
    file_type_of,
    float_type,
    permute_rows_for_llama,
    tensor_bytes,
)
from bitplan.exports.gguf_source import GgufSource, open_source
from bitplan.quantizer.formats import GgmlWeight
from bitplan.sources.lazy import LazyModel

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
    hf_of = {source.gguf_name(name): name for name in shapes}
    unit_of = {source.unit_tensor(unit): unit for unit in chosen}
    missing = [unit for gguf_name, unit in unit_of.items() if gguf_name is None or gguf_name not in hf_of]
    if missing:
        raise BitplanError(f"the source has no GGUF tensor for units {missing[:3]}")
    plan = []
    for tensor in source.tensors:
        hf_name = hf_of[tensor.name]
        shape = shapes[hf_name]
        qtype = T[chosen[unit_of[tensor.name]]] if tensor.name in unit_of else float_type(tensor.name, shape)
        plan.append((tensor.name, hf_name, shape, qtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(staging, source.arch)
    try:
        _header(writer, source, chosen, plan)
        rows = _tensors(writer, lazy, source, plan, unit_of, encode, stack_name, on_tensor)
        writer.close()
        os.replace(staging, out)
    finally:
        if staging.exists():
            staging.unlink()
    return StreamedGguf(path=out, file_bytes=out.stat().st_size, unit_bytes=sum(r["bytes"] for r in rows),
                        units=rows)


def _header(writer: Any, source: GgufSource, chosen: dict[str, str],
            plan: list[tuple[str, str, tuple[int, ...], T]]) -> None:
    for key, value, value_type, sub_type in source.metadata:
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    writer.add_string("general.quantized_by", "bitplan (streamed)")
    writer.add_file_type(file_type_of([(qtype.name, shape) for _, _, shape, qtype in plan if qtype.name in FILE_TYPES]))
    for name, _, shape, qtype in plan:
        if qtype in (T.F32, T.F16):
            dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, tensor_bytes(shape, qtype))
        else:
            writer.add_tensor_info(name, gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                                   tensor_bytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _tensors(writer: Any, lazy: LazyModel, source: GgufSource, plan: list[tuple[str, str, tuple[int, ...], T]],
             unit_of: dict[str, str], encode: EncodeFn, stack_name: str,
             on_tensor: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    """Each tensor's data in the file's order; a unit's block is materialized while its tensors are written."""
    modules = dict(lazy.model.named_modules())
    open_block: str | None = None
    rows = []
    try:
        for index, (name, hf_name, shape, qtype) in enumerate(plan):
            if name in unit_of:
                unit = unit_of[name]
                block = _block_prefix(unit, stack_name)
                if block != open_block:
                    if open_block is not None:
                        lazy.release(modules[open_block])
                    lazy.materialize(block, modules[block])
                    open_block = block
                encoded = encode(unit, modules[unit].weight.detach().float())
                if encoded.qtype != qtype.name:
                    raise BitplanError(f"{unit} was encoded as {encoded.qtype}, planned as {qtype.name}")
                payload = encoded.payload
                kind = name.split(".")[-2]
                if source.arch == "llama" and kind in source.heads:
                    payload = permute_rows_for_llama(torch.from_numpy(payload), source.heads[kind]).numpy()
                data = np.ascontiguousarray(payload)
                rows.append({"name": unit, "gguf_name": name, "type": qtype.name, "bytes": int(data.nbytes)})
            else:
                tensor = lazy.store.get(hf_name).float()
                if source.arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
                    tensor = tensor + 1  # transformers' Gemma RMSNorm scales by (1 + w); llama.cpp's by w
                data = gguf.quants.quantize(tensor.numpy(), qtype)
            if data.nbytes != tensor_bytes(shape, qtype):
                raise BitplanError(f"{name}: {data.nbytes} bytes against the {tensor_bytes(shape, qtype)} planned")
            writer.write_tensor_data(data)
            if on_tensor is not None:
                on_tensor(index + 1, len(plan))
    finally:
        if open_block is not None:
            lazy.release(modules[open_block])
    return rows


def _block_prefix(unit: str, stack_name: str) -> str:
    prefix = stack_name + "."
    if not unit.startswith(prefix):
        raise BitplanError(f"unit {unit!r} is outside the block stack {stack_name!r}")
    return prefix + unit[len(prefix):].split(".")[0]
