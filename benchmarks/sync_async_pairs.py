"""Count the sync/async pairs left in the package, and which of them hold logic of their own.

A pair is a function or method ``x`` and its async twin ``ax`` (``_x`` and ``_ax`` for private
ones) defined side by side: in the same module, or the same class. The async twin is:

- ``thin`` when its body (docstring aside) is at most three statements without any control
  flow (no ``if``, loop, ``try`` or ``with``): a driver (``await arun(self.x_flow())``), a
  thread (``await asyncio.to_thread(self.x, ...)``), a delegation (``await self.store.ax(...)``,
  arguments built by a helper both twins call), a stub (``return None``), or a relay of a
  stream (``async for c in ...: yield c``): no rule of its own;
- ``logic`` otherwise: branches or loops written a second time, which can drift.

Usage::

    .venv/bin/python benchmarks/sync_async_pairs.py             # every pair, then the totals
    .venv/bin/python benchmarks/sync_async_pairs.py --logic     # the pairs with logic only
    .venv/bin/python benchmarks/sync_async_pairs.py --markdown  # the same, as a Markdown table
    .venv/bin/python benchmarks/sync_async_pairs.py --package ../other-checkout/chatchain

It reads the source only (``ast``): nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "chatchain"

Function = ast.FunctionDef | ast.AsyncFunctionDef
_THIN_STATEMENTS = 3
_CONTROL = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith, ast.Match)


@dataclass(frozen=True)
class Pair:
    module: str
    scope: str  # the class's name, or "" at module level
    sync: Function
    twin: Function

    @property
    def name(self) -> str:
        return f"{self.scope}.{self.sync.name}" if self.scope else self.sync.name

    @property
    def sync_lines(self) -> int:
        return _lines(self.sync)

    @property
    def async_lines(self) -> int:
        return _lines(self.twin)

    @property
    def thin(self) -> bool:
        return _thin(_body(self.twin))


def _lines(function: Function) -> int:
    """The function's lines, decorators and docstring included."""
    start = min([function.lineno, *(d.lineno for d in function.decorator_list)])
    return (function.end_lineno or function.lineno) - start + 1


def _body(function: Function) -> list[ast.stmt]:
    body = function.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        body = body[1:]  # the docstring
    return body


def _thin(body: list[ast.stmt]) -> bool:
    if len(body) == 1 and _relay(body[0]):
        return True
    if len(body) > _THIN_STATEMENTS:
        return False
    return not any(isinstance(node, _CONTROL) for s in body for node in ast.walk(s))


def _relay(statement: ast.stmt) -> bool:
    """Whether ``statement`` is ``async for x in ...: yield x``."""
    if not isinstance(statement, ast.AsyncFor) or statement.orelse or len(statement.body) != 1:
        return False
    inner = statement.body[0]
    return isinstance(inner, ast.Expr) and isinstance(inner.value, ast.Yield)


def _twin_name(name: str) -> str | None:
    """The name of the async twin of the function ``name``, or ``None`` if it is one."""
    if name.startswith("__"):
        return None
    if name.startswith("_"):
        return "_a" + name[1:]
    return "a" + name


def _pairs_in(module: str, scope: str, body: list[ast.stmt]) -> Iterator[Pair]:
    functions: dict[str, Function] = {
        node.name: node for node in body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    for name, function in functions.items():
        twin_name = _twin_name(name)
        twin = functions.get(twin_name) if twin_name else None
        if isinstance(function, ast.FunctionDef) and isinstance(twin, ast.AsyncFunctionDef):
            yield Pair(module, scope, function, twin)
    for node in body:
        if isinstance(node, ast.ClassDef):
            inner = f"{scope}.{node.name}" if scope else node.name
            yield from _pairs_in(module, inner, node.body)


def pairs(package: Path = PACKAGE) -> list[Pair]:
    found: list[Pair] = []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package.parent).with_suffix("").as_posix().replace("/", ".")
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found.extend(_pairs_in(module, "", tree.body))
    return found


def _row(pair: Pair) -> str:
    kind = "thin" if pair.thin else "logic"
    where = f"{pair.module}:{pair.sync.lineno}"
    return (
        f"{kind:5}  {pair.sync_lines:4} {pair.async_lines:4}  {pair.name:48} "
        f"{pair.twin.name:24} {where}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--logic", action="store_true", help="list the pairs with logic only")
    parser.add_argument("--markdown", action="store_true", help="the pairs with logic, as Markdown")
    parser.add_argument("--package", type=Path, default=PACKAGE, help="the package to read")
    args = parser.parse_args(argv)
    found = pairs(args.package)
    logic = [p for p in found if not p.thin]
    if args.markdown:
        print("| module | pair | lines (sync, async) |")
        print("|---|---|---|")
        for p in logic:
            print(
                f"| `{p.module}` | `{p.name}` / `{p.twin.name}` | {p.sync_lines}, {p.async_lines} |"
            )
        return 0
    shown = logic if args.logic else found
    print(f"{'kind':5}  {'sync':>4} {'asyn':>4}  {'pair':48} {'twin':24} where")
    for p in shown:
        print(_row(p))
    lines = sum(p.sync_lines + p.async_lines for p in found)
    logic_lines = sum(p.sync_lines + p.async_lines for p in logic)
    print(
        f"\n{len(found)} pairs ({len(found) - len(logic)} thin, {len(logic)} with logic), "
        f"{lines} lines; the pairs with logic: {logic_lines} lines"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
