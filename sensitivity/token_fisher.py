"""Per-token empirical Fisher of the layer-output error: the default predictor for language models.

Quantizing ``W`` to ``W + dW`` moves the layer output at token ``t`` by ``dW x_t``; with ``g_t`` the gradient of
the summed calibration loss with respect to that output, the second-order (empirical Fisher) loss increase is

    delta_loss(b) = 0.5 / N * sum_t (g_t . dW_b x_t)^2

computed exactly, token by token, during the calibration backward passes. ``fisher_output_error`` approximates
the same quantity by separating gradients from inputs (``sum_o F_o [dW H dW^T]_oo``); keeping them together
keeps the correlations between output channels and between gradients and inputs, which is what made this
metric rank the real per-layer loss increase of SmolLM2-135M far better (``bench/sensitivity.py``).

With ``skip_first_position`` the first position of each window is left out of the second-order sum (not the
default: measured below, it trades KL for perplexity). ``g_t`` is the gradient of the whole
window's loss, the sum over every later token that attends to position ``t``; at most positions one token's own
prediction dominates it, but the first position is the one every token attends to (the attention sink, where a
block's ``down_proj`` writes a "massive activation"), so ``g_0`` is a sum over the whole window and its square is
the square of that sum, not one token's Fisher term. On SmolLM2-135M, 99.8% of layer 11 ``down_proj``'s
second-order term at ``Q3_K`` came from position 0 (|output| 22,000 there, median 6.5): predicted +0.74 nats,
measured -0.038 (``bench/format_spearman.py``). Its first-order term, a plain derivative, keeps every position.
Skipping it raised the rank correlation with the measured per-layer loss increase (``int3-g128`` 0.54 -> 0.61,
``Q3_K`` 0.38 -> 0.54 on WikiText-2) and the perplexity of a ``gguf-k`` job at Q2_K's bytes (35.19 -> 34.14), but
that job's KL to the source rose (0.208 -> 0.238): quantizing that sink-writing layer lowers the loss of this
pre-quantized model while moving its outputs away from the source's.

The same scalars give the first-order term ``1/N sum_t g_t . dW_b x_t`` for free; ``token_taylor`` adds it
(the loss change to second order). The gradient of the calibration loss is not zero at weights that were not
trained on that text (or were themselves quantized), so on calibration text from the target domain the first
term carries real signal; on text from another domain it is mostly noise.

``token_taylor_kl`` takes the two terms from two losses (``curvature_loss_fn``): the slope from the text's labels,
the square from labels drawn from the model itself (``bitplan.sources.models.causal_lm_sampled_loss``: in expectation
the Fisher of the model's predictions, the Gauss-Newton part of the Hessian, with no squared text slope in it). Told the
real error of a format, that sum ranked the measured per-layer loss increase better than told the RTN proxy in all
four cells of ``bench/format_spearman.py`` (two formats, two evaluation texts), which neither term alone did.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity.activations import LossFn, ProgressFn, StopFn, check_stop
from bitplan.sensitivity.request import PRECISIONS, ErrorFn, Key, SensitivityRequest
from bitplan.sensitivity.token_terms import TermAccumulator, TokenFisherTerms
from bitplan.stages import Stage


def projection_dtype() -> torch.dtype:
    """The dtype the per-token projections ``g_t . dW x_t`` are multiplied in by default (``precision="auto"``):
    bfloat16 where oneDNN runs bfloat16 matrix products natively (AVX512-BF16/AMX; 2.4x float32's rate on this
    project's 2-core AMD EPYC), float32 elsewhere, where bfloat16 products are emulated and slower. The products
    accumulate in float32 either way; bfloat16 rounds ``dW``, ``x_t``, ``g_t`` and the intermediate ``dW x_t``
    to 8 significant bits. On SmolLM2's 18 ``bitplan-int`` formats that moved the predicted loss increases by a
    median 0.04% and chose the same format for every layer (``bench/cost.py ...,bitplan-int@float32``)."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def resolve_precision(precision: str) -> torch.dtype:
    """``"auto"`` -> :func:`projection_dtype`; ``"float32"`` / ``"bfloat16"`` as named."""
    if precision == "auto":
        return projection_dtype()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    return getattr(torch, precision)


def unit_chunks(units: Mapping[str, nn.Linear], *, widths: int | Mapping[str, int], max_bytes: int,
                element_bytes: int = 4) -> list[list[str]]:
    """Consecutive runs of unit names whose errors at ``widths`` options (one count, or one per unit), each
    element ``element_bytes``, take at most ``max_bytes`` (a unit larger than that alone makes a chunk of its
    own)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name, module in units.items():
        size = module.weight.numel() * (widths if isinstance(widths, int) else widths[name]) * element_bytes
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks if chunks[0] else []


def stack_errors(units: Mapping[str, nn.Module], keys: Mapping[str, list[Key]], error_of: ErrorFn,
                  dtype: torch.dtype = torch.float32, *, on_error: Callable[[], None] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Each unit's errors at its options, ``(options, out, in)`` in ``dtype`` (an error has its weight's shape),
    computed on a thread per core (the encoders are C or torch code that releases the GIL), each thread's torch
    operations on one core meanwhile: two threads whose operations each spread over both cores encoded SmolLM2's
    18 integer formats 1.2x slower than one thread with both cores (timed on the seven layer shapes of one
    block). ``on_error()`` is called after each error is held (from the pool's threads, one call at a time)."""
    stacked = {name: torch.empty((len(keys[name]), *unit.weight.shape), dtype=dtype) for name, unit in units.items()}
    lock = threading.Lock()

    def fill(job: tuple[str, int, Key]) -> None:
        name, index, key = job
        stacked[name][index] = error_of(name, key)
        if on_error is not None:
            with lock:
                on_error()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(fill, [(name, index, key) for name in units for index, key in enumerate(keys[name])]))
    finally:
        torch.set_num_threads(threads)
    return stacked


