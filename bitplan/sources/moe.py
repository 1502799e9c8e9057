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

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bitplan.errors import ModelReferenceError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^(?P<stack>.*\.experts)\.(?P<expert>\d+)\.(?P<projection>gate_proj|up_proj|down_proj|w1|w2|w3)$")
_OLD_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral-style Linear experts


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

    routed: torch.Tensor | None = None  # tokens routed to each expert while counted (:func:`routed_tokens`)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            if self.routed is not None:
                self.routed += torch.bincount(top_k_index.flatten().cpu(), minlength=self.num_experts + 1)[
                    : self.num_experts]
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
    projection = match["projection"]
    return ExpertUnit(match["stack"], int(match["expert"]), _OLD_NAMES.get(projection, projection))


def expert_order(unit: str) -> tuple[str, int]:
    """A sort key putting an expert stack's units in expert order (a file stores the stack as one tensor)."""
    expert = expert_unit(unit)
    return (unit, -1) if expert is None else (f"{expert.stack}.{expert.projection}", expert.expert)


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


def checkpoint_name(name: str, model_type: str | None) -> str:
    """The name a checkpoint of ``model_type`` stores tensor or module ``name`` under, as transformers'
    ``save_pretrained`` writes it and its loader converts it back: Mixtral's (:func:`checkpoint_aliases`); any
    other model's own."""
    if model_type != "mixtral" or ".mlp." not in name:
        return name
    return checkpoint_aliases(f"{name}.weight")[0].removesuffix(".weight")  # a unit's name, or a tensor's


def expert_stacks(model: nn.Module) -> dict[str, LinearExperts]:
    """Qualified name -> each MoE layer's :class:`LinearExperts`, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LinearExperts)}


@contextlib.contextmanager
def routed_tokens(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Count, while the block is open, the tokens the router sends each expert: stack name -> ``(experts,)``
    int64 counts (a token picked by two experts counts once for each), filled by every forward run inside."""
    stacks = expert_stacks(model)
    counts = {name: torch.zeros(stack.num_experts, dtype=torch.int64) for name, stack in stacks.items()}
    for name, stack in stacks.items():
        stack.routed = counts[name]
    try:
        yield counts
    finally:
        for stack in stacks.values():
            stack.routed = None


@dataclass(frozen=True)
class RoutingReport:
    """What the calibration windows did in each MoE layer: the tokens each expert saw, and the experts no token
    reached (whose statistics are empty: they get their stack's format or a safe width, never a guess)."""

    tokens: dict[str, list[int]]  # stack name -> tokens per expert
    unreached: list[str]  # "<stack>.<expert>"

    @classmethod
    def of(cls, counts: dict[str, torch.Tensor]) -> RoutingReport:
        tokens = {name: [int(c) for c in value.tolist()] for name, value in counts.items()}
        return cls(tokens=tokens, unreached=[f"{name}.{index}" for name, per in tokens.items()
                                             for index, count in enumerate(per) if count == 0])

    def unreached_units(self, units: Iterable[str]) -> list[str]:
        """The units (expert projections) of the experts no calibration token reached."""
        dead = set(self.unreached)
        return [name for name in units if (e := expert_unit(name)) is not None and f"{e.stack}.{e.expert}" in dead]

    def unit_tokens(self, units: Iterable[str]) -> dict[str, int]:
        """Expert unit -> the tokens routed to its expert (what an importance matrix counts for it)."""
        return {name: self.tokens[e.stack][e.expert] for name in units
                if (e := expert_unit(name)) is not None and e.stack in self.tokens}

    def to_json(self) -> dict[str, object]:
        counts = [c for per in self.tokens.values() for c in per]
        return {"layers": len(self.tokens), "experts": len(counts), "tokens_per_expert": self.tokens,
                "min_tokens": min(counts, default=0), "max_tokens": max(counts, default=0),
                "unreached": self.unreached}


def unit_kind(name: str) -> str:
    """What a unit or float tensor is, for the report's bytes by kind: ``experts``, ``shared_experts``, ``router``,
    ``attention``, ``mlp``, ``embedding``, ``head``, ``norm`` or ``other``."""
    base = name.removesuffix(".weight").removesuffix(".bias")
    if expert_unit(base) is not None or ".experts." in name:
        return "experts"
    if ".shared_expert" in name:
        return "shared_experts"
    if re.search(r"\.(gate|router)(\.|$)", base) and "gate_proj" not in base:
        return "router"
    if "embed" in base:
        return "embedding"
    if base.endswith(("lm_head", "output")):
        return "head"
    if "norm" in base:
        return "norm"
    if ".self_attn." in name or ".attention." in name or ".attn." in name:
        return "attention"
    if ".mlp." in name or ".feed_forward." in name:
        return "mlp"
    return "other"


def measure_routing(model: nn.Module, forward: Callable[[], object]) -> RoutingReport | None:
    """The tokens each expert of ``model`` is routed by ``forward`` (one pass over the calibration windows, whole
    or streamed), or ``None`` for a model without experts."""
    if not expert_stacks(model):
        return None
    with routed_tokens(model) as counts, torch.no_grad():
        forward()
    return RoutingReport.of(counts)


SAFE_EXPERT_BITS = 4  # what an expert no calibration token reached is pinned to where experts stand apart


def unreached_pins(routing: RoutingReport | None, units: Iterable[str], widths: Iterable[int],
                   *, stacked: bool) -> tuple[tuple[str, int], ...]:
    """Pins for the units of experts no calibration token reached: their statistics are zero, so the allocator
    would give them its narrowest option on no evidence. Where a runtime stacks a layer's experts (``stacked``,
    GGUF) they take their stack's format and need none; elsewhere they are pinned to :data:`SAFE_EXPERT_BITS`
    (or the candidate width nearest above it)."""
    if routing is None or stacked:
        return ()
    candidates = sorted(set(widths))
    above = [w for w in candidates if w >= SAFE_EXPERT_BITS]
    width = above[0] if above else candidates[-1]
    return tuple((name, width) for name in routing.unreached_units(units))
