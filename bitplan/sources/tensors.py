"""Tensor stores: read one named tensor when asked, in the dtype it is stored in.

:class:`SafetensorsStore` reads a folder's shards (``model.safetensors`` or ``model-0000N-of-0000M.safetensors``,
with or without an index) one tensor at a time, at the byte range its header gives, so a model larger than memory
is never held whole. It reads rather than memory-maps: the pages of a mapping count toward the process's
resident memory until unmapped, so a pass over every shard would look (and, under pressure, act) like a whole
load. :class:`LoadedTensors` serves the
tensors of a model already in memory (a GGUF source, dequantized by transformers) through the same interface.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from bitplan.errors import ModelReferenceError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class TensorStore(Protocol):
    """Named tensors read on demand."""

    def names(self) -> list[str]:
        """Every tensor name the store holds."""

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header alone."""

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the tensor is stored in."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor, in its stored dtype, on the CPU (a copy the caller owns)."""


class SafetensorsStore:
    """The tensors of one or more safetensors files, each read at its byte range when asked."""

    def __init__(self, files: list[Path]) -> None:
        if not files:
            raise ModelReferenceError("no .safetensors files to read")
        self._where: dict[str, Path] = {}
        self._header: dict[str, dict[str, object]] = {}
        for path in files:
            for name, entry in _header(path).items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise ModelReferenceError(f"tensor {name!r} is in both {self._where[name].name} and {path.name}")
                self._where[name] = path
                self._header[name] = entry  # type: ignore[assignment]
        self._data_start = {path: _data_start(path) for path in files}

    @classmethod
    def of_folder(cls, folder: Path) -> SafetensorsStore:
        """The store of a Hugging Face folder: the shards its index names, else every ``*.safetensors``."""
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({folder / shard for shard in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        return cls(files)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._entry(name)["shape"])  # type: ignore[union-attr]

    def dtype(self, name: str) -> torch.dtype:
        code = str(self._entry(name)["dtype"])
        if code not in _DTYPES:
            raise ModelReferenceError(f"tensor {name!r} has dtype {code}, which bitplan does not read")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise KeyError(name)
        start, end = (int(v) for v in self._entry(name)["data_offsets"])  # type: ignore[union-attr]
        data = bytearray(end - start)
        with path.open("rb", buffering=0) as handle:
            handle.seek(self._data_start[path] + start)
            if handle.readinto(data) != len(data):
                raise ModelReferenceError(f"{path.name}: tensor {name!r} is cut short")
        if not data:
            return torch.empty(self.shape(name), dtype=self.dtype(name))
        return torch.frombuffer(data, dtype=self.dtype(name)).reshape(self.shape(name))

    def _entry(self, name: str) -> dict[str, object]:
        entry = self._header.get(name)
        if entry is None:
            raise KeyError(name)
        return entry


class LoadedTensors:
    """A model already in memory served as a tensor store (its parameters and persistent buffers, by name)."""

    def __init__(self, model: nn.Module) -> None:
        self._tensors: Mapping[str, torch.Tensor] = dict(model.state_dict(keep_vars=False))

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)


def _data_start(path: Path) -> int:
    """Where a safetensors file's data section starts: after the 8-byte size and the header."""
    with path.open("rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def _header(path: Path) -> dict[str, object]:
    """A safetensors file's JSON header (checked by :func:`bitplan.sources.models.validate_safetensors_header`
    first)."""
    from bitplan.sources.models import validate_safetensors_header

    validate_safetensors_header(path)
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size))  # type: ignore[no-any-return]
