"""The same integer program through PuLP and its bundled CBC solver (the HAWQ-V3 route)."""

from __future__ import annotations

import time

from bitplan.allocator.problem import Allocation, AllocationProblem, SolverStatus, reject_infeasible_budget


def solve_pulp(problem: AllocationProblem, *, time_limit_s: float = 60.0) -> Allocation:
    """Solve with PuLP/CBC. Raises ``ImportError`` with an install hint when PuLP is missing."""
    try:
        import pulp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("solver 'pulp' needs PuLP: pip install 'bitplan[test]' or pip install pulp") from error
    started = time.perf_counter()
    early = reject_infeasible_budget(problem, "pulp", started)
    if early is not None:
        return early
    model = pulp.LpProblem("bitplan", pulp.LpMinimize)
    # Integer in [0, 1] rather than Binary, which would override the upper bound of 0 on excluded options.
    x = [[pulp.LpVariable(f"x_{u}_{k}", lowBound=0, upBound=int(ok), cat="Integer")
          for k, ok in enumerate(unit.allowed())] for u, unit in enumerate(problem.units)]
    model += pulp.lpSum(o.distortion * x[u][k] for u, unit in enumerate(problem.units)
                        for k, o in enumerate(unit.options))
    for u in range(len(problem.units)):
        model += pulp.lpSum(x[u]) == 1
    if problem.budget.bytes is not None:
        model += pulp.lpSum(o.bytes * x[u][k] for u, unit in enumerate(problem.units)
                            for k, o in enumerate(unit.options)) <= problem.budget.bytes
    for resource in ("latency", "prefill"):
        limit = getattr(problem.budget, resource)
        if limit is not None:
            model += pulp.lpSum(float(getattr(o, resource) or 0.0) * x[u][k] for u, unit in enumerate(problem.units)
                                for k, o in enumerate(unit.options)) <= limit
    for members in problem.tie_groups().values():
        for other in members[1:]:
            for k in range(len(problem.units[members[0]].options)):
                model += x[members[0]][k] == x[other][k]
    model.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    elapsed = time.perf_counter() - started
    state = pulp.LpStatus[model.status]
    found = model.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if not found:
        status = SolverStatus.INFEASIBLE if state == "Infeasible" else SolverStatus.TIME_LIMIT
        return Allocation.without_solution(problem, status=status, solver="pulp", solve_s=elapsed, message=state)
    choice = tuple(max(range(len(row)), key=lambda k, row=row: row[k].value() or 0.0) for row in x)
    objective, used, latency = problem.evaluate(choice)
    optimal = state == "Optimal" and model.sol_status == pulp.LpSolutionOptimal
    # CBC through PuLP reports no bound for a stopped search: the lower bound is unknown then.
    return Allocation(status=SolverStatus.OPTIMAL if optimal else SolverStatus.FEASIBLE, choice=choice,
                      objective=objective, lower_bound=objective if optimal else None, bytes=used, latency=latency,
                      solve_s=elapsed, solver="pulp", message=state)
