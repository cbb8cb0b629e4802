"""The chat prompt: a system message, the history and the user's turn."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from chatchain.errors import ConfigurationError

__all__ = ["create_prompt", "prompt_variables"]


def prompt_variables(system: str) -> frozenset[str]:
    """The ``{variables}`` in a system prompt.

    Raises:
        ConfigurationError: The text has an unmatched brace or a malformed field.

    Example:
        >>> sorted(prompt_variables("You are a {role}. Answer in {language}."))
        ['language', 'role']
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(system) if name is not None]
    except ValueError as exc:
        raise ConfigurationError(
            f"The system prompt is not a valid template ({exc}). Write {{{{ and }}}} for "
            "literal braces."
        ) from None
    for name in fields:
        if not name.isidentifier():
            raise ConfigurationError(
                f"The system prompt has the field {{{name}}}: variables must be plain names "
                "like {language}. Write {{ and }} for literal braces."
            )
    return frozenset(fields)


def create_prompt(
    system: str,
    *,
    input_key: str = "input",
    history_key: str | None = "history",
    prompt_vars: Mapping[str, str] | None = None,
) -> ChatPromptTemplate:
    """The chat prompt: system template, history placeholder and the human slot.

    Args:
        system: The system message; ``{name}`` fields become prompt variables.
        input_key: The variable holding the user's text (or, without a history key, the
            list of messages of the turn).
        history_key: The variable the history fills; ``None`` for a single message list
            under ``input_key`` into which the history is prepended.
        prompt_vars: Default values for the system prompt's variables.

    Example:
        >>> prompt = create_prompt("Answer in {language}.", prompt_vars={"language": "English"})
        >>> [m.type for m in prompt.invoke({"input": "hi", "history": []}).to_messages()]
        ['system', 'human']
    """
    variables = prompt_variables(system)
    reserved = sorted(name for name in (input_key, history_key) if name in variables)
    if reserved:
        raise ConfigurationError(
            f"The system prompt uses {reserved}, which name the input or the history. "
            "Rename the variable, or choose another input_key/history_key."
        )
    unknown = set(prompt_vars or {}) - variables
    if unknown:
        raise ConfigurationError(
            f"prompt_vars sets {sorted(unknown)}, which the system prompt does not use; it "
            f"uses {sorted(variables) or 'no variables'}."
        )
    messages: list[Any]
    if history_key is None:
        messages = [("system", system), MessagesPlaceholder(input_key)]
    else:
        messages = [
            ("system", system),
            MessagesPlaceholder(history_key),
            ("human", f"{{{input_key}}}"),
        ]
    prompt = ChatPromptTemplate.from_messages(messages)
    return prompt.partial(**prompt_vars) if prompt_vars else prompt
