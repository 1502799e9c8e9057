"""Quantization step: plans -> quantized units (the calibration Grams collected once for every plan), and the
quantized model's KL divergence to the float one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.quantizer.formats import FORMATS, GgmlWeight, encode_gptq
from bitplan.quantizer.ggml_encode import DEFAULT_ENCODER, encode_ggml
from bitplan.quantizer.methods import needs_gram, needs_whole_gram, quantize_unit
from bitplan.quantizer.rtn import QuantizedWeight
from bitplan.sensitivity.activations import StopFn, check_stop
from bitplan.sensitivity.blockwise import block_grams
from bitplan.sensitivity.kl import output_kl
from bitplan.sources.models import LoadedModel, ModelKind
from bitplan.sources.units import find_block_stack
from bitplan.stages import ProgressFn, Stage

if TYPE_CHECKING:
    from bitplan.spec import JobSpec

Quantized = dict[str, "QuantizedWeight | GgmlWeight"]
Importance = dict[str, torch.Tensor]  # unit name -> per-column input energy on the calibration set


def spec_needs_grams(spec: JobSpec) -> bool:
    """Whether quantizing under ``spec`` needs each unit's calibration input Gram matrix (formats take only its
    diagonal, :func:`sensitivity.importance.input_energy`)."""
    if spec.quantization.format_names is not None:
        return runs_gptq(spec)
    return needs_gram(spec.quantization.quantizer.value) or spec.quantization.mix_groups


def reuses_importance(spec: JobSpec, importance: Importance | None, units: dict[str, nn.Linear]) -> bool:
    """Whether the job's widths are encoded with the per-column input energy the sensitivity pass already
    measured (the vector the told errors were computed with) instead of a second calibration pass: where its
    quantizer and ``--mix-groups`` read only the Gram matrices' diagonals (``rtn-salience``; not GPTQ)."""
    options = spec.quantization
    return (options.format_names is None and spec_needs_grams(spec) and not needs_whole_gram(options.quantizer.value)
            and importance is not None and all(name in importance for name in units))


def runs_gptq(spec: JobSpec) -> bool:
    """Whether the job's integer grid formats are encoded by GPTQ (``--quantizer gptq`` or ``gptq-salience``)."""
    return spec.quantization.quantizer.value.startswith("gptq")


def encoder_importance(spec: JobSpec, fmt: str, importance: Importance | None, name: str) -> torch.Tensor | None:
    """The importance vector ``fmt``'s encoder gets for unit ``name``: llama.cpp's always (what llama-imatrix
    would give it), our integer grids' only with ``--quantizer rtn-salience`` (plain ``rtn`` is min/max)."""
    if importance is None:
        return None
    if FORMATS[fmt].family == "bitplan-int" and spec.quantization.quantizer.value != "rtn-salience":
        return None
    return importance.get(name)  # none for a token embedding: a lookup has no input activations


def encode_unit(spec: JobSpec, weight: torch.Tensor, fmt: str, importance: Importance | None,
                name: str, gram: torch.Tensor | None = None) -> QuantizedWeight | GgmlWeight:
    """``weight`` in format ``fmt`` by that format's encoder (a GGML type by the spec's ``--encoder``); an integer
    grid under ``--quantizer gptq`` by GPTQ on the unit's calibration input Gram matrix ``gram``."""
    if runs_gptq(spec) and FORMATS[fmt].grid is not None:
        if gram is None:
            raise BitplanError(f"GPTQ needs {name}'s calibration Gram matrix to encode {fmt}")
        return encode_gptq(fmt, weight.detach().float(), gram, damp=spec.quantization.gptq_damp,
                           salience=spec.quantization.quantizer.value == "gptq-salience")
    encoder = spec.quantization.encoder.value
    if FORMATS[fmt].family == "ggml" and encoder != DEFAULT_ENCODER:  # --encoder: who writes the GGML blocks
        blocks = encode_ggml(weight.detach().float(), FORMATS[fmt].ggml_type,
                             encoder_importance(spec, fmt, importance, name), encoder=encoder)
        return GgmlWeight(fmt, blocks, (int(weight.shape[0]), int(weight.shape[1])))
    return FORMATS[fmt].encode(weight.detach().float(), encoder_importance(spec, fmt, importance, name))


