"""The package layers, read from the source with `ast` (nothing is imported):

    data_shards  <-  pretrain  <-  finetune  <-  maskpot        cluster apart (only maskpot imports it)

Every import of a project module must point down (or sideways within its package), no two project modules may
import each other (directly or round a longer loop), and an import inside a function body must carry a
`# startup:` comment saying what it saves at start-up (e.g. torch kept off the `maskpot --help` path).
The planted cases below write a violation into a copy of the tree and check that it is caught.
"""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

LAYERS = {"data_shards": 0, "pretrain": 1, "finetune": 2, "maskpot": 3}
APART = "cluster"                    # imports none of the layers; only the top layer may import it
PACKAGES = (*LAYERS, APART)
STARTUP_MARK = "# startup:"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass(frozen=True)
class Import:
    module: str          # importing module, e.g. "pretrain.loop"
    target: str          # imported project module, e.g. "data_shards.stream"
    path: Path
    line: int
    in_function: bool
    marked: bool         # the import's lines carry "# startup:"
    type_only: bool      # under `if TYPE_CHECKING:` (never executed)

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(root: Path, module: str) -> bool:
    return (root.joinpath(*module.split(".")) / "__init__.py").is_file()


def resolve(root: Path, importer: str, is_init: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by `from ... import` (relative levels resolved against `importer`)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_init else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def targets(root: Path, importer: str, is_init: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Project modules an import statement loads: `from pkg import sub` names the submodule when it is one."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        module = resolve(root, importer, is_init, node)
        names = [f"{module}.{a.name}" if is_package(root, module) and ((root.joinpath(*module.split("."))
                 / f"{a.name}.py").is_file() or is_package(root, f"{module}.{a.name}")) else module
                 for a in node.names]
    return sorted({n for n in names if n.split(".")[0] in PACKAGES})


def scan(root: Path) -> list[Import]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            tree = ast.parse(source, filename=str(path))
            importer = module_name(root, path)
            parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                chain, up = [], parents.get(node)
                while up is not None:
                    chain.append(up)
                    up = parents.get(up)
                in_function = any(isinstance(p, FUNCTIONS) for p in chain)
                type_only = any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in chain)
                marked = any(STARTUP_MARK in line for line in lines[node.lineno - 1:node.end_lineno])
                names = targets(root, importer, path.name == "__init__.py", node)
                if in_function and not names:   # a library imported in a function: a target of its own
                    names = [""]
                for target in names:
                    found.append(Import(importer, target, path, node.lineno, in_function, marked, type_only))
    return found


def upward(imports: list[Import], root: Path) -> list[str]:
    bad = []
    for imp in imports:
        if not imp.target:
            continue
        src, dst = imp.module.split(".")[0], imp.target.split(".")[0]
        if src == dst:
            continue
        if src == APART:
            bad.append(f"{imp.where(root)}: {APART} imports {imp.target} ({APART} stands apart from the layers)")
        elif dst == APART and LAYERS[src] != max(LAYERS.values()):
            bad.append(f"{imp.where(root)}: {imp.module} imports {imp.target} (only maskpot may import {APART})")
        elif dst != APART and LAYERS[dst] > LAYERS[src]:
            bad.append(f"{imp.where(root)}: {imp.module} imports {imp.target} (upward: {dst} sits above {src})")
    return bad


def unmarked_function_imports(imports: list[Import], root: Path) -> list[str]:
    return sorted({f"{imp.where(root)}: import inside a function without a '{STARTUP_MARK}' comment"
                   for imp in imports if imp.in_function and not imp.marked})


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every executed import."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.module, set())
        if imp.target and not imp.type_only and imp.target != imp.module:
            graph[imp.module].add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(root: Path) -> list[str]:
    imports = scan(root)
    return [*upward(imports, root), *unmarked_function_imports(imports, root),
            *(f"import cycle: {' <-> '.join(c)}" for c in cycles(imports))]


def test_the_tree_keeps_its_layers():
    imports = scan(REPO)
    assert len({imp.module for imp in imports}) > 40, "the scan found too few modules to mean anything"
    assert not violations(REPO), "\n".join(violations(REPO))


# --- the checks catch what they are for: plant one violation into a copy of the tree -------------------------

PLANTED = {
    "upward": ("data_shards/units.py", "from pretrain.config import PretrainConfig\n", "upward: pretrain sits above"),
    "upward-relative": ("pretrain/models/egnn.py", "from ...finetune import loop\n", "upward: finetune sits above"),
    "cluster-imports-a-layer": ("cluster/ranks.py", "import data_shards.keys\n", "cluster stands apart"),
    "layer-imports-cluster": ("finetune/config.py", "from cluster import ranks\n", "only maskpot may import"),
    "function-level": ("pretrain/objectives.py", "def _planted():\n    from data_shards import keys\n    return keys\n",
                       "without a '# startup:'"),
    "cycle": ("data_shards/frame.py", "from data_shards import units\n", "import cycle"),
}


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> tuple[Path, set[str]]:
    """A copy of the five packages and what the checks report on it before anything is planted."""
    root = tmp_path_factory.mktemp("layers")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root, set(violations(root))


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_violation_is_caught(tree_copy, tmp_path, case):
    clean, before = tree_copy
    relative, line, expected = PLANTED[case]
    if case == "cycle":   # units imports frame: the planted line closes a loop
        assert any(i.module == "data_shards.units" and i.target == "data_shards.frame" for i in scan(clean))
    root = tmp_path / "tree"
    shutil.copytree(clean, root)
    path = root / relative
    path.write_text(path.read_text() + "\n" + line)
    found = sorted(set(violations(root)) - before)   # what the planted line added
    assert any(expected in v for v in found), found
    if case != "cycle":   # each names the file and the line of the planted import
        statement = next(x for x in line.splitlines() if "import" in x).strip()
        lines = path.read_text().splitlines()
        planted_at = max(n for n, text in enumerate(lines, 1) if text.strip() == statement)
        assert any(v.startswith(f"{relative}:{planted_at}: ") for v in found), found
