"""Mixture-of-experts layers: a layer's routed experts as one ``nn.Linear`` per projection per expert.

transformers 5 stores a layer's experts as fused 3-D parameters (``experts.gate_up_proj (E, 2I, H)``,
``experts.down_proj (E, H, I)``), which are not ``nn.Linear`` modules, so nothing that looks for units would see
them and most of a MoE model's bytes would stay in float. :func:`unfuse_experts` replaces each fused experts module
with :class:`LinearExperts`, a list of :class:`ExpertMLP` (``gate_proj``, ``up_proj``, ``down_proj``) that computes
the same function. Then:

* every expert projection is a unit like any other linear layer;
* the hooks that gather calibration statistics see, for each expert, only the tokens the router sent it (its
  token count, Grams and importance), and the token metrics credit it with exactly those tokens;
* the names (``…mlp.experts.3.gate_proj``) are those of the checkpoints on disk (Qwen3-MoE, OLMoE, DeepSeek and
  what ``save_pretrained`` writes), so a lazy source finds each expert's tensor by name.

The router (a parameter, not a linear layer, in transformers 5) stays in float; shared experts are ordinary MLPs.
A fused layout this module cannot read is refused, never left in float in silence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from bitplan.errors import ModelReferenceError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^(?P<stack>.*\.experts)\.(?P<expert>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)$")


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(gate(gate_proj(x), up_proj(x)))`` (the gate function is its layer's)."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool, device: torch.device, dtype: torch.dtype):
        super().__init__()
        kwargs = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden, intermediate, **kwargs)
        self.up_proj = nn.Linear(hidden, intermediate, **kwargs)
        self.down_proj = nn.Linear(intermediate, hidden, **kwargs)


class LinearExperts(nn.ModuleList):
    """A layer's routed experts, one :class:`ExpertMLP` each, called as transformers calls its fused experts:
    ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``. Experts run in ascending order
    and add into the output as the fused eager loop does."""

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.is_concatenated = bool(getattr(fused, "is_concatenated", True))
        self._gate = type(fused)._apply_gate if hasattr(type(fused), "_apply_gate") else None
        for attribute in ("act_fn", "alpha", "limit"):  # what the layer's gate function reads
            if hasattr(fused, attribute):
                setattr(self, attribute, getattr(fused, attribute))

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The layer's gate function on one expert's two projections (its own ``_apply_gate`` when it has one,
        fed the layout it reads: ``[gate; up]`` concatenated or interleaved)."""
        if self._gate is None:
            return self.act_fn(gate) * up
        joined = torch.cat([gate, up], dim=-1) if self.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
        return self._gate(self, joined)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == self.num_experts:
                continue
            position, token = torch.where(mask[index])
            expert = self[index]
            x = hidden_states[token]
            y = expert.down_proj(self.gated(expert.gate_proj(x), expert.up_proj(x)))
            output.index_add_(0, token, (y * top_k_weights[token, position, None]).to(output.dtype))
        return output


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module holding its experts as 3-D parameters."""
    weight = getattr(module, "down_proj", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 3


def _expert_weights(fused: nn.Module, index: int) -> tuple[torch.Tensor, ...]:
    """``(gate (I, H), up (I, H), down (H, I))`` of expert ``index``, as ``nn.Linear`` stores them."""
    gate_up = fused.gate_up_proj[index]
    down = fused.down_proj[index]
    if getattr(fused, "is_transposed", False):
        gate_up, down = gate_up.T, down.T
    if getattr(fused, "is_concatenated", True):
        gate, up = gate_up.chunk(2, dim=0)
    else:
        gate, up = gate_up[0::2], gate_up[1::2]
    return gate, up, down


def _expert_biases(fused: nn.Module, index: int) -> tuple[torch.Tensor, ...] | None:
    if not getattr(fused, "has_bias", False):
        return None
    gate_up, down = fused.gate_up_proj_bias[index], fused.down_proj_bias[index]
    if getattr(fused, "is_concatenated", True):
        gate, up = gate_up.chunk(2)
    else:
        gate, up = gate_up[0::2], gate_up[1::2]
    return gate, up, down


def linear_experts(fused: nn.Module, where: str) -> LinearExperts:
    """The :class:`LinearExperts` computing what ``fused`` computes (weights copied; on ``meta`` they stay
    shapes only, for a lazy skeleton)."""
    gate_up = getattr(fused, "gate_up_proj", None)
    if not isinstance(gate_up, nn.Parameter) or gate_up.dim() != 3 or not getattr(fused, "has_gate", True):
        raise ModelReferenceError(f"the experts at {where} ({type(fused).__name__}) are stored in a layout bitplan "
                                  "cannot read (it needs gate_up_proj and down_proj as 3-D parameters): refusing "
                                  "rather than leaving them in float")
    count = gate_up.shape[0]
    gate, _, down = _expert_weights(fused, 0)
    intermediate, hidden = gate.shape
    experts = []
    for index in range(count):
        expert = ExpertMLP(hidden, intermediate, bias=getattr(fused, "has_bias", False), device=gate_up.device,
                           dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for linear, weight in zip((expert.gate_proj, expert.up_proj, expert.down_proj),
                                          _expert_weights(fused, index), strict=True):
                    linear.weight.copy_(weight)
                for linear, bias in zip((expert.gate_proj, expert.up_proj, expert.down_proj),
                                        _expert_biases(fused, index) or (), strict=False):
                    linear.bias.copy_(bias)
        experts.append(expert)
    return LinearExperts(experts, fused)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` with its :class:`LinearExperts`, in place, freeing the
    fused parameters as it goes; the number of layers replaced."""
    fused = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in fused:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, linear_experts(module, name))
        del module
    return len(fused)


@dataclass(frozen=True)
class ExpertUnit:
    """Where a unit sits in its layer's expert stack: ``stack`` (``…mlp.experts``), ``expert`` and
    ``projection`` (``gate_proj``, ``up_proj`` or ``down_proj``)."""

    stack: str
    expert: int
    projection: str

    @property
    def tie(self) -> str:
        """The label of the tensor a runtime that stores a layer's experts as one 3-D tensor per projection
        (llama.cpp's ``ffn_gate_exps``) holds this unit in: one format for all of them."""
        return f"{self.stack}.*.{self.projection}"


def expert_unit(name: str) -> ExpertUnit | None:
    """The expert a unit name belongs to (``….experts.<e>.<projection>``), or ``None`` for any other unit."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    return ExpertUnit(match["stack"], int(match["expert"]), match["projection"])


def unit_kind(name: str) -> str:
    """What a unit is, for the report's bytes by kind: ``experts``, ``shared_experts``, ``attention``, ``mlp``."""
    if expert_unit(name) is not None:
        return "experts"
    if ".shared_expert" in name:
        return "shared_experts"
    if ".self_attn." in name or ".attention." in name or ".attn." in name:
        return "attention"
    return "mlp"


_MIXTRAL_PROJECTIONS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def checkpoint_aliases(name: str) -> list[str]:
    """Other names a checkpoint may store a MoE tensor under: Mixtral's files keep ``block_sparse_moe`` and call
    an expert's projections ``w1`` (gate), ``w3`` (up) and ``w2`` (down)."""
    if ".mlp." not in name:
        return []
    aliased = name.replace(".mlp.", ".block_sparse_moe.", 1)
    unit = expert_unit(aliased.removesuffix(".weight"))
    if unit is not None:
        aliased = f"{unit.stack}.{unit.expert}.{_MIXTRAL_PROJECTIONS[unit.projection]}.weight"
    return [aliased]
