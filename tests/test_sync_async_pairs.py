"""The sync/async pairs script on a tiny package: what it pairs, and thin against logic."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

SOURCE = '''
from chatchain._flow import arun, run


def poll(attempt):
    while not attempt():
        pass


async def apoll(attempt):
    """Waits without blocking the loop."""
    while not await attempt():
        pass


def lonely():
    return 1


class Store:
    def load(self, key):
        return self._read(key)

    async def aload(self, key):
        """`load` for async callers."""
        return await self._aread(key)

    def commit(self, turn):
        return run(self._commit_flow(turn))

    async def acommit(self, turn):
        return await arun(self._commit_flow(turn))

    def _take(self, key):
        args = self._args(key)
        self._run(args)

    async def _atake(self, key):
        args = self._args(key)
        await self._arun(args)

    def write(self, a):
        self._w(self._x(a), self._y(a), self._z(a))

    async def awrite(self, a):
        x = self._x(a)
        y = self._y(a)
        z = self._z(a)
        await self._aw(x, y, z)

    def close(self):
        self._client.close()

    async def aclose(self):
        if self._aclient is not None:
            await self._aclient.close()

    def stream(self):
        yield from self._items()

    async def astream(self):
        async for item in self._aitems():
            yield item

    async def aonly(self):
        return None

    class Inner:
        def get(self):
            return 1

        async def aget(self):
            try:
                return await self._get()
            finally:
                pass
'''


@pytest.fixture(scope="module")
def script() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sync_async_pairs

        yield sync_async_pairs
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_pairs_are_named_side_by_side_and_classed_thin_or_logic(
    script: Any, tmp_path: Path
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(SOURCE)
    found = {p.name: ("thin" if p.thin else "logic") for p in script.pairs(package)}
    assert found == {
        "poll": "logic",
        "Store.load": "thin",
        "Store.commit": "thin",
        "Store._take": "thin",
        "Store.write": "logic",  # four statements: more than a driver
        "Store.close": "logic",
        "Store.stream": "thin",
        "Store.Inner.get": "logic",
    }


def test_the_package_has_pairs_and_the_counts_add_up(
    script: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main([]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    pairs = script.pairs()
    thin = sum(p.thin for p in pairs)
    assert last.startswith(f"{len(pairs)} pairs ({thin} thin, {len(pairs) - thin} with logic)")
    assert {"chatchain._flow"} <= {p.module for p in pairs}  # run/arun, stream/astream
