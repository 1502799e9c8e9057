"""The second peer of ``bench/peers.py``: each llama.cpp preset's own per-tensor types, encoded by llama.cpp's
``ggml_quantize_chunk`` with our importance vectors, what ``llama-quantize --imatrix`` makes. Loaded with
``_own_folder_off_path.sibling("_importance_peer")``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf
import numpy
import torch

from bitplan.sources.models import load_model, resolve_reference
from bitplan.spec import JobSpec
from bitplan.targets.exports.common import export_artifact

BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def preset_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name of every block-linear tensor of a file."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if BLOCK_LINEAR.search(t.name)}


def with_our_importance(model_ref: str, presets: list[str], out: Path, samples: int, seq_len: int) -> dict[str, Path]:
    """Each preset's own per-tensor types, encoded by llama.cpp's ``ggml_quantize_chunk`` with our importance
    vectors (what ``llama-quantize --imatrix`` does with an importance matrix: same types, weighted rounding;
    llama-cpp-python's ``llama_model_quantize`` takes its imatrix only as a C++ map). Written as GGUF files: the
    preset's own file with its block-linear tensors replaced (``graft_block_linear``), so that the token embedding
    and the head keep the preset's types and encoding, as ``llama-quantize --imatrix`` leaves them with an
    importance matrix from ``llama-imatrix`` (which collects neither by default)."""
    from bitplan.job.quantize import encode_unit
    from bitplan.sensitivity.importance import input_energy
    from bitplan.sources.calibration import build_calibration_set
    from bitplan.sources.units import find_units
    from bitplan.targets.artifact import write_artifact
    from bitplan.targets.manifest import RunRecord, SensitivityRecord, SolverRecord, SourceRecord

    loaded = load_model(model_ref)
    units = find_units(loaded.model)
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=samples, seq_len=seq_len)
    importance = input_energy(loaded.model, units, list(torch.split(calib.tokens, 1)))
    reader = gguf.GGUFReader(resolve_reference(model_ref)[1])
    arch = str(reader.fields["general.architecture"].contents())
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.TensorNameMap(arch_id, int(reader.fields[f"{arch}.block_count"].contents()))
    gguf_name = {unit: names.get_name(f"{unit}.weight", try_suffixes=(".weight",)) for unit in units}
    spec = JobSpec.from_flat(model=model_ref, bits_per_weight=5.0, formats="gguf-all")
    paths = {}
    for preset in presets:
        types = preset_types(out / f"llama-{preset}.gguf")
        quantized = {unit: encode_unit(spec, units[unit].weight, types[gguf_name[unit]], importance, unit)
                     for unit in units}
        record = RunRecord(source=SourceRecord(reference=model_ref, format="gguf", sha256=loaded.source_sha256),
                           budget={"preset": preset}, group_size=32, candidate_bits=[],
                           solver=SolverRecord(name=None, status="uniform", objective=None, lower_bound=None,
                                               solve_s=None),
                           sensitivity=SensitivityRecord(metric=None, warnings=[]), calibration=None,
                           quantizer=f"llama.cpp {preset} types + our importance", mix_groups=False)
        folder = out / f"imatrix-{preset}"
        write_artifact(folder, model=loaded.model, tokenizer=loaded.tokenizer, kind=loaded.kind, quantized=quantized,
                       run=record, float_dtype=torch.float16)
        exported, paths[preset] = out / f"imatrix-{preset}-export.gguf", out / f"imatrix-{preset}.gguf"
        export_artifact(folder, format="gguf", out=exported)
        graft_block_linear(out / f"llama-{preset}.gguf", exported, paths[preset])
        exported.unlink()
        shutil.rmtree(folder)  # the packed artifact: a 1.5B model's is gigabytes, and only the GGUF is scored
    return paths


def writer_with_metadata(reader: gguf.GGUFReader, out: Path) -> gguf.GGUFWriter:
    """A writer of ``out`` holding every metadata field of ``reader``'s file (its alignment included), ready for
    tensors."""
    writer = gguf.GGUFWriter(out, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        main = field.types[0]
        writer.add_key_value(field.name, field.contents(), main,
                             sub_type=field.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    return writer


def graft_block_linear(base: Path, donor: Path, out: Path) -> None:
    """``out`` = the GGUF ``base`` (its metadata and every tensor, in order) with each block-linear tensor taken
    from ``donor`` instead, which must hold it in the same type and shape. Raises ``ValueError`` naming the first
    tensor that differs."""
    reader, donors = gguf.GGUFReader(base), {t.name: t for t in gguf.GGUFReader(donor).tensors}
    writer = writer_with_metadata(reader, out)
    for tensor in reader.tensors:
        source = donors.get(tensor.name) if BLOCK_LINEAR.search(tensor.name) else tensor
        if source is None or (source.tensor_type, source.data.shape) != (tensor.tensor_type, tensor.data.shape):
            found = "missing" if source is None else f"{source.tensor_type.name} {source.data.shape}"
            raise ValueError(f"{donor.name}: {tensor.name} is {found}, {base.name} has {tensor.tensor_type.name} "
                             f"{tensor.data.shape}")
        writer.add_tensor(tensor.name, numpy.asarray(source.data), raw_shape=None, raw_dtype=source.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
