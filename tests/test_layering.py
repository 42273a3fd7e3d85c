"""The layering rules of docs/DESIGN.md, read from the code's imports:
the pure core does no I/O; only qubes/admin.py imports qubesadmin; the
broker never imports grant/, alloc/ or native; the agent never imports
the broker; and two arrows of issue 17: no import loop through native.py,
and an application's client reaches nothing of the agent.

Each rule fails naming the module and the import that breaks it. Imports
are read with ``ast`` from every module of the package (lazy imports
inside functions included), and relative imports are resolved, so a rule
cannot be dodged by spelling.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "qubes_gpu_share"
ROOT = pathlib.Path(__file__).parents[1] / "qubes-gpu-share" / PACKAGE

#: The pure core: state machine, decisions, messages, metadata, names,
#: settings. It decides and parses; it never does I/O.
PURE = ("decide", "lease", "formats", "limits", "names", "qubeinfo",
        "protocol", "wire", "messages", "oneline", "uint")
#: What counts as I/O (standard library and third party).
IO = {"asyncio", "socket", "subprocess", "sqlite3", "select", "selectors",
      "threading", "os", "io", "mmap", "fcntl", "ctypes", "cffi", "pyudev",
      "qubesadmin", "qrexec", "multiprocessing", "shutil", "tempfile",
      "concurrent", "signal", "urllib", "http"}


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(module: str, path: pathlib.Path) -> list[str]:
    """Every module ``module`` imports, absolute and dotted."""
    package = module if path.name == "__init__.py" else \
        module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            # ``from . import audit`` imports a module, not a name
            names += [f"{base}.{alias.name}" for alias in node.names
                      if f"{base}.{alias.name}" in ALL]
    return names


ALL = modules()


def breaking(rule) -> list[str]:
    """``module imports name`` for every import that breaks ``rule``."""
    return [f"{module} imports {name}"
            for module, path in sorted(ALL.items())
            for name in imports(module, path) if rule(module, name)]


def _in(module: str, *folders: str) -> bool:
    return any(module == f"{PACKAGE}.{folder}"
               or module.startswith(f"{PACKAGE}.{folder}.")
               for folder in folders)


def test_the_rules_see_the_code():
    """A sanity check of the reader itself: it finds the package and
    resolves relative imports."""
    assert f"{PACKAGE}.broker.core" in ALL
    assert f"{PACKAGE}.registry" in imports(f"{PACKAGE}.broker.core",
                                            ALL[f"{PACKAGE}.broker.core"])


def test_the_pure_core_does_no_io():
    """decide, lease, formats, limits, names, qubeinfo, the protocol and
    the text helpers (oneline, uint) import nothing that does I/O, and
    nothing of the package but each other."""
    pure = {f"{PACKAGE}.{name}" for name in PURE}

    def rule(module, name):
        if module not in pure and not any(module.startswith(p + ".")
                                          for p in pure):
            return False
        if name.startswith(PACKAGE + "."):
            return name not in pure and not any(name.startswith(p + ".")
                                                for p in pure)
        return name.split(".")[0] in IO
    assert any(f"{PACKAGE}.{name}" in ALL for name in PURE)
    assert breaking(rule) == []


def test_only_qubes_admin_imports_qubesadmin():
    """Qubes' Admin API client is one seam's real side: qubes/admin.py.
    (qubes/qubesd.py is handed qubesadmin's objects, never imports it.)"""
    def rule(module, name):
        return name.split(".")[0] == "qubesadmin" and \
            module != f"{PACKAGE}.qubes.admin"
    assert breaking(rule) == []


def test_the_broker_never_imports_grant_alloc_or_native():
    """The broker relays integers and metadata; it never touches buffer
    memory (no grant device, no allocator, no native helper)."""
    def rule(module, name):
        return _in(module, "broker") and \
            _in(name, "grant", "alloc", "native", "_native")
    assert breaking(rule) == []


def test_the_agent_never_imports_the_broker():
    """Agent and broker meet only through the protocol over qrexec."""
    def rule(module, name):
        return _in(module, "agent") and _in(name, "broker")
    assert breaking(rule) == []


def reachable(start: str) -> set[str]:
    """The package's modules ``start`` imports, directly or through
    others (lazy imports included: they make a loop too, only later)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        for name in imports(module, ALL[module]):
            if name in ALL and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_nothing_native_imports_leads_back_to_it():
    """native.py (the ioctls) reads facts and exceptions from grant/, and
    grant/gntdev.py calls native: no import loop through it."""
    reached = reachable(f"{PACKAGE}.native")
    assert f"{PACKAGE}.grant.this_domain" in reached  # the reader sees
    assert f"{PACKAGE}.native" not in reached


def test_the_client_library_pulls_in_nothing_of_the_agent():
    """An application imports the client; it shares the application
    protocol (appproto.py) with the agent and reaches nothing else of it,
    nor of the broker, through any chain of imports."""
    reached = reachable(f"{PACKAGE}.client")
    assert f"{PACKAGE}.appproto" in reached
    assert sorted(name for name in reached
                  if _in(name, "agent", "broker")) == []


@pytest.mark.parametrize("rule, module, name", [
    (test_the_broker_never_imports_grant_alloc_or_native,
     "broker.core", "grant.device"),
    (test_the_agent_never_imports_the_broker, "agent.daemon", "broker.core"),
])
def test_a_rule_names_the_offending_import(monkeypatch, rule, module, name):
    """Each rule fails, naming the import, when the code breaks it."""
    real = imports

    def with_bad(mod, path):
        extra = [f"{PACKAGE}.{name}"] if mod == f"{PACKAGE}.{module}" else []
        return real(mod, path) + extra
    monkeypatch.setitem(globals(), "imports", with_bad)
    with pytest.raises(AssertionError,
                       match=f"{PACKAGE}.{module} imports {PACKAGE}.{name}"):
        rule()
