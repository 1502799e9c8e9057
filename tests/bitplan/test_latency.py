"""Issue 19: latency budgets. The fit, the fitting design, the budget's checks and the solver's use of it, fast;
the whole path (a table measured through llama.cpp on SmolLM2, a job under a latency budget) behind ``slow``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bitplan.allocator import solve_allocation
from bitplan.errors import BitplanError, BudgetError, SpecError
from bitplan.job.planning import allocation_problem, latency_plan, legal_for_target
from bitplan.report.latency import LatencyTable, fit, latency_table, numel_by_type, random_mixtures, variant_assignments
from bitplan.spec import JobSpec

TYPES = ["Q4_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"]
SHAPES = {"a.q": (576, 576), "a.down": (576, 1536), "a.up": (1536, 576)}


def table(**overrides: object) -> LatencyTable:
    values = {"fingerprint": {"cpu": "test"}, "model_sha256": "a" * 64, "types": TYPES, "decode_fixed_ms": 2.0,
              "decode_ms_per_mweight": {"Q4_K": 1.0, "Q6_K": 1.5, "Q4_0": 0.8, "Q5_0": 1.1, "Q8_0": 2.0},
              "prefill_fixed_ms": 1.0, "prefill_ms_per_mweight": dict.fromkeys(TYPES, 0.5), **overrides}
    return LatencyTable(**values)  # type: ignore[arg-type]


def legal(fmt: str, shape: tuple[int, int]) -> bool:
    return legal_for_target("gguf", fmt, shape)


def test_fit_recovers_known_coefficients_and_predicts_unseen_mixtures() -> None:
    truth_fixed, truth = 1.5, {"Q4_0": 0.9, "Q8_0": 2.1, "Q6_K": 1.4}

    def time_of(counts: dict[str, int]) -> float:
        return truth_fixed + sum(truth[t] * n / 1e6 for t, n in counts.items())

    # variants of one model hold the same weights in total: fixed and per-weight parts trade off, predictions not
    same_total = [{"Q4_0": 3_000_000}, {"Q8_0": 3_000_000}, {"Q4_0": 1_000_000, "Q6_K": 2_000_000},
                  {"Q8_0": 500_000, "Q6_K": 2_500_000}, {"Q4_0": 2_000_000, "Q8_0": 1_000_000}]
    fixed, per = fit(list(truth), same_total, [time_of(c) for c in same_total])
    unseen = {"Q4_0": 700_000, "Q8_0": 1_300_000, "Q6_K": 1_000_000}
    predicted = fixed + sum(per[t] * n / 1e6 for t, n in unseen.items())
    assert predicted == pytest.approx(time_of(unseen), rel=1e-6)
    # with totals that vary, every coefficient is identified
    varied = [*same_total, {"Q4_0": 1_000_000}, {"Q8_0": 2_000_000, "Q6_K": 500_000}]
    fixed, per = fit(list(truth), varied, [time_of(c) for c in varied])
    assert fixed == pytest.approx(truth_fixed, rel=1e-6) and per == pytest.approx(truth, rel=1e-6)


def test_fitting_design_covers_every_type_on_legal_tensors_only() -> None:
    design = variant_assignments(SHAPES, TYPES, legal, mixtures=3, seed=1)
    assert set(design[0].values()) == {"Q8_0"}  # the base: the widest type every tensor holds
    used = {fmt for assignment in design for fmt in assignment.values()}
    assert used == set(TYPES)
    for assignment in design:
        assert all(legal(fmt, SHAPES[name]) for name, fmt in assignment.items())
    assert design[1:1 + len(TYPES) - 1] != design[-3:]
    assert random_mixtures(SHAPES, TYPES, legal, count=2, seed=5) == random_mixtures(SHAPES, TYPES, legal, count=2,
                                                                                     seed=5)
    assert numel_by_type({"a.q": "Q4_0", "a.up": "Q4_0"}, {"a.q": 10, "a.up": 5}) == {"Q4_0": 15}
    with pytest.raises(BitplanError, match="Q8_0 or Q4_0"):
        variant_assignments(SHAPES, ["Q4_K"], legal, mixtures=0, seed=0)  # K-quants cannot hold 576-wide rows


def test_latency_budget_is_checked_and_the_solver_meets_it() -> None:
    units = {name: SimpleNamespace(weight=SimpleNamespace(numel=lambda s=shape: s[0] * s[1]))
             for name, shape in SHAPES.items()}
    sizes = {name: {fmt: (shape[0] * shape[1] * bits) // 8 for fmt, bits in (("Q4_0", 4.5), ("Q8_0", 8.5))}
             for name, shape in SHAPES.items()}
    with pytest.raises(BudgetError, match="below the fastest achievable") as refused:
        latency_plan(table(), "cached", units, sizes, budget_ms=2.5)
    assert refused.value.param == "latency_ms_per_token"
    fastest = latency_plan(table(), "cached", units, sizes, budget_ms=100).fastest_ms
    slowest = latency_plan(table(), "cached", units, sizes, budget_ms=100).slowest_ms
    budget = (fastest + slowest) / 2
    plan = latency_plan(table(), "cached", units, sizes, budget_ms=budget)
    sensitivity = SimpleNamespace(units=[SimpleNamespace(name=n, delta_loss={"Q4_0": 1.0 + i, "Q8_0": 0.0})
                                         for i, n in enumerate(SHAPES)])
    high = sum(max(s.values()) for s in sizes.values())
    problem = allocation_problem(sizes, sensitivity, None, high, latency=plan)  # type: ignore[arg-type]
    solved = solve_allocation(problem)
    chosen = {u.name: list(sizes[u.name])[k] for u, k in zip(problem.units, solved.choice, strict=True)}
    assert solved.status.value == "optimal" and plan.predict(chosen) <= budget + 1e-9
    assert "Q8_0" in chosen.values() and "Q4_0" in chosen.values()  # the budget binds: a mixture
    # the most sensitive unit (largest delta) is the one kept at Q8_0 when only one fits
    assert chosen["a.up"] == "Q8_0" or plan.predict({**chosen, "a.up": "Q8_0"}) > budget


def _units_and_sizes() -> tuple[dict[str, SimpleNamespace], dict[str, dict[str, int]]]:
    units = {name: SimpleNamespace(weight=SimpleNamespace(numel=lambda s=shape: s[0] * s[1]))
             for name, shape in SHAPES.items()}
    sizes = {name: {fmt: int(shape[0] * shape[1] * bits) // 8 for fmt, bits in (("Q4_0", 4.5), ("Q5_0", 5.5),
                                                                                 ("Q8_0", 8.5))}
             for name, shape in SHAPES.items()}
    return units, sizes


def test_prefill_budget_alone_and_with_a_decode_budget_matches_brute_force() -> None:
    """Prefill times that order the types unlike decode (Q8_0 quick to prefill, slow to decode) make the two
    budgets pull apart; HiGHS with both rows equals brute force over every combination, and a prefill budget
    under the fastest is refused naming ``prefill_ms_per_token``."""
    units, sizes = _units_and_sizes()
    skewed = table(prefill_ms_per_mweight={"Q4_K": 1.0, "Q6_K": 1.0, "Q4_0": 2.0, "Q5_0": 1.2, "Q8_0": 0.4})
    with pytest.raises(BudgetError, match="prefill budget 0.5 ms per prompt token is below") as refused:
        latency_plan(skewed, "cached", units, sizes, None, 0.5)
    assert refused.value.param == "prefill_ms_per_token"
    probe = latency_plan(skewed, "cached", units, sizes, None, 1e6)
    sensitivity = SimpleNamespace(units=[SimpleNamespace(name=n, delta_loss={"Q4_0": 3.0 + i, "Q5_0": 1.0 + i,
                                                                             "Q8_0": 0.0})
                                         for i, n in enumerate(SHAPES)])
    high = sum(max(s.values()) for s in sizes.values())
    cases = [(None, (probe.fastest(prefill=True) + probe.slowest(prefill=True)) / 2),
             ((probe.fastest() + probe.slowest()) / 2, (probe.fastest(prefill=True) + probe.slowest(prefill=True)) / 2),
             (probe.fastest() + 0.3 * (probe.slowest() - probe.fastest()), probe.slowest(prefill=True))]
    for decode_ms, prefill_ms in cases:
        plan = latency_plan(skewed, "cached", units, sizes, decode_ms, prefill_ms)
        problem = allocation_problem(sizes, sensitivity, None, high, latency=plan)  # type: ignore[arg-type]
        exact, reference = solve_allocation(problem, solver="highs"), solve_allocation(problem, solver="brute_force")
        assert exact.status.value == reference.status.value
        if reference.choice:
            assert exact.objective == pytest.approx(reference.objective, abs=1e-9)
            chosen = {u.name: list(sizes[u.name])[k] for u, k in zip(problem.units, exact.choice, strict=True)}
            assert plan.predict(chosen, prefill=True) <= prefill_ms + 1e-9
            assert decode_ms is None or plan.predict(chosen) <= decode_ms + 1e-9
    with pytest.raises(ValueError, match="no prefill budget"):
        solve_allocation(problem, solver="cvxpy")
    with pytest.raises(ValueError, match="bytes budget only"):
        solve_allocation(problem, solver="lagrangian")


def _walk_reference(document: dict, axis: str) -> list[tuple[float, float, float]]:
    """The slow reference of the frontier along time: every allocation of a plain problem, the lower-left convex
    hull of (time, loss) taken by hand (Andrew's monotone chain), and each hull vertex's bytes."""
    import itertools

    units = document["units"]
    points = []
    for choice in itertools.product(*(range(len(u["options"])) for u in units)):
        options = [u["options"][k] for u, k in zip(units, choice, strict=True)]
        points.append((sum(o[axis] for o in options), sum(o["distortion"] for o in options),
                       sum(o["bytes"] for o in options)))
    points.sort(key=lambda p: (p[0], p[1]))
    hull: list[tuple[float, float, float]] = []
    for point in points:
        if hull and point[1] >= hull[-1][1] - 1e-12:
            continue  # not lower than a quicker point: never on the frontier
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1) <= 1e-12:
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def test_time_frontier_matches_the_hull_of_every_allocation() -> None:
    """``GET /v1/jobs/{id}/frontier?axis=latency``'s computation against its slow reference: every allocation
    enumerated, the convex hull of (time, predicted loss) taken by hand, the bytes of each vertex; and on a tied
    problem each breakpoint is optimal at its own time (brute force)."""
    import numpy as np

    from bitplan.allocator import AllocationProblem, Budget, Option, Unit
    from bitplan.report.frontier import job_frontier, problem_document, time_frontier

    rng = np.random.default_rng(3)
    units = []
    for index in range(5):
        speed = np.sort(rng.uniform(0.1, 1.0, 4))
        units.append(Unit(name=f"u{index}", options=tuple(
            Option(bits=b, bytes=float(rng.integers(100, 900)), distortion=float(d), latency=float(t),
                   prefill=float(rng.uniform(0.1, 1.0)))
            for b, t, d in zip((2, 3, 4, 8), speed, np.sort(rng.uniform(0, 5, 4))[::-1], strict=True))))
    problem = AllocationProblem(units=tuple(units), budget=Budget(bytes=1e9, latency=1e9))
    document = problem_document(problem, None, numel=10_000, fixed_ms={"latency_fixed_ms": 2.0,
                                                                       "prefill_fixed_ms": 1.0})
    for axis, fixed in (("latency", 2.0), ("prefill", 1.0)):
        times, losses, sizes = time_frontier(document, axis)
        reference = _walk_reference(document, axis)
        assert times.tolist() == pytest.approx([fixed + p[0] for p in reference], abs=1e-9)
        assert losses.tolist() == pytest.approx([p[1] for p in reference], abs=1e-9)
        assert sizes.tolist() == pytest.approx([p[2] for p in reference], abs=1e-9)
    report = job_frontier(document, [], axis="latency")
    assert report["axis"] == "latency" and all("latency_ms" in p for p in report["points"])
    assert all("latency_ms" in u and "prefill_ms" in u for u in report["uniform"])
    tied = AllocationProblem(units=tuple(Unit(name=u.name, options=u.options, tie="t" if i < 2 else None,
                                              min_bits=3 if i == 4 else None) for i, u in enumerate(units)),
                             budget=Budget(bytes=1e9, latency=1e9))
    times, losses, _ = time_frontier(problem_document(tied, None, numel=10_000), "latency")
    for t, loss in zip(times.tolist(), losses.tolist(), strict=True):
        best = solve_allocation(AllocationProblem(units=tied.units, budget=Budget(latency=t + 1e-9)),
                                solver="brute_force")
        assert best.objective == pytest.approx(loss, abs=1e-9)
    plain = problem_document(AllocationProblem(units=tuple(Unit(name=u.name, options=tuple(
        Option(bits=o.bits, bytes=o.bytes, distortion=o.distortion) for o in u.options)) for u in units),
        budget=Budget(bytes=1e9)), None, numel=10_000)
    with pytest.raises(ValueError, match="no latency times"):
        time_frontier(plain, "latency")


def test_latency_spec_rules_and_the_cli_contract(tmp_path: Path) -> None:
    spec = JobSpec.from_flat(model="smollm2-135m", latency_ms_per_token=9.5, target="gguf")
    assert spec.budget.describe() == "9.5 ms per token" and spec.budgets == 1
    assert JobSpec.from_flat(model="smollm2-135m", latency_ms_per_token=9.5, target="gguf", bits_per_weight=4.5)
    prefill = JobSpec.from_flat(model="smollm2-135m", prefill_ms_per_token=2.0, target="gguf")
    assert prefill.budget.describe() == "2 ms per prompt token" and prefill.budgets == 1
    for flat, param in (({"latency_ms_per_token": 9.5}, "latency_ms_per_token"),
                        ({"latency_ms_per_token": 9.5, "target": "gguf", "uniform_bits": 4}, "latency_ms_per_token"),
                        ({"latency_ms_per_token": -1.0, "target": "gguf"}, "latency_ms_per_token"),
                        ({"prefill_ms_per_token": 2.0}, "prefill_ms_per_token"),
                        ({"prefill_ms_per_token": 2.0, "target": "gguf", "uniform_bits": 4}, "prefill_ms_per_token"),
                        ({}, "bits_per_weight")):
        with pytest.raises(SpecError) as refused:
            JobSpec.from_flat(model="smollm2-135m", **flat)
        assert refused.value.param == param
    run = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", "--model", "smollm2-135m",
                          "--latency-ms-per-token", "9", "--out", str(tmp_path / "o"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    error = json.loads(run.stdout.strip().splitlines()[-1])["error"]
    assert error["param"] == "latency_ms_per_token" and "--target gguf" in error["message"]


def test_a_table_file_from_another_machine_must_match_the_model(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table().to_json()))
    loaded, source = latency_table("smollm2-135m", "a" * 64, ["Q4_0", "Q8_0"], table_file=path)
    assert source == "file" and loaded == table()
    with pytest.raises(BitplanError, match="another model"):
        latency_table("smollm2-135m", "b" * 64, ["Q4_0"], table_file=path)
    with pytest.raises(BitplanError, match="no timing for Q2_K"):
        latency_table("smollm2-135m", "a" * 64, ["Q2_K"], table_file=path)
    path.write_text("{}")
    with pytest.raises(BitplanError, match="not a bitplan latency table"):
        latency_table("smollm2-135m", "a" * 64, ["Q4_0"], table_file=path)


@pytest.mark.slow
def test_issue19_latency_table_and_a_job_under_a_latency_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A table measured through llama.cpp on SmolLM2 (one timing round: this checks the path, bench/latency.py
    the accuracy), then a job halfway between the fastest and the slowest decode: predicted within the budget,
    and its GGUF timed by llama.cpp."""
    monkeypatch.setenv("BITPLAN_CACHE_DIR", str(tmp_path / "cache"))
    measured = subprocess.run([sys.executable, "-m", "bitplan.cli", "latency", "--target", "gguf", "--rounds", "1",
                               "--formats", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K", "--json", "--out", str(tmp_path / "t.json")],
                              capture_output=True, text=True, timeout=1800)
    assert measured.returncode == 0, measured.stderr[-3000:]
    table_json = json.loads(measured.stdout)
    assert table_json["source"] == "measured" and table_json["fit"]["variants"] >= 5
    assert all(v >= 0 for v in table_json["decode_ms_per_mweight"].values())
    again = subprocess.run([sys.executable, "-m", "bitplan.cli", "latency", "--formats", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K",
                            "--json"], capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout)["source"] == "cached"
    common = ["--model", "smollm2-135m", "--target", "gguf", "--formats", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K", "--json"]
    too_fast = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", *common, "--latency-ms-per-token", "0.01",
                               "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert too_fast.returncode == 3
    message = json.loads(too_fast.stdout.strip().splitlines()[-1])["error"]["message"]
    fastest, slowest = (float(x) for x in re.findall(r"(\d+\.\d+) ms per token|slowest is (\d+\.\d+)", message)
                        [0:2] and re.findall(r"achievable (\d+\.\d+).*slowest is (\d+\.\d+)", message)[0])
    assert 0 < fastest < slowest
    budget = (fastest + slowest) / 2
    too_slow_a_prompt = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", *common, "--prefill-ms-per-token",
                                        "0.001", "--out", str(tmp_path / "c")], capture_output=True, text=True,
                                       timeout=600)
    assert too_slow_a_prompt.returncode == 3
    refusal = json.loads(too_slow_a_prompt.stdout.strip().splitlines()[-1])["error"]
    assert refusal["param"] == "prefill_ms_per_token"
    quickest, slowest_prefill = (float(x) for x in re.findall(r"achievable (\d+\.\d+).*slowest is (\d+\.\d+)",
                                                              refusal["message"])[0])
    prefill_budget = quickest + 0.75 * (slowest_prefill - quickest)
    run = subprocess.run([sys.executable, "-m", "bitplan.cli", "run", *common, "--latency-ms-per-token", f"{budget}",
                          "--prefill-ms-per-token", f"{prefill_budget}", "--samples", "2", "--seq-len", "64",
                          "--quality-windows", "1", "--out", str(tmp_path / "a"),
                          "--quiet"], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    report = result["latency"]
    assert report["table"]["source"] == "cached" and report["predicted_ms_per_token"] <= budget + 1e-9
    assert len({u["format"] for u in result["units"]}) > 1  # the budget binds: a mixture of types
    assert report["measured_ms_per_token"] > 0 and (tmp_path / "a" / "model.gguf").is_file()
    assert report["predicted_prefill_ms_per_token"] <= prefill_budget + 1e-9
    assert report["prefill_budget_ms_per_token"] == pytest.approx(prefill_budget)
    # the frontier along decode time from the artifact's problem: the exact job is at least as good as every hull
    # breakpoint its budget allows, and the job's point is among the measured ones
    from bitplan.report.frontier import job_frontier

    document = json.loads((tmp_path / "a" / "allocation-problem.json").read_text())
    along = job_frontier(document, [result], axis="latency")
    allowed = [p["predicted_loss"] for p in along["points"] if p["latency_ms"] <= budget]
    assert allowed and result["objective"] <= min(allowed) + 1e-9
    assert along["measured"][0]["latency_ms"] == report["predicted_ms_per_token"]
