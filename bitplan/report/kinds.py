"""The bytes of a written model by kind of tensor (attention, experts, shared experts, router, MLP, embedding,
head, norms): what a report shows so that no part of a model, a MoE model's experts above all, stays in float
without anyone seeing it. Measured from the files written: a GGUF's tensors, or a packed folder's manifest and
float tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bitplan.sources.moe import unit_kind
from bitplan.targets.artifact import safetensors_data_bytes

_GGUF_KINDS = (
    (re.compile(r"ffn_(gate|up|down)_exps"), "experts"),
    (re.compile(r"ffn_gate_inp"), "router"),
    (re.compile(r"_shexp"), "shared_experts"),
    (re.compile(r"^token_embd\."), "embedding"),
    (re.compile(r"^output\."), "head"),
    (re.compile(r"norm"), "norm"),
    (re.compile(r"\.attn_"), "attention"),
    (re.compile(r"\.ffn_"), "mlp"),
)


def gguf_kind(name: str) -> str:
    """The kind of a GGUF tensor by its name (llama.cpp's names)."""
    return next((kind for pattern, kind in _GGUF_KINDS if pattern.search(name)), "other")


def gguf_bytes_by_kind(path: Path) -> dict[str, int]:
    """Kind -> bytes of the GGUF file's tensors of that kind."""
    import gguf

    totals: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        kind = gguf_kind(tensor.name)
        totals[kind] = totals.get(kind, 0) + int(tensor.n_bytes)
    return dict(sorted(totals.items()))


def artifact_bytes_by_kind(unit_bytes: dict[str, int], float_file: Path) -> dict[str, int]:
    """Kind -> bytes of a packed folder: its units' bytes (manifest) and its float tensors."""
    totals: dict[str, int] = {}
    for name, size in [*unit_bytes.items(), *safetensors_data_bytes(float_file).items()]:
        kind = unit_kind(name)
        totals[kind] = totals.get(kind, 0) + size
    return dict(sorted(totals.items()))


def written_bytes_by_kind(folder: Path) -> dict[str, int] | None:
    """Kind -> bytes of what a run wrote in ``folder``: its GGUF when it has one, else its packed files (``None``
    for a folder with neither)."""
    if (folder / "model.gguf").is_file():
        return gguf_bytes_by_kind(folder / "model.gguf")
    manifest, floats = folder / "manifest.json", folder / "float.safetensors"
    if not (manifest.is_file() and floats.is_file()):
        return None
    units = json.loads(manifest.read_text()).get("units") or []
    return artifact_bytes_by_kind({unit["name"]: int(unit["bytes"]) for unit in units}, floats)
