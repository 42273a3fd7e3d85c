"""Which modules may import which: the arrows the layering asks for,
read from the source (imports inside functions included, since a lazy
import still makes the loop, only later).

* native.py (the ioctls) reads facts and exceptions from grant/, and
  grant/gntdev.py calls native: nothing native imports may lead back to it;
* an application's client library shares the application protocol with
  the agent (appproto.py) and pulls in nothing of the agent.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qubes-gpu-share" / \
    "qubes_gpu_share"


def _modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(name: str, path: pathlib.Path, modules) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in it."""
    package = name.split(".")
    if path.name != "__init__.py":
        package.pop()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level \
                else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
    return found & modules.keys()


def _reachable(start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    modules = _modules()
    seen: set[str] = set()
    todo = sorted(_imported(start, modules[start], modules))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imported(name, modules[name], modules))
    return seen


def test_nothing_native_imports_leads_back_to_it():
    native = "qubes_gpu_share.native"
    reached = _reachable(native)
    assert "qubes_gpu_share.grant.this_domain" in reached   # the test sees
    assert native not in reached


def test_the_client_library_pulls_in_nothing_of_the_agent():
    reached = _reachable("qubes_gpu_share.client")
    assert "qubes_gpu_share.appproto" in reached
    assert not {name for name in reached
                if name.startswith("qubes_gpu_share.agent")}
