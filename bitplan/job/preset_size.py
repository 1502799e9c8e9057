"""The whole-file bytes llama.cpp's quantization presets (``llama-quantize``'s ``Q4_K_M`` & co.) would make of a
GGUF model, computed without writing the file: a budget a user can name (``--size-of Q4_K_M``).

llama.cpp's own ``llama_model_quantize`` runs in dry-run mode (it reads the metadata and picks every tensor's type
by the preset's rules, and writes nothing); the type it logs for each tensor gives that tensor's exact bytes, and
the file is the source's header (the same keys: the preset only changes ``general.file_type``'s value) followed by
every tensor at the file's alignment. On the bundled SmolLM2 this equals the preset file's size exactly
(``tests/bitplan/test_preset_size.py``)."""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf

from bitplan.errors import BitplanError

# llama-quantize's presets that need no importance matrix (the IQ types do, at low bits): the choices of --size-of
SIZE_PRESETS = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
                "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# One line per tensor of the dry run: "[  3/272] blk.0.attn_k.weight - [576, 192, 1, 1], type = q4_1, size =
# 0.07 MiB -> 0.07 MiB (q5_0)"; a tensor kept as it is has no "-> ... (type)".
_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(\w+),\s+size\s*=.*?"
                          r"(?:\((\w+)\))?\s*$", re.MULTILINE)
_LOG_LOCK = threading.Lock()  # llama.cpp's log callback is process-wide


def preset_file_bytes(source: Path, preset: str) -> int:
    """Bytes of the GGUF file ``llama_model_quantize`` would write from ``source`` (a GGUF) at ``preset``, with
    llama.cpp's defaults and ``allow_requantize`` (a quantized source is re-quantized, as ``llama-quantize
    --allow-requantize`` does). Raises :class:`BitplanError` naming the presets for an unknown one."""
    if preset not in SIZE_PRESETS:
        raise BitplanError(f"unknown llama.cpp preset {preset!r}; choose one of {', '.join(SIZE_PRESETS)}",
                           param="size_of")
    reader = gguf.GGUFReader(source)  # seconds on a large vocabulary: read once
    types = preset_tensor_types(source, preset, {t.name for t in reader.tensors})
    end = int(reader.data_offset)
    for tensor in reader.tensors:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[tensor.name].upper()]]
        end = -(-end // reader.alignment) * reader.alignment + int(tensor.n_elements) // block_size * type_size
    return end


def preset_tensor_types(source: Path, preset: str, expected: set[str]) -> dict[str, str]:
    """Each tensor's GGML type name (``q4_K``, ``f32``) under ``preset``, from llama.cpp's dry run; an error unless
    every tensor of ``expected`` (the source's names) got one."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.allow_requantize = True
    params.dry_run = True
    with _captured_log() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), b"", ctypes.byref(params))
    text = "".join(lines)
    types = {m.group(1): m.group(3) or m.group(2) for m in _TENSOR_LINE.finditer(text)}
    if status != 0 or not expected <= set(types):
        raise BitplanError(f"llama.cpp could not plan the {preset} preset of {source.name} (status {status}); "
                           f"give the budget in bytes (--file-bytes) instead", param="size_of")
    return types


@contextmanager
def _captured_log() -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs (llama-cpp-python's own logger is put back after)."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))

    with _LOG_LOCK:
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
