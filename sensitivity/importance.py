"""Per-column input energy of every unit on the calibration set: ``sum_t x_t^2`` for each input column, the
diagonal of the input Gram matrix and what ``llama-imatrix`` accumulates. Encoders that take an importance
vector (llama.cpp's K-quant and IQ searches, the salience-calibrated grids) weight their rounding error by it.

One forward pass over the batches, without a graph; only one vector per unit is held.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from bitplan.sensitivity.activations import ProgressFn, StopFn, check_stop
from bitplan.stages import Stage


def input_energy(model: nn.Module, units: Mapping[str, nn.Linear], batches: Sequence[torch.Tensor], *,
                 on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> dict[str, torch.Tensor]:
    """Unit name -> ``(in_features,)`` float32 sum over calibration tokens of the squared input per column."""
    energy = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in units.items()}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            energy[name] += x.double().pow(2).sum(dim=0)

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in units.items()]
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                check_stop(should_stop, "input energy")
                model(batch)
                if on_progress is not None:
                    on_progress(Stage.CALIBRATION_STATISTICS, index + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.float() for name, value in energy.items()}
