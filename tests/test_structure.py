"""The shape of the package: its import graph has no cycle, and data flows one way (stages below the runner)."""

import ast
import configparser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = REPO / "src" / "sfm_hf"
# Joint (multi-backbone) runs are orchestrated above the stages; a stage that imports it knows what it is part of.
STAGE_PREFIXES = ("statistics", "distill", "evaluation", "export")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (in functions too: a lazy import that closes a
    loop is still a loop of ideas)."""
    modules = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from . import hub` imports the module hub; `from .config import Config` the module config.
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            imported.update(target for target in map(known, targets) if target and target != name)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done, on_path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def late():\n    from .. import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(package)) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph(PACKAGE_ROOT))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("forbidden", ["sfm_hf.multi", "sfm_hf.runner"])
def test_stages_do_not_import_what_is_built_on_them(forbidden):
    graph = import_graph(PACKAGE_ROOT)
    stages = [name for name in graph if name.removeprefix("sfm_hf.").startswith(STAGE_PREFIXES)]
    assert "sfm_hf.distill" in stages or any(name.startswith("sfm_hf.distill.") for name in stages)
    offenders = [name for name in stages if forbidden in graph[name]]
    assert not offenders, f"{offenders} import {forbidden}, which sits above the stages"


def test_hub_sources_do_not_reach_into_merging():
    assert "sfm_hf.merge" not in import_graph(PACKAGE_ROOT)["sfm_hf.hub"]


def test_the_wheel_lists_every_sub_package_and_the_card_templates():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    packages = {module_name(path.parent / "__init__.py", PACKAGE_ROOT) for path in PACKAGE_ROOT.rglob("__init__.py")}
    assert packages | {"sfm_hf.model_cards"} == listed
    assert sorted(path.name for path in (REPO / "model_cards").glob("*.j2")) == [
        "dataset_card.md.j2", "model_card.md.j2", "statistics_card.md.j2"]
