"""The layers of DESIGN.md's top-level layout, checked on every source file (AST, no imports).

    preprocessing   no project package; never torch, onnxruntime, bentoml, evidently, pandas,
                    transformers
    modelstore      of the project's packages only preprocessing
    monitoring      never service, training or tools
    training        never service or tools
    service         never training, tools, torch or evidently
    everywhere      ``bentoml._internal`` only under modelstore/

Arrows point down only: a package that reaches up (or sideways into the tools) fails here with
the file and the import named.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "preprocessing"
HEAVY = ("torch", "onnxruntime", "bentoml", "evidently", "pandas", "transformers")
PROJECT = ("training", "service", "monitoring", "modelstore", "tools")
# Every folder of project source; bench/ until it has moved under tools/.
SOURCE_DIRS = ("preprocessing", "modelstore", "monitoring", "training", "service", "scripts",
               "tools", "bench")
# What each package must not import (top-level module names).
FORBIDDEN = {
    "preprocessing": set(PROJECT) | {"scripts", "bench"} | set(HEAVY),
    "modelstore": set(PROJECT) - {"modelstore"} | {"scripts", "bench"},
    "monitoring": {"service", "training", "tools", "bench", "scripts"},
    "training": {"service", "tools", "bench", "scripts"},
    "service": {"training", "tools", "bench", "scripts", "torch", "evidently"},
}
INTERNAL = "bentoml._internal"
INTERNAL_OWNER = "modelstore"


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in a source, wherever it sits (functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def internal_imports(source: str) -> list[str]:
    """Every way a source reaches ``bentoml._internal``: ``import bentoml._internal.x``, ``from
    bentoml._internal.x import y``, ``from bentoml import _internal`` and ``import_module`` /
    ``__import__`` of a literal name; as "line N: what", in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if _is_internal(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_internal(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module == "bentoml":
                found += [(node.lineno, f"from bentoml import {a.name}") for a in node.names
                          if _is_internal(f"bentoml.{a.name}")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(arg, str) \
                    and _is_internal(arg):
                found.append((node.lineno, f"{called}({arg!r})"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def _is_internal(module: str) -> bool:
    return module == INTERNAL or module.startswith(INTERNAL + ".")


def package_sources() -> list[Path]:
    files = [path for folder in SOURCE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))
             if "__pycache__" not in path.parts]
    assert files, f"no sources under {ROOT}"
    return files


def layer_violations(package: str, source: str) -> list[str]:
    """What a source of top-level folder ``package`` imports against the rules."""
    problems = [f"imports {name}" for name in
                sorted(imported_modules(source) & FORBIDDEN.get(package, set()))]
    if package != INTERNAL_OWNER:
        problems += [f"imports BentoML internals ({where}); only {INTERNAL_OWNER}/ may"
                     for where in internal_imports(source)]
    return problems


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    package = path.relative_to(ROOT).parts[0]
    problems = layer_violations(package, path.read_text())
    assert not problems, f"{path.relative_to(ROOT)}: {'; '.join(problems)}"


def test_the_rules_see_every_kind_of_import() -> None:
    # Guard the guard: synthetic sources that break each rule, and ones that keep them.
    assert layer_violations("modelstore", "import training.export\n") == ["imports training"]
    assert layer_violations("modelstore", "from preprocessing import load_spec\n"
                                          "from bentoml._internal.tag import Tag\n") == []
    assert layer_violations("monitoring", "def f():\n    from service import api\n") == [
        "imports service"]
    assert layer_violations("training", "from tools.bench import config\n") == ["imports tools"]
    assert layer_violations("training", "from modelstore import open_store\n"
                                        "import monitoring.store\n") == []
    assert layer_violations("service", "import torch\nfrom evidently import Report\n"
                                       "from training.export import x\n") == [
        "imports evidently", "imports torch", "imports training"]
    assert layer_violations("preprocessing", "import modelstore.layout\n") == [
        "imports modelstore"]
    internal = ("import bentoml._internal.models.model as m\n"
                "from bentoml._internal.tag import Tag\n"
                "from bentoml import _internal\n"
                "from bentoml import models, Tag\n"
                "import bentoml\n"
                "import importlib\n"
                "importlib.import_module('bentoml._internal.configuration')\n"
                "try:\n"
                "    from bentoml._internal.server.http.traffic import TimeoutMiddleware\n"
                "except ImportError:\n"
                "    pass\n")
    assert internal_imports(internal) == [
        "line 1: import bentoml._internal.models.model",
        "line 2: from bentoml._internal.tag import ...",
        "line 3: from bentoml import _internal",
        "line 7: import_module('bentoml._internal.configuration')",
        "line 9: from bentoml._internal.server.http.traffic import ..."]
    for package in ("service", "training", "monitoring", "scripts", "tools", "bench"):
        assert len(layer_violations(package, internal)) == 5, package
    assert layer_violations("modelstore", internal) == []
    assert internal_imports("import bentoml\nfrom bentoml.exceptions import NotFound\n") == []


# ---- preprocessing sits at the bottom: no heavy runtimes, none of the project's packages ----

def test_import_loads_no_heavy_runtime() -> None:
    code = (
        "import sys, preprocessing, preprocessing.image, preprocessing.features, "
        "preprocessing.spec, preprocessing.errors, preprocessing.text\n"
        f"print(','.join(sorted(m for m in {HEAVY + PROJECT!r} if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing preprocessing loaded: {result.stdout.strip()}"


def source_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no sources under {PACKAGE}"
    return files


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sources_import_no_heavy_runtime_or_project_package(path: Path) -> None:
    forbidden = imported_modules(path.read_text()) & set(HEAVY + PROJECT)
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


def test_static_check_sees_imports() -> None:
    # Guard the guard: the kinds of import line it must refuse are all seen.
    source = (
        "import torch.nn as nn\n"
        "from pandas import DataFrame\n"
        "import os, bentoml\n"
        "from .spec import ImageSpec\n"
        "def f():\n"
        "    import onnxruntime\n"
        "try:\n"
        "    from evidently.report import Report\n"
        "except ImportError:\n"
        "    pass\n"
    )
    expected = {"torch", "pandas", "os", "bentoml", "onnxruntime", "evidently"}
    assert imported_modules(source) == expected
