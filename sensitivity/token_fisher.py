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
the square from labels drawn from the model itself (``bitplan.models.causal_lm_sampled_loss``: in expectation the
Fisher of the model's predictions, the Gauss-Newton part of the Hessian, with no squared text slope in it). Told the
real error of a format, that sum ranked the measured per-layer loss increase better than told the RTN proxy in all
four cells of ``bench/format_spearman.py`` (two formats, two evaluation texts), which neither term alone did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity.activations import LossFn, ProgressFn, StopFn, check_stop
from bitplan.stages import Stage


@dataclass(frozen=True)
class TokenFisherTerms:
    """Per unit and bit width, the two Taylor terms of the loss increase, and each unit's output-gradient energy
    per token."""

    second_order: dict[str, dict[Any, float]]  # keyed by bit width, or by option key (a format name)
    first_order: dict[str, dict[Any, float]]
    first_order_std_error: dict[str, dict[Any, float]]  # over calibration batches (inf with a single batch)
    energy: dict[str, float]


Key = Any  # an option key: a bit width (int) or a format name (str)
ErrorFn = Callable[[str, Any], torch.Tensor]  # (unit name, option key) -> weight error dW

DEFAULT_ERROR_BYTES = 4 << 30  # weight errors held at once: all of SmolLM2-135M's 18 bitplan-int ones in bfloat16


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
    if precision not in ("float32", "bfloat16"):
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


def projected_errors(g: torch.Tensor, deltas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(options, tokens)`` float32 scalars ``g_t . dW_b x_t`` for every option ``b`` at once: ``g (T, O)``,
    ``deltas (B, O, I)``, ``x (T, I)``. The product goes through the narrower side: ``x dW^T`` as one matrix
    product when ``O <= I`` (a ``T x B*O`` intermediate), ``g dW`` otherwise (``B x T x I``). With bfloat16
    ``deltas`` (:func:`projection_dtype`) both products run in bfloat16 with float32 sums, the second as a
    product batched over tokens (30% faster than a float32 multiply and sum on SmolLM2's ``down_proj``)."""
    options, out_features, in_features = deltas.shape
    low = deltas.dtype
    if low != torch.float32:  # both products in bfloat16 (float32 sums): the last one batched over tokens
        if out_features <= in_features:
            flat = deltas.reshape(options * out_features, in_features)
            through = (x.to(low) @ flat.T).view(-1, options, out_features)
            return torch.bmm(through, g.to(low)[:, :, None])[:, :, 0].T.float()
        through = torch.matmul(g.to(low), deltas).transpose(0, 1)  # (T, B, I)
        return torch.bmm(through, x.to(low)[:, :, None])[:, :, 0].T.float()
    if out_features <= in_features:
        through = (x @ deltas.reshape(options * out_features, in_features).T).view(-1, options, out_features)
        return (through * g[:, None, :]).sum(dim=2).T
    return (torch.matmul(g, deltas) * x[None]).sum(dim=2)  # a batched product, 1.5x einsum's speed


def _stack_errors(units: Mapping[str, nn.Module], keys: Mapping[str, list[Key]], error_of: ErrorFn,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Each unit's errors at its options, ``(options, out, in)`` in ``dtype`` (an error has its weight's shape),
    computed on a thread per core (the encoders are C or torch code that releases the GIL), each thread's torch
    operations on one core meanwhile: two threads whose operations each spread over both cores encoded SmolLM2's
    18 integer formats 1.2x slower than one thread with both cores (timed on the seven layer shapes of one
    block)."""
    stacked = {name: torch.empty((len(keys[name]), *unit.weight.shape), dtype=dtype) for name, unit in units.items()}

    def fill(job: tuple[str, int, Key]) -> None:
        name, index, key = job
        stacked[name][index] = error_of(name, key)

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


class TermAccumulator:
    """The sums behind :class:`TokenFisherTerms`, fed by hooks on the units during backward passes.

    ``deltas`` holds the current chunk's weight errors ``(options, out, in)`` per unit; :meth:`make_hook` gives a
    unit's forward hook, whose output-gradient hook adds that use's per-token scalars ``g_t . dW x_t`` (in a
    pass that feeds the second-order term) and their first-order sum (in a pass that feeds the slope);
    ``phase`` says which terms the current backward pass feeds. :meth:`end_batch` closes a calibration batch
    (squares its per-token scalars, keeps its first-order sum for the standard error); :meth:`result` divides.
    """

    def __init__(self, keys: Mapping[str, list[Key]], units: Mapping[str, nn.Module], *,
                 skip_first_position: bool = False) -> None:
        self.keys = keys
        self.skip_first_position = skip_first_position
        self.squares = {name: torch.zeros(len(keys[name]), dtype=torch.float64) for name in units}
        self.sums = {name: torch.zeros(len(keys[name]), dtype=torch.float64) for name in units}
        self.batch_sums_sq = {name: torch.zeros(len(keys[name]), dtype=torch.float64) for name in units}
        self.energy = dict.fromkeys(units, 0.0)
        self.deltas: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}  # per unit: this batch's (options, sequences, positions) scalars
        self.firsts: dict[str, torch.Tensor] = {}  # per unit: this batch's first-order sums (options,), all uses
        self.phase = {"slope": True, "curvature": True}  # which terms the current backward pass feeds

    def add(self, name: str, scalars: torch.Tensor | None, first: torch.Tensor | None = None) -> None:
        """One use's per-token scalars, and its first-order sum when not theirs (the bfloat16 path's, from the
        weight gradient: a sum over tokens cancels, and the rounding of each token's scalar would not); each only
        in a pass that feeds its term."""
        if self.phase["curvature"] and scalars is not None:
            pending = self.pending
            pending[name] = scalars.double() if name not in pending else pending[name] + scalars.double()
        if self.phase["slope"]:
            first = scalars.flatten(1).sum(dim=1, dtype=torch.float64) if first is None else first.double()
            self.firsts[name] = first if name not in self.firsts else self.firsts[name] + first

    def add_output_gradient(self, name: str, grad: torch.Tensor, x: torch.Tensor) -> None:
        """A unit's output gradient ``grad (..., out)`` and input ``x (..., in)`` in one backward pass."""
        deltas = self.deltas[name]
        g = grad.detach().float().reshape(-1, grad.shape[-1])
        inputs_ = x.float().reshape(-1, x.shape[-1])
        curvature = self.phase["curvature"]
        scalars = (projected_errors(g, deltas, inputs_).reshape(-1, *grad.shape[:-1]) if curvature else None)
        first = None
        low = deltas.dtype
        if self.phase["slope"] and (low != torch.float32 or scalars is None):
            # sum_t g_t . dW x_t = <dW, sum_t g_t x_t^T>, with float32 sums
            gradient = (g.to(low).T @ inputs_.to(low)).reshape(-1, 1)
            first = (deltas.flatten(1) @ gradient).float()[:, 0]
        self.add(name, scalars, first)
        if curvature:
            self.energy[name] += float(g.pow(2).sum())

    def make_hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        """A forward hook on unit ``name`` that feeds its output gradient to :meth:`add_output_gradient`."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()
            output.register_hook(lambda grad: self.add_output_gradient(name, grad, x))

        return hook

    def end_batch(self, names: Sequence[str]) -> None:
        """Close a calibration batch for ``names``: square its per-token scalars, keep its first-order sum."""
        for name in names:
            scalars = self.pending.pop(name, None)
            if scalars is not None:  # (options, sequences, positions)
                squared = scalars[..., 1:] if self.skip_first_position else scalars
                self.squares[name] += squared.pow(2).flatten(1).sum(dim=1)
            batch_sum = self.firsts.pop(name, None)
            if batch_sum is not None:
                self.sums[name] += batch_sum
                self.batch_sums_sq[name] += batch_sum.pow(2)

    def result(self, *, tokens: int, curved_tokens: int, batches: int) -> TokenFisherTerms:
        """The terms: second order and energy per curvature token, first order per token, its standard error
        from the spread of the ``batches`` per-batch sums."""
        tokens, curved_tokens = max(tokens, 1), max(curved_tokens, 1)

        def std_error(name: str, index: int) -> float:
            if batches < 2:
                return math.inf
            mean = float(self.sums[name][index]) / batches
            variance = max(float(self.batch_sums_sq[name][index]) / batches - mean * mean, 0.0) * batches / (
                batches - 1)
            return math.sqrt(batches * variance) / tokens

        keys = self.keys
        return TokenFisherTerms(
            second_order={name: {b: 0.5 * float(self.squares[name][i]) / curved_tokens
                                 for i, b in enumerate(keys[name])} for name in self.squares},
            first_order={name: {b: float(self.sums[name][i]) / tokens for i, b in enumerate(keys[name])}
                         for name in self.sums},
            first_order_std_error={name: {b: std_error(name, i) for i, b in enumerate(keys[name])}
                                   for name in self.sums},
            energy={name: value / curved_tokens for name, value in self.energy.items()})


def option_errors(units: Mapping[str, nn.Module], bits_options: Sequence[int], group_size: int,
                  options: Mapping[str, Sequence[Key]] | None, error_of: ErrorFn | None, curvature_stride: int
                  ) -> tuple[dict[str, list[Key]], ErrorFn]:
    """Each unit's option keys and ``error_of``: the given ones, or the RTN errors at ``bits_options`` (read from
    the unit's weight when asked, so a streamed block's weight is read while materialized); the arguments the
    token passes share, checked."""
    if curvature_stride < 1:
        raise ValueError(f"curvature_stride must be at least 1, got {curvature_stride}")
    if options is None or error_of is None:
        options = {name: list(bits_options) for name in units}

        def error_of(name: str, bits: Key) -> torch.Tensor:
            return quantization_error(units[name].weight, bits=int(bits), group_size=group_size)

    return {name: list(options[name]) for name in units}, error_of


def token_fisher(
    model: nn.Module,
    units: Mapping[str, nn.Linear],
    batches: Sequence[torch.Tensor],
    *,
    loss_fn: LossFn,
    bits_options: Sequence[int],
    group_size: int,
    max_error_bytes: int = DEFAULT_ERROR_BYTES,
    blocks: nn.ModuleList | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    options: Mapping[str, Sequence[Key]] | None = None,
    error_of: ErrorFn | None = None,
    skip_first_position: bool = False,
    precision: str = "auto",
    curvature_loss_fn: LossFn | None = None,
    curvature_stride: int = 1,
) -> TokenFisherTerms:
    """Both Taylor terms of the loss increase per (unit, bit width), and each unit's output-gradient energy.

    The RTN error ``dW_b`` of a unit at every width is held in memory (one copy of its weights per width, in
    ``precision``) so that each backward pass only adds matrix products. At most ``max_error_bytes`` of them are
    held at once: the units are taken in chunks that fit, each chunk with its own backward passes over the
    calibration set (a 7B model's four widths take about 104 GB in float32, so 26 passes over the calibration
    set at the default 4 GiB; 13 in bfloat16).
    With ``blocks`` (the transformer blocks the units lie in), each chunk's graph starts at the input of its
    first block, so its backward passes stop there.

    ``options`` (unit name -> its option keys) and ``error_of(name, key) -> dW`` replace the RTN errors at
    ``bits_options``: the terms are then those of any weight error, such as each candidate format's
    ``decode(encode(W)) - W`` (:mod:`bitplan.quantizer.formats`); the results are keyed by option key.
    ``skip_first_position`` leaves each window's first position (the attention sink) out of the second-order sum.
    ``precision``: the dtype the errors are held and the per-token projections multiplied in (``"auto"``:
    :func:`projection_dtype`; ``"float32"`` is the reference the tests compare ``"bfloat16"`` with). bfloat16
    errors take half the memory, so twice as many units share each chunk's backward passes.

    With ``curvature_loss_fn`` the two terms come from two losses: the first-order term (and its standard error)
    from ``loss_fn`` on every batch, through the weight gradient alone (no per-token products), and the
    second-order term and the energy from a second backward pass of ``curvature_loss_fn`` on every
    ``curvature_stride``-th batch (from the first), averaged over the tokens of those batches. With
    ``bitplan.models.causal_lm_sampled_loss`` as the latter: the text's slope with the model's own curvature.
    """
    dtype = resolve_precision(precision)
    keys, error_of = option_errors(units, bits_options, group_size, options, error_of, curvature_stride)
    tied = tied_inputs(model, units)
    terms = TermAccumulator(keys, units, skip_first_position=skip_first_position)
    phase, add, make_hook = terms.phase, terms.add, terms.make_hook

    looked_up: dict[str, torch.Tensor] = {}  # the token ids of a tied unit's last lookup

    def lookup_grad(name: str, module: nn.Module, ids: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """The tied input embedding's use of the unit's weight: its output moves by ``lookup(dW)`` at each token
        (the module's own forward with ``dW`` as weight, scaling included: it is linear in the weight)."""

        def grad_hook(grad: torch.Tensor) -> None:
            g = grad.detach().float().reshape(-1, grad.shape[-1])
            moved = torch.stack([torch.func.functional_call(module, {"weight": delta.float()}, (ids,)).float()
                                 .reshape(-1, g.shape[-1]) for delta in terms.deltas[name]])
            add(name, (moved * g[None]).sum(dim=2).reshape(-1, *grad.shape[:-1]))

        return grad_hook

    def make_lookup_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            looked_up[name] = inputs[0]
            leaf = output.detach().requires_grad_(True)  # the graph starts here when the model looks tokens up
            leaf.register_hook(lookup_grad(name, module, inputs[0]))
            return leaf

        return hook

    def make_embeds_hook(name: str) -> Callable[..., None]:
        """A loss that looks the tokens up itself and passes ``inputs_embeds`` (``causal_lm_loss``): the graph
        starts at those embeddings instead."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None and embeds.requires_grad and name in looked_up:
                embeds.register_hook(lookup_grad(name, tied[name], looked_up.pop(name)))

        return hook

    chunks = unit_chunks(units, widths={name: len(k) for name, k in keys.items()}, max_bytes=max_error_bytes,
                         element_bytes=dtype.itemsize)
    steps = len(chunks) * len(batches)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        for chunk_index, chunk in enumerate(chunks):
            terms.deltas = _stack_errors({name: units[name] for name in chunk}, keys, error_of, dtype)
            handles = [units[name].register_forward_hook(make_hook(name)) for name in chunk]
            for name in (n for n in chunk if n in tied):
                handles += [tied[name].register_forward_hook(make_lookup_hook(name)),
                            model.register_forward_pre_hook(make_embeds_hook(name), with_kwargs=True)]
            if blocks is not None and not any(name in tied for name in chunk):
                handles += graph_from_block(blocks, first_block(blocks, [units[name] for name in chunk]))
            try:
                for index, batch in enumerate(batches):
                    check_stop(should_stop, "token Fisher")
                    if curvature_loss_fn is None:
                        loss_fn(model, batch).backward()
                    else:  # the slope from loss_fn, then (on every curvature_stride-th batch) the curvature
                        phase.update(slope=True, curvature=False)
                        loss_fn(model, batch).backward()
                        if index % curvature_stride == 0:
                            phase.update(slope=False, curvature=True)
                            curvature_loss_fn(model, batch).backward()
                    terms.end_batch(chunk)
                    if on_progress is not None:
                        on_progress(Stage.TOKEN_FISHER, chunk_index * len(batches) + index + 1, steps)
            finally:
                for handle in handles:
                    handle.remove()
            terms.deltas = {}
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    curved = batches if curvature_loss_fn is None else batches[::curvature_stride]
    return terms.result(tokens=sum(batch.numel() for batch in batches),
                        curved_tokens=sum(batch.numel() for batch in curved), batches=len(batches))
