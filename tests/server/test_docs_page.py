"""The API docs at ``/docs`` in a real browser with no network: Swagger UI from the package's
own files, under a strict Content-Security-Policy, and no request leaving loopback.

The browser (Debian's headless Chromium) and service fixtures are those of the page tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.server.conftest import Service
from tests.server.test_page import browser, playwright  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class Offline:
    """A browser page whose requests beyond loopback are refused (and remembered)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requested: list[str] = []
        self.left_loopback: list[str] = []
        self.console_errors: list[str] = []
        page.route("**/*", self._route)
        page.on("request", lambda request: self.requested.append(request.url))
        page.on(
            "console",
            lambda message: (
                self.console_errors.append(message.text) if message.type == "error" else None
            ),
        )
        # Anything the page's policy blocks (an inline script, a style, a request elsewhere).
        page.add_init_script(
            "window.violations = [];"
            "document.addEventListener('securitypolicyviolation', e => window.violations.push("
            "e.violatedDirective + ' ' + e.blockedURI));"
        )

    def _route(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.left_loopback.append(url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline(browser: Browser, service: Service) -> Iterator[Offline]:  # noqa: F811
    context = browser.new_context(base_url=service.url)
    context.set_default_timeout(30_000)
    yield Offline(context.new_page())
    context.close()


def test_the_docs_render_every_operation_offline(offline: Offline, service: Service) -> None:
    page = offline.page
    page.goto("/docs")

    paths = httpx.get(f"{service.url}/openapi.json").json()["paths"]
    operations = page.locator(".opblock")
    expect(operations.first).to_be_visible()
    expect(operations).to_have_count(sum(len(methods) for methods in paths.values()))
    shown = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/v1/chat/completions", "/v1/sessions/{session_id}/messages"} <= {
        text.replace("\u200b", "") for text in shown
    }
    expect(page.locator(".info .title")).to_contain_text("chatchain")

    assert offline.left_loopback == []
    assert all(urlsplit(url).hostname in LOOPBACK for url in offline.requested)
    assert page.evaluate("window.violations") == []
    assert offline.console_errors == []


def test_an_operation_can_be_tried_from_the_docs(offline: Offline, service: Service) -> None:
    page = offline.page
    page.goto("/docs")
    health = page.locator(".opblock", has_text="/healthz").first
    health.locator(".opblock-summary").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()

    expect(health.locator(".live-responses-table .response .response-col_status")).to_have_text(
        "200"
    )
    assert offline.left_loopback == []
    assert page.evaluate("window.violations") == []


def test_the_docs_are_served_under_a_strict_policy(service: Service) -> None:
    response = httpx.get(f"{service.url}/docs")
    assert response.status_code == 200
    policy = dict(
        directive.split(" ", 1)
        for directive in response.headers["content-security-policy"].split("; ")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"  # no inline script, no CDN
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "<script>" not in response.text  # every script is a file of this origin
    assert "http" not in response.text  # nothing from elsewhere
    assert httpx.get(f"{service.url}/redoc").status_code == 404  # FastAPI's, from a CDN
