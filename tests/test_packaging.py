"""Issue 45: a non-editable install holds every package. pyproject.toml lists the packages by hand (each top-level
design folder installed as a subpackage of ``bitplan``), so a new folder with an ``__init__.py`` that is not listed
would be missing from a wheel while every editable checkout still imports it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_packages() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def test_issue45_every_folder_with_an_init_under_the_design_folders_is_a_listed_package() -> None:
    listed, folders = installed_packages()
    on_disk = set()
    for package, folder in folders.items():  # "bitplan.service" -> service/ ...
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *relative.parts]))
    assert {"bitplan.service.api", "bitplan.service.api.routes", "bitplan.quantizer.ggml_encode"} <= on_disk
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set(), "these listed packages have no folder with an __init__.py"


def test_issue45_every_design_folder_is_mapped_under_bitplan() -> None:
    _, folders = installed_packages()
    assert folders == {"bitplan": "bitplan", **{f"bitplan.{name}": name for name in
                                                 ("allocator", "sensitivity", "quantizer", "kernels", "service")}}
    assert all((ROOT / folder / "__init__.py").is_file() for folder in folders.values())
