"""``chatchain serve``: the chat service (``chatchain.server``) under uvicorn."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from chatchain.cli._setup import errors_reported, load_settings, open_settings_store, use_endpoint
from chatchain.cli._tools import TOOLS_HELP, load_tools
from chatchain.errors import ConfigurationError
from chatchain.settings import Settings

if TYPE_CHECKING:
    from uvicorn import Config
    from uvicorn.supervisors import Multiprocess

__all__ = ["serve"]

APP = "chatchain.server:create_app"  # each worker builds its own app from the environment
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 for every one: put a TLS proxy in front).",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes, sharing the store.",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="Where sessions and users live: sqlite:///path, redis://..., postgresql://..., or an "
    "installed store's scheme (default: CHATCHAIN_STORE, else chat.db in the user's data "
    "folder).",
)
@click.option("--offline", is_flag=True, help="Answer with chatchain's echo server, not a model.")
@click.option("--tools", "tools", metavar="MODULE", help=TOOLS_HELP)
@click.option(
    "--var",
    "variables",
    metavar="NAME=VALUE",
    multiple=True,
    help="Default value of a variable of the system prompt (CHATCHAIN_SYSTEM_PROMPT), e.g. "
    "--var language=French; repeat for more. Over CHATCHAIN_PROMPT_VARS; a native request's "
    "vars win. Needed for OpenAI-route clients with X-Session-Id, which cannot send vars.",
)
@click.option(
    "--shutdown-grace",
    "shutdown_grace",
    metavar="SECONDS",
    type=click.FloatRange(min=0),
    help="On SIGTERM, how long turns in flight (streams too) may take to finish; those "
    "still running then are stopped, their reply so far stored marked interrupted "
    "(default: CHATCHAIN_SERVER_SHUTDOWN_GRACE, else 30).",
)
@click.option(
    "--drain-delay",
    "drain_delay",
    metavar="SECONDS",
    type=click.FloatRange(min=0),
    help="On SIGTERM, how long to keep serving with /healthz answering 503 'draining' before "
    "no longer taking requests, for a load balancer to take the instance out (default: "
    "CHATCHAIN_SERVER_DRAIN_DELAY, else 0).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks, not one error line.")
def serve(
    host: str,
    port: int,
    workers: int,
    store_url: str | None,
    offline: bool,
    tools: str | None,
    variables: tuple[str, ...],
    shutdown_grace: float | None,
    drain_delay: float | None,
    debug: bool,
) -> None:
    """Serve the chat page, the chat API (and /docs, /healthz, /metrics) over HTTP.

    The chat page is at http://HOST:PORT/ (http://127.0.0.1:8000/ by default): open it in a
    browser and sign in with a token of `chatchain users add NAME`, kept in the same store.
    Settings come from the environment and .env, as for the other commands.

    On SIGTERM the service drains: /healthz answers 503 for --drain-delay seconds while
    requests are still served, then it takes no new ones, gives the turns in flight
    --shutdown-grace seconds, stops (and stores, marked interrupted) those left, and exits.
    """
    status = Console(stderr=True, highlight=False)
    with errors_reported(debug) as report:
        try:
            import uvicorn  # noqa: F401  (the server extra's packages, named now if missing)

            import chatchain.server  # noqa: F401
            from chatchain.server._app import TOOLS_ENV
        except ImportError as exc:
            raise ConfigurationError(
                f"chatchain serve needs {exc.name}: install it with pip install "
                "'chatchain[server]'."
            ) from None
        options = {
            "store_url": store_url,
            "server_shutdown_grace": shutdown_grace,
            "server_drain_delay": drain_delay,
        }
        settings = load_settings(None, options)
        settings = _with_variables(settings, variables, status)
        report.remember_key(settings)
        if workers > 1 and settings.store_url.startswith("memory:"):
            raise ConfigurationError(
                "--workers above 1 need a store the workers share: pass --store "
                "sqlite:///path (one machine), redis://... or postgresql://..."
            )
        _check_store(settings.store_url)
        tools = _check_tools(tools)
        with use_endpoint(settings, offline, status) as served:
            env = {"CHATCHAIN_STORE": served.store_url, TOOLS_ENV: tools or ""}
            env["CHATCHAIN_PROMPT_VARS"] = json.dumps(settings.prompt_vars)
            env["CHATCHAIN_SERVER_SHUTDOWN_GRACE"] = str(settings.server_shutdown_grace)
            env["CHATCHAIN_SERVER_DRAIN_DELAY"] = str(settings.server_drain_delay)
            if offline:
                assert served.base_url is not None
                # The worker's key is a placeholder: the real one (in .env, say) stays home.
                env |= {"OPENAI_BASE_URL": served.base_url, "OPENAI_API_KEY": "offline"}
            page = page_url(host, port)
            status.print(f"Chat page: {page} (sign in with a token of `chatchain users add`)")
            with _environment(env), _metrics_folder(workers):
                _run(settings, host, port, workers)


def _run(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run the app under uvicorn; with several workers, under `_supervisor`."""
    import uvicorn

    # After the drain delay: the turns' grace, then uvicorn stops what is left.
    grace = math.ceil(settings.server_shutdown_grace)
    if workers == 1:
        uvicorn.run(APP, factory=True, host=host, port=port, timeout_graceful_shutdown=grace)
        return
    config = uvicorn.Config(
        APP, factory=True, host=host, port=port, workers=workers, timeout_graceful_shutdown=grace
    )
    _supervisor(config, settings.server_drain_delay).run()


