"""Issue 45's ETA check on a recorded real job: README command 1 (SmolLM2 at 3.5 bpw, a first job on a fresh
machine, so no history), every progress event its worker stored, replayed through the worker's ETA model. At
25 %, 50 % and 75 % of the elapsed time (and at every tenth) the ETA is within 2x of the time that actually
remained. Replayed, not re-timed: the check holds whatever the machine running the tests is doing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitplan.stages import EtaModel, Stage, overall_fraction

RECORDED = Path(__file__).parent / "data" / "readme-job-progress-16d6f6b.json"


def _job() -> tuple[float, list[tuple[str, int, int, float]]]:
    data = json.loads(RECORDED.read_text())
    return float(data["elapsed_s"]), [(str(s), int(d), int(t), float(at)) for s, d, t, at in data["reports"]]


def eta_at(reports: list[tuple[str, int, int, float]], at: float) -> float | None:
    """The ETA the worker showed at ``at`` seconds: every report until then observed, no history."""
    eta = EtaModel(0.0)
    for stage, done, total, reported in reports:
        if reported > at:
            break
        eta.observe(stage, done, total, reported)
    return eta.remaining_s(at)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_issue45_the_eta_of_a_recorded_first_job_is_within_2x_of_the_time_left(share: float) -> None:
    elapsed, reports = _job()
    at = share * elapsed
    shown, left = eta_at(reports, at), elapsed - at
    assert shown is not None and left / 2 <= shown <= 2 * left, (share, shown, left)


def test_issue45_the_recorded_job_ran_the_default_stages_and_its_bar_never_goes_back() -> None:
    elapsed, reports = _job()
    assert 200 < elapsed < 400 and [s for s, *_ in reports][0] == Stage.LOAD.value
    assert {Stage.WEIGHT_ERRORS.value, Stage.TOKEN_FISHER.value, Stage.KL_CHECK.value} <= {s for s, *_ in reports}
    shown, reached = [], 0.0
    for stage, done, total, _ in reports:
        reached = max(reached, overall_fraction(stage, done, total))  # as the worker shows it: never back
        shown.append(reached)
    assert shown[-1] == pytest.approx(1.0)
    # the bar's fraction tracks the time spent: at half the time it shows between a third and two thirds
    middle = max(i for i, (*_, at) in enumerate(reports) if at <= elapsed / 2)
    assert 1 / 3 <= shown[middle] <= 2 / 3
