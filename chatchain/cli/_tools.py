"""``--tools MODULE``: the user's tools, from a Python module or file they point at.

Nothing is imported unless the option is given: a module runs code when imported, so the
user must ask for it by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from langchain_core.tools import BaseTool
from rich.text import Text

from chatchain import ConfigurationError, ToolRun

__all__ = ["TOOLS_HELP", "load_tools", "tool_line"]

TOOLS_HELP = (
    "Let the model call the tools of MODULE (a module name importable from the current folder, "
    "or a .py file): its TOOLS list if it has one, else every @tool at its top level."
)


def _import(spec: str) -> ModuleType:
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigurationError(f"--tools {spec}: there is no such file.")
        found = importlib.util.spec_from_file_location(path.stem, path)
        if found is None or found.loader is None:
            raise ConfigurationError(f"--tools {spec}: Python cannot load this file.")
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
        return module
    sys.path.insert(0, str(Path.cwd()))  # as `python -m` finds the user's own modules
    try:
        return importlib.import_module(spec)
    finally:
        sys.path.remove(str(Path.cwd()))


def load_tools(spec: str) -> list[Any]:
    """The tools of the module or file ``spec``: its ``TOOLS``, else its top-level ``@tool``s.

    Raises:
        ConfigurationError: The module cannot be imported, or holds no tools.
    """
    try:
        module = _import(spec)
    except ConfigurationError:
        raise
    except Exception as exc:  # the user's module failed: say so in one line
        raise ConfigurationError(
            f"--tools {spec}: importing it failed ({type(exc).__name__}: {exc}). Check that "
            "it runs with `python -c 'import ...'`, from this folder."
        ) from exc
    listed = getattr(module, "TOOLS", None)
    if listed is not None:
        if not isinstance(listed, (list, tuple)):
            raise ConfigurationError(
                f"--tools {spec}: TOOLS must be a list of tools and functions, not "
                f"{type(listed).__name__}."
            )
        tools = list(listed)
    else:
        tools = [value for value in vars(module).values() if isinstance(value, BaseTool)]
    if not tools:
        raise ConfigurationError(
            f"--tools {spec}: the module has no tools. Define TOOLS = [...] (tools or "
            "functions with type hints and a docstring), or decorate functions with @tool."
        )
    return tools


def _short(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def tool_line(call: ToolRun) -> Text:
    """One dim line for a finished tool call: name, short arguments, ok or the error."""
    args = ", ".join(f"{name}={value!r}" for name, value in call.args.items())
    line = f"  tool {call.name}({_short(args, 60)}) "
    line += "ok" if call.status == "success" else f"error: {_short(call.error or '', 100)}"
    return Text(line, style="dim")
