"""A float source with every weight off every grid: the bundled GGUF's function, rotated (issue 42, item 1).

The bundled SmolLM2's weights lie on Q4_1's grid (the file is Q4_1), which flatters any quantizer that finds that
grid again. This script writes an F16 GGUF that computes the same function with no weight on a grid, by the
computational invariance of RMSNorm models (QuaRot, Ashkboos et al. 2024, sec. 4; SpinQuant, Liu et al. 2024): with
the residual stream rotated by an orthogonal ``Q`` (``x -> x Q``, ``x`` a row vector, ``y = x W^T``),

    RMSNorm scales g folded into their readers:  W_in  -> (W_in diag(g)) Q   (q/k/v, gate/up, the head), g -> 1
    writers of the residual:                     W_out -> Q^T W_out           (o_proj, down_proj; a bias b -> b Q)
    token embedding:                             E     -> E Q
    a tied head is untied:                       output = (E diag(g_final)) Q

RMSNorm without a weight commutes with ``Q`` (``||x Q|| = ||x||``, the same eps), so every logit is unchanged up
to float rounding. ``Q`` is the QR factor of a seeded Gaussian with the signs of ``R``'s diagonal moved into it
(Haar-distributed, reproducible); all rotation arithmetic is float64. Reader biases (Qwen2's q/k/v) are unchanged.
llama.cpp stores q/k rows permuted for RoPE; a rotation acts on the columns only, so the permutation is untouched.

Then llama.cpp itself (llama-cpp-python) scores the rotated file against the source on ``--check-windows``
windows of 512 WikiText-2 tokens (per-token KL(source || rotated), mean and max, top-1 agreement), next to an
unrotated F16 copy of the dequantized source (the noise floor of F16 against Q4_1 in llama.cpp), and counts the
32-blocks of every tensor the source stored quantized (Q4_1, Q4_K, Q6_K, ...) that still lie on that type's grid
(``bench/_float_source_check.py``). Prints one JSON object.

    python bench/float_source.py --model smollm2-135m --out DIR [--seed 0] [--check-windows 4]
    python bench/float_source.py --model path/to/qwen2.5-1.5b.gguf --out DIR   # llama and qwen2 GGUFs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import gguf
import numpy
import torch

from bitplan.hashing import sha256_file
from bitplan.sources.calibration import builtin_text, read_text
from bitplan.sources.models import BUNDLED_MODELS, resolve_reference

logger = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
ARCHITECTURES = ("llama", "qwen2")  # RMSNorm before attention and MLP, no sandwich norms (Gemma is out of scope)
_check = _own_folder_off_path.sibling("_float_source_check")
# the checks, re-exported: tests/integration/test_float_source.py calls them through this module
check, compare_logits, evaluation_windows = _check.check, _check.compare_logits, _check.evaluation_windows
grid_report, llama_cpp_logits, quantized_tensors = _check.grid_report, _check.llama_cpp_logits, _check.quantized_tensors
SEQ_LEN = _check.SEQ_LEN


class Role(str, Enum):
    """What a tensor does to the residual stream, which decides how the rotation changes it."""

    EMBEDDING = "embedding"  # rows are residual vectors: E Q
    READER = "reader"  # reads a normed residual: (W diag(g)) Q
    WRITER = "writer"  # adds to the residual: Q^T W
    WRITER_BIAS = "writer-bias"  # b Q
    NORM = "norm"  # folded into its readers: ones
    UNCHANGED = "unchanged"  # reader biases


@dataclass(frozen=True)
class Naming:
    """Tensor names of one checkpoint convention; ``{i}`` in ``layer`` is the block index."""

    embedding: str
    head: str
    final_norm: str
    layer: str
    attn_norm: str
    attn_readers: tuple[str, ...]
    attn_writer: str
    mlp_norm: str
    mlp_readers: tuple[str, ...]
    mlp_writer: str


GGUF_NAMING = Naming("token_embd.weight", "output.weight", "output_norm.weight", "blk.{i}.", "attn_norm",
                     ("attn_q", "attn_k", "attn_v"), "attn_output", "ffn_norm", ("ffn_gate", "ffn_up"), "ffn_down")
HF_NAMING = Naming("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.{i}.",
                   "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "self_attn.o_proj", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")


@dataclass(frozen=True)
class Placement:
    """A tensor's role and, for a reader, the name of the norm whose scale folds into it."""

    role: Role
    norm: str | None = None


