"""``--tools MODULE``: loading the user's tools, and a dim line per tool call."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from rich.console import Console

from chatchain import Chatbot, ConfigurationError, Settings
from chatchain.cli._chat import stream_reply
from chatchain.cli._tools import load_tools
from chatchain.testing import FakeChatModel, OpenAITestServer, ScriptedCall, tool_call_reply
from tests.cli.conftest import Chatchain

TOOLS_MODULE = '''
from langchain_core.tools import tool


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def explode(reason: str) -> str:
    """Fail on purpose."""
    raise RuntimeError("kaboom: " + reason)


@tool
def unlisted() -> str:
    """Not in TOOLS."""
    return "no"


TOOLS = [add, explode]
'''

DECORATED_MODULE = '''
from langchain_core.tools import tool


def helper() -> str:
    return "not a tool"


@tool
def shout(text: str) -> str:
    """Say it loud."""
    return text.upper()
'''


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_MODULE, encoding="utf-8")
    return path


def test_a_file_gives_its_tools_list(tools_file: Path) -> None:
    tools = load_tools(str(tools_file))
    assert [getattr(t, "name", getattr(t, "__name__", "")) for t in tools] == ["add", "explode"]


def test_without_a_tools_list_every_top_level_tool_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "decorated_tools.py").write_text(DECORATED_MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "decorated_tools", raising=False)
    tools = load_tools("decorated_tools")  # a module name, found from the current folder
    assert [t.name for t in tools] == ["shout"]
    assert str(tmp_path) not in sys.path  # the folder was on the path for the import only


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "there is no such file"),
        ("raise ValueError('broken module')", "importing it failed (ValueError: broken module)"),
        ("x = 1", "the module has no tools"),
        ("TOOLS = 'add'", "TOOLS must be a list"),
    ],
)
def test_unusable_modules_say_what_to_do(tmp_path: Path, source: str | None, message: str) -> None:
    path = tmp_path / "bad_tools.py"
    if source is not None:
        path.write_text(source, encoding="utf-8")
    with pytest.raises(ConfigurationError, match="--tools") as caught:
        load_tools(str(path))
    assert message in str(caught.value)


def test_stream_reply_shows_a_dim_line_per_tool_call(tools_file: Path) -> None:
    fake = FakeChatModel(
        replies=[
            tool_call_reply(("add", {"a": 1, "b": 2}), ("explode", {"reason": "x" * 200})),
            "Three, and one failure.",
        ]
    )
    bot = Chatbot(Settings(api_key="sk-test"), llm=fake, tools=load_tools(str(tools_file)))
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    stream_reply(bot, "go", session_id="s", user_id=None, out=console, status=console)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  tool add(a=1, b=2) ok"
    assert lines[1].startswith("  tool explode(reason='xxxx")
    assert "…) error: RuntimeError: kaboom: xxx" in lines[1]
    assert len(lines[1]) < 200  # arguments and error are shortened
    assert lines[2] == "Three, and one failure."


def test_text_before_a_tool_call_ends_its_line_first() -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    fake = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2}), text="Adding."), "3"])
    bot = Chatbot(Settings(api_key="sk-test"), llm=fake, tools=[add])
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    stream_reply(bot, "go", session_id="s", user_id=None, out=console, status=console)
    assert out.getvalue().splitlines()[:3] == ["Adding.", "  tool add(a=1, b=2) ok", "3"]


def test_chat_with_tools_sends_them_and_without_loads_nothing(
    chatchain: Chatchain, server: OpenAITestServer, tools_file: Path
) -> None:
    result = chatchain("chat", "--tools", str(tools_file), "--session", "t", input="hi\n")
    assert result.exit_code == 0, result.output
    assert "Echo: hi" in result.output
    sent = server.requests[-1]["body"]
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["add", "explode"]
    result = chatchain("chat", "--session", "u", input="hi\n")
    assert result.exit_code == 0
    assert "tools" not in server.requests[-1]["body"]


def test_a_bad_tools_module_is_one_error_line(chatchain: Chatchain, tmp_path: Path) -> None:
    result = chatchain("ask", "--tools", str(tmp_path / "missing.py"), "hi")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: --tools")
    assert "there is no such file" in result.stderr


def test_help_documents_the_option(chatchain: Chatchain) -> None:
    result = chatchain("chat", "--help")
    assert "--tools MODULE" in result.output
    assert "TOOLS list" in result.output and "@tool" in result.output


def test_chat_shows_a_dim_line_per_tool_call(
    chatchain: Chatchain, server: OpenAITestServer, tools_file: Path
) -> None:
    server.queue_tool_calls(
        ScriptedCall("add", {"a": 1, "b": 2}), ScriptedCall("explode", {"reason": "why"})
    )
    server.queue_replies("Three; the other failed.")
    result = chatchain("chat", "--tools", str(tools_file), "--session", "t", input="go\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2:5] == [
        "  tool add(a=1, b=2) ok",
        "  tool explode(reason='why') error: RuntimeError: kaboom: why",
        "Three; the other failed.",
    ]
    with chatchain.store() as store:
        assert [m.type for m in store.load("t")] == ["human", "ai", "tool", "tool", "ai"]


def test_ask_prints_tool_lines_to_stderr(
    chatchain: Chatchain, server: OpenAITestServer, tools_file: Path
) -> None:
    server.queue_tool_calls(ScriptedCall("add", {"a": 2, "b": 2}))
    server.queue_replies("Four.")
    result = chatchain("ask", "--tools", str(tools_file), "2+2?")
    assert result.exit_code == 0
    assert result.stdout == "Four.\n"
    assert result.stderr.splitlines()[0] == "  tool add(a=2, b=2) ok"
