"""A whole-turn deadline (``CHATCHAIN_TURN_DEADLINE``) over blocking and async model calls.

``CHATCHAIN_TIMEOUT`` bounds each read only: an endpoint that sends an SSE comment every
second, or its body a byte a second, never trips it. The deadline bounds the turn as a whole.

Where it is enforced:

- **Where the bytes arrive**, for the models chatchain builds (and a user's `ChatOpenAI`
  without an HTTP client of its own, see `model.prepare_chat_model`): their HTTP client's
  transport (`DeadlineTransport`) reads the turn's deadline from a context variable set
  around each model call (`running`). A request is refused, unsent, once the deadline has
  passed, which ends the client's own retry that would go out late (billed, never recorded);
  a ``Retry-After`` that points past the deadline is shortened to it, so that the client wakes
  at the deadline (and is refused) rather than sleeping on. Every blocked connect, write and
  read waits no longer than the time left, and each piece of bytes read (an SSE keep-alive
  comment too) checks the deadline. The caller's own thread reads the stream: no thread, no
  queue per chunk.
- **In a worker thread**, for any other model (a user's own chat model, one with its own
  ``http_client``, or a proxy from the environment, which a custom transport would bypass):
  nothing but the model itself sees its bytes, and one that blocks without sending any could
  block forever, so the turn waits for its worker until the deadline, then abandons it. The
  worker's calls still carry the deadline: through chatchain's transport, nothing is sent late.
- **Async** calls are bounded by `asyncio.timeout_at`, which cancels them (the transport refuses
  a late request there too).

The transport stops a call by raising `DeadlinePassed`, a `BaseException` like
`asyncio.CancelledError` and for the same reason: the openai client's retry loop, LangChain's
fallbacks and chatchain's own ``except Exception`` retries must not catch it. The turn's
boundary (`call`, `iterate`, `abounded`) turns it into the turn's `TurnDeadlineError`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import queue
import ssl
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpcore2
import httpx2
import openai

__all__ = [
    "AsyncDeadlineTransport",
    "DeadlinePassed",
    "DeadlineTransport",
    "abounded",
    "async_http_client",
    "call",
    "http_client",
    "is_bounded",
    "iterate",
    "running",
]

T = TypeVar("T")

_END = object()

# openai's DefaultHttpxClient's pool: a transport given to httpx replaces the client's limits.
_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
_MAX_RETRY_AFTER = 120.0  # the openai client ignores a longer Retry-After (and does not retry)


class DeadlinePassed(BaseException):  # a cancellation, like asyncio.CancelledError
    """The turn's deadline passed during a model call; the turn raises `TurnDeadlineError`."""


@dataclass(frozen=True, slots=True)
class _Deadline:
    at: float  # `time.monotonic`
    expired: Callable[[], Exception]

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> float:
        """The seconds left.

        Raises:
            DeadlinePassed: None are.
        """
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlinePassed
        return left


_current: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "chatchain_turn_deadline", default=None
)


@contextmanager
def running(at: float | None, expired: Callable[[], Exception]) -> Iterator[None]:
    """The block's model calls carry the deadline ``at`` (`time.monotonic`) to the transport.

    Raises:
        Exception: ``expired()`` if the transport stopped a call at the deadline.
    """
    if at is None:
        yield
        return
    token = _current.set(_Deadline(at, expired))
    try:
        yield
    except DeadlinePassed:
        raise expired() from None
    finally:
        _current.reset(token)


def _capped(timeout: float | None, left: float) -> float:
    return left if timeout is None else min(timeout, left)


# -- the transport ----------------------------------------------------------------------------


class _BoundedStream(httpcore2.NetworkStream):
    """A connection whose blocked reads and writes end at the deadline of the call using it.

    httpcore reads a request's read timeout once, when the response body starts, and hands
    it to every read of the body: a timeout capped when the request went out would let a
    read that starts just before the deadline block for the whole cap again. Here each read
    gets the time left at that moment.
    """

    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        deadline = _current.get()
        if deadline is None:
            return self._stream.read(max_bytes, timeout)
        try:
            return self._stream.read(max_bytes, _capped(timeout, deadline.check()))
        except httpcore2.ReadTimeout:
            deadline.check()
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        deadline = _current.get()
        if deadline is None:
            self._stream.write(buffer, timeout)
            return
        try:
            self._stream.write(buffer, _capped(timeout, deadline.check()))
        except httpcore2.WriteTimeout:
            deadline.check()
            raise

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.NetworkStream:
        return _BoundedStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _BoundedBackend(httpcore2.NetworkBackend):
    """Opens `_BoundedStream` connections."""

    def __init__(self, backend: httpcore2.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _BoundedStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.NetworkStream:
        return _BoundedStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _capped_request(request: httpx2.Request, deadline: _Deadline) -> None:
    """Refuse ``request`` once the deadline passed; else cap its timeouts at the time left."""
    left = deadline.check()
    timeouts = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        name: _capped(timeouts.get(name), left) for name in ("connect", "read", "write", "pool")
    }


