"""The coarse range of bits per weight a set of candidate widths or formats can reach, known before any model is
loaded: the rule :class:`bitplan.spec.JobSpec` checks on construction. It lives below both the spec and
:mod:`bitplan.job.planning` (whose exact check needs the model's layers), so that neither imports the other back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bitplan.errors import BudgetError
from bitplan.quantizer.formats import FORMATS


@dataclass(frozen=True)
class BpwRange:
    """The bits per weight no model can go below (``floor``) or above (``ceiling``) with these candidates, and the
    words a refusal uses: what was chosen, and why the floor is what it is."""

    floor: float
    ceiling: float
    chosen: str
    floor_reason: str


def bpw_range(candidate_bits: tuple[int, ...], group_size: int, format_names: tuple[str, ...] | None,
              formats_label: str | None) -> BpwRange:
    """Without formats, ``min bits + 32 / group size`` (one fp16 scale and zero per full group) to
    ``max bits + 32`` (a group of one weight). With formats: the cheapest format's bits per weight (an integer
    grid's full groups; a GGML type's blocks, the same for every legal shape) to the widest grid's ``bits + 32``
    (or the largest GGML type). ``formats_label`` is what the user typed (a preset), for the message."""
    if format_names is None:
        bits = sorted(candidate_bits)
        return BpwRange(floor=min(bits) + 32 / group_size, ceiling=max(bits) + 32,
                        chosen=f"with bits {bits} and group size {group_size}",
                        floor_reason="the lowest bit width plus 32 bits of fp16 scale and zero per group")
    formats = [FORMATS[n] for n in format_names]
    return BpwRange(floor=min(f.bits_per_weight() for f in formats),
                    ceiling=max(f.bits_per_weight() if f.family == "ggml" else f.nominal_bits + 32 for f in formats),
                    chosen=f"with formats {formats_label or ','.join(format_names)!r}",
                    floor_reason="its cheapest format")


def check_bpw_budgets(budgets: tuple[float, ...], describe: Callable[[int], str], reach: BpwRange) -> None:
    """Refuse any bits-per-weight budget outside ``reach`` with a :class:`BudgetError` naming the bound; ``describe``
    spells budget ``index`` as the user gave it."""
    for index, budget in enumerate(budgets):
        if budget < reach.floor:
            raise BudgetError(
                f"budget {describe(index)} is below the smallest achievable size: {reach.chosen} no model "
                f"goes below {reach.floor:.4f} bits per weight ({reach.floor_reason})", param="bits_per_weight")
        if budget > reach.ceiling:
            raise BudgetError(
                f"budget {describe(index)} is above the largest achievable size: {reach.chosen} no model "
                f"goes above {reach.ceiling:g} bits per weight; give at most the largest candidate width plus its "
                f"scales and zeros", param="bits_per_weight")
