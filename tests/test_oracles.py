"""Oracles and references import nothing from the product (checked on their source, with ast).

An expected value computed with the code under test cannot catch that code's mistakes: a
wrong sigmoid once passed every parity test because the oracle imported the product's. So:

- every ``tests/*oracle*.py`` module imports nothing from ``qmag_ray``, at any depth;
- every function in the tests whose name says it is an oracle or a reference (``oracle``,
  ``reference``, ``_ref``) uses no name its module imported from ``qmag_ray`` and imports
  none itself, nor does any module-level helper it calls.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ORACLE_MODULES = sorted(p for p in TESTS.glob("*oracle*.py") if not p.name.startswith("test_"))
TEST_FILES = sorted(p for p in TESTS.rglob("*.py") if "data" not in p.relative_to(TESTS).parts)
ORACLE_NAME = re.compile(r"oracle|reference|(^|_)ref($|_)", re.IGNORECASE)


def _is_product(module: str | None) -> bool:
    return module is not None and (module == "qmag_ray" or module.startswith("qmag_ray."))


def product_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of ``qmag_ray`` anywhere in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_product(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_product(node.module):
            found.append((node.lineno, str(node.module)))
        elif isinstance(node, ast.Call) and (
            getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        ) in ("__import__", "import_module"):
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if args and isinstance(args[0], str) and _is_product(args[0]):
                found.append((node.lineno, args[0]))
    return found


def product_bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at top level by importing from ``qmag_ray``."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if _is_product(a.name)}
        elif isinstance(node, ast.ImportFrom) and _is_product(node.module):
            names |= {a.asname or a.name for a in node.names}
    return names


def oracle_violations(path: Path) -> list[str]:
    """What an oracle function of ``path`` takes from the product (empty: nothing)."""
    tree = ast.parse(path.read_text(), str(path))
    tainted = product_bound_names(tree)
    functions = {
        n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    problems = []
    for name in functions:
        if name.startswith("test_") or not ORACLE_NAME.search(name):
            continue
        seen, todo = set(), [name]
        while todo:  # the oracle and the module-level helpers it calls
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            body = functions[current]
            for line, module in product_imports(body):
                problems.append(f"{path.name}:{line} {current} (for {name}) imports {module}")
            for node in ast.walk(body):
                if isinstance(node, ast.Name):
                    if node.id in tainted:
                        problems.append(
                            f"{path.name}:{node.lineno} {current} (for {name}) uses {node.id}, "
                            "imported from qmag_ray"
                        )
                    elif node.id in functions:
                        todo.append(node.id)
    return problems


def test_there_are_oracles_to_check() -> None:
    names = {p.name for p in ORACLE_MODULES}
    assert {"oracle.py", "model_oracle.py"} <= names


@pytest.mark.parametrize("path", ORACLE_MODULES, ids=lambda p: p.name)
def test_oracle_modules_import_nothing_from_the_product(path: Path) -> None:
    found = product_imports(ast.parse(path.read_text(), str(path)))
    assert not found, f"{path.name} imports the code under test: {found}"


def test_oracle_and_reference_functions_use_nothing_from_the_product() -> None:
    problems = [p for path in TEST_FILES for p in oracle_violations(path)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_product_import(tmp_path: Path) -> None:
    """The checker itself can fail: the shapes of import that once slipped through."""
    direct = "from qmag_ray.calibration.search import weighted_scores\n"
    assert product_imports(ast.parse(direct)) == [(1, "qmag_ray.calibration.search")]
    nested = "def f():\n    import qmag_ray.scores as s\n    return s\n"
    assert product_imports(ast.parse(nested)) == [(2, "qmag_ray.scores")]
    dynamic = "import importlib\nm = importlib.import_module('qmag_ray.metrics')\n"
    assert product_imports(ast.parse(dynamic)) == [(2, "qmag_ray.metrics")]
    assert product_imports(ast.parse("import numpy\nfrom sklearn import metrics\n")) == []
    mod = tmp_path / "test_x.py"
    mod.write_text(
        "from qmag_ray.scores import cosine as cos\n"
        "def helper(a, b):\n    return cos(a, b)\n"
        "def plain_reference(a, b):\n    return helper(a, b)\n"
        "def clean_oracle(a, b):\n    return a @ b\n"
    )
    found = oracle_violations(mod)
    assert len(found) == 1 and "helper (for plain_reference) uses cos" in found[0]
