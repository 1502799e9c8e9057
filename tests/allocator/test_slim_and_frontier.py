"""SliM-LLM's within-layer search as a special case of the generic solver; the exact Pareto frontier."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitplan.allocator import solve_allocation
from bitplan.allocator.frontier import FrontierTooLarge, exact_frontier, frontier
from bitplan.allocator.lagrangian import pareto_frontier
from bitplan.allocator.slim import salience_search, within_layer_problem
from tests.allocator.test_ilp import random_problem


def total(distortion: np.ndarray, offset: np.ndarray) -> float:
    return float(distortion[np.arange(len(offset)), offset + 1].sum())


@pytest.mark.parametrize("seed", range(10))
def test_generic_solver_reproduces_slim_llm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_groups, bits, group_numel = 24, 3, 128
    salience = rng.lognormal(0, 1, size=n_groups)
    error = 4.0 ** -np.array([bits - 1, bits, bits + 1])  # one error curve scaled by each group's salience
    distortion = salience[:, None] * error[None, :]
    slim = salience_search(distortion, salience)
    problem = within_layer_problem(distortion, bits, group_numel)
    generic = solve_allocation(problem, solver="highs")
    offset = np.array([problem.units[g].options[k].bits - bits for g, k in enumerate(generic.choice)])
    assert offset.sum() <= 0 and slim.sum() == 0  # the layer's average is kept
    assert generic.objective == pytest.approx(total(distortion, slim), rel=1e-9)
    assert (offset == slim).all()


@pytest.mark.parametrize("seed", range(5))
def test_generic_solver_never_worse_than_slim_llm(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    salience = rng.lognormal(0, 1, size=16)
    distortion = np.sort(rng.lognormal(0, 1, size=(16, 3)), axis=1)[:, ::-1].copy()  # unrelated to salience
    generic = solve_allocation(within_layer_problem(distortion, 4, 64), solver="highs")
    assert generic.objective <= total(distortion, salience_search(distortion, salience)) + 1e-12


def brute_pareto(problem) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    points = []
    for choice in itertools.product(*(range(len(u.options)) for u in problem.units)):
        objective, used, _ = problem.evaluate(choice)
        points.append((used, objective))
    points.sort()
    front, best = [], float("inf")
    for used, objective in points:
        if objective < best - 1e-12:
            front.append((used, objective))
            best = objective
    return front


@pytest.mark.parametrize("seed", range(6))
def test_exact_frontier_equals_enumeration(seed: int) -> None:
    problem = random_problem(seed, n_units=5, n_options=3)
    exact = [(p["bytes"], p["objective"]) for p in exact_frontier(problem)]
    expected = brute_pareto(problem)
    assert [b for b, _ in exact] == [b for b, _ in expected]
    assert [o for _, o in exact] == pytest.approx([o for _, o in expected], rel=1e-12)
    hull = {(p["bytes"], round(p["objective"], 9)) for p in pareto_frontier(problem)}
    assert hull <= {(b, round(o, 9)) for b, o in exact}  # hull breakpoints are exact frontier points


def test_frontier_falls_back_to_the_hull_when_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = random_problem(1, n_units=12, n_options=4)
    with pytest.raises(FrontierTooLarge):
        exact_frontier(problem, max_points=10)
    monkeypatch.setattr("bitplan.allocator.frontier.EXACT_POINT_LIMIT", 10)
    points, kind = frontier(problem, kind="auto")
    assert kind == "hull" and points == pareto_frontier(problem)
    with pytest.raises(FrontierTooLarge):
        frontier(problem, kind="exact")


def test_cli_frontier_kinds(tmp_path: Path) -> None:
    problem = random_problem(2, n_units=4, n_options=3)
    data = {"units": [{"name": u.name, "options": [{"bits": o.bits, "bytes": o.bytes, "distortion": o.distortion}
                                                   for o in u.options]} for u in problem.units],
            "budget": {"bytes": problem.budget.bytes}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    for kind, expected in (("exact", exact_frontier(problem)), ("hull", pareto_frontier(problem))):
        out = subprocess.run([sys.executable, "-m", "bitplan.cli", "allocate", "--problem", str(path), "--json",
                              "--frontier", "--frontier-kind", kind], capture_output=True, text=True, check=True)
        points = json.loads(out.stdout.strip().splitlines()[-1])
        assert [p["bytes"] for p in points] == [p["bytes"] for p in expected]
        assert [p["objective"] for p in points] == pytest.approx([p["objective"] for p in expected])
