"""The stages a job reports progress in, each with its share of the whole job (``span``), next to the progress
callback type. Every ``on_progress(stage, done, total)`` call in the pipeline and the sensitivity metrics names
a :class:`Stage`, so the worker's overall fraction never meets a stage it does not know."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

ProgressFn = Callable[[str, int, int], None]


class Stage(str, Enum):
    """A pipeline stage as it crosses the API (job ``progress.stage``, event data)."""

    LOAD = "load"
    CALIBRATION_STATISTICS = "calibration statistics"
    BLOCK_STATISTICS = "block statistics"
    WEIGHT_ERRORS = "weight errors"  # every unit's weight error at each candidate format or width (layers x formats)
    TOKEN_FISHER = "token Fisher"
    HUTCHINSON_PROBES = "hutchinson probes"
    PREDICTED_ERROR = "predicted error"
    QUANTIZE = "quantize"
    KL_REFINEMENT = "kl refinement"
    QUALITY = "quality"
    WRITE = "write"
    KL_CHECK = "kl check"
    PERPLEXITY = "perplexity"
    LATENCY_TABLE = "latency table"  # measuring this machine's latency table (once per machine and model)
    LATENCY_CHECK = "latency check"  # timing the written GGUF

    @property
    def span(self) -> tuple[float, float]:
        """The share of the whole job this stage stands for: (start, end) fractions."""
        return STAGE_SPAN[self]


# Each stage's share of the default job (README command 1, SmolLM2 at 3.5 bpw on 2 cores, 277 s at 16d6f6b: load 17 s,
# calibration statistics 29, weight errors 48, token Fisher 154, quantize 15, quality, write and kl check 6): the
# bar's fraction, and the ETA's only guide to the stages after the current one in a job with no history on this
# machine (tests/bitplan/test_eta_recorded.py replays that job: within 1.3x of the time left at every tenth).
# The other metrics' stages (block statistics, Hutchinson probes, predicted error) continue from the same points.
STAGE_SPAN: dict[Stage, tuple[float, float]] = {
    Stage.LOAD: (0.0, 0.06), Stage.CALIBRATION_STATISTICS: (0.06, 0.17), Stage.BLOCK_STATISTICS: (0.17, 0.8),
    Stage.WEIGHT_ERRORS: (0.17, 0.34), Stage.TOKEN_FISHER: (0.34, 0.9), Stage.HUTCHINSON_PROBES: (0.17, 0.85),
    Stage.PREDICTED_ERROR: (0.85, 0.9),
    Stage.QUANTIZE: (0.9, 0.95), Stage.KL_REFINEMENT: (0.95, 0.96), Stage.QUALITY: (0.95, 0.97),
    Stage.WRITE: (0.97, 0.98), Stage.KL_CHECK: (0.98, 1.0), Stage.PERPLEXITY: (0.0, 1.0),
    Stage.LATENCY_TABLE: (0.06, 0.1), Stage.LATENCY_CHECK: (0.97, 0.98),
}


def overall_fraction(stage: str, done: int, total: int) -> float:
    """The fraction of the whole job done at ``done`` of ``total`` steps of ``stage`` (an unknown stage is an
    error: every stage has its span)."""
    low, high = Stage(stage).span
    return low + (high - low) * (min(done, total) / max(total, 1))


class EtaModel:
    """Seconds left in a job, from measured rates. A report ``(stage, done, total)`` at time ``t`` says ``done``
    of ``total`` steps of ``stage`` are complete, so the time since the previous report was spent on ``stage``.
    The current stage's time left is its own measured time per step times the steps left, weighed against the
    history's time for it by the share of steps done (:meth:`_left_in`); the stages after it
    take what they took in the last similar job on this machine (``history``: ``[[stage, seconds], ...]`` in
    the order they ran, as :meth:`durations` gives it) scaled by this job's pace (its time on the stages it has
    finished over the history's time on them: a job on a busier or quieter machine), else this job's time per
    unit of stage span so far times the span left (``STAGE_SPAN``). The time since the last report counts as work
    already done."""

    def __init__(self, start: float, history: list[tuple[str, float]] | None = None) -> None:
        self.history = [(str(stage), float(seconds)) for stage, seconds in history or []]
        self.start = self.last = start
        self.spent: dict[str, float] = {}  # stage -> seconds attributed to it, in the order first reported
        self.current: tuple[str, int, int] | None = None
        self.latest: dict[str, tuple[int, int]] = {}  # stage -> its last (done, total)
        self.reached = 0.0  # the furthest fraction of the job's stage spans reported (a later stage may start lower)

    def observe(self, stage: str, done: int, total: int, now: float) -> None:
        stage = Stage(stage).value  # plain strings as keys (a str Enum hashes by its name)
        self.spent[stage] = self.spent.get(stage, 0.0) + max(now - self.last, 0.0)
        self.last = now
        self.current = (stage, done, total)
        self.latest[stage] = (done, total)
        self.reached = max(self.reached, overall_fraction(stage, done, total))

    def durations(self) -> list[tuple[str, float]]:
        """The measured seconds of every stage reported, in order (a later job's ``history``)."""
        return list(self.spent.items())

    def remaining_s(self, now: float) -> float | None:
        """Seconds left at ``now`` (``None`` before anything can be said: no report yet)."""
        if self.current is None:
            return None
        stage, done, total = self.current
        left_here = self._left_in(stage, done, total)
        later = self._later_from_history(stage)
        if left_here is not None:
            left_here += self._unfinished(stage)
        if later is None or left_here is None:
            fraction = self.reached  # not this stage's own start: "weight errors" ends past "token Fisher"'s
            if fraction <= 0.02:
                return None
            per_span = (self.last - self.start) / fraction
            end = max(Stage(stage).span[1], fraction)
            if left_here is None:
                left_here = per_span * (end - fraction)
            if later is None:
                later = per_span * (1.0 - end)
        return max(left_here + later - (now - self.last), 0.0)

    def _left_in(self, stage: str, done: int, total: int) -> float | None:
        """Seconds left in the current stage: its own time per step times the steps left, and, where the history
        ran it, the history's time for it (at this job's pace) less the time spent, the two weighed by the share of
        steps done (a rate from the first step or two is noise; the history is a whole stage's)."""
        own = self.spent[stage] / done * max(total - done, 0) if done > 0 else None
        before = dict(self.history)
        if stage not in before:
            return own
        then = max(before[stage] * self._pace(stage) - self.spent[stage], 0.0)
        if own is None:
            return then
        weight = done / total if total > 0 else 1.0
        return weight * own + (1 - weight) * then

    def _unfinished(self, stage: str) -> float:
        """Seconds still owed to stages other than ``stage`` that reported part of their steps and will come back
        (a sweep's per-budget stages: the first budget's "kl check" is 1 of 2), at each one's own rate."""
        return sum(self.spent[name] / done * (total - done) for name, (done, total) in self.latest.items()
                   if name != stage and 0 < done < total)

    def _later_from_history(self, stage: str) -> float | None:
        """Seconds the stages after ``stage`` took in the history job (those this job has not reported yet), or
        ``None`` when there is no history or it never ran ``stage``."""
        names = [name for name, _ in self.history]
        if stage not in names:
            return None
        later = sum(seconds for name, seconds in self.history[names.index(stage) + 1:] if name not in self.spent)
        return later * self._pace(stage)

    def _pace(self, stage: str) -> float:
        """This job's seconds on the stages it finished (all reported before ``stage``) over the history's seconds
        on the same stages, within [1/2, 2]; 1 until finished stages make up a tenth of the history's time (a
        stage of a fraction of a second says nothing about the machine)."""
        before = dict(self.history)
        finished = [name for name in self.spent if name != stage and name in before
                    and self.latest[name][0] >= self.latest[name][1]]
        then = sum(before[name] for name in finished)
        if then <= 0.1 * sum(before.values()):
            return 1.0
        return min(max(sum(self.spent[name] for name in finished) / then, 0.5), 2.0)
