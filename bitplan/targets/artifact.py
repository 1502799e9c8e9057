"""The packed artifact: writing it atomically and rebuilding a working torch model from it alone.

Layout of an artifact directory (format version 1):

* ``config.json`` and tokenizer files: the source model's, as transformers writes them;
* ``float.safetensors``: every tensor of the model that is not a quantized unit's weight (embeddings, norms,
  biases, the output head unless tied), float32;
* ``quantized.safetensors``: for each unit ``NAME``: ``NAME.qweight`` int32 words (``bitstream-int32``, see
  :mod:`kernels.bitpack`, codes in row-major ``(out_features, in_features)`` order), ``NAME.scales`` and
  ``NAME.zeros`` ``(out_features, ceil(in_features / group_size))`` float16. Since version 2 a unit whose column
  groups have different widths (manifest ``group_bits``, ``layout: segments-by-width``) stores one
  ``NAME.qweight_b{b}``, ``NAME.scales_b{b}``, ``NAME.zeros_b{b}`` per width ``b`` instead: the groups of width
  ``b`` in their original order, packed as one ``(out_features, K_b)`` matrix (see :mod:`kernels.quant_linear`);
  the manifest's ``tensors`` names each unit's tensors. Since version 3 a unit in a GGML type (manifest ``format``
  ``Q4_K`` etc., ``layout: ggml-blocks``) stores ``NAME.ggml``, its ``(out_features, row_bytes)`` uint8 blocks as
  llama.cpp lays them out; it loads as a float ``nn.Linear`` (dequantized by the ``gguf`` package), and the GGUF
  export copies its blocks unchanged. Since version 4 a unit whose scales and zeros are double-quantized (manifest
  ``format`` ``int{b}-g{g}-fzero-dq{k}``) stores ``NAME.scales_q`` and ``NAME.zeros_q`` (``k``-bit codes, packed
  like the weight's) and ``NAME.scale_range`` ``(out_features, 4)`` float16 (each row's scale low and step, zero
  low and step) in place of ``NAME.scales`` and ``NAME.zeros``. Versions 1 to 3 still load;
* ``requires-bitplan.safetensors`` (since version 5): one placeholder tensor, ``UNIT.weight`` of shape ``(1,)``
  for one quantized unit (``quantization_config.guard``). After ``import bitplan`` transformers ignores it; without
  our package transformers skips the unknown ``quant_method`` and would fill every unit with random weights, so
  the placeholder's wrong shape makes ``from_pretrained`` raise (a size mismatch) instead;
* ``manifest.json``: format version, per-unit bits and group size, budget, achieved size measured from the
  written file, solver and sensitivity details, calibration hash, and the sha256 of every other file.
"""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitplan.errors import ArtifactError
from bitplan.hashing import sha256_file
from bitplan.kernels.quant_linear import QuantLinear
from bitplan.quantizer.formats import FORMATS, GgmlWeight, scale_bits_of
from bitplan.quantizer.mixed import pack_segments
from bitplan.quantizer.rtn import QuantizedWeight
from bitplan.sources.models import ModelKind
from bitplan.sources.moe import unfuse_experts
from bitplan.sources.units import unit_shape
from bitplan.targets.manifest import (
    FORMAT_VERSION,
    GGML_LAYOUT,
    MANIFEST,
    MIXED_LAYOUT,
    PACKING_FORMAT,
    Achieved,
    Manifest,
    RunRecord,
    UnitRecord,
    read_manifest,
    write_manifest,
)

FLOAT_FILE = "float.safetensors"
QUANTIZED_FILE = "quantized.safetensors"
GUARD_FILE = "requires-bitplan.safetensors"


@dataclass(frozen=True)
class WrittenArtifact:
    """Where the artifact is, what it holds, and its size as measured from the files."""

    path: Path
    manifest: Manifest
    manifest_sha256: str
    quantized_bytes: int
    quantized_numel: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / self.quantized_numel


