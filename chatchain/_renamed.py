"""Old names kept working for a while, each warning with the name to use instead.

A renamed public name stays as an alias that raises a `DeprecationWarning` saying what replaces
it, so that code written for the old name keeps running and its author knows what to change.
"""

from __future__ import annotations

import warnings

__all__ = ["warn_renamed"]


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now ``new``.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_renamed("Reply.tool_calls", "Reply.tool_runs")
        >>> str(caught[0].message)
        'Reply.tool_calls is deprecated: use Reply.tool_runs (same value; the old name will go).'
    """
    warnings.warn(
        f"{old} is deprecated: use {new} (same value; the old name will go).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
