"""What the commands share: settings with the options applied, the store, the Chatbot, the
offline endpoint, and errors shown as one line.

The user's data folder (``platformdirs.user_data_dir("chatchain")``, or ``CHATCHAIN_DATA_DIR``)
holds the default store, ``chat.db``, and the chat's input history, ``history``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import click
import platformdirs
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from chatchain import Chatbot, ChatChainError, ConfigurationError, MissingAPIKeyError, Settings
from chatchain.stores import HistoryStore, SessionInfo, open_store
from chatchain.testing import OpenAITestServer, memory_echo_reply

DATA_DIR_ENV = "CHATCHAIN_DATA_DIR"
"""Overrides the user's data folder (where the default store and the input history live)."""

NO_ENDPOINT = (
    "No model endpoint is configured: set OPENAI_API_KEY for OpenAI, or OPENAI_BASE_URL and "
    "OPENAI_MODEL for a local OpenAI-compatible server (e.g. OPENAI_BASE_URL="
    "http://localhost:11434/v1 for Ollama), in the environment or in .env; or add --offline "
    "to try chatchain against its own echo server."
)
OFFLINE = "OFFLINE: replies are echoes from chatchain's test server on 127.0.0.1."

# The option that sets each overridden field, to name it when its value is refused.
_OPTION_OF = {"model": "--model", "temperature": "--temperature", "store_url": "--store"}


def data_dir() -> Path:
    """The user's chatchain data folder, created readable by its owner only."""
    path = Path(os.environ.get(DATA_DIR_ENV) or platformdirs.user_data_dir("chatchain"))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def load_settings(env_file: Path | None, overrides: Mapping[str, Any]) -> Settings:
    """The settings from the environment and ``env_file``, with the options' ``overrides``.

    Without ``--store`` or ``CHATCHAIN_STORE``, the store is ``chat.db`` in the data folder.

    Raises:
        ConfigurationError: A variable or an option's value is invalid.
    """
    settings = Settings.load(env_file if env_file is not None else ".env")
    values = {key: value for key, value in overrides.items() if value is not None}
    if "store_url" not in values and "store_url" not in settings.model_fields_set:
        values["store_url"] = f"sqlite:///{data_dir() / 'chat.db'}"
    try:
        # Validated again (model_copy would not), so a bad option is refused like a bad variable.
        # model_dump() shows the store without its password: take the real URL.
        return Settings.model_validate(
            {**settings.model_dump(), "store_url": settings.store_url, **values}
        )
    except ValidationError as exc:
        problems = [
            f"{_OPTION_OF.get(str(error['loc'][0]), error['loc'][0])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigurationError(f"Invalid option {'; '.join(problems)}.") from None


@contextmanager
def use_endpoint(settings: Settings, offline: bool, notice: Console) -> Iterator[Settings]:
    """The settings to talk to the model with; with ``offline``, a local echo server's.

    The offline server runs until the block ends; the real key is never sent to it.

    Raises:
        MissingAPIKeyError: No key and no base URL, and not ``offline``.
    """
    if not offline:
        if settings.api_key is None and not settings.base_url:
            raise MissingAPIKeyError(NO_ENDPOINT)
        yield settings
        return
    with OpenAITestServer(reply=memory_echo_reply, model=settings.model) as server:
        notice.print(Text(OFFLINE, style="bold yellow"))
        yield settings.model_copy(update={"base_url": server.base_url, "api_key": None})


def store_bot(settings: Settings) -> Chatbot:
    """A Chatbot for reading and managing the store (it needs no API key)."""
    return Chatbot(settings)


def open_settings_store(settings: Settings) -> HistoryStore:
    """The store the settings name (shared by the Chatbots of one chat)."""
    return open_store(
        settings.store_url, lock_timeout=settings.lock_timeout, **settings.store_options
    )


def new_session_id() -> str:
    """A short random session id."""
    return uuid4().hex[:8]


def session_infos(bot: Chatbot) -> list[SessionInfo]:
    """What the store knows about each of its sessions, oldest first."""
    return [info for sid in bot.sessions() if (info := bot.session_info(sid)) is not None]


def latest_session(bot: Chatbot) -> str | None:
    """The session written most recently, or ``None`` when the store has none."""
    infos = session_infos(bot)
    return max(infos, key=lambda info: info.updated_at).session_id if infos else None


class ErrorReport:
    """Shows an error as one ``error: ...`` line, or its traceback with ``--debug``.

    The API key, once known (`secret`), is replaced by ``***`` in whatever is shown.
    """

    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.secret: str | None = None
        self._console = Console(stderr=True, highlight=False)

    def remember_key(self, settings: Settings) -> None:
        """Keep the key of ``settings`` to scrub it from what is shown."""
        if settings.api_key is not None and settings.api_key.get_secret_value().strip():
            self.secret = settings.api_key.get_secret_value()

    def show(self, exc: BaseException) -> None:
        """Print ``exc`` to stderr (one line, or the traceback with ``--debug``)."""
        if self.debug:
            text = "".join(traceback.format_exception(exc)).rstrip()
        elif isinstance(exc, ChatChainError):
            text = f"error: {exc}"
        else:
            text = f"error: {type(exc).__name__}: {exc}"
        if not self.debug:
            # A gateway's message can span lines; the promise is one line.
            text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        if self.secret:
            text = text.replace(self.secret, "***")
        self._console.print(Text(text, style="red"), soft_wrap=True)


@contextmanager
def errors_reported(debug: bool) -> Iterator[ErrorReport]:
    """Run a command's body: an error is shown by the report and exits with status 1.

    The library logs each failure as a warning too; without ``--debug`` that would repeat the
    error line, so chatchain's log is shown only with ``--debug``.
    """
    report = ErrorReport(debug)
    logger = logging.getLogger("chatchain")
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if debug else logging.NullHandler()
    level = logger.level
    if debug:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield report
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as exc:
        report.show(exc)
        raise click.exceptions.Exit(1) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
