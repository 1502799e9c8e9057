"""Which of vLLM's WNA16 kernels would serve each layer of a compressed-tensors export, per GPU generation.

vLLM picks a mixed-precision linear kernel per layer (``choose_mp_linear_kernel`` in
``vllm/model_executor/layers/quantization/kernels/mixed_precision/__init__.py``): the first of its kernels, in
priority order, whose minimum compute capability the GPU has and whose ``can_implement`` accepts the layer's
weight type, group size and shape. The table below restates those rules for what our export writes (symmetric
integer weights, ``uint4b8`` / ``uint8b128`` in vLLM's terms, no activation reordering, one GPU), as read in
vLLM's sources (``machete.py``/``machete_utils.py``: sm90, groups -1 and 128, input width a multiple of 64 and
output a multiple of 128; ``marlin.py``/``marlin_utils.py``: sm80, groups -1/32/64/128, output a multiple of 64
and input of 128, the group dividing the input; ``exllama.py``: sm60, 4 or 8 bits, any group that divides the
input, output a multiple of 32). Newer vLLM versions pad Marlin's shapes and add kernels (AllSpark for sm80-89
with per-channel scales, Cutlass W4A8, CPU and XPU paths); this table is a prediction to check on the machine
that serves the model, not a measurement. Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CAPABILITIES = {"sm90": 90, "sm80": 80, "sm75": 75}  # Hopper, Ampere, Turing


@dataclass(frozen=True)
class Kernel:
    name: str
    min_capability: int
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...] | None  # None: any group size that divides the input width (or -1)
    out_multiple: int
    in_multiple: int


KERNELS = (  # vLLM's priority order
    Kernel("MacheteLinearKernel", 90, (4, 8), (-1, 128), out_multiple=128, in_multiple=64),
    Kernel("MarlinLinearKernel", 80, (4, 8), (-1, 32, 64, 128), out_multiple=64, in_multiple=128),
    Kernel("ExllamaLinearKernel", 60, (4, 8), None, out_multiple=32, in_multiple=1),
)


def why_not(kernel: Kernel, bits: int, group_size: int, in_features: int, out_features: int,
            capability: int) -> str | None:
    """Why ``kernel`` cannot serve the layer on a GPU of ``capability`` (``None``: it can)."""
    if capability < kernel.min_capability:
        return f"needs compute capability {kernel.min_capability}"
    if bits not in kernel.bits:
        return f"serves {'/'.join(map(str, kernel.bits))}-bit weights"
    if kernel.group_sizes is not None and group_size not in kernel.group_sizes:
        return f"group sizes {kernel.group_sizes}"
    if group_size > 0 and in_features % group_size:
        return f"the group {group_size} must divide the input width {in_features}"
    if out_features % kernel.out_multiple or in_features % kernel.in_multiple:
        return f"shape must be a multiple of {kernel.out_multiple} x {kernel.in_multiple} (out x in)"
    return None


def serving_kernels(bits: int, group_size: int, in_features: int, out_features: int) -> dict[str, Any]:
    """Per GPU generation, the kernel vLLM would choose for the layer, or ``None`` with every kernel's reason."""
    result: dict[str, Any] = {}
    for label, capability in CAPABILITIES.items():
        reasons = {k.name: why_not(k, bits, group_size, in_features, out_features, capability) for k in KERNELS}
        chosen = next((name for name, reason in reasons.items() if reason is None), None)
        result[label] = chosen if chosen is not None else {"none": {k: v for k, v in reasons.items()}}
    return result
