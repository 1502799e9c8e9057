"""The token metrics' pass with the model streamed block by block: the exact gradients of the whole model's loss
with the memory of one block and the hidden states between blocks.

1. **Forward.** Every calibration window enters block 0 and passes through the blocks one block at a time; the
   input of every block for every window is kept (``boundaries``: in memory up to a cap, then memory-mapped).
2. **Head.** The final norm and head turn each window's last hidden states into logits; the loss (the text's
   labels for the slope, labels drawn from the model for the curvature of ``token_taylor_kl``) and its gradient
   with respect to those hidden states are taken there.
3. **Backward, block by block in reverse.** Block ``i`` re-runs from its stored input with autograd; the
   gradient at its output (from the block above) flows back through it, feeding its units' hooks (the same
   per-token products ``g_t . dW x_t`` as :func:`sensitivity.token_fisher.token_fisher`) and giving the gradient
   at its input, which the block below receives.

Each unit's output gradient is the whole model's, so the terms equal the whole-model pass's to float rounding
(the tests compare them). Units outside the block stack (a tied head) need the whole model's pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from bitplan.sensitivity.activations import ProgressFn, StopFn, check_stop
from bitplan.sensitivity.request import SensitivityRequest
from bitplan.sensitivity.token_fisher import option_errors, resolve_precision, stack_errors, unit_chunks
from bitplan.sensitivity.token_terms import TermAccumulator, TokenFisherTerms
from bitplan.stages import Stage

Hidden = torch.Tensor
LogitsLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat next-token logits, tokens) -> loss


class BlockStream(Protocol):
    """What the streamed pass needs of a model (``bitplan.sources.stream.DecoderStream``): its blocks run on ``device``
    (what they return is on it too); the stored hidden states and gradients between blocks stay on the host."""

    num_blocks: int
    device: torch.device

    def embed(self, tokens: torch.Tensor) -> Hidden: ...

    def block(self, index: int) -> AbstractContextManager[Callable[[Hidden], Hidden]]: ...

    def head(self) -> AbstractContextManager[Callable[[Hidden], torch.Tensor]]: ...

    def block_of(self, unit_name: str) -> int | None: ...


class Store(Protocol):
    """Hidden states by key (``bitplan.sources.stream.Boundaries``)."""

    def put(self, key: Any, tensor: torch.Tensor) -> None: ...

    def get(self, key: Any) -> torch.Tensor: ...


@dataclass
class StreamedModel:
    """What :func:`sensitivity.api.compute_sensitivity` needs to run the token pass streamed: the stream, where its
    boundaries go, and the losses as functions of the head's logits (``loss``: the text's labels or, for
    ``token_kl``, the model's; ``curvature_loss``: the model's, for ``token_taylor_kl``'s second-order term)."""

    stream: BlockStream
    boundaries: Store
    loss: LogitsLoss
    curvature_loss: LogitsLoss | None = None


def units_by_block(stream: BlockStream, units: Mapping[str, nn.Module]) -> dict[int, list[str]]:
    """Block index -> the units in it, in model order; a unit outside the block stack raises ``ValueError``."""
    grouped: dict[int, list[str]] = {}
    for name in units:
        index = stream.block_of(name)
        if index is None:
            raise ValueError(f"unit {name!r} is outside the block stack: the streamed pass cannot reach it")
        grouped.setdefault(index, []).append(name)
    return grouped


