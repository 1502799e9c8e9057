"""What transformers runs while it loads our packed folder: the ``bitplan`` quantization config and quantizer, and
the modules that hold a unit's tensors until they are loaded. Imported only by
:func:`bitplan.targets.hf_quantizer.register`, once transformers itself is imported (this module imports it at the
top)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bitplan.kernels.quant_linear import QuantLinear, segment_layout
from bitplan.quantizer.formats import FORMATS, GgmlWeight, scale_bits_of
from bitplan.sources.moe import unfuse_experts
from bitplan.targets.manifest import GGML_LAYOUT

QUANT_METHOD = "bitplan"  # the same as bitplan.targets.hf_quantizer's (which does not import this module before it
# is due)


def empty_blocks(unit: dict[str, Any]) -> torch.Tensor:
    """A unit's ``ggml`` blocks as transformers will load them: ``(rows, row_bytes)`` uint8."""
    return torch.zeros(unit["out_features"], FORMATS[unit["format"]].bytes((1, unit["in_features"])),
                       dtype=torch.uint8)


def decode_blocks(unit: dict[str, Any], blocks: torch.Tensor) -> torch.Tensor:
    """The float weight ``(out_features, in_features)`` of a unit stored in a GGML type, from its loaded blocks."""
    shape = (unit["out_features"], unit["in_features"])
    return FORMATS[unit["format"]].decode(GgmlWeight(unit["format"], blocks.cpu().numpy(), shape))


class GgmlBlocks(nn.Module):
    """A unit stored in a GGML type while transformers loads it: its ``ggml`` blocks (decoded after loading)."""

    def __init__(self, unit: dict[str, Any]) -> None:
        super().__init__()
        self.unit = unit
        self.register_buffer("ggml", empty_blocks(unit))
        self.register_buffer("bias", torch.zeros(unit["out_features"]) if unit["bias"] else None)

    def to_linear(self) -> nn.Linear:
        """The float ``nn.Linear`` the loaded blocks stand for (what the model runs with)."""
        weight = decode_blocks(self.unit, self.ggml)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=self.bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def hold_embedding_blocks(model: nn.Module, unit: dict[str, Any]) -> None:
    """A token embedding stored in a GGML type: a ``ggml`` buffer beside its weight takes its blocks while
    transformers loads (the index names ``NAME.ggml``, not ``NAME.weight``, which is therefore not reported
    missing) and is decoded into the weight after."""
    module = model.get_submodule(unit["name"])
    module.register_buffer("ggml", empty_blocks(unit))
    module.bitplan_unit = unit
    ignored = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    model._keys_to_ignore_on_load_missing = ignored | {re.escape(f"{unit['name']}.weight")}


def decode_embedding_blocks(module: nn.Embedding) -> None:
    """Replace a held embedding's blocks (:func:`hold_embedding_blocks`) by its decoded float weight."""
    weight = decode_blocks(module.bitplan_unit, module.ggml)
    del module.ggml, module.bitplan_unit
    module.weight = nn.Parameter(weight, requires_grad=False)


def untie_quantized_head(model: Any, units: set[str]) -> str | None:
    """A quantized output head tied to the input embedding (a unit of a whole-file budget) is stored apart from the
    embedding's float copy: transformers must not tie the two while loading (the head is no ``weight`` then).
    Returns the head's name when it was tied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if name not in units or f"{name}.weight" not in tied:
        return None
    tied.pop(f"{name}.weight")
    return name


def unit_module(unit: dict[str, Any]) -> nn.Module:
    """The module a (non-embedding) unit is swapped for before loading: a GGML unit's block holder, else a
    ``QuantLinear`` of its layout."""
    if unit.get("layout") == GGML_LAYOUT:
        return GgmlBlocks(unit)
    return QuantLinear(unit["in_features"], unit["out_features"], bits=unit["bits"], group_size=unit["group_size"],
                       bias=unit["bias"], group_bits=unit.get("group_bits"),
                       scale_bits=scale_bits_of(unit.get("format")))


class BitplanConfig(QuantizationConfigMixin):
    """The folder's ``quantization_config``: every unit's layout
    (:func:`bitplan.targets.hf_quantizer.quantization_config` writes it)."""

    def __init__(self, units: list[dict[str, Any]] | None = None, format_version: int = 0, guard: str | None = None,
                 **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.units = list(units or [])
        self.format_version = format_version
        self.guard = guard  # the placeholder tensor that stops a load without bitplan; ignored here


class BitplanHfQuantizer(HfQuantizer):  # type: ignore[misc]
    """Swaps each unit for the module that takes its stored tensors, then finishes the ones that need decoding."""

    requires_calibration = True  # the folder is already quantized; nothing is quantized while loading

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        unfuse_experts(model)  # a MoE layer's experts as the per-expert units the folder stores (bitplan.sources.moe)
        if self.quantization_config.guard:
            ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignored | {re.escape(self.quantization_config.guard)}
        self._tied_head = untie_quantized_head(model, {u["name"] for u in self.quantization_config.units})
        for unit in self.quantization_config.units:
            parent_name, _, child = unit["name"].rpartition(".")
            parent = model.get_submodule(parent_name)
            if unit.get("layout") == GGML_LAYOUT and isinstance(getattr(parent, child), nn.Embedding):
                hold_embedding_blocks(model, unit)  # kept in place (a scaled lookup stays one)
            else:
                setattr(parent, child, unit_module(unit))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear) and module.group_bits is not None:
                # the column order of a mixed layer is not stored (a non-persistent buffer): it was built
                # on transformers' meta device, so build it again
                module.perm = segment_layout(module.group_bits, module.in_features, module.group_size)[2]
            if isinstance(module, GgmlBlocks):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.to_linear())
            if isinstance(module, nn.Embedding) and hasattr(module, "bitplan_unit"):
                decode_embedding_blocks(module)
        if self._tied_head is not None and isinstance(model.get_submodule(self._tied_head), nn.Linear):
            # one tensor for both uses, in the head's chosen type: as our loader (and llama.cpp) run it
            model.get_input_embeddings().weight = model.get_submodule(self._tied_head).weight
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False  # write with bitplan (the folder is the serialized form)

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Add the config and the quantizer to transformers' registries under ``quant_method: "bitplan"``."""
    register_quantization_config(QUANT_METHOD)(BitplanConfig)
    register_quantizer(QUANT_METHOD)(BitplanHfQuantizer)
