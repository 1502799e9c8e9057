"""compressed-tensors export (``pack-quantized``): a Hugging Face folder that vLLM and SGLang load, with
``config.json``'s ``quantization_config`` naming one config group per bit width (mixed precision by module).

Each unit's codes are stored as the library stores int quantization: signed ``q = code - 2**(b-1)`` packed densely
into int32 along the input dimension (``weight_packed``), fp16 ``weight_scale`` per group, the signed zero point
packed along the output dimension (``weight_zero_point``) and ``weight_shape``. Dequantization
``(q - zp) * scale`` equals ours exactly. The library needs groups that divide the input width, so a layer with
a partial last group (576 columns in groups of 128) is written with groups of ``gcd(128, 576) = 64`` sharing their
parent's scale and zero. A unit with mixed widths inside is written at its widest width (its
narrower codes are valid codes there), so it weighs more than in our artifact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitplan.errors import BitplanError
from bitplan.quantizer.formats import GgmlWeight
from bitplan.quantizer.rtn import QuantizedWeight
from bitplan.sources.moe import checkpoint_name
from bitplan.targets.artifact import FLOAT_FILE, GUARD_FILE, MANIFEST, QUANTIZED_FILE, safetensors_data_bytes
from bitplan.targets.exports.common import ExportReport, file_hashes, read_artifact_units, register_export
from bitplan.targets.exports.vllm_kernels import serving_kernels
from bitplan.targets.hf_quantizer import INDEX_FILE

WEIGHTS_FILE = "model.safetensors"
SHAPE_BYTES = 16  # weight_shape: two int64


def whole_groups(unit: QuantizedWeight) -> QuantizedWeight:
    """The same weight with groups that divide ``in_features`` (the library requires it): group size
    ``gcd(group_size, in_features)``, each scale and zero repeated over the smaller groups of its group."""
    in_features = unit.codes.shape[1]
    size = math.gcd(unit.group_size, in_features)
    if size == unit.group_size:
        return unit
    repeat = unit.group_size // size
    n_groups = in_features // size

    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(repeat, dim=1)[:, :n_groups].contiguous()

    return dataclasses.replace(unit, group_size=size, scales=spread(unit.scales), zeros=spread(unit.zeros))


def is_symmetric(unit: QuantizedWeight) -> bool:
    """Whether every zero point is the grid's middle ``2**(bits-1)`` (our ``-sym`` formats): the library's
    symmetric scheme, stored without zero points (the one transformers and vLLM's WNA16 kernels load)."""
    return bool((unit.zeros.float() == float(1 << (unit.bits - 1))).all())


def unit_tensors(unit: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The compressed-tensors parameters of one unit (local names)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (unit.bits - 1)
    signed_codes = (unit.codes.to(torch.int16) - offset).to(torch.int8)
    tensors = {"weight_packed": pack_to_int32(signed_codes, unit.bits),
               "weight_scale": unit.scales.to(torch.float16).contiguous(),
               "weight_shape": torch.tensor(list(unit.codes.shape), dtype=torch.int64)}
    if not is_symmetric(unit):
        signed_zeros = (unit.zeros.float().round().to(torch.int16) - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(signed_zeros, unit.bits, packed_dim=0)
    return tensors


def predicted_unit_bytes(unit: QuantizedWeight) -> int:
    out_features, in_features = unit.codes.shape
    n_groups = unit.scales.shape[1]
    packed = out_features * -(-in_features * unit.bits // 32) * 4
    zero_points = 0 if is_symmetric(unit) else -(-out_features * unit.bits // 32) * n_groups * 4
    return packed + out_features * n_groups * 2 + zero_points + SHAPE_BYTES


def quantization_config(units: dict[str, QuantizedWeight]) -> dict[str, object]:
    import compressed_tensors

    groups = {}
    schemes = {name: (u.bits, u.group_size, is_symmetric(u)) for name, u in units.items()}
    for bits, group_size, symmetric in sorted(set(schemes.values())):
        targets = [f"re:^{re.escape(name)}$" for name, scheme in schemes.items()
                   if scheme == (bits, group_size, symmetric)]
        groups[f"group_{bits}bit_g{group_size}{'_sym' if symmetric else ''}"] = {
            "targets": targets,
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "observer": "minmax"},
            "input_activations": None, "output_activations": None,
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": groups,
            "ignore": ["lm_head"], "quantization_status": "compressed", "kv_cache_scheme": None,
            "version": compressed_tensors.__version__}


@register_export("compressed-tensors")
def export_compressed_tensors(artifact: Path, out: Path) -> ExportReport:
    """Write the folder ``out`` from the artifact at ``artifact``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitplanError(f"--out {out} must be a new or empty folder for a compressed-tensors export")
    manifest, units, floats = read_artifact_units(artifact)
    _refuse_unexportable(units)
    notes = ["vllm_kernel: the WNA16 kernel vLLM would choose per layer on Hopper (sm90), Ampere (sm80) and Turing "
             "(sm75) GPUs, by its kernels' rules (bitplan/targets/exports/vllm_kernels.py; a prediction, not run here)",
             "bytes counts the quantized layers' tensors (packed codes, fp16 scales, packed zero points, shapes); "
             "zero points are packed at each layer's width"]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        on_disk = functools.partial(checkpoint_name, model_type=json.loads(
            (artifact / "config.json").read_text()).get("model_type"))  # Mixtral's block_sparse_moe, w1/w2/w3
        state = {on_disk(name): tensor.to(torch.float16).contiguous() for name, tensor in floats.items()
                 if name not in manifest.tied}
        regrouped = {on_disk(name): whole_groups(u) for name, u in units.items()}
        if any(regrouped[on_disk(name)].group_size != u.group_size for name, u in units.items()):
            notes.append("compressed-tensors needs groups that divide each layer's input width: layers with a partial "
                         "last group are written with group size gcd(group size, input width), scales repeated")
        units = regrouped
        unit_state, rows, predicted = _unit_state(units)
        state.update(unit_state)
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_model_files(artifact, staging, units)
        data = safetensors_data_bytes(staging / WEIGHTS_FILE)
        written = sum(size for name, size in data.items() if name in unit_state)  # a layer's bias is not its codes
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if any(u.group_bits for u in manifest.units):
        notes.append("layers with mixed widths inside are written at their widest width")
    return ExportReport(format="compressed-tensors", path=str(out), bytes=written, predicted_bytes=predicted,
                        file_bytes=sum(p.stat().st_size for p in out.iterdir()),
                        sha256=file_hashes(sorted(out.iterdir())), artifact_bytes=int(manifest.achieved.bytes),
                        units=rows, notes=notes)


def _refuse_unexportable(units: dict[str, QuantizedWeight | GgmlWeight]) -> None:
    """Refuse an artifact compressed-tensors cannot hold: units in GGML types, or with fractional zero points."""
    ggml_units = [name for name, u in units.items() if isinstance(u, GgmlWeight)]
    if ggml_units:
        raise BitplanError(f"{len(ggml_units)} units of this artifact are stored in GGML types (first: "
                           f"{ggml_units[0]}), which compressed-tensors cannot hold; export it as gguf, or make "
                           f"the artifact with integer formats (--formats bitplan-int)", param="format")
    fractional = [name for name, u in units.items() if bool((u.zeros.float().frac() != 0).any())]
    if fractional:
        raise BitplanError(f"{len(fractional)} units of this artifact have fractional zero points (an -fzero "
                           f"format; first: {fractional[0]}), which compressed-tensors' integer zero points cannot "
                           f"hold; export it as gguf, or make the artifact with --formats bitplan-int or ct-wna16",
                           param="format")


def _unit_state(units: dict[str, QuantizedWeight]) -> tuple[dict[str, torch.Tensor], list[dict[str, object]], int]:
    """The units' tensors as compressed-tensors names them, one report row per unit, and their predicted bytes."""
    state: dict[str, torch.Tensor] = {}
    rows, predicted = [], 0
    for name, unit in units.items():
        state.update({f"{name}.{key}": value for key, value in unit_tensors(unit).items()})
        size = predicted_unit_bytes(unit)
        predicted += size
        out_features, in_features = unit.codes.shape
        rows.append({"name": name, "bits": unit.bits, "group_size": unit.group_size, "bytes": size,
                     "vllm_kernel": serving_kernels(unit.bits, unit.group_size, in_features, out_features)})
    return state, rows, predicted


def _write_model_files(artifact: Path, staging: Path, units: dict[str, QuantizedWeight]) -> None:
    """Copy the artifact's model files (config, tokenizer, ...) into ``staging``, the config with the units'
    ``quantization_config`` and float16 as its dtype."""
    for name in os.listdir(artifact):
        if (artifact / name).is_file() and name not in (MANIFEST, FLOAT_FILE, QUANTIZED_FILE, WEIGHTS_FILE,
                                                        INDEX_FILE, GUARD_FILE) \
                and not name.endswith(".gguf"):
            shutil.copy2(artifact / name, staging / name)
    config = json.loads((staging / "config.json").read_text())
    config["quantization_config"] = quantization_config(units)
    config["torch_dtype"] = "float16"
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
