"""Re-solve an allocation with what the whole quantized model measures: each block's share of the output KL.

A per-unit prediction sees one unit quantized alone. Once an allocation is chosen and quantized, the model's
output KL divergence can be split by block (``KL(all) - KL(all but that block)``, with every other unit
quantized), which includes the interactions between units. Each block's predicted increases (over the widest
width) are scaled by its measured share over its predicted share, clamped to ``[1/MAX_SCALE, MAX_SCALE]``, and the
allocation is solved again, with the scales at full strength and damped (``scale ** p`` for each ``p`` in
``DAMPING``); the distinct new allocations are quantized together (one calibration pass for GPTQ's Grams). The
allocation with the lowest KL on calibration windows that took no part in the scaling is kept,
the first one included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from bitplan.quantizer.rtn import dequantize_weight
from bitplan.sensitivity import SensitivityResult
from bitplan.sensitivity.activations import ProgressFn, StopFn, check_stop
from bitplan.sensitivity.kl import kl_contributions, output_kl
from bitplan.sources.units import block_index
from bitplan.stages import Stage

MAX_SCALE = 4.0
DAMPING = (1.0, 0.5, 0.25)  # the scales are tried at these powers; each distinct allocation is quantized and checked

SolveFn = Callable[[SensitivityResult], dict[str, int]]  # sensitivities -> bits per unit within the budget
QuantizeFn = Callable[[list[dict[str, int]]], list[dict[str, Any]]]  # allocations -> quantized units, each


@dataclass(frozen=True)
class Refinement:
    """The allocation to keep, its quantized units, and what the refinement measured (for the manifest)."""

    chosen: dict[str, int]
    quantized: dict[str, Any]
    report: dict[str, Any]


def block_groups(unit_names: list[str], stack_name: str | None) -> dict[str, list[str]]:
    """Unit names grouped by transformer block (``{stack_name}.{i}``); a unit outside the blocks is its own group."""
    groups: dict[str, list[str]] = {}
    for name in unit_names:
        index = None if stack_name is None else block_index(name, stack_name)
        groups.setdefault(name if index is None else f"{stack_name}.{index}", []).append(name)
    return groups


def group_scales(sensitivity: SensitivityResult, chosen: Mapping[str, int], groups: Mapping[str, list[str]],
                 contributions: Mapping[str, float]) -> dict[str, float]:
    """Per group, its measured share of the KL over its predicted share of the increase (both counted from zero
    up: a negative measured contribution is noise or a gain and counts as none), clamped."""
    excess = {u.name: u.delta_loss[chosen[u.name]] - u.delta_loss[max(u.delta_loss)] for u in sensitivity.units}
    predicted = {g: max(sum(excess[name] for name in names), 0.0) for g, names in groups.items()}
    measured = {g: max(contributions[g], 0.0) for g in groups}
    predicted_total, measured_total = sum(predicted.values()), sum(measured.values())
    scales = {}
    for group in groups:
        if predicted_total <= 0 or measured_total <= 0:
            scales[group] = 1.0
        elif predicted[group] <= 0:
            scales[group] = MAX_SCALE if measured[group] > 0 else 1.0
        else:
            ratio = (measured[group] / measured_total) / (predicted[group] / predicted_total)
            scales[group] = min(max(ratio, 1.0 / MAX_SCALE), MAX_SCALE)
    return scales


def rescaled(sensitivity: SensitivityResult, groups: Mapping[str, list[str]], scales: Mapping[str, float]
             ) -> SensitivityResult:
    """Each unit's increase over its widest width multiplied by its group's scale (the widest stays put)."""
    scale_of = {name: scales[group] for group, names in groups.items() for name in names}
    units = []
    for unit in sensitivity.units:
        floor = unit.delta_loss[max(unit.delta_loss)]
        units.append(replace(unit, delta_loss={b: floor + scale_of[unit.name] * (v - floor)
                                               for b, v in unit.delta_loss.items()}))
    return replace(sensitivity, units=tuple(units))


def refine_allocation(model: nn.Module, units: Mapping[str, nn.Linear], stack_name: str | None,
                      sensitivity: SensitivityResult, chosen: dict[str, int], quantized: dict[str, Any],
                      windows: torch.Tensor, *, solve: SolveFn, quantize: QuantizeFn,
                      on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> Refinement:
    """One KL-guided re-solve. ``windows`` (``2n`` calibration windows): the first ``n`` measure the block shares,
    the last ``n`` compare the allocations' KL."""
    started = time.perf_counter()
    half = windows.shape[0] // 2
    if half < 1:
        raise ValueError("KL refinement needs at least two calibration windows")
    scale_windows = list(torch.split(windows[:half], 1))
    check_windows = list(torch.split(windows[half: 2 * half], 1))
    groups = block_groups(list(units), stack_name)
    replacements = {name: dequantize_weight(q) for name, q in quantized.items()}
    steps = len(groups) * len(scale_windows)
    done = 0

    def tick() -> None:
        nonlocal done
        check_stop(should_stop, "KL refinement")
        done += 1
        if on_progress is not None:
            on_progress(Stage.KL_REFINEMENT, done, steps)

    _, contributions = kl_contributions(model, units, replacements, groups, scale_windows, on_group=tick)
    scales = group_scales(sensitivity, chosen, groups, contributions)
    kl_first = output_kl(model, units, replacements, check_windows)
    report: dict[str, Any] = {
        "scale_windows": len(scale_windows), "check_windows": len(check_windows),
        "block_kl": {g: round(v, 8) for g, v in contributions.items()},
        "block_scales": {g: round(v, 4) for g, v in scales.items()},
        "kl_first": kl_first,
    }
    solved = {power: solve(rescaled(sensitivity, groups, {g: v**power for g, v in scales.items()}))
              for power in DAMPING}
    distinct: list[dict[str, int]] = []
    for candidate in solved.values():
        if candidate != chosen and candidate not in distinct:
            distinct.append(candidate)
    checked = []
    for candidate, candidate_quantized in zip(distinct, quantize(distinct) if distinct else [], strict=True):
        kl = output_kl(model, units, {name: dequantize_weight(q) for name, q in candidate_quantized.items()},
                       check_windows)
        checked.append((kl, candidate, candidate_quantized))
    best_kl, best_chosen, best_quantized = min([(kl_first, chosen, quantized), *checked], key=lambda c: c[0])
    kl_of = [next((kl for kl, c, _ in checked if c == candidate), None) for candidate in solved.values()]
    report["candidates"] = [{"power": power, "changed_units": _changed(candidate, chosen), "kl": kl}
                            for (power, candidate), kl in zip(solved.items(), kl_of, strict=True)]
    best_power = next((p for p, c in solved.items() if c is best_chosen), None)
    report.update(quantized_allocations=len(distinct), kept="first" if best_chosen is chosen else "refined",
                  power=best_power, kl_kept=best_kl,
                  changed_units=_changed(best_chosen, chosen), seconds=round(time.perf_counter() - started, 3))
    return Refinement(best_chosen, best_quantized, report)


def _changed(candidate: Mapping[str, int], chosen: Mapping[str, int]) -> int:
    return sum(candidate[name] != bits for name, bits in chosen.items())
