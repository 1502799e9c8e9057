"""``transformers.AutoModelForCausalLM.from_pretrained(folder)`` of our packed folder, after ``import bitplan``.

The folder's ``config.json`` carries ``quantization_config`` with ``quant_method: "bitplan"`` and each unit's
layout (width, group size, per-group widths, GGML type), and ``model.safetensors.index.json`` maps every tensor
to ``float.safetensors`` or ``quantized.safetensors``, so transformers finds the weights the way it finds any
sharded checkpoint. The quantizer registered here swaps each unit for a ``QuantLinear`` (or, for a unit in a GGML
type, a holder of its blocks that becomes a float ``nn.Linear`` once loaded; an untied token embedding in a GGML
type stays the model's own embedding module, its weight loaded as blocks and decoded) before transformers loads
the tensors into it. ``import bitplan`` only registers a post-import hook (``wrapt``): transformers is imported, and
the quantizer registered, when the caller imports transformers, not before.
"""

from __future__ import annotations

from typing import Any

QUANT_METHOD = "bitplan"
INDEX_FILE = "model.safetensors.index.json"
_registered = False


def quantization_config(units: list[dict[str, Any]], format_version: int, guard: str | None = None
                        ) -> dict[str, Any]:
    """The ``quantization_config`` written into an artifact's ``config.json``; ``guard`` names the placeholder
    tensor that makes transformers refuse the folder without our package
    (:data:`bitplan.targets.artifact.GUARD_FILE`)."""
    keep = ("name", "bits", "group_size", "in_features", "out_features", "bias", "group_bits", "layout", "format")
    config = {"quant_method": QUANT_METHOD, "format_version": format_version,
              "units": [{k: u[k] for k in keep if u.get(k) is not None} for u in units]}
    return config | ({"guard": guard} if guard else {})


def register(_module: Any = None) -> None:
    """Register the ``bitplan`` quantization method with transformers (once): the config and quantizer of
    :mod:`bitplan.targets.hf_loading`, which imports transformers and is therefore imported only now."""
    global _registered
    if _registered:
        return
    from bitplan.targets.hf_loading import register_with_transformers

    register_with_transformers()
    _registered = True


def install_hook() -> None:
    """Register with transformers once it is imported (now, if it already is)."""
    import wrapt

    wrapt.register_post_import_hook(register, "transformers")