def safetensors_data_bytes(path: Path) -> dict[str, int]:
    """Byte length of each tensor's data, read from a safetensors file's header."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    return {name: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def _float_state(model: nn.Module, unit_names: set[str], dtype: torch.dtype = torch.float32
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Non-unit tensors, each stored once; returns the state and ``alias -> stored name`` for shared ones."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in unit_names and leaf == "weight":
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype).contiguous().clone()
    return state, aliases


def swap_into_place(staging: Path, destination: Path, *, replaceable: Callable[[Path], bool], what: str) -> None:
    """Rename the finished staging directory to ``destination``. An existing ``destination`` is replaced whole
    when it is empty or ``replaceable`` says it is an earlier output of the same kind; otherwise the staging
    directory is removed and the write refused (``what`` names the output the folder should hold)."""
    if destination.exists():
        if any(destination.iterdir()) and not replaceable(destination):
            shutil.rmtree(staging)
            raise ArtifactError(f"output directory {destination} exists and is not {what}; "
                                f"choose an empty or new directory")
        trash = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex[:8]}")
        destination.rename(trash)
        staging.rename(destination)
        shutil.rmtree(trash)
    else:
        staging.rename(destination)


def write_artifact(
    destination: Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    kind: ModelKind,
    quantized: Mapping[str, QuantizedWeight | GgmlWeight],
    run: RunRecord | None,
    float_dtype: torch.dtype = torch.float32,
    formats: Mapping[str, str] | None = None,
) -> WrittenArtifact:
    """Write the artifact under a temporary name, then rename it to ``destination``.

    Args:
        quantized: unit name -> its quantized weight; every unit is an ``nn.Linear`` of ``model`` (or, in a GGML
            type, its token embedding: rows are tokens, columns the width).
        run: the pipeline's record of how the artifact was made (budget, solver, sensitivity, calibration, ...).
        float_dtype: how the tensors that are not quantized units are stored (the source model's dtype).
        formats: unit name -> the format name the manifest records (default ``int{bits}-g{group}``).
    """
    destination = destination.resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        float_state, aliases = _float_state(model, set(quantized), float_dtype)
        save_file(float_state, str(staging / FLOAT_FILE), metadata={"format": "pt"})
        units = _write_units(staging, dict(model.named_modules()), quantized, formats)
        _write_transformers_entry(staging, float_state, units, dict(model.named_modules()))
        total_bytes = sum(u.bytes for u in units)
        total_numel = sum(u.in_features * u.out_features for u in units)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        file_bytes = sum((staging / n).stat().st_size for n in files)
        parameters = sum(p.numel() for p in model.parameters())
        achieved = Achieved(bytes=total_bytes, numel=total_numel, bits_per_weight=8.0 * total_bytes / total_numel,
                            file_bytes=file_bytes, parameters=parameters,
                            file_bits_per_parameter=8.0 * file_bytes / parameters)
        manifest = Manifest(format_version=FORMAT_VERSION, packing=PACKING_FORMAT, model_kind=kind.value,
                            units=units, tied=aliases, achieved=achieved, run=run, files=files)
        manifest_sha = write_manifest(staging, manifest)
        swap_into_place(staging, destination, replaceable=lambda d: (d / MANIFEST).is_file(),
                        what="a bitplan artifact")
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return WrittenArtifact(path=destination, manifest=manifest, manifest_sha256=manifest_sha,
                           quantized_bytes=total_bytes, quantized_numel=total_numel)


def _write_transformers_entry(staging: Path, float_state: Mapping[str, torch.Tensor], units: list[UnitRecord],
                              modules: Mapping[str, nn.Module]) -> None:
    """What lets ``AutoModelForCausalLM.from_pretrained(folder)`` load the folder after ``import bitplan``: the
    ``quantization_config`` in ``config.json`` (:mod:`bitplan.targets.hf_quantizer`) and a safetensors index naming the
    file of every tensor; and what makes it raise without our package: the guard placeholder (:data:`GUARD_FILE`)."""
    from bitplan.targets.hf_quantizer import INDEX_FILE, quantization_config

    guard = guard_unit(units, modules)
    config = json.loads((staging / "config.json").read_text())
    config["quantization_config"] = quantization_config([u.to_dict() for u in units], FORMAT_VERSION,
                                                        guard=f"{guard}.weight" if guard else None)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weight_map = {name: FLOAT_FILE for name in float_state}
    weight_map.update({f"{u.name}.{leaf}": QUANTIZED_FILE for u in units for leaf in u.tensors})
    files = [FLOAT_FILE, QUANTIZED_FILE]
    if guard is not None:
        # one metadata key: safetensors orders a header's keys as a hash map does, so more would change its sha256
        save_file({f"{guard}.weight": torch.zeros(1)}, str(staging / GUARD_FILE), metadata={"format": "pt"})
        weight_map[f"{guard}.weight"] = GUARD_FILE
        files.append(GUARD_FILE)
    total = sum((staging / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def guard_unit(units: list[UnitRecord], modules: Mapping[str, nn.Module]) -> str | None:
    """The unit whose ``weight`` the guard placeholder stands for: the first ``nn.Linear`` outside an expert list (a
    name transformers' own model has as a 2-D parameter, so a ``(1,)`` tensor there is a size mismatch); None when
    no unit is one (the folder then has no guard). The first by name, so the same units give the same file."""
    return min((u.name for u in units if isinstance(modules.get(u.name), nn.Linear)
                and ".experts." not in f".{u.name}."), default=None)


def _write_units(staging: Path, modules: dict[str, nn.Module], quantized: Mapping[str, QuantizedWeight | GgmlWeight],
                 formats: Mapping[str, str] | None = None) -> list[UnitRecord]:
    """Pack every unit into ``quantized.safetensors``; one record per unit with its bytes measured from the file.
    The file's metadata has one key only, so its header (and its sha256) is the same on every run."""
    packed: dict[str, torch.Tensor] = {}
    layout: list[tuple[str, Any, QuantizedWeight | GgmlWeight, list[str]]] = []
    for name, q in quantized.items():
        tensors = {"ggml": torch.from_numpy(q.payload.copy())} if isinstance(q, GgmlWeight) else pack_segments(q)
        packed.update({f"{name}.{leaf}": tensor.contiguous() for leaf, tensor in tensors.items()})
        layout.append((name, modules[name], q, sorted(tensors)))
    save_file(packed, str(staging / QUANTIZED_FILE), metadata={"format": "pt"})
    data_bytes = safetensors_data_bytes(staging / QUANTIZED_FILE)
    units = []
    for name, module, q, leaves in layout:
        rows, columns = unit_shape(module)
        common = {"name": name, "in_features": columns, "out_features": rows,
                  "bias": getattr(module, "bias", None) is not None, "tensors": leaves,
                  "bytes": sum(data_bytes[f"{name}.{leaf}"] for leaf in leaves)}
        if isinstance(q, GgmlWeight):
            units.append(UnitRecord(**common, bits=q.bits, group_size=ggml_block(q.qtype), layout=GGML_LAYOUT,
                                    format=q.qtype))
            continue
        mixed = q.group_bits is not None and len(set(q.group_bits)) > 1
        default = f"int{q.bits}-g{q.group_size}"
        units.append(UnitRecord(**common, bits=q.bits, group_size=q.group_size,
                                group_bits=list(q.group_bits) if mixed else None,
                                layout=MIXED_LAYOUT if mixed else None,
                                format=None if mixed else (formats or {}).get(name, default)))
    return units


def ggml_block(qtype: str) -> int:
    """Weights per block along a row of GGML type ``qtype``."""
    from bitplan.quantizer.ggml import block_size

    return block_size(FORMATS[qtype].ggml_type)


def load_artifact(path: Path | str, *, verify: bool = True) -> tuple[nn.Module, Any, Manifest]:
    """Rebuild the quantized model (with ``QuantLinear`` units), its tokenizer and manifest from ``path``."""
    import transformers

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:  # a compressed-tensors target's, for transformers
        del config.quantization_config
    auto = (transformers.AutoModelForCausalLM if manifest.model_kind == ModelKind.CAUSAL_LM.value
            else transformers.AutoModel)
    model = auto.from_config(config, dtype=torch.float32)
    unfuse_experts(model)  # the units are per-expert linear layers (bitplan.sources.moe)
    state = load_file(str(path / FLOAT_FILE))
    state.update(load_file(str(path / QUANTIZED_FILE)))
    for unit in manifest.units:
        parent_name, _, child = unit.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if unit.layout == GGML_LAYOUT:  # a float layer with the weight llama.cpp's blocks stand for
            blocks = state.pop(f"{unit.name}.ggml")
            shape = (unit.out_features, unit.in_features)
            weight = FORMATS[str(unit.format)].decode(GgmlWeight(str(unit.format), blocks.numpy(), shape))
            state[f"{unit.name}.weight"] = weight
            continue
        setattr(parent, child, QuantLinear(unit.in_features, unit.out_features, bits=unit.bits,
                                           group_size=unit.group_size, bias=unit.bias, group_bits=unit.group_bits,
                                           scale_bits=scale_bits_of(unit.format)))
    for alias, stored in manifest.tied.items():
        state[alias] = state[stored]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"artifact {path} does not match its config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer, manifest
