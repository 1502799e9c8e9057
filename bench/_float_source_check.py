"""The checks of ``bench/float_source.py`` (issue 42, item 1): does the rotated file compute the source's function in
llama.cpp, and does any block of it still lie on the source's grid. Loaded with
``_own_folder_off_path.sibling("_float_source_check")``; ``float_source`` re-exports what its tests call.

Grid detectors, per 32-block of every tensor the source stored in a quantized type:

- ``exact``: re-encoding the block to the source's type and decoding it gives it back bit for bit (gguf-py's
  encoder where it has one, as for Q4_1, else llama.cpp's own ``ggml_quantize_chunk`` without importance, as for
  the K-quants). A weak detector: a block that does not use both end levels gets another scale, and an F16 copy
  rounds ``d q + m``.
- ``at_most_levels``: the block holds at most as many distinct values as the type's grid has levels in a 32-block
  (16 for the 4-bit types, Q4_K's 32-sub-blocks included; 32 for the 5-bit ones). Necessary for lying on any such
  grid, whatever its scales and minimums, and blind to F16 rounding. Not defined for Q6_K (64 levels, 16-blocks)
  and 8-bit types, whose 32-blocks can hold any 32 values.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import gguf
import numpy
import torch

from bitplan.sources.models import load_model

SEQ_LEN = 512
BLOCK = 32  # the grids' block: Q4_0/Q4_1/Q5_x, and the sub-block of Q4_K and Q5_K
T = gguf.GGMLQuantizationType
GRID_LEVELS = {T.Q4_0: 16, T.Q4_1: 16, T.Q4_K: 16, T.Q5_0: 32, T.Q5_1: 32, T.Q5_K: 32}  # values a 32-block can hold
PLAIN = (T.F32, T.F16, T.BF16)


def dequantized(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's order: ``(ne1, ne0)`` = ``(out, in)`` for a matrix (gguf-py's reader
    gives ``data`` in numpy order, ``shape`` in ggml's reversed order)."""
    return torch.from_numpy(numpy.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=numpy.float32))


def _reencoded(values: numpy.ndarray, qtype: gguf.GGMLQuantizationType) -> numpy.ndarray:
    """``values (rows, cols) float32`` encoded to ``qtype`` and decoded again (gguf-py where it can, else
    llama.cpp's ``ggml_quantize_chunk``)."""
    try:
        return gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
    except NotImplementedError:
        from bitplan.quantizer.ggml import dequantize_ggml, quantize_ggml

        return dequantize_ggml(quantize_ggml(torch.from_numpy(values), qtype), qtype).numpy()


def grid_blocks(weights: numpy.ndarray, qtype: gguf.GGMLQuantizationType) -> dict[str, int | None]:
    """How many ``BLOCK``-blocks of ``weights (rows, cols) float32`` lie on ``qtype``'s grid (the module docstring's
    ``exact`` and ``at_most_levels``, ``None`` where undefined), and ``blocks`` in all."""
    values = numpy.ascontiguousarray(weights, dtype=numpy.float32)
    blocks = values.reshape(-1, BLOCK)
    exact = (_reencoded(values, qtype).reshape(-1, BLOCK) == blocks).all(axis=1)
    levels = None
    if qtype in GRID_LEVELS:
        distinct = 1 + (numpy.diff(numpy.sort(blocks, axis=1), axis=1) != 0).sum(axis=1)
        levels = int((distinct <= GRID_LEVELS[qtype]).sum())
    return {"exact": int(exact.sum()), "at_most_levels": levels, "blocks": len(blocks)}


def quantized_tensors(source: Path) -> dict[str, gguf.GGMLQuantizationType]:
    """Name -> type of every tensor ``source`` stores in a quantized type (the grids a copy could still lie on)."""
    return {t.name: t.tensor_type for t in gguf.GGUFReader(source).tensors if t.tensor_type not in PLAIN}


def grid_report(path: Path, types: Mapping[str, gguf.GGMLQuantizationType]) -> dict[str, dict[str, object]]:
    """``grid_blocks`` of the tensors ``types`` names (name -> the source's type) in the GGUF at ``path``, summed
    per source type: counts and fractions, and the levels that ``at_most_levels`` allows."""
    totals: dict[str, dict[str, object]] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name not in types:
            continue
        qtype = types[tensor.name]
        total = totals.setdefault(qtype.name, {"tensors": 0, "blocks": 0, "exact": 0, "at_most_levels": None,
                                               "levels": GRID_LEVELS.get(qtype)})
        counts = grid_blocks(dequantized(tensor).numpy(), qtype)
        total["tensors"] += 1
        total["blocks"] += counts["blocks"]
        total["exact"] += counts["exact"]
        if counts["at_most_levels"] is not None:
            total["at_most_levels"] = (total["at_most_levels"] or 0) + counts["at_most_levels"]
    for total in totals.values():
        total["exact_fraction"] = total["exact"] / total["blocks"]
        if total["at_most_levels"] is not None:
            total["at_most_levels_fraction"] = total["at_most_levels"] / total["blocks"]
    return totals


