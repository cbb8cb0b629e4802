"""The `entry_point` fixture: each rule of a turn written once, run over every way to run it.

In the spirit of llm's ``tests/test_async_parity.py``: the Chatbot's ``chat``, ``stream``,
``achat`` and ``astream``, and the service's native server-sent events and OpenAI-compatible
routes (in this process), each behind the one interface of `tests.parity._adapters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parity._adapters import ENTRY_POINTS, EntryPoint, make_entry_point


@pytest.fixture(params=list(ENTRY_POINTS))
def entry_point(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EntryPoint]:
    """One way of running a turn, over a SQLite store of the test's own (call ``open``)."""
    made = make_entry_point(request.param, tmp_path)
    yield made
    made.close()


def with_drifts(drifts: dict[str, str]) -> pytest.MarkDecorator:
    """Run a rule over every entry point, those in ``drifts`` expected to fail (strictly):
    ``{name: "drift: what differs"}``, for the turn engine to remove."""
    return pytest.mark.parametrize(
        "entry_point",
        [
            pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=drifts[name]))
            if name in drifts
            else name
            for name in ENTRY_POINTS
        ],
        indirect=True,
    )
