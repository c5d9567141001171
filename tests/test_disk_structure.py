"""The disk engine's modules stay apart: no import cycle (not even through imports inside functions),
each module says its job in a top docstring, and only the store's own modules touch its private state."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kvtierd" / "disk"
OWN = {"segments", "capacity"}          # SegmentStore and its mixin


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PKG.glob("*.py")) if p.stem != "__init__"}


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("kvtierd.disk."):
                out.add(node.module.split(".")[2])
            elif node.module == "kvtierd.disk":
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("kvtierd.disk.")}
    return out


def test_no_import_cycles_between_disk_modules():
    mods = _modules()
    graph = {m: _imports(t) & set(mods) for m, t in mods.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path[path.index(n):] + [n])}"
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_disk_module_has_a_docstring_saying_its_job():
    for name, tree in {**_modules(), "__init__": ast.parse((PKG / "__init__.py").read_text())}.items():
        doc = ast.get_docstring(tree)
        assert doc and len(doc.split()) >= 8, f"kvtierd/disk/{name}.py needs a top docstring"


def test_recovery_compaction_and_fsck_use_the_store_and_keydir_apis_only():
    for name, tree in _modules().items():
        if name in OWN:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in ("store", "s")):
                raise AssertionError(f"kvtierd/disk/{name}.py:{node.lineno} touches store.{node.attr}")
