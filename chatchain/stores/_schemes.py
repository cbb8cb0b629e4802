"""Store URLs: each scheme names the callable that opens it, built in or installed.

A package adds a scheme with an entry point in the ``chatchain.stores`` group: the entry
point's name is the scheme, its value a callable (``package.module:open_my_store``, or a
class's ``from_url``) that takes the URL and returns a store: a `HistoryStore`, or a
`HistoryBackend` that `as_store` completes. Keyword parameters it names are the store's
options (``lock_timeout`` is passed when it takes one). The built-in schemes are entry
points too, opened by the same code (`open_store`); only where they are listed differs.

- **Built-ins win.** They are listed here, not in chatchain's installed metadata (so a
  checkout without metadata, or an editable install older than a scheme, still has them),
  and resolved without reading the installed entry points: no package can take
  ``sqlite://`` over. An installed entry point that claims a built-in scheme is ignored
  with a `RuntimeWarning` naming its package, whenever the installed ones are read.
- **Read afresh.** The installed entry points are read for each URL whose scheme is not
  built in: `open_store` runs once per process or bot, and a package installed while the
  process runs (a notebook's ``pip install``) is found.
- **Two packages, one scheme** is refused when that scheme is opened, naming both.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from chatchain.errors import ChatChainError, ConfigurationError, StoreError
from chatchain.stores._base import HistoryBackend, HistoryStore
from chatchain.stores._composed import as_store

__all__ = ["GROUP", "open_store"]

GROUP = "chatchain.stores"
_HOW_TO_ADD = (
    f'add one with an entry point in the "{GROUP}" group of a package (see docs/writing-a-store.md)'
)

_BUILT_IN = {
    scheme: EntryPoint(scheme, value, GROUP)
    for scheme, value in {
        "memory": "chatchain.stores._memory:MemoryStore.from_url",
        "sqlite": "chatchain.stores._sqlite:SQLiteStore.from_url",
        "redis": "chatchain.stores._redis:RedisStore.from_url",
        "rediss": "chatchain.stores._redis:RedisStore.from_url",
        "unix": "chatchain.stores._redis:RedisStore.from_url",
        "postgresql": "chatchain.stores._postgres:PostgresStore.from_url",
        "postgres": "chatchain.stores._postgres:PostgresStore.from_url",
    }.items()
}
# How the built-in schemes are written (a test checks that it names each one).
_BUILT_IN_FORMS = (
    "memory://, sqlite:///path, redis://host:port/db (or rediss://, unix://), "
    "postgresql://user@host/db (or postgres://)"
)


def open_store(url: str, *, lock_timeout: float = 120.0, **options: Any) -> HistoryStore:
    """The store a URL names, built with the store's own options.

    Args:
        url: ``memory://``, ``sqlite:///path``, ``redis://host:port/db``,
            ``postgresql://user@host/db``, or a scheme an installed package adds (an
            entry point in the ``chatchain.stores`` group, see ``docs/writing-a-store.md``).
        lock_timeout: How long a turn waits for a session another turn holds, in seconds.
        **options: The options of the store the URL names (for instance ``lease`` for
            SQLite and Redis, ``prefix`` for Redis, ``table_prefix``, ``min_size`` and
            ``max_size`` for PostgreSQL); see each store's class.

    Raises:
        ConfigurationError: The URL's scheme is unknown (the message lists the known ones
            and how to add one) or claimed by two packages, an option is not one of its
            store's, its driver is not installed (the message says which ``pip install``
            fixes it), or an installed store fails to load or returns no store.
        StoreError: An installed store failed to open (its own error is the cause).

    Example:
        >>> open_store("memory://")  # doctest: +ELLIPSIS
        <chatchain.stores._memory.MemoryStore object at ...>
    """
    entry = _entry_point(url.partition(":")[0].lower())
    factory = _load(entry)
    arguments = _arguments(entry, factory, lock_timeout, options)
    return as_store(_build(entry, factory, url, arguments), lock_timeout=lock_timeout)


def _entry_point(scheme: str) -> EntryPoint:
    """The entry point that opens ``scheme``: a built-in one, else the one installed."""
    built_in = _BUILT_IN.get(scheme)
    if built_in is not None:
        return built_in
    installed = _installed()
    claims = installed.get(scheme, [])
    if len(claims) == 1:
        return claims[0]
    if claims:
        raise ConfigurationError(
            f"{scheme}:// is claimed by {' and by '.join(_origin(entry) for entry in claims)}: "
            "uninstall all but one of those packages."
        )
    found = ", ".join(f"{name}:// ({_package(claims[0])})" for name, claims in installed.items())
    raise ConfigurationError(
        f"Unknown store URL {scheme}://... (CHATCHAIN_STORE or --store). Built in: "
        f"{_BUILT_IN_FORMS}; installed: {found or 'none'}. To use another store, "
        f"{_HOW_TO_ADD}."
    )


def _installed() -> dict[str, list[EntryPoint]]:
    """The schemes the installed packages add, each with the entry points that claim it."""
    found: dict[str, list[EntryPoint]] = {}
    for entry in entry_points(group=GROUP):
        scheme = entry.name.lower()
        if scheme in _BUILT_IN:
            warnings.warn(
                f"{_origin(entry)} claims the built-in store scheme {scheme}://, which stays "
                f"chatchain's own: uninstall {_package(entry)}, or ask its authors to use a "
                "scheme of their own.",
                RuntimeWarning,
                stacklevel=4,  # open_store's caller
            )
            continue
        found.setdefault(scheme, []).append(entry)
    return found


def _load(entry: EntryPoint) -> Callable[..., object]:
    """The callable ``entry`` names, imported.

    Raises:
        ConfigurationError: It cannot be imported, or is not callable.
    """
    try:
        factory = entry.load()
    except Exception as exc:
        raise ConfigurationError(
            f"The {entry.name}:// store could not be loaded ({_origin(entry)}): "
            f"{type(exc).__name__}: {exc}. Reinstall {_package(entry)} (or fix its entry point)."
        ) from exc
    if not callable(factory):
        raise ConfigurationError(
            f"The {entry.name}:// store's entry point names {_a(type(factory).__name__)}, not a "
            "callable "
            f"({_origin(entry)}): an entry point in {GROUP} names a callable that takes the "
            f"URL and returns a store; ask the authors of {_package(entry)}."
        )
    return factory  # type: ignore[no-any-return]


def _arguments(
    entry: EntryPoint,
    factory: Callable[..., object],
    lock_timeout: float,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The keyword arguments to call ``factory`` with: the options it names, and
    ``lock_timeout`` if it takes one.

    Raises:
        ConfigurationError: An option is not one of the store's.
    """
    named, takes_any = _keywords(factory)
    accepted = named - {"lock_timeout"}
    unknown = sorted(set(options) - accepted)
    if unknown and not takes_any:
        raise ConfigurationError(
            f"The {entry.name}:// store has no option {', '.join(unknown)} (its options: "
            f"{', '.join(sorted(accepted)) or 'none'}): drop it, or check the store the URL names."
        )
    if takes_any or "lock_timeout" in named:
        return {**options, "lock_timeout": lock_timeout}
    return dict(options)