def _supervisor(config: Config, drain_delay: float) -> Multiprocess:
    """uvicorn's supervisor of ``config.workers`` processes (as ``uvicorn.run`` makes it),
    which also closes its own copy of the listening socket when the workers close theirs.

    uvicorn's keeps it open until every worker has exited: once the workers stopped taking
    requests, a new connection would be accepted by the system and wait, unanswered, through
    the whole shutdown grace, then be reset (a proxy cannot send a POST elsewhere then: it
    was sent). Closed, the socket refuses new connections, which a proxy sends elsewhere.
    """
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        terminated = False

        def handle_term(self) -> None:
            self.terminated = True  # SIGTERM: the workers drain first (SIGINT: at once)
            super().handle_term()

        def terminate_all(self) -> None:
            super().terminate_all()  # SIGTERM to each worker, which drains, then closes
            if self.terminated:
                time.sleep(drain_delay)
            for sock in self.sockets:
                sock.close()

    return Supervisor(config, sockets=[config.bind_socket()])


def _with_variables(settings: Settings, variables: tuple[str, ...], status: Console) -> Settings:
    """``settings`` with the ``--var NAME=VALUE`` defaults of the system prompt's variables.

    Raises:
        ConfigurationError: A ``--var`` is not ``NAME=VALUE``, or names no variable of the
            system prompt.
    """
    from chatchain.prompt import prompt_variables

    given = dict(settings.prompt_vars)
    names = prompt_variables(settings.system_prompt)
    for variable in variables:
        name, equals, value = variable.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ConfigurationError(f"--var {variable!r}: write NAME=VALUE, e.g. language=French.")
        if name not in names:
            raise ConfigurationError(
                f"--var {name}: the system prompt (CHATCHAIN_SYSTEM_PROMPT) has no {{{name}}}; "
                f"its variables are {', '.join(sorted(names)) or 'none'}."
            )
        given[name] = value
    missing = sorted(names - set(given))
    if missing:
        status.print(
            f"The system prompt's {', '.join('{' + n + '}' for n in missing)} has no default: "
            "requests must send it (native vars); OpenAI-route requests with X-Session-Id "
            f"cannot, and are refused. Give one with --var {missing[0]}=VALUE."
        )
    return settings.model_copy(update={"prompt_vars": given})


def page_url(host: str, port: int) -> str:
    """The chat page's address for a browser on this machine.

    Example:
        >>> page_url("0.0.0.0", 8000), page_url("::1", 80)
        ('http://127.0.0.1:8000/', 'http://[::1]:80/')
    """
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine's own address works
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _check_store(url: str) -> None:
    """Open the store once before the workers do: a bad URL or a store that keeps no users
    fails here, with one clear line (and migrations run once)."""
    from chatchain.users import Users

    with closing(open_settings_store(Settings(store_url=url))) as store:
        Users(store)


def _check_tools(spec: str | None) -> str | None:
    """Load ``--tools`` once before the workers do (a module that fails, fails here), and
    name a file by its absolute path, which every worker finds."""
    if spec is None:
        return None
    load_tools(spec)
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec.endswith(".py") or path.is_file() else spec


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` (which the workers inherit) while the block runs."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _metrics_folder(workers: int) -> Iterator[None]:
    """With several workers, a fresh folder for prometheus-client's multiprocess files (so
    /metrics adds up all workers), removed afterwards; kept if the operator set one."""
    if workers == 1 or os.environ.get(_MULTIPROC_ENV):
        yield
        return
    with (
        tempfile.TemporaryDirectory(prefix="chatchain-metrics-") as folder,
        _environment({_MULTIPROC_ENV: folder}),
    ):
        yield
