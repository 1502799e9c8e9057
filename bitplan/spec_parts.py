"""The six parts of a job spec (:class:`bitplan.spec.JobSpec`): :class:`Budget`, :class:`Calibration`,
:class:`SensitivityOptions`, :class:`Allocation`, :class:`Quantization`, :class:`Refinement`, and the enums their
choices take.

Each part is a frozen dataclass whose leaf fields carry an :class:`~bitplan.options.Option` (flat name, flag,
bounds, help) and which checks itself in ``__post_init__``; :mod:`bitplan.spec` assembles them into a job, checks
what spans parts, and re-exports every name here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bitplan.allocator.problem import SOLVERS
from bitplan.errors import SpecError
from bitplan.job.preset_size import SIZE_PRESETS
from bitplan.options import check_part, option_field
from bitplan.quantizer.formats import FORMATS, PRESETS, resolve_formats
from bitplan.quantizer.ggml_encode import ENCODERS
from bitplan.quantizer.methods import QUANTIZERS
from bitplan.sensitivity.request import DEFAULT_ERROR_BYTES, HutchinsonConfig, Metric

MetricChoice = Enum("MetricChoice", {"AUTO": "auto", **{m.name: m.value for m in Metric}}, type=str)  # type: ignore[misc]
MetricChoice.__doc__ = ("A sensitivity metric, or ``auto`` (for causal LMs token_kl to a GGUF target, token_taylor_kl "
                        "otherwise; output_error for other models).")
PrecisionChoice = Enum("PrecisionChoice", {"AUTO": "auto", "FLOAT32": "float32", "BFLOAT16": "bfloat16"},  # type: ignore[misc]
                       type=str)
PrecisionChoice.__doc__ = "The dtype the token metrics' per-token products run in (``auto``: bfloat16 where native)."
DeviceChoice = Enum("DeviceChoice", {"AUTO": "auto", "CPU": "cpu", "CUDA": "cuda"}, type=str)  # type: ignore[misc]
DeviceChoice.__doc__ = "Where a streamed job's blocks compute (``auto``: the GPU when one is visible, else the CPU)."
ComputeDtypeChoice = Enum("ComputeDtypeChoice", {"AUTO": "auto", "FLOAT32": "float32", "BFLOAT16": "bfloat16"},  # type: ignore[misc]
                          type=str)
ComputeDtypeChoice.__doc__ = ("The dtype a streamed job's blocks compute in "
                              "(bitplan.sources.stream.resolve_compute_dtype).")
SizePresetChoice = Enum("SizePresetChoice", {p: p for p in SIZE_PRESETS}, type=str)  # type: ignore[misc]
SizePresetChoice.__doc__ = "A llama.cpp quantization preset whose whole-file size is the budget (--size-of)."
SolverChoice = Enum("SolverChoice", {s.upper(): s for s in SOLVERS if s != "brute_force"}, type=str)  # type: ignore[misc]
SolverChoice.__doc__ = "An allocation solver (allocator.solve_allocation)."
QuantizerChoice = Enum("QuantizerChoice", {q.upper().replace("-", "_"): q for q in QUANTIZERS}, type=str)  # type: ignore[misc]
QuantizerChoice.__doc__ = "A quantizer (quantizer.methods)."
TARGETS = {"bitplan": None, "gguf": "gguf-k", "compressed-tensors": "ct-wna16"}  # target -> default formats
TargetChoice = Enum("TargetChoice", {t.upper().replace("-", "_"): t for t in TARGETS}, type=str)  # type: ignore[misc]
TargetChoice.__doc__ = "Where the model will run: our packed folder, a GGUF for llama.cpp, or compressed-tensors."
EncoderChoice = Enum("EncoderChoice", {e.upper().replace(".", "_"): e for e in ENCODERS}, type=str)  # type: ignore[misc]
EncoderChoice.__doc__ = "An encoder of the GGML types (quantizer.ggml_encode)."
TARGET_LEGAL = {"gguf": "GGML types (a gguf-* preset)", "compressed-tensors": "the ct-wna16 formats (int4/int8, "
                "groups 32/64/128, symmetric: what transformers loads and vLLM's WNA16 kernels serve)"}


@dataclass(frozen=True)
class Budget:
    """Exactly one of: bits-per-weight budgets (several make a sweep), a bytes budget, uniform bits."""

    bits_per_weight: tuple[float, ...] = option_field(
        (), "floats", "budget in effective bits per weight (scales and zeros counted); several comma-separated "
        "budgets share one sensitivity pass (a sweep)", flag="--bpw", positive=True, group="budget", max_items=64,
        label="bits per weight")
    bytes: int | None = option_field(None, "int", "budget in bytes of the quantized layers", flag="--bytes",
                                     positive=True, maximum=2**50, group="budget", label="a bytes budget")
    uniform_bits: int | None = option_field(None, "int", "uniform baseline: every layer at this bit width",
                                            flag="--uniform-bits", minimum=1, maximum=8, group="budget")
    file_bytes: int | None = option_field(None, "int", "budget in bytes of the whole GGUF file (tensors, metadata "
                                          "and padding, measured from the written file; gguf target)",
                                          flag="--file-bytes", positive=True, maximum=2**50, group="budget",
                                          label="a whole-file budget")
    size_of: Any = option_field(None, "enum", "budget: the bytes of the whole GGUF file llama.cpp's preset would make "
                                "of this model (llama-quantize's own type choices, computed without writing it; gguf "
                                "target, a GGUF source)", flag="--size-of", choices=SizePresetChoice, group="budget",
                                label="a named size")
    latency_ms_per_token: float | None = option_field(
        None, "float", "decode-latency budget in milliseconds per token at batch 1, as predicted by this machine's "
        "measured latency table (gguf target; alone or with a size budget)", flag="--latency-ms-per-token",
        positive=True, maximum=1e6, label="a latency budget")
    prefill_ms_per_token: float | None = option_field(
        None, "float", "prefill budget in milliseconds per prompt token (a 32-token prompt), as predicted by this "
        "machine's measured latency table (gguf target; alone, with a decode budget or with a size budget)",
        flag="--prefill-ms-per-token", positive=True, maximum=1e6, label="a prefill budget")
    latency_table: str | None = option_field(None, "str", "latency table measured on the machine that will run the "
                                             "model (bitplan latency --out FILE; over HTTP the id of one uploaded to "
                                             "/v1/latency-tables); default: this machine's", flag="--latency-table")

    def __post_init__(self) -> None:
        check_part(self)
        given = [bool(self.bits_per_weight), self.bytes is not None, self.uniform_bits is not None,
                 self.file_bytes is not None, self.size_of is not None]
        if sum(given) > 1 or (sum(given) == 0 and not self.has_time_budget):
            raise SpecError("give exactly one of a bits-per-weight budget, a bytes budget, a whole-file budget, a "
                            "named size (--size-of) or uniform bits (a latency or prefill budget may come alone or "
                            "with a size budget)",
                            param="bits_per_weight")
        if self.has_time_budget and self.uniform_bits is not None:
            raise SpecError("a latency budget chooses formats per layer; a uniform baseline takes no latency budget",
                            param=self.time_param)

    @property
    def has_time_budget(self) -> bool:
        """Whether a decode-latency or prefill budget is given."""
        return self.latency_ms_per_token is not None or self.prefill_ms_per_token is not None

    @property
    def time_param(self) -> str:
        """The field a refusal of the time budgets names: the decode budget when given, else the prefill one."""
        return "latency_ms_per_token" if self.latency_ms_per_token is not None else "prefill_ms_per_token"

    def describe(self, index: int = 0) -> str:
        if self.bits_per_weight:
            return f"{self.bits_per_weight[index]:g} bits per weight"
        if self.bytes is not None:
            return f"{self.bytes} bytes"
        if self.file_bytes is not None:
            return f"{self.file_bytes} bytes of file"
        if self.size_of is not None:
            return f"the size of llama.cpp's {self.size_of.value} file"
        if self.uniform_bits is not None:
            return f"uniform {self.uniform_bits} bits"
        if self.latency_ms_per_token is not None:
            return f"{self.latency_ms_per_token:g} ms per token"
        return f"{self.prefill_ms_per_token:g} ms per prompt token"


@dataclass(frozen=True)
class Calibration:
    """The calibration windows: from a text file or the built-in text."""

    text: str | None = option_field(None, "str", "calibration text file (default: the built-in text)",
                                    flag="--calibration", http=False, name="calibration_text")
    num_samples: int = option_field(32, "int", "calibration windows", flag="--samples", minimum=1, maximum=512)
    seq_len: int = option_field(512, "int", "calibration window length in tokens", flag="--seq-len", minimum=16,
                                maximum=8192)
    seed: int = option_field(0, "int", "seed of the calibration windows' sampling", flag="--seed", minimum=0,
                             maximum=2**32 - 1)

    def __post_init__(self) -> None:
        check_part(self)


@dataclass(frozen=True)
class SensitivityOptions:
    """How the predicted loss increase per (layer, bit width) is measured."""

    metric: Any = option_field(MetricChoice.AUTO, "enum", "sensitivity metric (auto: for language models token_kl to "
                               "the gguf target, token_taylor_kl otherwise; output_error for other models)",
                               flag="--metric", choices=MetricChoice)
    max_error_bytes: int = option_field(DEFAULT_ERROR_BYTES, "int", "token metrics: bytes of rounding errors held at "
                                        "once (less: more passes)", flag="--max-error-bytes", minimum=1, maximum=2**44)
    precision: Any = option_field(PrecisionChoice.AUTO, "enum", "token metrics: dtype of the per-token products "
                                  "(auto: bfloat16 where the CPU multiplies it natively, else float32)",
                                  flag="--sensitivity-precision", choices=PrecisionChoice)
    device: Any = option_field(DeviceChoice.AUTO, "enum", "streamed jobs: where each block and its windows compute "
                               "(auto: cuda when a GPU is visible, else cpu); the hidden states between blocks stay "
                               "in host memory", flag="--device", choices=DeviceChoice)
    compute_dtype: Any = option_field(ComputeDtypeChoice.AUTO, "enum", "streamed jobs: dtype of the blocks' forward "
                                      "and backward (statistics accumulate in float32; float32 is the reference; "
                                      "auto: see docs/streaming.md)", flag="--compute-dtype",
                                      choices=ComputeDtypeChoice)
    max_memory: int | None = option_field(None, "int", "streamed jobs: bytes of host memory the job may use, checked "
                                          "before any heavy work (default: 0.8 of the memory available when the "
                                          "job starts)", flag="--max-memory", minimum=1 << 20, maximum=2**50)
    hutchinson: HutchinsonConfig = field(default_factory=HutchinsonConfig)

    def __post_init__(self) -> None:
        check_part(self)
        from bitplan.sources.devices import check_device  # the one rule, shared with the stream

        check_device(self.device.value)


@dataclass(frozen=True)
class Allocation:
    """The knapsack: candidate widths, solver, ties and pins."""

    candidate_bits: tuple[int, ...] = option_field((2, 3, 4, 8), "ints", "candidate bit widths", flag="--bits",
                                                   minimum=1, maximum=8, max_items=8)
    solver: Any = option_field(SolverChoice.AUTO, "enum", "allocation solver", flag="--solver", choices=SolverChoice)
    time_limit_s: float = option_field(60.0, "float", "solver time limit in seconds (the best solution and its bound "
                                       "are kept)", flag="--time-limit", minimum=0.01, maximum=3600)
    tie_fused: bool = option_field(False, "bool", "q/k/v and gate/up projections of a block share one bit width "
                                   "(fused by runtimes)", flag="--tie-fused")
    pinned: tuple[tuple[str, int], ...] = option_field(
                (), "pins", "keep layers matching an fnmatch pattern at BITS (repeatable; the last match wins), e.g. "
                "'*.down_proj=8'", flag="--pin")

    def __post_init__(self) -> None:
        check_part(self)
        if not self.candidate_bits:
            raise SpecError("candidate_bits needs at least one bit width", param="candidate_bits")


@dataclass(frozen=True)
class Quantization:
    """How each layer is quantized at its width."""

    quantizer: Any = option_field(QuantizerChoice.RTN_SALIENCE, "enum", "rtn-salience (default): each group's "
                                  "range searched to minimize the calibration's input-energy-weighted error "
                                  "(SliM-LLM); rtn: plain round to nearest (-symmetric: grid symmetric around 0); "
                                  "gptq: GPTQ error feedback on calibration inputs (give in-domain calibration "
                                  "text)", flag="--quantizer", choices=QuantizerChoice)
    group_size: int = option_field(128, "int", "input columns per fp16 scale and zero", flag="--group-size", minimum=8,
                                   maximum=4096, label="group size")
    mix_groups: bool = option_field(False, "bool", "column groups of each layer take bits-1, bits or bits+1 within "
                                    "the layer's size (SliM-LLM)", flag="--mix-groups")
    gptq_damp: float = option_field(0.01, "float", "GPTQ: dampening added to the Gram diagonal, as a fraction of "
                                    "its mean (more: steadier on little calibration data, less error feedback)",
                                    flag="--gptq-damp", minimum=0.0001, maximum=1.0)
    formats: str | None = option_field(
        None, "str", "candidate formats per layer: a preset (bitplan-default: the --bits widths at --group-size; "
        "bitplan-mix; bitplan-int; gguf-k; gguf-legacy; gguf-all) or comma-separated names from `bitplan formats`; "
        "each layer chooses among the ones legal for its shape, with the real error of each (default: the "
        "target's: bitplan-mix for a packed job under a budget with the rtn-salience quantizer, the default --bits "
        "and --group-size, no --mix-groups and no KL refinement, else bitplan-default; gguf: gguf-k)",
        flag="--formats")
    target: Any = option_field(TargetChoice.BITPLAN, "enum", "the file the model runs from: bitplan (our packed "
                               "folder), gguf (OUT/model.gguf beside the manifest, for llama.cpp; its layers "
                               "choose among GGML types only) or compressed-tensors (OUT loads with transformers' "
                               "from_pretrained; int4/int8 symmetric groups)", flag="--target",
                               choices=TargetChoice)
    encoder: Any = option_field(EncoderChoice.LLAMA_CPP, "enum", "who writes the GGML types' blocks: llama.cpp "
                                "(default: its ggml_quantize_chunk with our importance vectors) or bitplan (our "
                                "importance-weighted search of each block's scales and minima; the same bytes, "
                                "decoded by llama.cpp; IQ2/IQ3 stay llama.cpp's)", flag="--encoder",
                                choices=EncoderChoice)

    def __post_init__(self) -> None:
        check_part(self)
        try:
            names = self.format_names
        except ValueError as error:
            raise SpecError(str(error), param="formats") from None
        target = self.target.value
        if target in TARGET_LEGAL:
            legal = (lambda n: FORMATS[n].family == "ggml") if target == "gguf" else PRESETS["ct-wna16"].__contains__
            other = [n for n in names or () if not legal(n)]
            if names is None or other:
                what = "the --bits widths" if names is None else repr(other[0])
                raise SpecError(f"the {target} target stores {TARGET_LEGAL[target]}; {what} cannot be stored "
                                f"there (default: {TARGETS[target]})", param="formats")
        not_grids = [n for n in names or () if FORMATS[n].grid is None]
        if self.quantizer.value.startswith("gptq") and not_grids:
            why = ("is encoded by llama.cpp's own quantizer" if FORMATS[not_grids[0]].family == "ggml" else
                   "has a fractional zero point, which GPTQ's integer grids do not solve for")
            raise SpecError(f"GPTQ encodes the integer grid formats (int{{b}}-g{{g}}[-sym]); {not_grids[0]!r} {why}: "
                            "choose integer grid formats (e.g. bitplan-int, ct-wna16) or --quantizer rtn or "
                            "rtn-salience", param="formats")
        if names is not None and self.mix_groups:
            raise SpecError("--mix-groups mixes widths inside a layer of one grid; it does not combine with "
                            "--formats", param="formats")

    @property
    def format_names(self) -> tuple[str, ...] | None:
        """The candidate format names (the target's default when none are given), or ``None`` for the --bits
        widths at --group-size."""
        return resolve_formats(self.formats if self.formats is not None else TARGETS[self.target.value])


@dataclass(frozen=True)
class Refinement:
    """What is measured on the quantized model: the KL check, and the optional KL-guided re-solve."""

    kl_refine_windows: int = option_field(0, "int", "re-solve once with each block's measured share of the output KL "
                                          "on N calibration windows (checked on N others; kept only if the KL drops); "
                                          "0: off", flag="--kl-refine", minimum=0, maximum=64)
    kl_windows: int = option_field(2, "int", "calibration windows on which the artifact's KL divergence is measured "
                                   "(0: skip)", flag="--kl-windows", minimum=0, maximum=512)
    quality_windows: int = option_field(8, "int", "held-back windows (text the calibration did not see) on which the "
                                        "quality report is measured: KL to the source, perplexities, top-1 agreement "
                                        "(0: skip)", flag="--quality-windows", minimum=0, maximum=256)
    quality_seq_len: int = option_field(512, "int", "tokens per held-back window", flag="--quality-seq-len", minimum=16,
                                        maximum=8192)
    eval_text: str | None = option_field(None, "str", "text file of the quality report's windows (over HTTP a path "
                                         "under a model root); default: the built-in held-back text",
                                         flag="--eval-text")

    def __post_init__(self) -> None:
        check_part(self)


PARTS: dict[str, type] = {"budget": Budget, "calibration": Calibration, "sensitivity": SensitivityOptions,
                          "allocation": Allocation, "quantization": Quantization, "refinement": Refinement}
