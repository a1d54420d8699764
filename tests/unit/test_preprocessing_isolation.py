"""preprocessing/ sits at the bottom: no heavy runtimes, none of the project's other packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "preprocessing"
HEAVY = ("torch", "onnxruntime", "bentoml", "evidently", "pandas", "transformers")
PROJECT = ("training", "service", "monitoring")


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in a source, wherever it sits (functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


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
