"""Issue 45: the sizes of the style (shared STYLE.md): no function over 60 lines outside ``bench/``, no module over
400 lines anywhere. Today's offenders are listed with their length; the list only shrinks: a new offender, or a
listed one that grew, fails; one that shrank or is gone fails too until its line is tightened or deleted."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
SKIPPED = {".venv", ".git", "bitplan.egg-info", "docker", "node_modules"}
# "path" (a module's lines) or "path:Qualified.name" (a function's lines, from ``def`` to its last line)
ALLOWED = {}


def _python_files() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py"))
            if not any(part in SKIPPED or part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _long_functions(tree: ast.AST, prefix: str = "") -> dict[str, int]:
    """Every function (methods and nested ones too, by qualified name) longer than the limit, with its lines."""
    found = {}
    for node in ast.iter_child_nodes(tree):
        name = getattr(node, "name", "")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found[prefix + name] = lines
            found.update(_long_functions(node, f"{prefix}{name}."))
        else:
            found.update(_long_functions(node, f"{prefix}{name}." if isinstance(node, ast.ClassDef) else prefix))
    return found


def measure_offenders() -> dict[str, int]:
    """Every module over :data:`MAX_MODULE_LINES` and function over :data:`MAX_FUNCTION_LINES` (outside bench/)."""
    offenders = {}
    for path in _python_files():
        relative, text = path.relative_to(ROOT).as_posix(), path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            offenders[relative] = len(text.splitlines())
        if not relative.startswith("bench/"):
            offenders.update({f"{relative}:{name}": n for name, n in _long_functions(ast.parse(text)).items()})
    return offenders


def test_issue45_no_new_or_growing_offender() -> None:
    offenders = measure_offenders()
    new = {key: n for key, n in offenders.items() if key not in ALLOWED}
    grown = {key: f"{ALLOWED[key]} -> {n}" for key, n in offenders.items() if key in ALLOWED and n > ALLOWED[key]}
    assert (new, grown) == ({}, {}), ("split these (a function over 60 lines or a module over 400: "
                                      "/work/shared/STYLE.md)")


def test_issue45_the_allow_list_only_shrinks() -> None:
    offenders = measure_offenders()
    stale = {key: f"{n} -> {offenders.get(key, 'within the limit')}" for key, n in ALLOWED.items()
             if offenders.get(key) != n}
    assert stale == {}, "tighten or delete these lines of ALLOWED"


def test_issue45_the_measure_finds_long_functions_and_methods() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def long():\n{body}\n\nclass K:\n    def short(self):\n        return 1\n\n"
                     f"    def method(self):\n{body.replace('    ', '        ')}\n")
    assert _long_functions(tree) == {"long": MAX_FUNCTION_LINES + 1, "K.method": MAX_FUNCTION_LINES + 1}
