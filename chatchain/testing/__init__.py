"""Test doubles that ship with chatchain, for its own tests and for yours.

- `FakeChatModel`: a LangChain chat model with scripted or echo replies, real streaming and
  OpenAI-like usage, for unit tests without a network.
- `OpenAITestServer`: a real OpenAI-compatible HTTP server on 127.0.0.1 (JSON and SSE
  streaming with a usage chunk, errors on demand), for end-to-end tests of `ChatOpenAI`;
  `Fault` also plays the hostile endpoints met in the wild (keep-alive trickles, a body a byte
  a second, replies under another model name, a lone surrogate in the reply).
"""

from chatchain.testing._fake import FakeChatModel
from chatchain.testing._server import Fault, OpenAITestServer, echo_reply

__all__ = ["FakeChatModel", "Fault", "OpenAITestServer", "echo_reply"]
