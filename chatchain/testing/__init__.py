"""Test doubles that ship with chatchain, for its own tests and for yours.

- `FakeChatModel`: a LangChain chat model with scripted or echo replies, scripted tool calls
  (`tool_call_reply`, with `bind_tools`), real streaming and
  OpenAI-like usage, for unit tests without a network.
- `OpenAITestServer`: a real OpenAI-compatible HTTP server on 127.0.0.1 (JSON and SSE
  streaming with a usage chunk, errors on demand), for end-to-end tests of `ChatOpenAI`;
  `Fault` also plays the hostile endpoints met in the wild (keep-alive trickles, a body a byte
  a second, replies under another model name, a lone surrogate in the reply); it also
  scripts tool calls (`ScriptedCall`, rules per tool) and JSON-schema replies (`fit_schema`),
  so you can test your tools and structured replies offline.
- `redis_server` and `PostgresCluster`: real Redis and PostgreSQL servers of a test's own on
  free ports of 127.0.0.1 (Debian's binaries, in a temporary directory), to run a store against
  and to stop or crash; `redis_url_of` gives a Redis server's URL.
"""

from chatchain.testing._fake import FakeChatModel, tool_call_reply
from chatchain.testing._scripts import ScriptedCall, fit_schema
from chatchain.testing._server import Fault, OpenAITestServer, echo_reply, memory_echo_reply
from chatchain.testing._stores import PostgresCluster, redis_server, redis_url_of

__all__ = [
    "FakeChatModel",
    "Fault",
    "OpenAITestServer",
    "PostgresCluster",
    "ScriptedCall",
    "echo_reply",
    "fit_schema",
    "memory_echo_reply",
    "redis_server",
    "redis_url_of",
    "tool_call_reply",
]
