"""The ETA from measured rates (``bitplan.stages.EtaModel``), on a simulated clock: a job whose stages run at
constant rates is predicted exactly once a job of its kind has run, and its current stage is always predicted
from its own rate."""

from __future__ import annotations

import pytest

from bitplan.stages import EtaModel, Stage

# (stage, steps, seconds per step): a job of the usual shape, with a long load and a slow quality stage
PLAN = [(Stage.LOAD, 1, 20.0), (Stage.TOKEN_FISHER, 8, 5.0), (Stage.PREDICTED_ERROR, 2, 1.0),
        (Stage.QUANTIZE, 10, 0.5), (Stage.QUALITY, 1, 30.0), (Stage.WRITE, 1, 2.0), (Stage.KL_CHECK, 1, 8.0)]
TOTAL = sum(steps * per for _, steps, per in PLAN)


def run(eta: EtaModel, start: float = 100.0) -> list[tuple[float, float | None, float]]:
    """Feed ``eta`` the reports of one job; at each report and halfway to the next: (time, predicted seconds
    left, true seconds left)."""
    now, seen = start, []
    eta.observe(Stage.LOAD, 0, 1, now)
    for stage, steps, per in PLAN:
        for done in range(1, steps + 1):
            seen.append((now + per / 2, eta.remaining_s(now + per / 2), start + TOTAL - now - per / 2))
            now += per
            eta.observe(stage, done, steps, now)
            seen.append((now, eta.remaining_s(now), start + TOTAL - now))
    return seen


def test_a_job_of_a_kind_already_measured_is_predicted_exactly() -> None:
    first = EtaModel(100.0)
    run(first)
    assert [stage for stage, _ in first.durations()] == [s.value for s, _, _ in PLAN]
    assert sum(seconds for _, seconds in first.durations()) == pytest.approx(TOTAL)
    second = EtaModel(500.0, first.durations())
    for at, predicted, true in run(second, 500.0):
        assert predicted == pytest.approx(true, abs=1e-6), at


def test_without_history_the_current_stage_runs_at_its_own_rate() -> None:
    eta = EtaModel(0.0)
    assert eta.remaining_s(0.0) is None  # nothing reported yet
    eta.observe(Stage.LOAD, 1, 1, 20.0)
    for done in range(1, 5):  # token Fisher: 5 s a step, 8 steps
        eta.observe(Stage.TOKEN_FISHER, done, 8, 20.0 + 5 * done)
    left = eta.remaining_s(40.0)
    assert left is not None
    # this stage: 4 steps left at 5 s; the stages after it: this job's seconds per share of the spans so far
    low, high = Stage.TOKEN_FISHER.span
    fraction = low + (high - low) * 4 / 8
    assert left == pytest.approx(4 * 5.0 + 40.0 / fraction * (1 - high))
    assert eta.remaining_s(42.0) == pytest.approx(left - 2.0)  # time since the last report counts as done
    assert eta.remaining_s(1e6) == 0.0


def test_a_stage_that_did_not_run_before_falls_back_and_a_skipped_one_is_not_waited_for() -> None:
    history = [(Stage.LOAD.value, 20.0), (Stage.TOKEN_FISHER.value, 40.0), (Stage.QUANTIZE.value, 5.0),
               (Stage.KL_CHECK.value, 8.0)]
    eta = EtaModel(0.0, history)
    eta.observe(Stage.LOAD, 1, 1, 20.0)
    assert eta.remaining_s(20.0) == pytest.approx(40.0 + 5.0 + 8.0)
    eta.observe(Stage.QUANTIZE, 5, 10, 22.0)  # the sensitivity came from the cache: no token Fisher this time
    # quantize: its own rate (2 s more) and the history's (5 s less the 2 spent), half and half at 5 of 10 steps
    assert eta.remaining_s(22.0) == pytest.approx(0.5 * 2.0 + 0.5 * 3.0 + 8.0)


def record_job(folder, out, seed: int, samples: int = 4, seq_len: int = 32) -> list[tuple[str, int, int, float]]:
    """A real two-budget sweep on a tiny model: every ``(stage, done, total, monotonic seconds)`` it reported."""
    import time

    from bitplan.job.pipeline import run_budgets
    from bitplan.spec import JobSpec

    reports: list[tuple[str, int, int, float]] = []
    spec = JobSpec.from_flat(model=str(folder), bits_per_weight=[3.5, 4.5], num_samples=samples, seq_len=seq_len,
                             group_size=64, quality_windows=2, quality_seq_len=32, seed=seed)
    run_budgets(spec, out_dirs=[out / "a", out / "b"], use_cache=False,
                on_progress=lambda stage, done, total: reports.append((Stage(stage).value, done, total,
                                                                       time.monotonic())))
    return reports


