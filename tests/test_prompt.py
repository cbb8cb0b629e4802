import pytest

from chatchain import ConfigurationError, create_prompt
from chatchain.prompt import prompt_variables


def test_variables_are_found() -> None:
    assert prompt_variables("You are a {role}; answer in {language}. {{literal}}") == {
        "role",
        "language",
    }


@pytest.mark.parametrize("system", ["Unclosed {brace", "Attribute {a.b}", "Index {a[0]}", "{}"])
def test_malformed_templates_say_how_to_escape(system: str) -> None:
    with pytest.raises(ConfigurationError, match=r"\{\{"):
        create_prompt(system)


def test_variables_cannot_shadow_input_or_history() -> None:
    with pytest.raises(ConfigurationError, match="input"):
        create_prompt("Repeat {input}")


def test_defaults_for_unknown_variables_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="langage"):
        create_prompt("Answer in {language}.", prompt_vars={"langage": "French"})


def test_literal_braces_survive() -> None:
    prompt = create_prompt('Reply as JSON like {{"a": 1}} in {language}.')
    system = prompt.invoke({"input": "x", "history": [], "language": "Greek"}).to_messages()[0]
    assert system.content == 'Reply as JSON like {"a": 1} in Greek.'
