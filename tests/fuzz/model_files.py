"""Mutations of valid tiny model files (safetensors and GGUF): header lengths, offsets, shapes, dtypes, counts,
truncation and flipped bytes. Shared by the CI fuzz test and ``bench/fuzz_models.py``'s long run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

HEADER_FIELDS = ("data_offsets", "shape", "dtype")
WEIRD_INTS = st.one_of(st.integers(-2**63, 2**64), st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 10**30]))


def safetensors_mutation() -> st.SearchStrategy:
    """A function ``bytes -> bytes`` mutating a safetensors file."""
    return st.one_of(
        st.tuples(st.just("header_length"), WEIRD_INTS),
        st.tuples(st.just("field"), st.sampled_from(HEADER_FIELDS), st.integers(0, 50),
                  st.one_of(WEIRD_INTS, st.lists(WEIRD_INTS, max_size=4), st.text(max_size=8))),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
        st.tuples(st.just("duplicate"), st.integers(0, 50)),
    )


def mutate_safetensors(raw: bytes, mutation: tuple) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    names = sorted(n for n in header if n != "__metadata__")
    kind = mutation[0]
    if kind == "header_length":
        return struct.pack("<Q", mutation[1] % 2**64) + raw[8:]
    if kind in ("truncate", "flip"):
        return _byte_mutation(raw, mutation)
    if kind == "field":
        header[names[mutation[2] % len(names)]][mutation[1]] = mutation[3]
    if kind == "duplicate":
        source = names[mutation[1] % len(names)]
        header[source + ".copy"] = dict(header[source])
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def write_tiny_gguf(path: Path) -> None:
    """A small valid GGUF (llama metadata, two tensors) written with the gguf package."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((16, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_mutation() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
        st.tuples(st.just("u64"), st.sampled_from([8, 16]), WEIRD_INTS),  # tensor count, metadata count
        st.tuples(st.just("splice"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    )


def _byte_mutation(raw: bytes, mutation: tuple) -> bytes:
    """``("truncate", where)`` or ``("flip", where, xor mask)``, ``where`` a fraction of the file."""
    if mutation[0] == "truncate":
        return raw[: int(len(raw) * mutation[1])]
    position = min(int(len(raw) * mutation[1]), len(raw) - 1)
    return raw[:position] + bytes([raw[position] ^ mutation[2]]) + raw[position + 1:]


def mutate_gguf(raw: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind in ("truncate", "flip"):
        return _byte_mutation(raw, mutation)
    if kind == "u64":
        return raw[: mutation[1]] + struct.pack("<Q", mutation[2] % 2**64) + raw[mutation[1] + 8:]
    position = int(len(raw) * mutation[1])
    return raw[:position] + mutation[2] + raw[position + len(mutation[2]):]