@contextlib.contextmanager
def plain_cpu_buffers() -> Iterator[None]:
    """Models loaded inside run without llama.cpp's extra CPU buffers, as bitplan loads them
    (:func:`bitplan.report.llama_runtime.plain_cpu_buffers`: llama-cpp-python 0.3.36 built on this AVX512/AMX machine
    segfaults in ``llama_decode`` on the Q4_1 SmolLM2 with them)."""
    from bitplan.report.llama_runtime import plain_cpu_buffers as without_extra_buffers

    without_extra_buffers()
    yield


def evaluation_windows(model: Path, text: str, count: int) -> list[list[int]]:
    """``count`` consecutive windows of ``SEQ_LEN`` tokens from the start of ``text`` (rows joined by a blank line,
    as ``tokenize_for_perplexity``), tokenized by llama.cpp's own tokenizer of ``model``, no BOS added."""
    import llama_cpp

    joined = "\n\n".join(text.splitlines())[: count * SEQ_LEN * 16]  # well over 512 tokens per window of prose
    with plain_cpu_buffers():  # vocab_only=True segfaults in llama-cpp-python 0.3.36 here
        runtime = llama_cpp.Llama(model_path=str(model), n_ctx=SEQ_LEN, verbose=False)
    ids = runtime.tokenize(joined.encode(), add_bos=False, special=False)
    runtime.close()
    if len(ids) < count * SEQ_LEN:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {count} windows of {SEQ_LEN}")
    return [ids[i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in range(count)]


def llama_cpp_logits(path: Path, windows: list[list[int]], threads: int) -> Iterator[numpy.ndarray]:
    """Each window's logits ``(SEQ_LEN, vocab) float32`` as llama.cpp computes them from the GGUF at ``path``."""
    import llama_cpp

    with plain_cpu_buffers():
        runtime = llama_cpp.Llama(model_path=str(path), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, logits_all=True,
                                  n_threads=threads, verbose=False)
    for window in windows:
        runtime.reset()
        runtime.eval(window)
        yield numpy.array(runtime.scores[: len(window)], dtype=numpy.float32)
    runtime.close()


@torch.no_grad()
def torch_logits(path: Path, windows: list[list[int]]) -> Iterator[numpy.ndarray]:
    """Each window's logits ``(SEQ_LEN, vocab) float32`` from the GGUF dequantized to float32 by transformers and run
    by torch: the function the file's weights define, without llama.cpp's 8-bit activations in quantized products."""
    model = load_model(str(path)).model.float().eval()
    for window in windows:
        yield model(torch.tensor([window])).logits[0].float().numpy()


def compare_logits(reference: list[numpy.ndarray], candidate: Iterator[numpy.ndarray]) -> dict[str, float]:
    """Per-token ``KL(reference || candidate)`` in nats (float64 softmax), its mean and max, and top-1 agreement."""
    kls, agree = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        ref_lp = torch.log_softmax(torch.from_numpy(ref).double(), dim=-1)
        cand_lp = torch.log_softmax(torch.from_numpy(cand).double(), dim=-1)
        kls.append((ref_lp.exp() * (ref_lp - cand_lp)).sum(dim=-1))
        agree.append(ref_lp.argmax(dim=-1) == cand_lp.argmax(dim=-1))
    every, same = torch.cat(kls), torch.cat(agree)
    return {"kl_mean": float(every.mean()), "kl_max": float(every.max()), "top1_agreement": float(same.double().mean()),
            "tokens": int(every.numel())}


def check(source: Path, rotated: Path, control: Path, *, text: str, windows: int, threads: int) -> dict[str, object]:
    """On ``windows`` windows of ``text``, llama.cpp's KL of the rotated file and of the unrotated F16 control against
    the source file; the rotated file against the control (both F16: what the rotation alone costs); and all three
    files run by llama.cpp against the source's float32 function run by torch (``torch_logits``)."""
    started = time.perf_counter()
    tokens = evaluation_windows(source, text, windows)
    reference, control_logits, rotated_logits = (list(llama_cpp_logits(path, tokens, threads))
                                                 for path in (source, control, rotated))
    report: dict[str, object] = {
        "rotated_vs_source": compare_logits(reference, iter(rotated_logits)),
        "unrotated_f16_vs_source": compare_logits(reference, iter(control_logits)),
        "rotated_vs_unrotated_f16": compare_logits(control_logits, iter(rotated_logits)),
    }
    exact = list(torch_logits(source, tokens))
    for name, logits in (("source", reference), ("unrotated_f16", control_logits), ("rotated", rotated_logits)):
        report[f"{name}_vs_torch_float32_source"] = compare_logits(exact, iter(logits))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
