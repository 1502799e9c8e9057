"""Where a streamed job computes and in what dtype: the rules behind the job options ``device`` and
``compute_dtype``, in one place so that the spec's check and the stream agree.

``auto`` devices resolve to CUDA when a GPU is visible, else the CPU. ``auto`` compute dtypes resolve to float32,
the reference: bfloat16 blocks were faster on this project's CPU (AVX-512 BF16, torch 2.13: 1.8x on a block of the
1B shape) but moved SmolLM2's per-unit predictions by a median 4% (over 1% for 86% of them), past the 1e-2 a
default may move them (docs/streaming.md, "Devices, dtypes and memory"); they are there to be asked for.
"""

from __future__ import annotations

import torch

from bitplan.errors import SpecError

DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_device(name: str) -> None:
    """Refuse a device this machine cannot give (``cuda`` without a visible GPU) with how to fix it."""
    if name not in DEVICES:
        raise SpecError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}", param="device")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' was asked for but torch sees no GPU here (torch.cuda.is_available() is "
                        f"false; this torch is {torch.__version__}): use --device cpu or auto, or run the job on a "
                        "machine with a GPU and a CUDA build of torch", param="device")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu`` / ``cuda`` as named (checked)."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_compute_dtype(name: str) -> torch.dtype:
    """``auto`` -> float32 (the reference, see the module docstring); ``float32`` / ``bfloat16`` as named."""
    if name == "auto":
        return torch.float32
    if name not in COMPUTE_DTYPES:
        raise SpecError(f"unknown compute dtype {name!r}; choose one of auto, {', '.join(COMPUTE_DTYPES)}",
                        param="compute_dtype")
    return COMPUTE_DTYPES[name]