def _keywords(factory: Callable[..., object]) -> tuple[set[str], bool]:
    """The keyword parameters of ``factory`` after the URL, and whether it takes ``**any``."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read: give it what was asked for
        return set(), True
    takes_any = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {parameter.name for parameter in parameters[1:] if parameter.kind in keywords}
    return named, takes_any


def _build(
    entry: EntryPoint, factory: Callable[..., object], url: str, arguments: Mapping[str, Any]
) -> HistoryBackend:
    """The store ``factory`` opens at ``url``.

    Raises:
        StoreError: The factory failed with an error of its own (chained as the cause).
        ConfigurationError: It returned something that is not a store.
    """
    try:
        store = factory(url, **arguments)
    except ChatChainError:
        raise  # the store's own message says what to do
    except Exception as exc:
        raise StoreError(
            f"The {entry.name}:// store could not be opened ({_origin(entry)}): "
            f"{type(exc).__name__}: {exc}. Check the URL (CHATCHAIN_STORE or --store)."
        ) from exc
    if not isinstance(store, HistoryBackend):
        raise ConfigurationError(
            f"The {entry.name}:// store returned {_a(type(store).__name__)}, not a "
            f"chatchain.stores.HistoryStore or HistoryBackend ({_origin(entry)}): ask the "
            f"authors of {_package(entry)}."
        )
    return store


def _origin(entry: EntryPoint) -> str:
    """Where ``entry`` comes from, as a person would look it up."""
    return f"entry point {entry.name} = {entry.value} of {_package(entry)}"


def _package(entry: EntryPoint) -> str:
    """The distribution that installed ``entry`` (``chatchain`` for a built-in)."""
    dist = entry.dist
    return "chatchain" if dist is None else f"{dist.name} {dist.version}"


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``an int``, ``a dict``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
