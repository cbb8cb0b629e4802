"""Your settings for notebooks and scripts: edit this file, or put the values in ``.env``.

The installed package never imports this file. It builds on `chatchain.Settings`, which reads
the environment and the ``.env`` next to this file (see ``.env.example`` for every variable).

Example (from a notebook in ``notebooks/``)::

    import sys; sys.path.insert(0, "..")
    from config import Config
    bot = Config.chatbot()
    bot.chat("Hi! I'm Bob", session_id=Config.SESSION_ID)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatchain import Chatbot, Settings

ROOT = Path(__file__).resolve().parent


class Config:
    """The project's defaults; change them here."""

    ENV_FILE = ROOT / ".env"
    SYSTEM_PROMPT = (
        "You are a helpful assistant. Answer all questions to the best of your ability in "
        "{language}."
    )
    LANGUAGE = "English"
    SESSION_ID = "dp123"

    @classmethod
    def settings(cls, **overrides: Any) -> Settings:
        """Settings from the environment and ``.env``, with this file's system prompt.

        ``overrides`` (e.g. ``store_url="sqlite:///chat.db"``, ``window_turns=4``) win, validated
        like the rest: a bad value raises `chatchain.ConfigurationError`.
        """
        return Settings.load(cls.ENV_FILE, **{"system_prompt": cls.SYSTEM_PROMPT, **overrides})

    @classmethod
    def chatbot(cls, **overrides: Any) -> Chatbot:
        """A `Chatbot` with these settings (and ``overrides``) and the default language."""
        return Chatbot(cls.settings(**overrides), prompt_vars={"language": cls.LANGUAGE})
