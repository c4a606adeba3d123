"""The dependency direction of shared/DESIGN.md, read from the source: prune/ and cache/ are
leaves, model/ knows no sampler or method, and the command-line tools are clients of the
packages (and of metrics.py, the metrics evaluate.py and search.py share), never of each other."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "sampler", "prune", "cache", "lab", "metrics", "plots")   # metrics.py, plots.py: one module
TOOLS = ("sample", "bench", "evaluate", "search")


def project_imports(path):
    """The project packages and tool modules that a file imports (relative imports excluded)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES + TOOLS)
    return found


ALLOWED = {"prune": {"prune"}, "cache": {"cache"}, "model": {"model", "cache"},
           "sampler": {"sampler", "model", "prune", "cache"}, "metrics": {"lab", "sampler"},
           "plots": {"metrics"}}


@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_import_only_downwards(package):
    for path in sorted((ROOT / package).glob("*.py")) or [ROOT / f"{package}.py"]:
        assert project_imports(path) <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {project_imports(path)}"


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_do_not_import_each_other(tool):
    path = ROOT / f"{tool}.py"
    if path.exists():
        assert not project_imports(path) & set(TOOLS), f"{tool}.py imports {project_imports(path) & set(TOOLS)}"
