"""Settings: one typed object, read from the environment and a ``.env`` file.

The environment wins over ``.env`` (as with ``python-dotenv``'s ``load_dotenv``), and values
given in code win over both. Nothing here writes to ``os.environ``.

A ``CHATCHAIN_*`` variable that is neither a setting nor one of the few other names chatchain
reads (``CHATCHAIN_DATA_DIR``, ``CHATCHAIN_REDIS_URL``, ``CHATCHAIN_POSTGRES_URL``) is refused,
in the environment and in ``.env`` alike: a misspelt ``CHATCHAIN_BUDGET_SESION_USD`` must not
silently leave the turns without a cap.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from chatchain._renamed import warn_renamed
from chatchain.errors import ConfigurationError, MissingAPIKeyError
from chatchain.pricing import ModelPrice, Pricer

if TYPE_CHECKING:
    from chatchain.budgets import Budget
    from chatchain.window import HistoryWindow

__all__ = ["Settings"]

# CHATCHAIN_* variables that chatchain reads but that are not settings, with what they are for.
# Every other CHATCHAIN_* name that is not a setting is refused as a likely typo.
_OTHER_VARIABLES: Mapping[str, str] = {
    "CHATCHAIN_DATA_DIR": "the CLI's data folder (default store and input history)",
    "CHATCHAIN_REDIS_URL": "a Redis server for the notebooks and the store tests",
    "CHATCHAIN_POSTGRES_URL": "a PostgreSQL server for the notebooks and the store tests",
    "CHATCHAIN_SERVE_TOOLS": "the tools module of `chatchain serve --tools`, for its workers",
}

_PREFIX = "CHATCHAIN_"

# A local OpenAI-compatible server (Ollama, vLLM, llama.cpp) ignores the key, but the OpenAI
# client refuses to start without one.
_PLACEHOLDER_KEY = "not-needed"

# Fields renamed: the old keyword still works, with a warning naming the new one.
_RENAMED_FIELDS = {"store": "store_url"}


class Settings(BaseSettings):
    """Everything chatchain can be configured with.

    Each field is read from the environment variable named in its docs, then from ``.env``.

    Example:
        >>> settings = Settings(model="gpt-4o-mini", temperature=0.0)
        >>> settings.model
        'gpt-4o-mini'
        >>> Settings(api_key="sk-secret")  # doctest: +ELLIPSIS
        Settings(api_key=SecretStr('**********'), ...)

        The store's password is left out of the repr and of ``model_dump()``; the
        ``store_url`` attribute keeps the real URL for the code that connects:

        >>> settings = Settings(store_url="postgresql://app:pw@db.example/chat")
        >>> settings.model_dump()["store_url"], settings.store_url
        ('postgresql://app@db.example/chat', 'postgresql://app:pw@db.example/chat')
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        validate_by_name=True,
        use_attribute_docstrings=True,
    )

    api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    """``OPENAI_API_KEY``. Never printed, logged or shown in a repr or an error."""

    base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    """``OPENAI_BASE_URL``: any OpenAI-compatible endpoint, e.g. ``http://localhost:11434/v1``."""

    model: str = Field(default="gpt-4o-mini", min_length=1, validation_alias="OPENAI_MODEL")
    """``OPENAI_MODEL``: the chat model's name."""

    temperature: float | None = Field(
        default=0.7, ge=0.0, le=2.0, validation_alias="CHATCHAIN_TEMPERATURE"
    )
    """``CHATCHAIN_TEMPERATURE``: sampling temperature from 0 to 2."""

    max_tokens: int | None = Field(default=None, gt=0, validation_alias="CHATCHAIN_MAX_TOKENS")
    """``CHATCHAIN_MAX_TOKENS``: cap on the tokens of one reply; none by default."""

    timeout: float = Field(default=60.0, gt=0, validation_alias="CHATCHAIN_TIMEOUT")
    """``CHATCHAIN_TIMEOUT``: seconds to wait for the endpoint on each attempt."""

    turn_deadline: float | None = Field(
        default=300.0, gt=0, validation_alias="CHATCHAIN_TURN_DEADLINE"
    )
    """``CHATCHAIN_TURN_DEADLINE``: seconds one whole turn may take, retries and a slow stream
    included (``CHATCHAIN_TIMEOUT`` bounds each read only); then it ends as a timeout."""

    tool_rounds: int = Field(default=5, ge=1, validation_alias="CHATCHAIN_TOOL_ROUNDS")
    """``CHATCHAIN_TOOL_ROUNDS``: how many rounds of tool calls one turn may run; a model
    that still asks for tools is then called once more without them, and must answer."""

    tool_timeout: float = Field(default=30.0, gt=0, validation_alias="CHATCHAIN_TOOL_TIMEOUT")
    """``CHATCHAIN_TOOL_TIMEOUT``: seconds one tool call may take; a slower one is cancelled
    and reported to the model as an error (the turn's deadline still bounds the whole turn)."""

    tool_result_tokens: int = Field(
        default=2000, ge=1, validation_alias="CHATCHAIN_TOOL_RESULT_TOKENS"
    )
    """``CHATCHAIN_TOOL_RESULT_TOKENS``: the most tokens of one tool result sent to the model
    (and stored); a longer result is cut, with a note saying so."""

    max_retries: int = Field(default=2, ge=0, validation_alias="CHATCHAIN_MAX_RETRIES")
    """``CHATCHAIN_MAX_RETRIES``: retries with exponential backoff, honouring Retry-After."""

    fallback_model: str | None = Field(default=None, validation_alias="CHATCHAIN_FALLBACK_MODEL")
    """``CHATCHAIN_FALLBACK_MODEL``: a model to try when the main one fails on the endpoint."""

    system_prompt: str = Field(
        default="You are a helpful assistant.",
        min_length=1,
        validation_alias="CHATCHAIN_SYSTEM_PROMPT",
    )
    """``CHATCHAIN_SYSTEM_PROMPT``: the system message; may hold variables like ``{language}``."""

    prompt_vars: dict[str, str] = Field(
        default_factory=dict, validation_alias="CHATCHAIN_PROMPT_VARS"
    )
    """``CHATCHAIN_PROMPT_VARS``: default values of ``CHATCHAIN_SYSTEM_PROMPT``'s variables, as
    JSON (e.g. ``{"language": "French"}``); a call's own values win. ``chatchain serve --var
    NAME=VALUE`` sets them too, so that clients that cannot pass variables (the
    OpenAI-compatible route) can use a prompt that has some."""

    lock_timeout: float = Field(default=120.0, gt=0, validation_alias="CHATCHAIN_LOCK_TIMEOUT")
    """``CHATCHAIN_LOCK_TIMEOUT``: seconds a turn waits for another turn on its session."""

    store_url: str = Field(default="memory://", min_length=1, validation_alias="CHATCHAIN_STORE")
    """``CHATCHAIN_STORE``: the URL of where sessions live: ``memory://``, ``sqlite:///path``,
    ``redis://host:port/db``, ``postgresql://user@host/db``, or the scheme of a store an
    installed package adds (entry-point group ``chatchain.stores``). Shown without its password
    (and query) in the repr and in ``model_dump()``; this attribute is the real URL."""

    journal: str | None = Field(default=None, min_length=1, validation_alias="CHATCHAIN_JOURNAL")
    """``CHATCHAIN_JOURNAL``: the folder of the journal where a finished turn waits when the
    store cannot save it (down, locked), until it can. By default beside a SQLite store's
    file (``chat.db.unsaved-turns``), and ``journal/`` in the user's data folder for Redis
    and PostgreSQL (``CHATCHAIN_DATA_DIR``, else e.g. ``~/.local/share/chatchain``)."""

    window_turns: int | None = Field(default=6, ge=1, validation_alias="CHATCHAIN_WINDOW_TURNS")
    """``CHATCHAIN_WINDOW_TURNS``: newest exchanges sent with each turn."""

    window_tokens: int | None = Field(
        default=3000, ge=1, validation_alias="CHATCHAIN_WINDOW_TOKENS"
    )
    """``CHATCHAIN_WINDOW_TOKENS``: token budget of the history plus the new input."""

    summarize: bool = Field(default=True, validation_alias="CHATCHAIN_SUMMARIZE")
    """``CHATCHAIN_SUMMARIZE``: fold turns that leave the window into a running summary."""

    summary_tokens: int | None = Field(
        default=500, ge=1, validation_alias="CHATCHAIN_SUMMARY_TOKENS"
    )
    """``CHATCHAIN_SUMMARY_TOKENS``: token budget of the running summary in the prompt; a
    longer summary is cut at the last sentence that fits. A turn's prompt is at most the
    system message + this + ``CHATCHAIN_WINDOW_TOKENS``."""

    summary_model: str | None = Field(default=None, validation_alias="CHATCHAIN_SUMMARY_MODEL")
    """``CHATCHAIN_SUMMARY_MODEL``: the model that writes the summaries (e.g. a cheaper one);
    ``OPENAI_MODEL`` by default."""

    summary_max_tokens: int | None = Field(
        default=None, gt=0, validation_alias="CHATCHAIN_SUMMARY_MAX_TOKENS"
    )
    """``CHATCHAIN_SUMMARY_MAX_TOKENS``: cap on the reply of a summary call;
    ``CHATCHAIN_SUMMARY_TOKENS`` by default (``CHATCHAIN_MAX_TOKENS`` caps turns only)."""

    token_counter: Literal["auto", "exact", "utf8-bytes", "approximate", "tiktoken"] = Field(
        default="auto", validation_alias="CHATCHAIN_TOKEN_COUNTER"
    )
    """``CHATCHAIN_TOKEN_COUNTER``: how prompts are counted for holds and the window, offline.
    ``auto``: exactly with OpenAI's encoding for OpenAI's models (o200k_base, cl100k_base),
    else a bound that is never low for any tokenizer (UTF-8 bytes plus chat-format tokens);
    ``exact``: refuse a model whose encoding is unknown; ``utf8-bytes``: always the bound
    (a server that names its model like OpenAI's but runs another); ``approximate``:
    LangChain's estimate, which counts CJK text at about a quarter of what is billed;
    ``tiktoken``: 0.1.0's name for ``exact``."""

    prices: dict[str, ModelPrice] = Field(default_factory=dict, validation_alias="CHATCHAIN_PRICES")
    """``CHATCHAIN_PRICES``: your prices in USD per million tokens, which win over the price
    tables, as JSON: ``{"my-model": {"input": 0.5, "output": 1.5, "cached_input": 0.25}}``."""

    cache: str | None = Field(default=None, min_length=1, validation_alias="CHATCHAIN_CACHE")
    """``CHATCHAIN_CACHE``: a response cache for the chat model, off by default: ``memory://``
    (the chain's memory, the newest 1,000 replies), ``sqlite:///path/to/cache.db`` (a file that
    survives restarts) or ``redis://host:6379/0`` (shared by processes and machines). A turn
    whose model, parameters and messages all match a cached call is answered from the cache:
    no request, cost 0, recorded as cached with what it saved. Shown without its password.
    Unset, chatchain's model reads no cache at all (not LangChain's global ``set_llm_cache``
    either, which knows no users and whose hits would be recorded as paid calls)."""

    cache_scope: Literal["user", "shared"] = Field(
        default="user", validation_alias="CHATCHAIN_CACHE_SCOPE"
    )
    """``CHATCHAIN_CACHE_SCOPE``: who may be answered with a cached reply. ``user`` (the
    default): only the user it was made for (``user_id``); calls without a user id share one
    scope of their own, never a user's. ``shared``: every user, so that one user's reply
    (and so what they asked) may be served to another: an operator's explicit choice, for a
    service whose users may see each other's questions."""

    budget_session_usd: float | None = Field(
        default=None, ge=0, validation_alias="CHATCHAIN_BUDGET_SESSION_USD"
    )
    """``CHATCHAIN_BUDGET_SESSION_USD``: most USD one session may spend."""

    budget_session_tokens: int | None = Field(
        default=None, ge=0, validation_alias="CHATCHAIN_BUDGET_SESSION_TOKENS"
    )
    """``CHATCHAIN_BUDGET_SESSION_TOKENS``: most tokens one session may spend."""

    budget_user_usd: float | None = Field(
        default=None, ge=0, validation_alias="CHATCHAIN_BUDGET_USER_USD"
    )
    """``CHATCHAIN_BUDGET_USER_USD``: most USD one user (``user_id``) may spend."""

    budget_user_tokens: int | None = Field(
        default=None, ge=0, validation_alias="CHATCHAIN_BUDGET_USER_TOKENS"
    )
    """``CHATCHAIN_BUDGET_USER_TOKENS``: most tokens one user may spend."""

    budget_total_usd: float | None = Field(
        default=None, ge=0, validation_alias="CHATCHAIN_BUDGET_TOTAL_USD"
    )
    """``CHATCHAIN_BUDGET_TOTAL_USD``: most USD everything in the store may spend."""

    budget_total_tokens: int | None = Field(
        default=None, ge=0, validation_alias="CHATCHAIN_BUDGET_TOTAL_TOKENS"
    )
    """``CHATCHAIN_BUDGET_TOTAL_TOKENS``: most tokens everything in the store may spend."""

    server_max_body_bytes: int = Field(
        default=1_048_576, gt=0, validation_alias="CHATCHAIN_SERVER_MAX_BODY_BYTES"
    )
    """``CHATCHAIN_SERVER_MAX_BODY_BYTES``: the largest request body ``chatchain serve``
    accepts (1 MiB by default); a larger one is refused with 413 before it is read."""

    server_shutdown_grace: float = Field(
        default=30.0, ge=0, validation_alias="CHATCHAIN_SERVER_SHUTDOWN_GRACE"
    )
    """``CHATCHAIN_SERVER_SHUTDOWN_GRACE``: seconds the turns in flight (streams included) may
    take to finish once ``chatchain serve`` stops taking requests (SIGTERM); those still
    running then are stopped, their reply so far stored marked interrupted (30 by default)."""

    server_drain_delay: float = Field(
        default=0.0, ge=0, validation_alias="CHATCHAIN_SERVER_DRAIN_DELAY"
    )
    """``CHATCHAIN_SERVER_DRAIN_DELAY``: seconds ``chatchain serve`` keeps serving after
    SIGTERM, ``/healthz`` answering 503 ``draining``, before it stops taking requests: time
    for a load balancer's health checks to take the instance out (0 by default)."""

    server_cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), validation_alias="CHATCHAIN_SERVER_CORS_ORIGINS"
    )
    """``CHATCHAIN_SERVER_CORS_ORIGINS``: comma-separated origins (e.g.
    ``https://chat.example.com``) whose pages may call ``chatchain serve`` from a browser;
    none by default (CORS off)."""

    server_requests_per_minute: int = Field(
        default=120, ge=0, validation_alias="CHATCHAIN_SERVER_REQUESTS_PER_MINUTE"
    )
    """``CHATCHAIN_SERVER_REQUESTS_PER_MINUTE``: API requests one user may make in any 60 s,
    then 429 with ``Retry-After``; 0 for no limit. Counted in the store (SQLite, Redis,
    PostgreSQL), so it holds across workers and machines; per process over ``memory://``. A
    user's own limit (``chatchain users caps NAME --requests-per-minute N``) replaces it."""

    server_streams_per_user: int = Field(
        default=4, ge=0, validation_alias="CHATCHAIN_SERVER_STREAMS_PER_USER"
    )
    """``CHATCHAIN_SERVER_STREAMS_PER_USER``: streamed replies one user may have open at once,
    then 429 with ``Retry-After``; 0 for no limit. Counted in the store as the requests are
    (a killed instance's streams free their slots within 15 s); a user's own limit
    (``chatchain users caps NAME --streams N``) replaces it."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' sources, unchanged, once no ``CHATCHAIN_*`` variable is a typo."""
        _refuse_unknown_variables(cls, getattr(dotenv_settings, "env_file", None))
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @field_validator("cache")
    @classmethod
    def _cache_url(cls, cache: str | None) -> str | None:
        from chatchain._cache import check_url

        if cache is None:
            return None
        try:
            return check_url(cache)
        except ConfigurationError as exc:  # raised as is by `load` (its text names the variable)
            raise _CacheURLError(str(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and (renamed := _RENAMED_FIELDS.keys() & data.keys()):
            data = dict(data)
            for old in sorted(renamed):
                new = _RENAMED_FIELDS[old]
                warn_renamed(f"Settings({old}=...)", f"Settings({new}=...)", stacklevel=5)
                data.setdefault(new, data.pop(old))
        return data

    @property
    def store(self) -> str:
        """Deprecated: `store_url` (a ``store`` is a `HistoryStore` everywhere else)."""
        warn_renamed("Settings.store", "Settings.store_url")
        return self.store_url

    @field_serializer("store_url", "cache")
    def _url_without_password(self, url: str | None) -> str | None:
        return None if url is None else _redacted_url(url)

    @field_validator("server_cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            redact = name in ("store_url", "cache") and value is not None
            yield name, _redacted_url(value) if redact else value

    @classmethod
    def load(cls, env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
        """Read the settings from the environment and ``env_file``, then apply ``overrides``.

        Args:
            env_file: The ``.env`` file to read; a missing file is fine; ``None`` reads none.
            overrides: Values by field name (e.g. ``model="gpt-4o"``, ``window_turns=None``)
                that win over both, validated like the rest.

        Returns:
            The settings.

        Raises:
            ConfigurationError: A value is malformed, or a ``CHATCHAIN_*`` variable is not a
                setting; the message names the variable.

        Example:
            >>> Settings.load(env_file=None, temperature=0.2).temperature
            0.2
        """
        given = dict(overrides)
        for old in sorted(_RENAMED_FIELDS.keys() & given.keys()):
            new = _RENAMED_FIELDS[old]
            warn_renamed(f"Settings.load({old}=...)", f"Settings.load({new}=...)")
            given.setdefault(new, given.pop(old))
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise ConfigurationError(f"Unknown settings: {', '.join(unknown)}.")
        try:
            return cls(_env_file=env_file, **given)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise ConfigurationError(_explain(exc)) from None
        except SettingsError as exc:
            raise ConfigurationError(_explain_unparsable(cls, exc)) from None

    def history_window(self) -> HistoryWindow | None:
        """The window these settings describe (``None`` when it keeps no turn or token bound)."""
        from chatchain.window import HistoryWindow

        if self.window_turns is None and self.window_tokens is None:
            return None
        return HistoryWindow(
            max_turns=self.window_turns,
            max_tokens=self.window_tokens,
            summarize=self.summarize and self.window_turns is not None,
            summary_tokens=self.summary_tokens,
        )

    @property
    def summary_reply_tokens(self) -> int | None:
        """The ``max_tokens`` of a summary call: ``summary_max_tokens``, else ``summary_tokens``."""
        return self.summary_max_tokens or self.summary_tokens

    def budget(self) -> Budget:
        """The spending caps these settings set (falsy when there are none)."""
        from chatchain.budgets import Budget

        return Budget(
            session_usd=self.budget_session_usd,
            session_tokens=self.budget_session_tokens,
            user_usd=self.budget_user_usd,
            user_tokens=self.budget_user_tokens,
            total_usd=self.budget_total_usd,
            total_tokens=self.budget_total_tokens,
        )

    def pricer(self) -> Pricer:
        """Prices for this endpoint, with ``CHATCHAIN_PRICES`` first."""
        return Pricer(self.prices, self.base_url)

    def resolved_api_key(self) -> SecretStr:
        """The key to send: the configured one, or a placeholder for a local server.

        Raises:
            MissingAPIKeyError: Neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` is set.
        """
        if self.api_key is not None and self.api_key.get_secret_value().strip():
            return self.api_key
        if self.base_url:
            return SecretStr(_PLACEHOLDER_KEY)
        raise MissingAPIKeyError(
            "No API key is configured. Set OPENAI_API_KEY in the environment or add the line "
            "OPENAI_API_KEY=sk-... to your .env file. For a local OpenAI-compatible server "
            "(Ollama, vLLM, llama.cpp) set OPENAI_BASE_URL instead, "
            "e.g. OPENAI_BASE_URL=http://localhost:11434/v1."
        )


class _CacheURLError(ValueError):
    """A bad ``CHATCHAIN_CACHE``: its message is whole, not pydantic's "Value error, ..."."""


def _explain(exc: ValidationError) -> str:
    # pydantic's own text echoes the input, which could be a secret: rebuild it without values.
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        if isinstance(cause := error.get("ctx", {}).get("error"), _CacheURLError):
            return str(cause)  # already says which variable and what to write
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        problems.append(f"{name}: {error['msg']}")
    return (
        "Invalid chatchain settings: "
        + "; ".join(problems)
        + ". Fix the variable in the environment or in .env."
    )


def _variable_of(settings_cls: type[BaseSettings], field: str) -> str:
    alias = settings_cls.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else field.upper()


def _explain_unparsable(settings_cls: type[BaseSettings], exc: SettingsError) -> str:
    # pydantic-settings could not decode a JSON value; its message names the field, not the
    # variable, and its cause may quote the value (which could hold a secret).
    match = re.search(r'field "(\w+)"', str(exc))
    field = match.group(1) if match else None
    if field is None or field not in settings_cls.model_fields:
        return f"Invalid chatchain settings: {exc}. Fix the variable in the environment or in .env."
    variable = _variable_of(settings_cls, field)
    cause = exc.__cause__
    where = (
        f" ({cause.msg} at character {cause.pos})"
        if isinstance(cause, json.JSONDecodeError)
        else ""
    )
    example = ' e.g. {"my-model": {"input": 0.5, "output": 1.5}}' if field == "prices" else ""
    return (
        f"Invalid chatchain settings: {variable} is not valid JSON{where}. Fix it in the "
        f"environment or in .env; it takes a JSON object,{example}."
    )


def _refuse_unknown_variables(
    settings_cls: type[BaseSettings], env_file: Path | str | Any | None
) -> None:
    """Raise `ConfigurationError` for a ``CHATCHAIN_*`` variable that nothing reads.

    Both the environment and the ``.env`` file(s) are checked; names are compared without
    case, as pydantic-settings reads them.
    """
    known = {_variable_of(settings_cls, name).upper() for name in settings_cls.model_fields}
    known = {name for name in known if name.startswith(_PREFIX)} | set(_OTHER_VARIABLES)
    found = [(name, "the environment") for name in os.environ]
    files = [env_file] if isinstance(env_file, (str, os.PathLike)) else list(env_file or ())
    for file in files:
        path = Path(file).expanduser()
        if path.is_file():
            found += [(name, str(path)) for name in dotenv_values(path, encoding="utf-8")]
    for name, where in found:
        if not name.upper().startswith(_PREFIX) or name.upper() in known:
            continue
        # Compared without the prefix that every name shares, which would make all look close.
        suffixes = sorted(known_name.removeprefix(_PREFIX) for known_name in known)
        close = difflib.get_close_matches(name.upper().removeprefix(_PREFIX), suffixes, n=1)
        hint = f"Did you mean {_PREFIX}{close[0]}? " if close else ""
        raise ConfigurationError(
            f"Unknown chatchain setting {name} (in {where}). {hint}Rename or remove it: an "
            "unknown CHATCHAIN_* variable is refused so that a typo cannot silently drop a "
            "setting such as a budget. The names are in the README and in chatchain.Settings."
        )


def _redacted_url(url: str) -> str:
    """``url`` without its password or query (which may hold one), as the stores show it."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return f"{url.partition(':')[0]}://***"
    if password is None and not parts.query:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return f"{parts.scheme}://{netloc}{parts.path}"
