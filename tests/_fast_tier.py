"""The fast tier (`pytest -m "not slow"`, `./run.sh test --fast`) keeps a test of every package.

`tests/conftest.py` calls `check` once collection is done. A test covers the packages that its
file imports at module level plus those its own function imports; a package with no selected
test that covers it stops the run before any test starts, naming the package. Only a run of the
whole suite under exactly the fast tier's mark expression is checked (one file, `-k` or another
`-m` is a choice of the person running it).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

FAST_TIER = "not slow"


def packages(package_dir: Path) -> list[str]:
    """Dotted names of `package_dir` and every package below it (folders with __init__.py)."""
    root = Path(package_dir)
    found = [root.name]
    for init in sorted(root.rglob("__init__.py")):
        rel = init.parent.relative_to(root)
        if rel.parts:
            found.append(".".join((root.name, *rel.parts)))
    return found


def _imported(nodes) -> set[str]:
    """Absolute module names imported by `nodes` (`from a import b` gives a.b and a)."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_level(tree: ast.Module):
    """Nodes outside every function and class body (module-level try/if blocks included)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


class _File:
    def __init__(self, path: Path):
        self.tree = ast.parse(Path(path).read_text(), str(path))
        self.module_imports = _imported(_module_level(self.tree))
        self.functions = {node.name: node for node in self.tree.body
                          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def imports_of(self, function: str | None) -> set[str]:
        node = self.functions.get(function or "")
        return self.module_imports | (_imported(ast.walk(node)) if node else set())


def owner(module: str, known: list[str]) -> str | None:
    """The deepest package of `known` that `module` is, or is inside."""
    best = None
    for package in known:
        if (module == package or module.startswith(package + ".")) and \
                (best is None or len(package) > len(best)):
            best = package
    return best


def tests_per_package(items, package_dir: Path) -> Counter:
    """{package: number of `items` that cover it}, every package of `package_dir` listed."""
    known = packages(package_dir)
    counts = Counter(dict.fromkeys(known, 0))
    files: dict[Path, _File] = {}
    covered: dict[tuple, set] = {}
    for item in items:
        path = Path(item.path)
        key = (path, getattr(item, "originalname", None) or item.name)
        if key not in covered:  # once per test function, not per parameter
            if path not in files:
                files[path] = _File(path)
            imports = files[path].imports_of(key[1])
            covered[key] = {owner(m, known) for m in imports} - {None}
        counts.update(covered[key])
    return counts


def _whole_suite(config) -> bool:
    """No file or test named on the command line, no -k, --deselect, --lf or --sw."""
    if config.option.keyword or any(config.getoption(name, None) for name in (
            "deselect", "lf", "stepwise", "stepwise_skip")):
        return False
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        return True
    testpaths = {(config.rootpath / p).resolve() for p in config.getini("testpaths")}
    return bool(config.args) and \
        all(Path(config.invocation_params.dir, a).resolve() in testpaths for a in config.args)


def check(session, package_dir: Path) -> None:
    """Stops a whole-suite fast-tier run whose selection leaves a package without a test."""
    config = session.config
    if (config.option.markexpr or "").strip() != FAST_TIER or not _whole_suite(config):
        return
    counts = tests_per_package(session.items, package_dir)
    config.stash[_COUNTS] = counts
    missing = sorted(p for p, n in counts.items() if n == 0)
    if missing:
        pytest.exit(f"the fast tier (-m {FAST_TIER!r}) has no test of {', '.join(missing)}: "
                    "keep at least one test that imports it unmarked (not slow)", returncode=1)


def summary(terminalreporter) -> None:
    """One line after a checked run: how many fast tests cover each package."""
    counts = terminalreporter.config.stash.get(_COUNTS, None)
    if counts:
        terminalreporter.write_line("fast tier, tests per package: " + ", ".join(
            f"{p} {n}" for p, n in sorted(counts.items())))


_COUNTS = pytest.StashKey[Counter]()
