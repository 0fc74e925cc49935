"""The packages depend one way: ``proxy -> dispatcher <- metaserver``, ``adapters ->
dispatcher``, and ``dispatcher`` on none of them.

Data flows from the registries through the adapters into the Dispatcher's core
and out of its faces; the Meta Server and the proxy are separate programs that
speak the Dispatcher's protocol. The ``zkgate`` command finds their
subcommands, the upstream adapters and the layouts through entry points, so
the Dispatcher's package never has to import them. This test reads every
module's imports (as text, nothing is imported) and fails on an import against
that direction, which is also what keeps the packages free of cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Which of the project's packages each package may import (itself always).
ALLOWED: dict[str, frozenset[str]] = {
    "dispatcher": frozenset(),
    "adapters": frozenset({"dispatcher"}),
    "metaserver": frozenset({"dispatcher"}),
    "proxy": frozenset({"dispatcher"}),
}
#: The project's other top-level folders: nothing shipped may import them.
NOT_SHIPPED = frozenset({"tests", "bench", "fuzz"})


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level name) of every absolute import in ``path``, including
    those under ``if TYPE_CHECKING:`` and inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_every_package_imports_only_in_the_direction_of_the_data() -> None:
    project = set(ALLOWED) | NOT_SHIPPED
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name in imports(path):
                if name in project and name != package and name not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the direction of the layers:\n" + "\n".join(wrong)


def test_the_check_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from __future__ import annotations\n"
        "import metaserver.server\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from proxy import cli\n"
        "def later():\n"
        "    from adapters.static import StaticUpstream\n"
        "from . import sibling\n"
    )
    assert {name for _, name in imports(module)} == {
        "__future__", "metaserver", "typing", "proxy", "adapters",
    }  # fmt: skip


# ------------------------------------------------------------ module cycles


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is first imported: the top level,
    including inside ``if``/``try`` blocks, but not under ``if TYPE_CHECKING:``
    (never run) nor inside functions and classes (run later, when the cycle is
    already resolved)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level_imports(block)
            for handler in node.handlers:
                yield from _module_level_imports(handler.body)


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports at module level.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to
    ``a.b``; relative imports are resolved against the importing module.
    """
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _module_level_imports(tree.body):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
                continue
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                if path.name != "__init__.py":
                    anchor.pop()
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    edges.add(f"{base}.{alias.name}")
                elif base in modules:
                    edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path = [start]
        on_path = {start}
        pending = [iter(sorted(graph[start]))]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                pending.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                pending.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_module_imports_itself_back_inside_the_dispatcher() -> None:
    """A cycle of module-level imports makes the import order decide whether a
    name exists yet; each configuration section is read beside its owner so that
    no owner has to import the whole configuration back."""
    graph = module_graph(ROOT / "dispatcher")
    # The walk must have read the edges, or "no cycle" would mean nothing.
    assert "dispatcher.zk.server.config" in graph["dispatcher.config"]
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_a_cycle_and_ignores_deferred_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg import a\n"
        "def later():\n"
        "    import pkg.a\n"
        "from .c import thing\n"
    )
    (package / "sub" / "c.py").write_text("import pkg.d\n")
    (package / "d.py").write_text("")
    graph = module_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert find_cycle(graph) is None
    (package / "d.py").write_text("try:\n    from pkg.a import x\nexcept ImportError:\n    pass\n")
    assert find_cycle(module_graph(package)) == [
        "pkg.a",
        "pkg.sub.b",
        "pkg.sub.c",
        "pkg.d",
        "pkg.a",
    ]
