"""docs/DESIGN.md's code map names every module of the package, and only
modules that exist (issue 17): a module added, moved or removed without
the map following fails here, naming it."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qubes-gpu-share" / "qubes_gpu_share"
SKIP = {"__init__.py", "__main__.py"}


def _code_map() -> str:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    start = text.index("## Code map")
    return text[start:text.index("\n## ", start + 1)]


def _modules() -> list[pathlib.Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
                  if p.name not in SKIP and "__pycache__" not in p.parts)


def test_every_module_is_in_the_code_map():
    code_map = _code_map()
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.py", code_map))
    missing = [str(m) for m in _modules()
               if m.name not in named
               or any(f"{folder}/" not in code_map
                      for folder in m.parts[:-1])]
    assert not missing, f"not in docs/DESIGN.md's code map: {missing}"


def test_the_code_map_names_no_module_that_is_gone():
    names = {m.name for m in _modules()}
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.py", _code_map()))
    gone = sorted(n for n in named - names - SKIP
                  if not n.startswith("test_"))
    assert not gone, f"docs/DESIGN.md's code map names missing modules: {gone}"
