"""Quantization units: every ``nn.Linear`` inside the model's stack of transformer blocks."""

from __future__ import annotations

from torch import nn

from bitplan.errors import ModelReferenceError
from bitplan.sources.moe import LinearExperts


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of transformer blocks: the longest list whose items contain a Linear layer (a MoE
    layer's list of experts, inside a block, is never it)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not isinstance(module, LinearExperts) and len(module) > 0:
            if any(isinstance(m, nn.Linear) for m in module.modules()):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:  # bad input (a model with zero layers, say): the caller's, with the model named
        raise ModelReferenceError(f"{type(model).__name__} has no list of blocks containing nn.Linear layers: "
                                  f"no linear layers inside its transformer blocks to quantize (zero layers?)")
    return best


def block_index(name: str, stack_name: str) -> int | None:
    """The index of the block that unit ``name`` lies in (``{stack_name}.{i}.…``), or ``None`` outside the stack."""
    prefix = stack_name + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def find_units(model: nn.Module) -> dict[str, nn.Linear]:
    """Qualified name -> ``nn.Linear`` for every linear layer inside the transformer blocks, in model order.

    Embeddings, the output head and anything outside the block stack stay in float.
    """
    stack_name, _ = find_block_stack(model)
    prefix = stack_name + "."
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix)
    }


def find_output_head(model: nn.Module) -> dict[str, nn.Linear]:
    """Qualified name -> the output head (``get_output_embeddings()``), when the model has a linear one. In a tied
    model its weight is the input embedding's too: quantizing it quantizes both (as in a GGUF's ``token_embd``)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        return {}
    return {name: module for name, module in model.named_modules() if module is head}


def find_untied_embedding(model: nn.Module) -> dict[str, nn.Embedding]:
    """Qualified name -> the input token embedding, when it is a tensor of its own (not the output head's weight):
    in a GGUF it is the file's ``token_embd``, one more tensor a whole-file budget chooses a type for. Quantizing
    it changes only the token lookup."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Embedding):
        return {}
    if any(getattr(head, "weight", None) is embedding.weight for head in find_output_head(model).values()):
        return {}
    return {name: module for name, module in model.named_modules() if module is embedding}


def unit_shape(module: nn.Module) -> tuple[int, int]:
    """``(rows, columns)`` of a unit's weight: ``(out_features, in_features)`` of a linear layer, ``(vocabulary,
    width)`` of an embedding (a GGML row is one token's vector, as llama.cpp stores ``token_embd``)."""
    rows, columns = module.weight.shape
    return int(rows), int(columns)
