"""The importance matrix beside a GGUF (``model.imatrix.gguf``): the importance vectors a job's encoders used, in
the GGUF format ``llama-imatrix`` writes and ``llama-quantize --imatrix`` reads."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import gguf
import numpy as np
import torch

from bitplan.sources.moe import expert_order
from bitplan.targets.exports.gguf_source import open_source

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
        for unit in sorted(importance, key=expert_order):
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
