"""The layout rules the README's Development section states, read from the source: stage flows are
leaves, tasks/ never imports Prefect or flows/, models/ never imports flows/ or warehouse/, and
SQL runs only in warehouse/."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULES = ["generate", "filter", "sft", "preferences", "reward", "ppo", "dpo", "grpo", "evaluate"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def test_the_registry_lists_every_stage_module():
    from instructflow.flows.stages import stage_names

    assert stage_names() == STAGE_MODULES


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_a_stage_flow_imports_no_other_stage_flow(stage):
    others = {f"instructflow.flows.{other}" for other in STAGE_MODULES if other != stage}
    assert not imported_modules(ROOT / "flows" / f"{stage}.py") & others


@pytest.mark.parametrize("package, forbidden", [
    ("tasks", ("prefect", "instructflow.flows", "instructflow.models")),
    ("models", ("instructflow.flows", "instructflow.warehouse")),
    ("warehouse", ("instructflow.flows", "instructflow.tasks", "instructflow.models")),
])
def test_packages_import_only_what_the_readme_allows(package, forbidden):
    wrong = {f"{path.name}: {module}" for path in (ROOT / package).glob("*.py") for module in imported_modules(path)
             if module.startswith(forbidden)}
    assert not wrong, sorted(wrong)


def test_sql_runs_only_in_the_warehouse_package():
    sql = re.compile(r"\.(execute|executemany|rows|scalar)\(\s*f?[\"'](SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|WITH)\b")
    outside = [f"{path.relative_to(ROOT)}:{n}" for package in ("flows", "tasks", "models")
               for path in (ROOT / package).glob("*.py")
               for n, line in enumerate(path.read_text().splitlines(), 1) if sql.search(line)]
    assert not outside, outside


PACKAGES = {"flows": "instructflow.flows", "tasks": "instructflow.tasks", "models": "instructflow.models",
            "warehouse": "instructflow.warehouse", "seeds": "instructflow.seeds"}


def project_modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}" if path.stem != "__init__" else package: path
            for folder, package in PACKAGES.items() for path in (ROOT / folder).glob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth (function-level imports included)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_modules(path):
            # `from pkg import module` lists both pkg and pkg.module: the module when it is one, else the pkg
            if imported in modules:
                edges.add(imported)
        edges = {e for e in edges if not (e in PACKAGES.values() and any(x.startswith(e + ".") for x in edges))}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_none_where_there_is_none():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_project_has_no_import_cycle_lazy_imports_included():
    graph = import_graph()
    assert "instructflow.flows.cli" in graph and "instructflow.flows.pipeline" in graph["instructflow.flows.cli"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
