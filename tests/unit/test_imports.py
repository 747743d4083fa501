"""Every `from megafusion... import name` in the library, launchers, tools, benchmarks and tests resolves.

Tools and benchmarks import inside their ``main`` (after argparse), where neither ruff nor a test run of the
library sees a stale path after a module moves; this reads every import statement and resolves it.
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p
    for pattern in ("megafusion/**/*.py", "launcher/*.py", "tools/*.py", "benchmarks/*.py", "tests/**/*.py")
    for p in ROOT.glob(pattern)
)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megafusion":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "megafusion":
                    yield node.lineno, a.name, []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_megafusion_imports_resolve(path):
    broken = []
    for line, module, names in _imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            broken.append(f"{path.name}:{line}: {module}: {exc}")
            continue
        for name in names:
            if hasattr(mod, name):
                continue
            try:  # a submodule imported by name
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                broken.append(f"{path.name}:{line}: {module} has no {name}")
    assert not broken, "\n".join(broken)
