"""The ``chatchain`` terminal chat: a thin command line over the public API.

Commands: ``chat`` (interactive, streamed), ``ask`` (one turn, for scripts and pipes),
``sessions`` (list, show, export, import, delete, prune), ``usage`` (the ledger's totals) and
``demo`` (a short scripted session). ``python -m chatchain`` runs the same command. It needs
the ``cli`` extra: ``pip install 'chatchain[cli]'``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["load_tools", "main"]

# What `pip install 'chatchain[cli]'` adds; without any of them the command cannot start.
_EXTRAS = frozenset({"click", "platformdirs", "prompt_toolkit", "rich"})


def load_tools(spec: str) -> list[Any]:
    """The tools of the module or file ``spec`` (``--tools MODULE``): its ``TOOLS`` list, else
    its top-level ``@tool``s. Needs the ``cli`` extra (rich), as ``chatchain serve`` does.

    Raises:
        ConfigurationError: The module cannot be imported, or holds no tools.
    """
    from chatchain.cli._tools import load_tools as load

    return load(spec)


def main() -> None:
    """Run the ``chatchain`` command line (the console script); exits with its status.

    Without the ``cli`` extra it prints the one ``pip install`` line that fixes that and
    exits with status 1.
    """
    try:
        from chatchain.cli._commands import cli
    except ImportError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in _EXTRAS:
            raise
        print(
            f"error: the chatchain command needs {package}: "
            "install it with pip install 'chatchain[cli]'",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    cli()