def streamed_token_fisher(
    stream: BlockStream,
    units: Mapping[str, nn.Linear],
    windows: Sequence[torch.Tensor],
    boundaries: Store,
    request: SensitivityRequest,
    *,
    loss: LogitsLoss,
    curvature_loss: LogitsLoss | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TokenFisherTerms:
    """:func:`sensitivity.token_fisher.token_fisher`'s terms with the model streamed (the module docstring's
    three steps). ``loss`` / ``curvature_loss`` take the flat next-token logits ``(windows * (seq_len - 1),
    vocab)`` of one window and its tokens ``(1, seq_len)``; ``request`` is ``token_fisher``'s. A unit's weight is
    read when its block is materialized (the request's ``error_of`` runs inside the block's ``with``)."""
    dtype = resolve_precision(request.precision)
    curvature_stride = request.curvature_stride or 1
    keys, error_of = option_errors(units, request)
    grouped = units_by_block(stream, units)
    terms = HostTerms(keys, units, skip_first_position=request.skip_first_position)
    count = stream.num_blocks
    clock = BlockClock(on_progress, blocks=count)
    _forward(stream, windows, boundaries, clock, should_stop)  # 1. forward
    passes = _head_gradients(stream, windows, boundaries, loss=loss, curvature_loss=curvature_loss,
                             curvature_stride=curvature_stride)  # 2. head
    clock.step("head")
    for index in reversed(range(count)):  # 3. backward
        check_stop(should_stop, "token Fisher")
        names = grouped.get(index, [])
        chunks = unit_chunks({n: units[n] for n in names}, widths={n: len(keys[n]) for n in names},
                             max_bytes=request.max_error_bytes, element_bytes=dtype.itemsize) or [[]]
        with stream.block(index) as run:
            for chunk_index, chunk in enumerate(chunks):
                with _weights_for_encoders({name: units[name] for name in chunk}):
                    deltas = stack_errors({name: units[name] for name in chunk}, keys, error_of, dtype)
                terms.deltas = {name: delta.to(stream.device) for name, delta in deltas.items()}
                del deltas
                handles = [units[name].register_forward_hook(terms.make_hook(name)) for name in chunk]
                try:
                    for w in range(len(windows)):
                        below = _block_backward(run, boundaries.get((index, w)), passes[w], terms,
                                                keep=chunk_index == len(chunks) - 1)
                        if below is not None:
                            passes[w] = below
                        terms.end_batch(chunk)
                finally:
                    for handle in handles:
                        handle.remove()
                terms.deltas = {}
        clock.step("backward")
    curved = windows if curvature_loss is None else windows[::curvature_stride]
    return terms.result(tokens=sum(t.numel() for t in windows), curved_tokens=sum(t.numel() for t in curved),
                        batches=len(windows))


Pass = list[tuple[dict[str, bool], torch.Tensor]]  # per window: (which terms it feeds, gradient at a boundary)


def _forward(stream: BlockStream, windows: Sequence[torch.Tensor], boundaries: Store, clock: BlockClock,
             should_stop: StopFn | None) -> None:
    """Every window through the blocks without a graph, each block's input for each window kept in
    ``boundaries`` under ``(block, window)`` (the last block's output under ``(num_blocks, window)``)."""
    for w, tokens in enumerate(windows):
        check_stop(should_stop, "token Fisher (forward)")
        boundaries.put((0, w), stream.embed(tokens))
    for index in range(stream.num_blocks):
        with stream.block(index) as run, torch.no_grad():
            for w in range(len(windows)):
                boundaries.put((index + 1, w), run(boundaries.get((index, w))))
        clock.step("forward")


def _head_gradients(stream: BlockStream, windows: Sequence[torch.Tensor], boundaries: Store, *, loss: LogitsLoss,
                    curvature_loss: LogitsLoss | None, curvature_stride: int) -> list[Pass]:
    """Per window, the gradient of each loss with respect to the last block's output, with the terms it feeds:
    one loss for both terms, or the slope's and (every ``curvature_stride``-th window) the curvature's."""
    top = stream.num_blocks
    passes: list[Pass] = []
    with stream.head() as head:
        for w, tokens in enumerate(windows):
            hidden = boundaries.get((top, w)).clone().requires_grad_(True)
            logits = head(hidden)  # the losses on the host: labels drawn with a CPU generator, as the reference's
            flat = logits[:, :-1].reshape(-1, logits.shape[-1]).cpu()
            tokens = tokens.to(flat.device)
            if curvature_loss is None:
                (grad,) = torch.autograd.grad(loss(flat, tokens), hidden)
                passes.append([({"slope": True, "curvature": True}, grad)])
                continue
            wanted = w % curvature_stride == 0
            (slope,) = torch.autograd.grad(loss(flat, tokens), hidden, retain_graph=wanted)
            window: Pass = [({"slope": True, "curvature": False}, slope)]
            if wanted:
                (curvature,) = torch.autograd.grad(curvature_loss(flat, tokens), hidden)
                window.append(({"slope": False, "curvature": True}, curvature))
            passes.append(window)
    return passes


def _block_backward(run: Callable[[Hidden], Hidden], stored: torch.Tensor, window: Pass, terms: TermAccumulator,
                    *, keep: bool) -> Pass | None:
    """Re-run one block on one window's stored input and pass each gradient back through it (the units' hooks
    feed ``terms``); with ``keep``, the gradients at the block's input, for the block below."""
    hidden = stored.clone().requires_grad_(True)
    with torch.enable_grad():
        output = run(hidden)
        below: Pass = []
        for position, (phase, grad) in enumerate(window):
            terms.phase.update(phase)
            (at_input,) = torch.autograd.grad(output, hidden, grad_outputs=grad.to(output.device, output.dtype),
                                              retain_graph=position < len(window) - 1)
            below.append((phase, at_input.float()))
    return below if keep else None


class HostTerms(TermAccumulator):
    """:class:`TermAccumulator` whose sums stay on the host while the blocks run on a device: each use's per-token
    scalars ``(options, tokens)`` come back to the CPU (small beside the block's activations) before they are
    squared and summed in float64."""

    def add(self, name: str, scalars: torch.Tensor | None, first: torch.Tensor | None = None) -> None:
        super().add(name, None if scalars is None else scalars.cpu(), None if first is None else first.cpu())


@contextlib.contextmanager
def _weights_for_encoders(units: Mapping[str, nn.Module]) -> Iterator[None]:
    """The units' weights in float32 on the CPU for the duration: the encoders behind ``error_of`` are CPU code
    (llama.cpp's, numpy's) and the RTN errors are computed in the weight's dtype, so a block computing in bfloat16
    or on a GPU gets the float32 reference's errors (bf16 as stored is exact in float32); a no-op for a float32
    block on the CPU."""
    originals = {name: unit.weight for name, unit in units.items()
                 if unit.weight.device.type != "cpu" or unit.weight.dtype != torch.float32}
    try:
        for name, weight in originals.items():
            units[name]._parameters["weight"] = nn.Parameter(weight.detach().float().cpu(), requires_grad=False)
        yield
    finally:
        for name, weight in originals.items():
            units[name]._parameters["weight"] = weight


BACKWARD_PRIOR = 6.0  # a backward block's time in forward blocks before one is measured (re-run, two gradients)


@dataclass
class BlockClock:
    """The streamed pass's progress, one report per block, as the share of its expected time.

    A consumer's ETA is rate-based (:class:`bitplan.stages.EtaModel`: time per step times the steps left), but a
    backward block costs several forward blocks (the re-run, one gradient per phase, the candidate errors), so
    equal steps would promise the backward half at the forward half's pace. Each report therefore says ``done`` of
    :attr:`TICKS` = time spent / (time spent + the steps left at the mean time measured for their kind); a
    backward block before any is measured counts :data:`BACKWARD_PRIOR` forward blocks, the head one. ``done``
    never goes back.
    """

    on_progress: ProgressFn | None
    blocks: int
    now: Callable[[], float] = time.perf_counter
    TICKS = 1000
    started: float = field(default=0.0, init=False)
    seconds: dict[str, list[float]] = field(default_factory=dict, init=False)
    last: float = field(default=0.0, init=False)
    done: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.started = self.last = self.now()

    def step(self, kind: str) -> None:
        """One block of ``kind`` (``forward``, ``head``, ``backward``) finished: report the share done."""
        now = self.now()
        self.seconds.setdefault(kind, []).append(now - self.last)
        self.last = now
        if self.on_progress is None:
            return
        spent = now - self.started
        left = sum(self._mean(k) * max(n - len(self.seconds.get(k, [])), 0)
                   for k, n in (("forward", self.blocks), ("head", 1), ("backward", self.blocks)))
        final = len(self.seconds.get("backward", [])) >= self.blocks
        share = 1.0 if final else spent / max(spent + left, 1e-12)
        self.done = max(self.done, min(round(share * self.TICKS), self.TICKS if final else self.TICKS - 1))
        self.on_progress(Stage.TOKEN_FISHER, self.done, self.TICKS)

    def _mean(self, kind: str) -> float:
        measured = self.seconds.get(kind)
        if measured:
            return sum(measured) / len(measured)
        forward = self.seconds.get("forward") or [0.0]
        return sum(forward) / len(forward) * (BACKWARD_PRIOR if kind == "backward" else 1.0)
