"""Bit allocation as a multiple-choice knapsack: problem model, exact ILP solver, brute-force reference."""

from bitplan.allocator.problem import Allocation, AllocationProblem, Budget, Option, SolverStatus, Unit
from bitplan.allocator.solve import problem_from_json, problem_to_json, solve_allocation

__all__ = [
    "Allocation",
    "AllocationProblem",
    "Budget",
    "Option",
    "SolverStatus",
    "Unit",
    "problem_from_json",
    "problem_to_json",
    "solve_allocation",
]
