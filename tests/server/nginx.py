"""Debian's nginx in front of `chatchain serve` instances, configured by the README.

`readme_config` takes the README's ```nginx block (so the documentation is what the tests
run), `for_test` points its upstream at the instances' ports and makes it listen on a free port
of 127.0.0.1 without TLS, and `Nginx` runs it in the foreground (``daemon off``) as this user,
with its pid file, logs and temporary files in a folder of the test's own: no system service.

The wrapper adds two things for the tests only: an access log that names the instance of each
request (``$upstream_addr``), and the same as an ``X-Upstream`` response header, so that a test
can tell which instance serves a stream while it streams.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import httpx

from chatchain.testing._stores import free_port

__all__ = ["NGINX", "Nginx", "for_test", "free_ports", "readme_config"]

README = Path(__file__).resolve().parents[2] / "README.md"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_BLOCK = re.compile(r"```nginx\n(?P<config>.*?)```", re.S)
_SERVER = re.compile(r"^(?P<indent>\s*)server 127\.0\.0\.1:\d+(?P<params>[^;]*);\n", re.M)
_LISTEN = re.compile(r"^(?P<indent>\s*)listen 443 ssl;", re.M)
_TLS = re.compile(r"^\s*ssl_\w+ [^;]*;\n", re.M)

# The test's own additions (outside the README's block): where each request went.
_WRAPPER = """\
{user}worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
daemon off;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$request_method $uri $status $upstream_addr $upstream_status';
    access_log {folder}/access.log upstreams;
    add_header X-Upstream $upstream_addr always;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{config}
}}
"""


def readme_config(text: str | None = None) -> str:
    """The README's one ```nginx block (raises if there is none or more than one)."""
    blocks = _BLOCK.findall(README.read_text() if text is None else text)
    if len(blocks) != 1:
        raise AssertionError(f"the README has {len(blocks)} ```nginx blocks, not one")
    return str(blocks[0])


def for_test(config: str, ports: Sequence[int], listen: int, down: Collection[int] = ()) -> str:
    """``config`` with one upstream ``server`` line per port (each with the README's
    parameters, and ``down`` for the ports in ``down``: taken out of rotation) and a
    plain-HTTP ``listen`` on ``127.0.0.1:listen`` instead of TLS."""
    servers = list(_SERVER.finditer(config))
    if not servers or _LISTEN.search(config) is None:
        raise AssertionError("the README's nginx block has no upstream servers or no listen 443")
    first = servers[0]
    lines = "".join(
        f"{first['indent']}server 127.0.0.1:{port}{first['params']}"
        f"{' down' if port in down else ''};\n"
        for port in ports
    )
    config = _SERVER.sub("", config)
    config = config[: first.start()] + lines + config[first.start() :]
    config = _LISTEN.sub(rf"\g<indent>listen 127.0.0.1:{listen};", config)
    return _TLS.sub("", config)


class Nginx:
    """nginx running ``config`` (an ``http`` block's content) from ``folder``.

    Example:
        >>> proxy = Nginx(for_test(readme_config(), [8000, 8001], 8080), tmp)  # doctest: +SKIP
        >>> proxy.start(); httpx.get(proxy.url + "/healthz"); proxy.stop()  # doctest: +SKIP
    """

    def __init__(self, config: str, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.conf = folder / "nginx.conf"
        self._write(config)
        self.process: subprocess.Popen[bytes] | None = None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [NGINX, "-p", str(self.folder), "-e", str(self.folder / "error.log")]
        return subprocess.run(
            [*argv, "-c", str(self.conf), *args], capture_output=True, text=True, check=False
        )

    def _write(self, config: str) -> None:
        # Started by root, nginx would run its workers as `nobody`, who cannot write here.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(_WRAPPER.format(user=user, folder=self.folder, config=config))

    def reload(self, config: str) -> None:
        """Run ``config`` from now on (``nginx -s reload``: requests under way finish)."""
        self._write(config)
        done = self._run("-s", "reload")
        if done.returncode != 0:
            raise AssertionError(f"nginx -s reload failed:\n{done.stderr}")

    def start(self) -> None:
        """Check the configuration (``nginx -t``), start nginx and wait until it answers."""
        checked = self._run("-t")
        if checked.returncode != 0:
            raise AssertionError(f"nginx -t refused the configuration:\n{checked.stderr}")
        argv = [NGINX, "-p", str(self.folder), "-e", str(self.folder / "error.log")]
        self.process = subprocess.Popen([*argv, "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited:\n{self.errors()}")
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not answer:\n{self.errors()}")

    def errors(self) -> str:
        log = self.folder / "error.log"
        return log.read_text() if log.exists() else ""

    def requests(self) -> list[list[str]]:
        """The access log: ``[method, path, status, upstream addresses, their statuses]``."""
        log = self.folder / "access.log"
        return [line.split(" ", 4) for line in log.read_text().splitlines()] if log.exists() else []

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: let requests finish
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_ports(count: int) -> list[int]:
    """``count`` different free ports of 127.0.0.1."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)
