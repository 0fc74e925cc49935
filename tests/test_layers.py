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
