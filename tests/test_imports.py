"""The layers' import rules, checked on the source: the core stays free of HTTP and Redis, and no two
modules import each other (STYLE.md rules 3 and 9)."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("service", "training", "benchmarks")

# Every module of the core, the index and the model, imported in a fresh interpreter: what they pull in.
_LOADED_BY_THE_CORE = """
import importlib, json, pkgutil, sys
import service.core, service.index, service.model
for package in (service.core, service.index, service.model):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_the_core_index_and_model_load_neither_http_nor_redis() -> None:
    done = subprocess.run([sys.executable, "-c", _LOADED_BY_THE_CORE], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert "service.core.recommender" in loaded and "service.index.vector_index" in loaded
    outside = sorted(m for m in loaded if m.split(".")[0] in {"fastapi", "starlette", "redis", "uvicorn"})
    assert not outside, f"the core imports the outside world: {outside[:10]}"


def module_imports(root: Path, folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Module name -> the names it imports, at any depth of its code (TYPE_CHECKING blocks included);
    `from x import y` imports both x and x.y. The rule of ../shared/hooks/before-stop."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((root / folder).glob("**/*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
            found[name] = names
    return found


def test_no_two_modules_import_each_other() -> None:
    imports = module_imports(ROOT, CHECKED)
    assert "service.config" in imports and "training.train" in imports  # the folders were read
    circles = [f"{a} <-> {b}" for a, b in itertools.combinations(sorted(imports), 2)
               if b in imports[a] and a in imports[b]]
    assert not circles, f"modules that import each other: {circles}"