def residual_layout(names: list[str], naming: Naming) -> dict[str, Placement]:
    """Every tensor's placement, the head included (added when the checkpoint ties it to the embedding).

    Raises ``ValueError`` naming the tensors the convention does not place (another architecture's tensors)."""
    layout = {naming.embedding: Placement(Role.EMBEDDING), naming.final_norm: Placement(Role.NORM),
              naming.head: Placement(Role.READER, naming.final_norm)}
    layer = re.compile(re.escape(naming.layer).replace(re.escape("{i}"), r"(\d+)"))
    for index in sorted({int(m.group(1)) for m in map(layer.match, names) if m}):
        prefix = naming.layer.format(i=index)
        for norm, readers, writer in ((naming.attn_norm, naming.attn_readers, naming.attn_writer),
                                      (naming.mlp_norm, naming.mlp_readers, naming.mlp_writer)):
            layout[f"{prefix}{norm}.weight"] = Placement(Role.NORM)
            layout.update({f"{prefix}{r}.weight": Placement(Role.READER, f"{prefix}{norm}.weight") for r in readers})
            layout.update({f"{prefix}{r}.bias": Placement(Role.UNCHANGED) for r in readers})
            layout[f"{prefix}{writer}.weight"] = Placement(Role.WRITER)
            layout[f"{prefix}{writer}.bias"] = Placement(Role.WRITER_BIAS)
    unknown = sorted(set(names) - set(layout))
    if unknown:
        raise ValueError(f"no residual-stream role for {len(unknown)} tensors ({', '.join(unknown[:5])}): only "
                         f"pre-norm RMSNorm models with separate q/k/v and gate/up ({', '.join(ARCHITECTURES)}) "
                         "can be rotated; extend Naming for another layout")
    missing = sorted(n for n, p in layout.items() if p.role not in (Role.UNCHANGED, Role.WRITER_BIAS)
                     and n not in names and n != naming.head)
    if missing:
        raise ValueError(f"incomplete checkpoint: {len(missing)} tensors missing ({', '.join(missing[:5])})")
    return {name: placement for name, placement in layout.items() if name in names or name == naming.head}


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal ``(size, size) float64`` matrix: QR of a seeded Gaussian, signs of diag(R) into Q."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotate_tensor(tensor: torch.Tensor, placement: Placement, *, rotation: torch.Tensor,
                  norm_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of the rotated model, float64.

    Args:
        tensor: ``(out, in)`` for a matrix (``y = x W^T``), ``(vocab, hidden)`` for the embedding, ``(n,)`` otherwise.
        placement: its role (and norm, for a reader).
        rotation: ``Q (hidden, hidden) float64``, orthogonal.
        norm_scale: ``g (hidden,)``, the scale of the norm a reader reads (required for a reader).
    """
    weight = tensor.to(torch.float64)
    if placement.role is Role.EMBEDDING:
        return weight @ rotation
    if placement.role is Role.READER:
        if norm_scale is None:
            raise ValueError(f"a reader needs the scale of its norm ({placement.norm})")
        return (weight * norm_scale.to(torch.float64)[None, :]) @ rotation
    if placement.role is Role.WRITER:
        return rotation.T @ weight
    if placement.role is Role.WRITER_BIAS:
        return weight @ rotation
    if placement.role is Role.NORM:
        return torch.ones_like(weight)
    return weight


def rotate_residual(tensors: Mapping[str, torch.Tensor], *, naming: Naming, seed: int) -> dict[str, torch.Tensor]:
    """The rotated model's tensors (float64), the head untied if it was tied: the core the GGUF writer streams.

    Args:
        tensors: a state dict in ``naming``'s convention (``(out, in)`` matrices); a missing head means tied.
        naming: the tensor-name convention (``HF_NAMING`` for transformers, ``GGUF_NAMING`` for llama.cpp).
        seed: seeds ``Q`` (``random_orthogonal``).
    """
    layout = residual_layout(list(tensors), naming)
    rotation = random_orthogonal(tensors[naming.embedding].shape[1], seed)
    rotated = {}
    for name, placement in layout.items():
        source = tensors.get(name, tensors[naming.embedding])  # the tied head is the embedding
        scale = tensors[placement.norm] if placement.norm else None
        rotated[name] = rotate_tensor(source, placement, rotation=rotation, norm_scale=scale)
    return rotated


# --- GGUF ------------------------------------------------------------------------------------------------------


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter,
                   extra: Mapping[str, tuple[object, gguf.GGUFValueType]]) -> None:
    """Every key/value and array of the source (the tokenizer included) except those the writer makes itself,
    with the file type set to F16 and ``extra`` keys (name -> (value, GGUFValueType)) added."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub_type=sub)
    for key, (value, value_type) in extra.items():
        writer.add_key_value(key, value, value_type)


def _arch(reader: gguf.GGUFReader) -> str:
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    return str(field.contents()) if field is not None else "?"