def input_grams(loaded: LoadedModel, units: dict[str, nn.Linear], tokens: torch.Tensor,
                on_progress: ProgressFn | None, should_stop: StopFn | None) -> dict[str, torch.Tensor]:
    """Every unit's calibration input Gram matrix ``sum_t x_t x_t^T`` (what GPTQ and salience need), all at once
    (:func:`quantize_plans` consumes them block by block instead)."""
    grams = {}
    for block in grams_by_block(loaded, units, tokens, on_progress, should_stop):
        grams.update(block)
    return {name: grams[name] for name in units}


def grams_by_block(loaded: LoadedModel, units: dict[str, nn.Linear], tokens: torch.Tensor,
                   on_progress: ProgressFn | None, should_stop: StopFn | None) -> Iterator[dict[str, torch.Tensor]]:
    """Unit name -> input Gram matrix, one transformer block at a time (:func:`sensitivity.blockwise.block_grams`)."""
    for stats in block_grams(loaded.model, find_block_stack(loaded.model), units, list(torch.split(tokens, 1)),
                             on_progress=on_progress, should_stop=should_stop):
        yield {name: entry.gram for name, entry in stats.items()}


def quantize_plans(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear],
                   choices: list[dict[str, int]] | list[dict[str, str]], tokens: torch.Tensor | None,
                   on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   importance: Importance | None = None) -> list[Quantized]:
    """Every unit at its bit width, for each allocation in ``choices``, with the spec's quantizer; or, where an
    allocation names formats (strings), in its format by that format's encoder with ``importance``.

    A calibrated quantizer (GPTQ, salience) gets each unit's input Gram matrix; they are collected block by block
    on ``tokens`` and each block's are dropped as soon as its units are quantized for every allocation, so only
    one block's Grams are held. Where only their diagonals are read (:func:`reuses_importance`), the measured
    ``importance`` is passed instead, with no second calibration pass.
    """
    options = spec.quantization
    quantized: list[Quantized] = [{} for _ in choices]
    done = 0
    reuse = reuses_importance(spec, importance, units)
    energy: Importance = importance if reuse and importance is not None else {}  # the diagonals, when reused

    def quantize(names: list[str], grams: dict[str, torch.Tensor] | None) -> None:
        nonlocal done
        for name in names:
            for chosen, into in zip(choices, quantized, strict=True):
                if isinstance(chosen[name], str):
                    into[name] = encode_unit(spec, units[name].weight, chosen[name], importance, name,
                                             None if grams is None else grams[name])
                    continue
                into[name] = quantize_unit(units[name].weight, method=options.quantizer.value, bits=chosen[name],
                                           group_size=options.group_size, mix_groups=options.mix_groups,
                                           damp=options.gptq_damp, gram=None if grams is None else grams[name],
                                           salience=energy.get(name))
            done += 1
            if on_progress is not None:
                on_progress(Stage.QUANTIZE, done, len(units))
            check_stop(should_stop, "quantization")

    if reuse:
        quantize(list(units), None)
    elif spec_needs_grams(spec):
        if tokens is None:
            raise BitplanError(f"quantizer {options.quantizer.value!r} needs calibration tokens")
        for grams in grams_by_block(loaded, units, tokens, None, should_stop):
            quantize(list(grams), grams)
    else:
        quantize(list(units), None)
    return [{name: into[name] for name in units} for into in quantized]


def measure_kl(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear],
               replacements: dict[str, torch.Tensor], tokens: torch.Tensor | None) -> tuple[float | None, float]:
    """KL divergence of the quantized model's next-token distribution (``replacements``: each unit's dequantized
    weight) on the first ``kl_windows`` calibration windows (language models only), and the seconds it took."""
    windows = spec.refinement.kl_windows
    if windows <= 0 or tokens is None or loaded.kind is not ModelKind.CAUSAL_LM:
        return None, 0.0
    started = time.perf_counter()
    kl = output_kl(loaded.model, units, replacements, list(torch.split(tokens[:windows], 1)))
    return kl, round(time.perf_counter() - started, 3)