def first_block(blocks: nn.ModuleList, modules: Sequence[nn.Module]) -> int:
    """Index of the first block that holds any of ``modules`` (0 when none does)."""
    wanted = {id(m) for m in modules}
    for index, block in enumerate(blocks):
        if any(id(m) in wanted for m in block.modules()):
            return index
    return 0


def graph_from_block(blocks: nn.ModuleList, index: int) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that make the autograd graph start at the hidden states entering ``blocks[index]``: the blocks
    before it run without a graph (their input is detached) and a backward pass stops at that input."""

    def replace_hidden(requires_grad: bool) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (args[0].detach().requires_grad_(requires_grad), *args[1:]), kwargs
            hidden = kwargs["hidden_states"].detach().requires_grad_(requires_grad)
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [blocks[index].register_forward_pre_hook(replace_hidden(True), with_kwargs=True)]
    if index > 0:
        handles.append(blocks[0].register_forward_pre_hook(replace_hidden(False), with_kwargs=True))
    return handles


def tied_inputs(model: nn.Module, units: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Units whose weight is also the model's input embedding (a tied output head), and that embedding: quantizing
    the one tensor moves both the logits and every token's input."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None or getattr(embedding, "weight", None) is None:
        return {}
    return {name: embedding for name, module in units.items() if module.weight is embedding.weight}


def option_errors(units: Mapping[str, nn.Module], request: SensitivityRequest) -> tuple[dict[str, list[Key]], ErrorFn]:
    """Each unit's option keys and ``error_of``: the request's, or the RTN errors at its ``bits_options`` (read from
    the unit's weight when asked, so a streamed block's weight is read while materialized)."""
    if request.options is not None and request.error_of is not None:
        return {name: list(request.options[name]) for name in units}, request.error_of
    group_size = request.group_size

    def error_of(name: str, bits: Key) -> torch.Tensor:
        return quantization_error(units[name].weight, bits=int(bits), group_size=group_size)

    return {name: list(request.bits_options) for name in units}, error_of


ERROR_REPORTS = 100


class ErrorProgress:
    """Reports the held weight errors as the ``weight errors`` stage (steps: units x options, across every
    chunk; about :data:`ERROR_REPORTS` reports in all): encoding each layer in each candidate format can take as
    long as the backward passes, which are reported as ``token Fisher`` steps. Counted apart, each stage's rate is
    its own (issue 45: the first backward step once stood for both, and a first job's ETA said 2,432 s with 190 s
    left)."""

    def __init__(self, total: int, on_progress: ProgressFn | None) -> None:
        self.total, self.done, self.on_progress = total, 0, on_progress
        self.every = max(1, total // ERROR_REPORTS)
        if on_progress is not None:
            on_progress(Stage.WEIGHT_ERRORS, 0, total)

    def step(self) -> None:
        self.done += 1
        if self.on_progress is not None and (self.done % self.every == 0 or self.done == self.total):
            self.on_progress(Stage.WEIGHT_ERRORS, self.done, self.total)


class TokenFisherPass:
    """:func:`token_fisher`'s pass, in its steps: :meth:`prepare_errors` holds one chunk of units' weight errors,
    :meth:`attach_hooks` makes their output gradients feed a :class:`TermAccumulator`, :meth:`backward` runs one
    calibration batch's backward passes, and :meth:`finish` averages the sums; :meth:`run` strings them together
    over the chunks that fit ``request.max_error_bytes``.

    A unit whose weight is also the input embedding (a tied head) is used twice per token; the embedding's use is
    fed by :meth:`_on_lookup` / :meth:`_on_embeds`, which start the graph at the looked-up embeddings, and
    :meth:`_add_lookup`, which adds the lookup's per-token scalars."""

    def __init__(self, model: nn.Module, units: Mapping[str, nn.Linear], request: SensitivityRequest, *,
                 loss_fn: LossFn, curvature_loss_fn: LossFn | None = None, blocks: nn.ModuleList | None = None
                 ) -> None:
        self.model, self.units, self.request, self.blocks = model, units, request, blocks
        self.loss_fn, self.curvature_loss_fn = loss_fn, curvature_loss_fn
        self.dtype = resolve_precision(request.precision)
        self.stride = request.curvature_stride or 1
        self.keys, self.error_of = option_errors(units, request)
        self.tied = tied_inputs(model, units)
        self.terms = TermAccumulator(self.keys, units, skip_first_position=request.skip_first_position)
        self.looked_up: dict[str, torch.Tensor] = {}  # the token ids of a tied unit's last lookup

    def run(self, batches: Sequence[torch.Tensor], *, on_progress: ProgressFn | None = None,
            should_stop: StopFn | None = None) -> TokenFisherTerms:
        """The terms over ``batches``, the model's parameters frozen meanwhile (their flags restored after)."""
        chunks = unit_chunks(self.units, widths={name: len(k) for name, k in self.keys.items()},
                             max_bytes=self.request.max_error_bytes, element_bytes=self.dtype.itemsize)
        requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        self.model.requires_grad_(False)
        errors = ErrorProgress(sum(len(k) for k in self.keys.values()), on_progress)
        try:
            for chunk_index, chunk in enumerate(chunks):
                self.prepare_errors(chunk, on_error=errors.step)
                handles = self.attach_hooks(chunk)
                try:
                    for index, batch in enumerate(batches):
                        check_stop(should_stop, "token Fisher")
                        self.backward(batch, index)
                        self.terms.end_batch(chunk)
                        if on_progress is not None:
                            on_progress(Stage.TOKEN_FISHER, chunk_index * len(batches) + index + 1,
                                        len(chunks) * len(batches))
                finally:
                    for handle in handles:
                        handle.remove()
                self.terms.deltas = {}
        finally:
            for parameter, flag in requires_grad.items():
                parameter.requires_grad_(flag)
        return self.finish(batches)

    def prepare_errors(self, chunk: Sequence[str], *, on_error: Callable[[], None] | None = None) -> None:
        """Hold the weight errors ``(options, out, in)`` of the units in ``chunk``, in the request's precision."""
        self.terms.deltas = stack_errors({name: self.units[name] for name in chunk}, self.keys, self.error_of,
                                          self.dtype, on_error=on_error)

    def attach_hooks(self, chunk: Sequence[str]) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that feed the chunk's output gradients to the accumulator (a tied unit's embedding use too); with
        ``blocks`` and no tied unit, the graph starts at the chunk's first block, so backward passes stop there."""
        handles = [self.units[name].register_forward_hook(self.terms.make_hook(name)) for name in chunk]
        for name in (n for n in chunk if n in self.tied):
            handles += [self.tied[name].register_forward_hook(functools.partial(self._on_lookup, name)),
                        self.model.register_forward_pre_hook(functools.partial(self._on_embeds, name),
                                                             with_kwargs=True)]
        if self.blocks is not None and not any(name in self.tied for name in chunk):
            handles += graph_from_block(self.blocks, first_block(self.blocks, [self.units[name] for name in chunk]))
        return handles

    def backward(self, batch: torch.Tensor, index: int) -> None:
        """Batch ``index``'s backward passes: ``loss_fn``'s for both terms; with a curvature loss, ``loss_fn``'s
        for the slope, then (on every ``stride``-th batch) the curvature loss's for the second-order term."""
        if self.curvature_loss_fn is None:
            self.loss_fn(self.model, batch).backward()
            return
        self.terms.phase.update(slope=True, curvature=False)
        self.loss_fn(self.model, batch).backward()
        if index % self.stride == 0:
            self.terms.phase.update(slope=False, curvature=True)
            self.curvature_loss_fn(self.model, batch).backward()

    def finish(self, batches: Sequence[torch.Tensor]) -> TokenFisherTerms:
        """The averages: the first-order term over every batch's tokens, the second over the curvature batches'."""
        curved = batches if self.curvature_loss_fn is None else batches[::self.stride]
        return self.terms.result(tokens=sum(batch.numel() for batch in batches),
                                 curved_tokens=sum(batch.numel() for batch in curved), batches=len(batches))

    def _on_lookup(self, name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
                   ) -> torch.Tensor:
        """The tied embedding's forward hook: the graph starts at its output when the model looks tokens up."""
        self.looked_up[name] = inputs[0]
        leaf = output.detach().requires_grad_(True)
        leaf.register_hook(functools.partial(self._add_lookup, name, module, inputs[0]))
        return leaf

    def _on_embeds(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A loss that looks the tokens up itself and passes ``inputs_embeds`` (``causal_lm_loss``): the graph
        starts at those embeddings instead."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.requires_grad and name in self.looked_up:
            embeds.register_hook(functools.partial(self._add_lookup, name, self.tied[name], self.looked_up.pop(name)))

    def _add_lookup(self, name: str, module: nn.Module, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """The tied input embedding's use of the unit's weight: its output moves by ``lookup(dW)`` at each token
        (the module's own forward with ``dW`` as weight, scaling included: it is linear in the weight)."""
        g = grad.detach().float().reshape(-1, grad.shape[-1])
        moved = torch.stack([torch.func.functional_call(module, {"weight": delta.float()}, (ids,)).float()
                             .reshape(-1, g.shape[-1]) for delta in self.terms.deltas[name]])
        self.terms.add(name, (moved * g[None]).sum(dim=2).reshape(-1, *grad.shape[:-1]))


def token_fisher(
    model: nn.Module,
    units: Mapping[str, nn.Linear],
    batches: Sequence[torch.Tensor],
    request: SensitivityRequest,
    *,
    loss_fn: LossFn,
    curvature_loss_fn: LossFn | None = None,
    blocks: nn.ModuleList | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TokenFisherTerms:
    """Both Taylor terms of the loss increase per (unit, option), and each unit's output-gradient energy
    (:class:`TokenFisherPass`'s steps).

    The weight error ``dW_b`` of a unit at every option (the RTN error at each of the request's ``bits_options``,
    or its ``error_of``) is held in memory (one copy of its weights per option, in the request's ``precision``)
    so that each backward pass only adds matrix products. At most ``request.max_error_bytes`` of them are held at
    once: the units are taken in chunks that fit, each chunk with its own backward passes over the calibration
    set (a 7B model's four widths take about 104 GB in float32, so 26 passes over the calibration set at the
    default 4 GiB; 13 in bfloat16). With ``blocks`` (the transformer blocks the units lie in), each chunk's graph
    starts at the input of its first block, so its backward passes stop there.

    With ``options`` and ``error_of`` in the request, the terms are those of any weight error, such as each
    candidate format's ``decode(encode(W)) - W`` (:mod:`bitplan.quantizer.formats`), keyed by option key.
    ``skip_first_position`` leaves each window's first position (the attention sink) out of the second-order sum.
    ``precision``: the dtype the errors are held and the per-token projections multiplied in (``"auto"``:
    :func:`projection_dtype`; ``"float32"`` is the reference the tests compare ``"bfloat16"`` with). bfloat16
    errors take half the memory, so twice as many units share each chunk's backward passes.

    With ``curvature_loss_fn`` the two terms come from two losses: the first-order term (and its standard error)
    from ``loss_fn`` on every batch, through the weight gradient alone (no per-token products), and the
    second-order term and the energy from a second backward pass of ``curvature_loss_fn`` on every
    ``request.curvature_stride``-th batch (from the first; 1 when unset), averaged over the tokens of those
    batches. With ``bitplan.sources.models.causal_lm_sampled_loss`` as the latter: the text's slope with the model's own
    curvature.
    """
    return TokenFisherPass(model, units, request, loss_fn=loss_fn, curvature_loss_fn=curvature_loss_fn,
                           blocks=blocks).run(batches, on_progress=on_progress, should_stop=should_stop)