def rotate_llama_gguf(src: Path, dst: Path, seed: int = 0, *, rotate: bool = True) -> dict[str, object]:
    """Write ``dst``, an F16 GGUF of ``src`` (llama or qwen2 arch) with its residual stream rotated by
    ``random_orthogonal(hidden, seed)`` and a tied head untied as ``output.weight``; ``rotate=False`` writes the
    plain dequantized source as F16 instead (the noise-floor control). Matrices are F16, vectors F32 (llama.cpp's
    convention). Returns what it did: seconds, tensors, whether the head was untied, the source's tensor types."""
    started = time.perf_counter()
    reader = gguf.GGUFReader(src)
    arch = _arch(reader)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{src.name} is a {arch!r} GGUF: only {', '.join(ARCHITECTURES)} can be rotated "
                         "(pre-norm RMSNorm models; Gemma's sandwich norms need another derivation)")
    by_name = {t.name: t for t in reader.tensors}
    tied = GGUF_NAMING.head not in by_name
    layout = residual_layout(list(by_name), GGUF_NAMING)
    hidden = int(by_name[GGUF_NAMING.embedding].shape[0])  # ggml order: ne0 = hidden
    rotation = random_orthogonal(hidden, seed)
    norms = {n: _check.dequantized(by_name[n]) for n, p in layout.items() if p.role is Role.NORM}
    writer = gguf.GGUFWriter(dst, arch)
    _copy_metadata(reader, writer, {"bitplan.float_source.seed": (seed, gguf.GGUFValueType.UINT32),
                                    "bitplan.float_source.rotated": (rotate, gguf.GGUFValueType.BOOL)})
    names = [t.name for t in reader.tensors] + ([GGUF_NAMING.head] if tied and rotate else [])
    for name in names:
        source = _check.dequantized(by_name.get(name, by_name[GGUF_NAMING.embedding]))
        placement = layout[name]
        if rotate:
            scale = norms[placement.norm] if placement.norm else None
            source = rotate_tensor(source, placement, rotation=rotation, norm_scale=scale)
        dtype = numpy.float16 if source.ndim == 2 else numpy.float32
        writer.add_tensor(name, source.numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "hidden": hidden, "tensors": len(names), "head_untied": tied and rotate,
            "source_types": dict(sorted(_type_counts(reader).items())),
            "seconds": round(time.perf_counter() - started, 1)}


def _type_counts(reader: gguf.GGUFReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a bundled id or a .gguf file (llama or qwen2)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-windows", type=int, default=4, help="WikiText-2 windows of 512 (0: no check)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="if missing: bitplan's built-in text")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.check_windows < 0 or args.seed < 0:
        parser.error("--check-windows and --seed must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    kind, source = resolve_reference(args.model)
    if kind != "gguf":
        parser.error(f"--model must be a GGUF (a bundled GGUF id or a .gguf file), got a {kind} reference")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.model if args.model in BUNDLED_MODELS else source.stem
    rotated = args.out / f"{stem}-rotated-f16.gguf"
    written = rotate_llama_gguf(source, rotated, args.seed)
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "float-source", "model": args.model, "source": str(source), "source_sha256": sha256_file(source),
        "seed": args.seed, "output": str(rotated), "output_sha256": sha256_file(rotated),
        "output_bytes": rotated.stat().st_size, "seconds": written.pop("seconds"), "written": written,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "gguf": _version("gguf"), "llama_cpp_python": _version("llama_cpp")},
        "command": " ".join(sys.argv),
    }
    if args.check_windows:
        control = args.out / f"{stem}-unrotated-f16.gguf"
        report["control"] = {"output": str(control), **rotate_llama_gguf(source, control, rotate=False)}
        report["control"]["output_sha256"] = sha256_file(control)
        grids = quantized_tensors(source)  # before any torch load (bitplan remembers a GGUF source's blocks)
        report["source_grid"] = {"detectors": "bench/_float_source_check.py's docstring",
                                 "rotated": grid_report(rotated, grids), "unrotated_f16": grid_report(control, grids)}
        text_path = args.text if args.text.is_file() else None
        report["text"] = str(text_path) if text_path else "builtin:python-docs (WikiText-2 not found)"
        text = read_text(text_path) if text_path else builtin_text()
        report["check"] = {"windows": args.check_windows, "seq_len": SEQ_LEN, "llama_cpp": "use_extra_bufts=False",
                           **check(source, rotated, control, text=text, windows=args.check_windows,
                                   threads=args.threads)}
    print(json.dumps(report, indent=2))  # noqa: T201 (the benchmark's output)


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version({"llama_cpp": "llama-cpp-python"}.get(module, module))
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
