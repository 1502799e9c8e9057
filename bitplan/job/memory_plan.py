"""The streamed job's memory, planned before any heavy work (issue 41): what its peak will be, and whether it fits
under the job's ``max_memory``.

The peak is the sum of what is held at once while the token pass runs one block (the largest of the stages the
streamed job runs; the quality report holds less, :func:`plan_memory`):

- the process as it stands (its resident memory when the plan is made) and :data:`LIBRARIES_BYTES` for what the
  encoders load later;
- the largest group of weights materialized at once (a block, the embedding, or the final norm with the head) in
  the compute dtype, plus the largest tensor as stored while it is cast;
- one window's activations through a block with autograd, and through the head (logits, their host copy, their
  softmax and gradient);
- every window's gradient at a block boundary, twice (the block's input and output side) for each of the two
  losses of ``token_taylor_kl``;
- the candidate errors held at once (a block's, at most ``max_error_bytes`` unless one unit's alone are more)
  and the encoders' working set (a few float32 copies of the largest unit per thread);
- the hidden states between blocks, held in memory up to what is left under the cap (beyond it they spill to
  files), so they never make a job refuse.

A job that does not fit is refused with :class:`bitplan.errors.SpecError` naming what would fit: fewer windows,
shorter windows, or a larger cap. :func:`tests.stream.test_memory_plan` checks the estimate against the measured
peak of a small streamed job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from bitplan.errors import SpecError

DEFAULT_MEMORY_FRACTION = 0.8  # of the memory available when the job starts, when max_memory is not given
LIBRARIES_BYTES = 160 << 20  # llama.cpp's encoder and the GGUF writer, loaded after the plan is made
GiB = float(1 << 30)


@dataclass(frozen=True)
class JobShape:
    """What the plan is computed from: the model's sizes, the windows and the job's limits.

    Attributes:
        weight_bytes: the largest group materialized at once, in the compute dtype, plus its largest tensor as
            stored (the cast's source).
        hidden, intermediate, heads, vocab, blocks: the model's widths and block count.
        largest_unit: elements of the largest quantized weight; ``block_units`` of the block with the most.
        options: the most candidate formats a unit has.
        windows, seq_len: the calibration windows.
        compute_bytes: bytes per element of the blocks' activations (the compute dtype).
        error_bytes: ``max_error_bytes``; ``error_element_bytes`` the per-token products' element size.
        threads: the encoders' threads.
    """

    weight_bytes: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    blocks: int
    largest_unit: int
    block_units: int
    options: int
    windows: int
    seq_len: int
    compute_bytes: int
    error_bytes: int
    error_element_bytes: int
    threads: int


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated peak, by part, in bytes, under ``cap`` (see the module docstring for each part)."""

    cap: int
    process: int
    weights: int
    activations: int
    gradients: int
    errors: int
    boundaries_needed: int

    @property
    def fixed(self) -> int:
        """Everything but the hidden states between blocks."""
        return self.process + self.weights + self.activations + self.gradients + self.errors

    @property
    def boundaries_in_memory(self) -> int:
        """The hidden states held in memory: what is left under the cap, at most what they need."""
        return max(min(self.boundaries_needed, self.cap - self.fixed), 0)

    @property
    def peak(self) -> int:
        return self.fixed + self.boundaries_in_memory

    @property
    def fits(self) -> bool:
        return self.fixed <= self.cap

    def to_json(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "boundaries_in_memory": self.boundaries_in_memory, "peak": self.peak}


def default_max_memory() -> int:
    """:data:`DEFAULT_MEMORY_FRACTION` of the memory available now (psutil's ``available``: free plus reclaimable)."""
    return int(DEFAULT_MEMORY_FRACTION * psutil.virtual_memory().available)


def estimate(shape: JobShape, *, cap: int, process: int) -> MemoryPlan:
    """The plan of ``shape`` under ``cap`` bytes, the process holding ``process`` bytes already."""
    seq, hidden = shape.seq_len, shape.hidden
    block = seq * (16 * hidden + 6 * shape.intermediate) * shape.compute_bytes + 3 * shape.heads * seq * seq * 4
    head = 4 * seq * shape.vocab * 4
    per_element = shape.options * shape.error_element_bytes  # a block's errors in chunks of at most error_bytes
    errors = max(min(shape.error_bytes, shape.block_units * per_element), shape.largest_unit * per_element)
    encoders = shape.threads * 4 * shape.largest_unit * 4
    return MemoryPlan(cap=cap, process=process + LIBRARIES_BYTES, weights=shape.weight_bytes,
                      activations=max(2 * block, head), gradients=4 * shape.windows * seq * hidden * 4,
                      errors=errors + encoders,
                      boundaries_needed=(shape.blocks + 1) * shape.windows * seq * hidden * 4)


def check_plan(shape: JobShape, plan: MemoryPlan, *, process: int) -> None:
    """Refuse a plan that does not fit, saying what would: fewer windows, shorter windows, or a larger cap."""
    if plan.fits:
        return
    ways = []
    windows = _largest(lambda n: estimate(dataclasses.replace(shape, windows=n), cap=plan.cap, process=process),
                       shape.windows)
    if windows:
        ways.append(f"{windows} windows (--samples {windows})")
    seq_len = _largest(lambda n: estimate(dataclasses.replace(shape, seq_len=n), cap=plan.cap, process=process),
                       shape.seq_len, low=16)
    if seq_len:
        ways.append(f"windows of {seq_len} tokens (--seq-len {seq_len})")
    ways.append(f"--max-memory {math.ceil(plan.fixed / (1 << 20)) << 20} ({plan.fixed / GiB:.2f} GiB)")
    raise SpecError(f"the streamed job needs about {plan.fixed / GiB:.2f} GiB before any hidden states are kept "
                    f"(process {plan.process / GiB:.2f}, weights {plan.weights / GiB:.2f}, activations "
                    f"{plan.activations / GiB:.2f}, gradients {plan.gradients / GiB:.2f}, errors and encoders "
                    f"{plan.errors / GiB:.2f} GiB) but max_memory is {plan.cap / GiB:.2f} GiB; it would fit with "
                    + " or ".join(ways), param="max_memory")


def _largest(plan_of: Callable[[int], MemoryPlan], current: int, *, low: int = 1) -> int | None:
    """The largest ``n`` in ``[low, current)`` whose plan fits (plans grow with ``n``), or ``None``."""
    if current <= low or not plan_of(low).fits:
        return None
    good, bad = low, current
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if plan_of(middle).fits else (good, middle)
    return good


def group_bytes(modules: list[nn.Module], *, compute: torch.dtype, stored: torch.dtype) -> int:
    """Bytes of a group of modules materialized in ``compute`` (from their meta shapes), plus the largest tensor
    in ``stored`` while it is cast (nothing when the two dtypes agree)."""
    sizes = [p.numel() for module in modules for p in module.parameters()]
    cast = 0 if compute == stored or not sizes else max(sizes) * stored.itemsize
    return sum(sizes) * compute.itemsize + cast


def process_bytes() -> int:
    """This process's resident memory now, with its children's."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


def shape_of(stream: Any, *, compute: torch.dtype, windows: int, seq_len: int, options: int, error_bytes: int,
             error_element_bytes: int) -> JobShape:
    """The :class:`JobShape` of a :class:`bitplan.sources.stream.DecoderStream`'s model (sizes from its meta skeleton
    and config) for the given windows and limits."""
    from bitplan.sources.units import find_units

    config = stream.model.config
    store, names = stream.source.store, stream.source.names
    stored = next((store.dtype(n) for n in names.values() if store.dtype(n).is_floating_point), torch.float32)
    groups = [[block] for block in stream.blocks] + [[stream.embedding], [stream.norm, stream.head_module]]
    units = find_units(stream.model)
    per_block: dict[int, int] = {}
    for name, unit in units.items():
        index = stream.block_of(name)
        per_block[index] = per_block.get(index, 0) + unit.weight.numel()
    return JobShape(
        weight_bytes=max(group_bytes(group, compute=compute, stored=stored) for group in groups),
        hidden=int(config.hidden_size), intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
        heads=int(config.num_attention_heads), vocab=int(config.vocab_size), blocks=stream.num_blocks,
        largest_unit=max((u.weight.numel() for u in units.values()), default=0),
        block_units=max(per_block.values(), default=0), options=options, windows=windows,
        seq_len=seq_len, compute_bytes=compute.itemsize, error_bytes=error_bytes,
        error_element_bytes=error_element_bytes, threads=torch.get_num_threads())


def plan_memory(shape: JobShape, *, max_memory: int | None) -> MemoryPlan:
    """The plan of ``shape`` under ``max_memory`` (default :func:`default_max_memory`), refused with what would
    fit when it does not (:func:`check_plan`)."""
    process = process_bytes()
    cap = default_max_memory() if max_memory is None else max_memory
    plan = estimate(shape, cap=cap, process=process)
    check_plan(shape, plan, process=process)
    return plan