def replay(reports: list[tuple[str, int, int, float]], start: float, history=None):
    """The worker's view of a recorded job: per report, the ETA and the share ``elapsed / (elapsed + left)``."""
    eta, seen = EtaModel(start, history), []
    for stage, done, total, at in reports:
        eta.observe(stage, done, total, at)
        left = eta.remaining_s(at)
        seen.append((stage, done, total, at, left, None if left is None else (at - start) / max(at - start + left,
                                                                                                  1e-9)))
    return eta, seen


def test_issue45_a_real_sweeps_progress_is_honest(tiny_llama_dir, tmp_path) -> None:
    """Two real jobs of one kind (the second with the first's stage times as history, as the worker keeps them):
    no stage reports more steps than its total, no share passes 1, the first budget's "kl check" is not the end
    (ETA above 0 while the second budget's stages remain), and at the end of each stage the second job's ETA is
    within a factor of 3 of the time that actually remained, give or take 2 s (generous: tiny stages on shared
    cores)."""
    import time

    start = time.monotonic()
    first = record_job(tiny_llama_dir, tmp_path / "first", seed=0)
    measured, _ = replay(first, start)
    start = time.monotonic()
    second = record_job(tiny_llama_dir, tmp_path / "second", seed=1)
    end = time.monotonic()
    _, seen = replay(second, start, measured.durations())
    assert all(0 <= done <= total for _, done, total, *_ in first + second)
    assert all(share is None or 0 <= share <= 1 for *_, share in seen)
    checks = [(done, total, left) for stage, done, total, _, left, _ in seen if stage == Stage.KL_CHECK.value]
    assert [(d, t) for d, t, _ in checks] == [(1, 2), (2, 2)] and checks[0][2] > 0
    stage_ends = [row for row, after in zip(seen, seen[1:], strict=False) if after[0] != row[0]]
    assert len(stage_ends) >= 5
    for stage, done, total, at, left, _ in stage_ends:
        true_left = end - at
        assert left is not None and true_left / 3 - 2 <= left <= 3 * true_left + 2, (stage, done, total, left,
                                                                                        true_left)


def eta_at(reports: list[tuple[str, int, int, float]], start: float, at: float, history=None) -> float | None:
    """The ETA the worker shows at time ``at`` of a recorded job: every report until then observed."""
    eta = EtaModel(start, history)
    for stage, done, total, reported in reports:
        if reported > at:
            break
        eta.observe(stage, done, total, reported)
    return eta.remaining_s(at)


@pytest.mark.slow  # wall-clock timing of a 5-second job: it holds on quiet cores, not beside a loaded benchmark
def test_issue45_the_eta_at_a_quarter_half_and_three_quarters_of_a_real_job(tiny_llama_dir, tmp_path) -> None:
    """The issue's check on a recorded real job (the second of its kind, the worker's history from the first): at
    25 %, 50 % and 75 % of the elapsed time the ETA is within a factor of 2 of the time that actually remained
    (give or take 1 s: the job takes about 5 seconds, and consecutive runs of it differ by up to 2x in a stage on
    shared cores). A warm-up job first, as on a worker that
    has run one before: the first job in a process also pays for imports."""
    import time

    record_job(tiny_llama_dir, tmp_path / "warm", seed=2, samples=32, seq_len=256)  # one-time costs (imports,
    # kernels built for these shapes) in neither job
    start = time.monotonic()
    first = record_job(tiny_llama_dir, tmp_path / "first", seed=0, samples=32, seq_len=256)
    measured, _ = replay(first, start)
    start = time.monotonic()
    second = record_job(tiny_llama_dir, tmp_path / "second", seed=1, samples=32, seq_len=256)
    end = time.monotonic()
    for fraction in (0.25, 0.5, 0.75):
        at = start + fraction * (end - start)
        left, true_left = eta_at(second, start, at, measured.durations()), end - at
        assert left is not None and true_left / 2 - 1 <= left <= 2 * true_left + 1, (fraction, left, true_left)