def _retry_after(headers: httpx2.Headers) -> float | None:
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return float(headers[name]) / divisor
        except (KeyError, ValueError):
            continue
    return None


def _retry_by_deadline(response: httpx2.Response, deadline: _Deadline) -> None:
    """Shorten a ``Retry-After`` that points past the deadline to the time left.

    The openai client sleeps for it before retrying; a retry after the deadline would be
    refused anyway, so the client wakes at the deadline and the turn ends then, as it
    would have while the client slept.
    """
    if response.status_code < 400:
        return
    wait = _retry_after(response.headers)
    left = deadline.left()
    if wait is not None and 0 < left < wait <= _MAX_RETRY_AFTER:
        response.headers["retry-after-ms"] = f"{left * 1000:.0f}" if left >= 0.001 else "1"


class DeadlineTransport(httpx2.BaseTransport):
    """An `httpx2.HTTPTransport` that ends each call at the turn's deadline (see the module).

    Outside a turn's model call (no deadline set) it is the plain transport.
    """

    def __init__(self, transport: httpx2.HTTPTransport | None = None) -> None:
        self._transport = transport or httpx2.HTTPTransport(limits=_LIMITS)
        # httpx builds its connection pool without a `network_backend` parameter; the pool
        # takes one (httpcore's documented extension point), so it is swapped in here.
        pool = self._transport._pool
        if not isinstance(pool, httpcore2.ConnectionPool):
            raise TypeError(f"a direct connection pool is needed, not {type(pool).__name__}")
        pool._network_backend = _BoundedBackend(pool._network_backend)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = _current.get()
        if deadline is None:
            return self._transport.handle_request(request)
        _capped_request(request, deadline)
        response = self._transport.handle_request(request)
        _retry_by_deadline(response, deadline)
        return response

    def close(self) -> None:
        self._transport.close()


class AsyncDeadlineTransport(httpx2.AsyncBaseTransport):
    """`DeadlineTransport` for async calls: refuses late requests, caps their timeouts.

    Reads need no bound of their own here: `abounded` cancels the call at the deadline.
    """

    def __init__(self, transport: httpx2.AsyncHTTPTransport | None = None) -> None:
        self._transport = transport or httpx2.AsyncHTTPTransport(limits=_LIMITS)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = _current.get()
        if deadline is None:
            return await self._transport.handle_async_request(request)
        _capped_request(request, deadline)
        response = await self._transport.handle_async_request(request)
        _retry_by_deadline(response, deadline)
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


def _proxy_in_environment() -> bool:
    # httpx routes through HTTP(S)_PROXY only when it builds its own transports.
    return bool(urllib.request.getproxies())


class _BoundedClient(openai.DefaultHttpxClient):
    """openai's default HTTP client over a `DeadlineTransport`."""


@functools.cache
def _shared_http_client() -> _BoundedClient:
    client = _BoundedClient(transport=DeadlineTransport())
    atexit.register(client.close)  # its pooled connections, closed rather than leaked
    return client


def http_client() -> openai.DefaultHttpxClient | None:
    """The process's HTTP client for chatchain's models, or ``None`` under a proxy.

    Like langchain-openai's default client it is shared by every model, for its pooled
    connections; it closes at exit. Under a proxy from the environment (``HTTPS_PROXY``...)
    there is none: httpx only honours those without a custom transport, so the models keep
    their default client, and the deadline its worker thread.
    """
    return None if _proxy_in_environment() else _shared_http_client()


def async_http_client() -> openai.DefaultAsyncHttpxClient:
    """A new async HTTP client over `AsyncDeadlineTransport` (openai's default under a proxy)."""
    if _proxy_in_environment():
        return openai.DefaultAsyncHttpxClient()
    return openai.DefaultAsyncHttpxClient(transport=AsyncDeadlineTransport())


def is_bounded(client: object) -> bool:
    """Whether ``client`` is chatchain's HTTP client, which enforces the deadline itself."""
    return isinstance(client, _BoundedClient)


# -- the turn's boundary ----------------------------------------------------------------------


