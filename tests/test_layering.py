"""The layering docs/ARCHITECTURE.md §2 states, checked by importing modules in a fresh interpreter.

search → media, model_handlers, storage (never the pipelines' transforms, never Beam for a local
index); model_handlers → nothing above it; the index pipeline and the JSON-lines sink run no model,
so importing them loads no torch; localstack/ and evaluation/ never import each other (what both use,
the sample catalogue and the in-process server, lies beneath them).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(*modules: str) -> set[str]:
    code = (f"import sys, json\nfor name in {list(modules)!r}: __import__(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout))


def test_search_imports_neither_the_transforms_nor_beam():
    modules = [f"search.{p.stem}" for p in (ROOT / "search").glob("*.py") if p.stem != "__init__"] + [
        f"search.{p.parent.name}.{p.stem}" for p in (ROOT / "search").glob("*/*.py") if p.stem != "__init__"]
    loaded = loaded_after(*modules)
    assert "search" in loaded and "media" in loaded
    assert not {"transforms", "pipelines", "apache_beam"} & loaded


def test_model_handlers_import_neither_the_transforms_nor_the_pipelines():
    modules = [f"model_handlers.{p.stem}" for p in (ROOT / "model_handlers").glob("*.py") if p.stem != "__init__"]
    loaded = loaded_after(*modules)
    assert "torch" in loaded  # the backends were really imported
    assert not {"transforms", "pipelines", "search", "localstack"} & loaded


@pytest.mark.parametrize("module", ["pipelines.index", "transforms.sinks", "pipelines.options"])
def test_what_runs_no_model_imports_no_torch(module):
    loaded = loaded_after(module)
    assert "apache_beam" in loaded and "torch" not in loaded


def test_media_is_beam_free():
    assert not {"apache_beam", "transforms", "torch"} & loaded_after("media.download", "media.decode",
                                                                      "media.host_guard")


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module's import statements name, those inside functions too (which
    `loaded_after` sees only when they run)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, other", [("localstack", "evaluation"), ("evaluation", "localstack")])
def test_localstack_and_evaluation_do_not_import_each_other(package, other):
    paths = sorted((ROOT / package).glob("*.py"))
    loaded = loaded_after(*(f"{package}.{p.stem}" for p in paths if p.stem != "__init__"))
    assert package in loaded and "sample_catalogue" in loaded  # the modules were really imported
    assert other not in loaded
    assert not [p.name for p in paths if other in imported_packages(p)]
