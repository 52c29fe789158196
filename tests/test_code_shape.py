"""Code shape, read from the source with `ast`: every file of the packages (and of benchmarks/ and tests/) stays
under MAX_FILE_LINES lines and every function or method under MAX_FUNCTION_LINES lines (decorators
excluded, docstring and body included). A longer one is split into named pieces; the planted case below
checks that the checker catches both kinds.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import REPO

PACKAGES = ("data_shards", "pretrain", "finetune", "maskpot", "cluster", "benchmarks", "tests")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def python_files(root: Path, packages=PACKAGES) -> list[Path]:
    return sorted(p for package in packages for p in (root / package).rglob("*.py"))


def offenders(path: Path, root: Path) -> list[str]:
    """`path:line name length` for the file when it is too long and for each function that is."""
    source = path.read_text()
    where = path.relative_to(root)
    found = []
    lines = len(source.splitlines())
    if lines > MAX_FILE_LINES:
        found.append(f"{where}:1 <file> {lines} lines (max {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, FUNCTIONS):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {node.name} {length} lines (max {MAX_FUNCTION_LINES})")
    return found


def check_shape(root: Path, packages=PACKAGES) -> list[str]:
    return [line for path in python_files(root, packages) for line in offenders(path, root)]


def test_files_and_functions_are_short():
    found = check_shape(REPO)
    assert not found, "too long (split into named modules / helpers):\n" + "\n".join(found)


def function_source(name: str, lines: int, indent: str = "") -> str:
    """A function `name` of exactly `lines` lines."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


def test_checker_catches_a_long_function_a_long_method_and_a_long_file(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    source = (function_source("long_one", MAX_FUNCTION_LINES + 1) + "\n\n"
              + function_source("just_fits", MAX_FUNCTION_LINES) + "\n\n"
              + "class Holder:\n" + function_source("long_method", 70, "    "))
    (package / "functions.py").write_text(source)
    method_line = source.splitlines().index("    def long_method():") + 1
    (package / "long_file.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    (package / "fits.py").write_text("x = 1\n" * MAX_FILE_LINES)
    found = check_shape(tmp_path, ("pkg",))
    assert found == [f"pkg/functions.py:1 long_one {MAX_FUNCTION_LINES + 1} lines (max {MAX_FUNCTION_LINES})",
                     f"pkg/functions.py:{method_line} long_method 70 lines (max {MAX_FUNCTION_LINES})",
                     f"pkg/long_file.py:1 <file> {MAX_FILE_LINES + 1} lines (max {MAX_FILE_LINES})"], found
