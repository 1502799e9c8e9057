"""The numeric core never imports the service, web or queue layers; our names live under ``bitplan.`` only, so
Hugging Face's ``kernels`` package (which transformers imports when present) and ours both import."""

from __future__ import annotations

import ast
import graphlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("fastapi", "starlette", "uvicorn", "redis", "huey", "pydantic_settings")
CORE = ("bitplan.allocator", "bitplan.sensitivity", "bitplan.quantizer", "bitplan.kernels", "bitplan.job.pipeline",
        "bitplan.cli", "bitplan.spec")
ROOT = Path(__file__).resolve().parent.parent


def _run_elsewhere(code: str, cwd: Path, extra_path: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter outside the repository (so only installed names are importable)."""
    env_path = [] if extra_path is None else [str(extra_path)]
    script = f"import sys\nsys.path[:0] = {env_path!r}\n" + code
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=cwd)
    return result.stdout


def test_core_imports_no_service_layer(tmp_path: Path) -> None:
    code = (
        f"import importlib\nfor name in {CORE!r}: importlib.import_module(name)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith('bitplan.service')]\n"
        "assert not bad, bad\n"
    )
    _run_elsewhere(code, tmp_path)


def test_issue13_no_generic_top_level_names_installed(tmp_path: Path) -> None:
    """Outside the clone, none of the repository's folders is importable under a bare name (``kernels`` may be: it
    is Hugging Face's distribution, which transformers >= 5.25 installs, never our folder)."""
    code = (
        "import importlib.util\n"
        "specs = [(n, importlib.util.find_spec(n)) for n in ('allocator', 'sensitivity', 'quantizer', 'kernels', "
        "'service')]\n"
        f"print([n for n, spec in specs if spec is not None\n"
        f"       and (spec.origin or '').startswith({str(ROOT)!r} + '/' + n)])\n"
    )
    assert _run_elsewhere(code, tmp_path).strip() == "[]"


def _hugging_face_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("where", ["outside", "clone_root"])
def test_issue13_hugging_face_kernels_and_ours_both_import(tmp_path: Path, where: str) -> None:
    """Hugging Face's ``kernels`` (the real one when installed, else a stand-in on the path) and ours both import, and
    transformers (which imports ``kernels`` when that distribution is installed) still loads a model class. From the
    clone's root (``python -m``/``-c`` there, and pytest, put it first on ``sys.path``) the folder ``kernels/`` is
    found first under the bare name and hands it over to the installed distribution."""
    extra = None
    if not _hugging_face_kernels_installed():
        extra = tmp_path / "site"
        (extra / "kernels").mkdir(parents=True)
        (extra / "kernels" / "__init__.py").write_text("HF_KERNELS = True\n")
    code = (
        "import kernels, bitplan.kernels\n"
        "from bitplan.kernels import QuantLinear\n"
        "assert bitplan.kernels.__name__ == 'bitplan.kernels' and not hasattr(kernels, 'QuantLinear')\n"
        "from transformers import PreTrainedModel, LlamaForCausalLM\n"
        "print(kernels.__file__)\nprint(bitplan.kernels.__file__)\n"
    )
    hf, ours = _run_elsewhere(code, tmp_path if where == "outside" else ROOT, extra).split()
    assert not hf.startswith(str(ROOT / "kernels")) and ours == str(ROOT / "kernels" / "__init__.py")


def test_issue13_bare_kernels_from_the_clone_without_the_distribution_is_missing() -> None:
    """With no ``kernels`` distribution importable, the bare name from the clone's root is a plain
    ModuleNotFoundError (what transformers' optional import expects), not our folder."""
    code = (
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as error:\n    print('missing', error.name)\n"
        "else:\n    print('found', kernels.__file__)\n"
    )
    assert _run_elsewhere(code, ROOT).strip() == "missing kernels"


# The layers of the house, lowest first: a module imports only from its own layer or below (function-level and
# ``TYPE_CHECKING`` imports count: a lazy import hides an arrow, it does not remove it). ``bitplan.stages`` and
# ``bitplan.errors`` are the shared vocabulary (the progress stages, the domain errors): they import nothing of ours.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bitplan.stages", "bitplan.errors"),
    ("bitplan.kernels",),
    ("bitplan.allocator",),
    ("bitplan.quantizer",),
    ("bitplan.sensitivity",),
    ("bitplan",),  # the job and its steps: spec, job/ (planning, pipeline, ...), sources/, targets/, report/, CLI
    ("bitplan.service",),
)
FOLDERS = {"bitplan": "bitplan", "allocator": "bitplan.allocator", "sensitivity": "bitplan.sensitivity",
           "quantizer": "bitplan.quantizer", "kernels": "bitplan.kernels", "service": "bitplan.service"}
# Known import cycles, as the edge that closes each, with why it is still here. Shrink only: fixing one means
# deleting its line; a new cycle fails the test.
ALLOWED_BACK_EDGES = {
    ("bitplan.job.streamed_job", "bitplan.job.pipeline"): "RunResult lives in bitplan.job.run_result now: "
                                                          "streamed_job's two imports of it from bitplan.job.pipeline "
                                                          "are left to change",
}


def _module_files() -> dict[str, Path]:
    """Every module of ours by its installed name (``kernels/dequant.py`` -> ``bitplan.kernels.dequant``)."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ours that ``path`` (module ``name``) imports anywhere in its body: ``from a.b import c`` is
    ``a.b.c`` when that is a module, else ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix naming ``module``."""
    best = max((len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + "."))
    return best[1]


def test_issue45_no_import_reaches_up_a_layer() -> None:
    """kernels < allocator < quantizer < sensitivity < the job modules < service; ``kernels/quant_linear.py`` once
    imported ``quantizer.grid`` (the decoder of double-quantized scales now lives in ``kernels.dequant``)."""
    upward = sorted(f"{module} -> {target}" for module, targets in _import_graph().items() for target in targets
                    if _layer_of(target) > _layer_of(module))
    assert upward == []


def test_issue45_the_layer_map_sees_every_package() -> None:
    """The graph the layer and cycle checks walk is the real one: it holds the arrows the house is built on."""
    graph = _import_graph()
    assert {"bitplan.kernels.dequant", "bitplan.spec", "bitplan.service.worker"} <= set(graph)
    assert "bitplan.kernels.dequant" in graph["bitplan.quantizer.grid"]
    assert "bitplan.job.budget_range" in graph["bitplan.spec"] and "bitplan.spec" in graph["bitplan.job.planning"]
    assert [_layer_of(m) for m in ("bitplan.stages", "bitplan.kernels.bitpack", "bitplan.quantizer",
                                   "bitplan.spec", "bitplan.service.api")] == [0, 1, 3, 5, 6]


def test_issue45_no_import_cycle_among_the_core_and_job_modules() -> None:
    """No circle among ``bitplan/`` and the numeric packages (``spec`` <-> ``planning`` was one: the coarse budget
    rule now lives below both, in ``bitplan.job.budget_range``). Known cycles are listed by the edge that closes them
    in :data:`ALLOWED_BACK_EDGES`; that list only shrinks."""
    graph = {name: targets - {t for t in targets if (name, t) in ALLOWED_BACK_EDGES}
             for name, targets in _import_graph().items() if _layer_of(name) < len(LAYERS) - 1}
    sorter = graphlib.TopologicalSorter({name: {t for t in targets if t in graph} for name, targets in graph.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    stale = [edge for edge in ALLOWED_BACK_EDGES if edge[1] not in _import_graph().get(edge[0], set())]
    assert stale == [], f"these cycles are fixed: delete them from ALLOWED_BACK_EDGES: {stale}"
