"""Run the OpenAI-compatible test server in the foreground.

Prints ``base_url=http://HOST:PORT/v1`` on one line once it is serving, and stops cleanly
on SIGINT (Ctrl-C) or SIGTERM. ``--hostile`` makes it answer every chat request like a hostile
endpoint, to rehearse an application against one.

Example:
    $ python -m chatchain.testing --port 8000
    base_url=http://127.0.0.1:8000/v1
    $ python -m chatchain.testing --hostile keep-alive --hostile alias
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from chatchain.testing._server import Fault, OpenAITestServer

TRICKLE_S = 30.0

# What each --hostile mode sets on the fault every chat request gets.
HOSTILE: dict[str, dict[str, object]] = {
    "keep-alive": {"keep_alive": TRICKLE_S, "stall_after": 2},
    "byte-a-second": {"drip": TRICKLE_S},
    "alias": {},  # answer_model: openrouter/<the model asked for>, set below
    "lone-surrogate": {"lone_surrogate": True},
    "ignore-max-tokens": {"ignore_max_tokens": True},
}


def hostile_fault(modes: Sequence[str], model: str) -> Fault | None:
    """The fault for ``--hostile`` modes (combined), applied to every chat request.

    Example:
        >>> hostile_fault(["alias", "lone-surrogate"], "gpt-4o-mini").answer_model
        'openrouter/gpt-4o-mini'
        >>> hostile_fault([], "gpt-4o-mini") is None
        True
    """
    if not modes:
        return None
    fields: dict[str, object] = {}
    for mode in modes:
        fields.update(HOSTILE[mode])
    if "alias" in modes:
        fields["answer_model"] = f"openrouter/{model}"
    return Fault(times=sys.maxsize, **fields)  # type: ignore[arg-type]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chatchain.testing",
        description="Run chatchain's OpenAI-compatible test server (echoes the last user message).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to bind; 0 picks a free one (default)"
    )
    parser.add_argument(
        "--model", default="gpt-4o-mini", help="model to list (default: %(default)s)"
    )
    parser.add_argument(
        "--context-window",
        type=int,
        default=None,
        help="reject prompts longer than this many tokens (default: no limit)",
    )
    parser.add_argument(
        "--chunk-words", type=int, default=1, help="words per streamed chunk (default: %(default)s)"
    )
    parser.add_argument(
        "--chunk-interval",
        type=float,
        default=0.0,
        help="seconds before each streamed chunk, like a model writing (default: %(default)s)",
    )
    parser.add_argument(
        "--hostile",
        action="append",
        default=[],
        choices=list(HOSTILE),
        help=f"answer every chat request like a hostile endpoint (repeat to combine): "
        f"keep-alive (SSE comments for {TRICKLE_S:g} s, after two chunks), byte-a-second (the "
        f"body a byte a second for {TRICKLE_S:g} s), alias (answers as openrouter/<model>), "
        "lone-surrogate (each reply ends with half an emoji), ignore-max-tokens (whole replies "
        "whatever max_tokens says)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code (0).

    Example:
        >>> main(["--port", "0"])  # doctest: +SKIP
        base_url=http://127.0.0.1:54321/v1
        0
    """
    args = _parse_args(argv)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = OpenAITestServer(
        host=args.host,
        port=args.port,
        model=args.model,
        context_window=args.context_window,
        chunk_words=args.chunk_words,
        chunk_interval=args.chunk_interval,
    )
    fault = hostile_fault(args.hostile, args.model)
    if fault is not None:
        server.add_fault(fault)
    try:
        server.start()
        print(f"base_url={server.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
