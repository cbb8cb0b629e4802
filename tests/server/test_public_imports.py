"""The service is written over chatchain's public API only: no module of chatchain/server
imports a private chatchain module (``chatchain._turn``, ``chatchain.cli._tools``, ...), so
that what it needs is public, documented and kept, for any other application too."""

from __future__ import annotations

import ast
from pathlib import Path

import chatchain.server

SERVER = Path(chatchain.server.__file__).parent


def _imported(tree: ast.Module) -> list[str]:
    """Every chatchain module or name a file imports, dotted (``chatchain._money.format_usd``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in found if name.split(".")[0] == "chatchain"]


def _private(name: str) -> bool:
    """Whether ``name`` reaches into a private part of chatchain outside the server."""
    parts = name.split(".")
    if parts[:2] == ["chatchain", "server"]:
        return False  # the server's own modules
    return any(part.startswith("_") and part != "__version__" for part in parts[1:])


def test_the_server_imports_no_private_chatchain_module() -> None:
    files = sorted(SERVER.rglob("*.py"))
    assert len(files) > 5  # the whole package was read
    private = {
        f"{path.relative_to(SERVER)}: {name}"
        for path in files
        for name in _imported(ast.parse(path.read_text(encoding="utf-8")))
        if _private(name)
    }
    assert private == set()


def test_the_check_sees_private_imports() -> None:
    tree = ast.parse(
        "from chatchain._turn import LIMITS_KEY\n"
        "import chatchain._money\n"
        "from chatchain.cli._tools import load_tools\n"
        "from chatchain import _metering\n"
        "from chatchain.server import _metrics\n"
        "from chatchain import Chatbot, __version__\n"
    )
    assert [name for name in _imported(tree) if _private(name)] == [
        "chatchain._turn.LIMITS_KEY",
        "chatchain._money",
        "chatchain.cli._tools.load_tools",
        "chatchain._metering",
    ]
