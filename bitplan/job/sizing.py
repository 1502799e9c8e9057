"""Step 2 of the pipeline: the units a job plans for (the block layers, and the head a whole-file budget also
chooses for), their exact bytes in every option, and every budget in bytes, checked before any heavy work; a
named size (``--size-of``) resolved to its bytes; the latency table a time budget is planned against."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bitplan.errors import BitplanError, ModelReferenceError, SpecError
from bitplan.job.planning import LatencyPlan, Sizes, budgets_in_bytes, latency_plan, unit_sizes
from bitplan.job.preset_size import preset_file_bytes
from bitplan.sources.models import LoadedModel, resolve_reference
from bitplan.sources.moe import expert_unit
from bitplan.sources.units import find_output_head, find_units, find_untied_embedding
from bitplan.spec import JobSpec
from bitplan.stages import ProgressFn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sized:
    """Step 2's result: the block units, the head units a whole-file budget also chooses for, every planned unit's
    exact bytes per option, and each budget in bytes (``None``: a uniform baseline)."""

    units: dict[str, nn.Linear]
    head: dict[str, nn.Module]
    sizes: Sizes
    budgets: list[int | None]

    @property
    def planned(self) -> dict[str, nn.Module]:
        """What the budget counts and the allocator chooses for."""
        return {**self.units, **self.head}


def size_units(spec: JobSpec, loaded: LoadedModel) -> Sized:
    """Step 2: find the units and check every budget against the achievable range (before any heavy work)."""
    units = find_units(loaded.model)
    if not units:
        raise ModelReferenceError(f"{spec.model!r} has no linear layers inside its transformer blocks to quantize")
    if spec.quantization.target.value == "gguf":
        check_gguf_source(spec, loaded)
    if spec.quantization.target.value == "compressed-tensors":
        check_compressed_tensors_experts(spec, loaded, units)
    head = head_units(spec, loaded)
    planned = {**units, **head}
    sizes = unit_sizes(planned, spec.widths, spec.quantization.group_size, spec.quantization.format_names,
                       spec.quantization.target.value)
    if spec.budget.uniform_bits is not None:
        return Sized(units=units, head=head, sizes=sizes, budgets=[None])
    overhead = None
    if spec.budget.file_bytes is not None:
        from bitplan.targets.exports.gguf_file import file_overhead

        overhead = file_overhead(loaded.source_path, list(planned))
    numel = sum(m.weight.numel() for m in planned.values())
    return Sized(units=units, head=head, sizes=sizes, budgets=list(budgets_in_bytes(spec, sizes, numel, overhead)))


def resolve_named_size(spec: JobSpec) -> JobSpec:
    """``--size-of PRESET``: the spec with the whole-file budget (``file_bytes``) of the GGUF llama.cpp's preset
    would make of the model (:func:`bitplan.job.preset_size.preset_file_bytes`), or ``spec`` itself without one."""
    preset = spec.budget.size_of
    if preset is None:
        return spec
    source_format, path = resolve_reference(spec.model)
    if source_format != "gguf":
        raise ModelReferenceError(f"--size-of {preset.value} has llama.cpp plan its preset from a GGUF file; "
                                  f"{spec.model!r} is a {source_format} model: give --file-bytes instead",
                                  param="size_of")
    file_bytes = preset_file_bytes(path, preset.value)
    logger.info("--size-of %s: %d bytes of file", preset.value, file_bytes)
    return dataclasses.replace(spec, budget=dataclasses.replace(spec.budget, size_of=None, file_bytes=file_bytes))


def head_units(spec: JobSpec, loaded: LoadedModel) -> dict[str, nn.Module]:
    """The output head, and an untied model's token embedding, as more units to choose a format for: under a
    whole-file budget of the gguf target, which counts their bytes (in a tied model the head is the file's
    ``token_embd``: the embedding and the head are one tensor; in an untied one ``output`` and ``token_embd`` are
    two, each chosen). Under a budget of the block linear layers alone they keep the source's types; with a time
    budget too (the latency table times the block linear layers' types only)."""
    if (spec.quantization.target.value != "gguf" or spec.budget.file_bytes is None or spec.budget.has_time_budget
            or spec.quantization.format_names is None):
        return {}
    return {**find_output_head(loaded.model), **find_untied_embedding(loaded.model)}


def plan_latency(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear], sizes: Sizes,
                 on_progress: ProgressFn | None) -> LatencyPlan | None:
    """Step 2b, with a latency (decode or prefill) budget: this machine's latency table for the model and the
    candidate GGML types (cached; measured now when missing, or read from ``--latency-table``), and the budgets
    checked against it."""
    if not spec.budget.has_time_budget:
        return None
    from bitplan.report.latency import latency_table

    names = spec.quantization.format_names or ()
    used = {fmt for options in sizes.values() for fmt in options}
    table_file = None if spec.budget.latency_table is None else Path(spec.budget.latency_table)
    table, source = latency_table(spec.model, loaded.source_sha256, [f for f in names if f in used],
                                  table_file=table_file, on_progress=on_progress, loaded=loaded)
    return latency_plan(table, source, units, sizes, spec.budget.latency_ms_per_token,
                        spec.budget.prefill_ms_per_token)


# MoE model types whose per-expert compressed-tensors checkpoints transformers 5.25 loads into its fused experts
# (each expert's projections dequantized and merged): tested on tiny models of each (tests/moe/test_moe_ct.py)
CT_EXPERT_MODEL_TYPES = ("qwen3_moe", "olmoe", "mixtral")


def check_compressed_tensors_experts(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear]) -> None:
    """A MoE model goes to compressed-tensors only where transformers reads per-expert checkpoints back into its
    fused experts; elsewhere (gpt-oss: its checkpoints hold the experts fused) the folder would not load as
    quantized, so it is refused before any heavy work."""
    if not any(expert_unit(name) is not None for name in units):
        return
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", None)
    if model_type not in CT_EXPERT_MODEL_TYPES:
        raise ModelReferenceError(
            f"the compressed-tensors target writes a MoE model's experts one by one, which transformers loads back "
            f"only for {', '.join(CT_EXPERT_MODEL_TYPES)}; {spec.model!r} is {model_type!r}: use --target gguf or "
            f"the packed folder (--target bitplan)", param="target")


def check_gguf_source(spec: JobSpec, loaded: LoadedModel) -> None:
    """The gguf target takes metadata and tokenizer from a GGUF file or a Hugging Face folder of a supported
    architecture: refused before any heavy work otherwise."""
    if loaded.source_format not in ("gguf", "hf-folder"):
        raise ModelReferenceError(f"the gguf target takes the tokenizer and metadata from a GGUF file or a Hugging "
                                  f"Face folder; {spec.model!r} is a {loaded.source_format} model", param="model")
    if loaded.source_format == "hf-folder":
        from bitplan.targets.exports.gguf_source import open_source

        try:
            open_source(loaded.source_path, {})
        except BitplanError as error:
            raise ModelReferenceError(f"the gguf target cannot be written from {spec.model!r}: {error}",
                                      param="model") from None
        if spec.budget.latency_ms_per_token is not None or spec.budget.prefill_ms_per_token is not None:
            raise SpecError("latency budgets time variants of a GGUF source file; this model is a Hugging Face "
                            "folder (give a size budget, or a GGUF of it)", param="latency_ms_per_token")