class _Outcome:
    """What a worker produced: a value, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


def _remaining(at: float) -> float:
    return max(0.0, at - time.monotonic())


def call(
    fn: Callable[[], T],
    at: float | None,
    expired: Callable[[], Exception],
    *,
    in_thread: bool = True,
) -> T:
    """``fn()``, given up on at ``at`` (`time.monotonic`).

    With ``in_thread`` it runs in a worker thread that the caller waits for until ``at``,
    then abandons; without, in the caller's thread, bounded by chatchain's transport.

    Raises:
        Exception: What ``fn`` raised, or ``expired()`` once ``at`` has passed.
    """
    if at is None:
        return fn()
    if not in_thread:
        with running(at, expired):
            return fn()
    outcome = _Outcome()
    done = threading.Event()
    context = contextvars.copy_context()  # LangChain's callbacks and tracing live in context

    def work() -> None:
        try:
            with running(at, expired):  # the transport refuses what this worker sends late
                outcome.value = fn()
        except BaseException as exc:  # handed to the waiting thread
            outcome.error = exc
        finally:
            done.set()

    threading.Thread(target=context.run, args=(work,), name="chatchain-turn", daemon=True).start()
    if not done.wait(_remaining(at)):
        raise expired()
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[no-any-return]


def iterate(
    items: Generator[T, None, None],
    at: float | None,
    expired: Callable[[], Exception],
    *,
    in_thread: bool = True,
) -> Generator[T, None, None]:
    """``items``, given up on at ``at`` (`time.monotonic`).

    Without ``in_thread`` the caller's thread pulls them, each pull bounded by chatchain's
    transport, and the deadline is checked before each (the caller's time between items
    counts). With it, see `_iterate_in_thread`.

    Raises:
        Exception: What ``items`` raised, or ``expired()`` once ``at`` has passed.
    """
    if at is None:
        yield from items
        return
    if in_thread:
        yield from _iterate_in_thread(items, at, expired)
        return
    deadline = _Deadline(at, expired)
    try:
        while True:
            if time.monotonic() >= at:
                raise expired()
            token = _current.set(deadline)
            try:
                item = next(items)
            except StopIteration:
                return
            except DeadlinePassed:
                raise expired() from None
            finally:
                _current.reset(token)
            yield item
    finally:
        items.close()


def _iterate_in_thread(
    items: Generator[T, None, None], at: float, expired: Callable[[], Exception]
) -> Generator[T, None, None]:
    """``items``, pulled by a worker thread and given up on at ``at``.

    The worker pulls one item each time the caller asks for one, never ahead: stopping early
    closes ``items`` (and the model's stream) at once, as a plain loop would. When the deadline
    ends a pull, the worker is left to finish it, then closes ``items`` by itself.
    """
    wanted = threading.Semaphore(0)
    passed: queue.SimpleQueue[tuple[object, Any]] = queue.SimpleQueue()
    stop = threading.Event()
    closed = _Outcome()
    deadline = _Deadline(at, expired)

    def produce() -> None:
        _current.set(deadline)  # the worker's own context: its late requests are refused
        try:
            while wanted.acquire() and not stop.is_set():
                try:
                    item = next(items)
                except StopIteration:
                    passed.put((_END, None))
                    return
                except DeadlinePassed:
                    passed.put((expired(), None))
                    return
                except BaseException as exc:  # handed to the consuming thread
                    passed.put((exc, None))
                    return
                passed.put((None, item))
        finally:
            try:
                items.close()
            except BaseException as exc:  # raised by the consumer, if it waits for the close
                closed.error = exc
            finished.set()

    finished = threading.Event()
    context = contextvars.copy_context()  # LangChain's callbacks and tracing live in context
    worker = threading.Thread(target=context.run, args=(produce,), name="chatchain-stream")
    worker.daemon = True
    worker.start()
    pulling = False
    try:
        while True:
            wanted.release()
            pulling = True
            try:
                kind, item = passed.get(timeout=_remaining(at))
            except queue.Empty:
                raise expired() from None
            pulling = False
            if kind is _END:
                return
            if isinstance(kind, BaseException):
                raise kind
            yield item
    finally:
        stop.set()
        wanted.release()
        if not pulling:  # the worker is idle: let it close the stream before going on
            finished.wait()
            if closed.error is not None:
                raise closed.error


@asynccontextmanager
async def abounded(at: float | None, expired: Callable[[], Exception]) -> AsyncIterator[None]:
    """Cancel the block at ``at`` (`time.monotonic`) and raise ``expired()`` instead.

    Raises:
        Exception: ``expired()`` if ``at`` passed inside the block.
    """
    if at is None:
        yield
        return
    loop = asyncio.get_running_loop()
    # The event loop's clock is time.monotonic by default; convert in case it is not.
    timeout = asyncio.timeout_at(loop.time() + at - time.monotonic())
    try:
        with running(at, expired):
            async with timeout:
                yield
    except TimeoutError as exc:
        if timeout.expired():
            raise expired() from exc
        raise
