"""Screenshots of the chat page for the README, from a real run: docs/img/page-*.png.

Starts chatchain's OpenAI-compatible test server with scripted replies, a real
``chatchain serve`` over a SQLite file of a temporary folder, and Debian's headless Chromium
(Playwright), then chats as a person would and photographs the page at 1280x800 and on a
phone (390x844, with the session drawer closed and open). Everything runs on 127.0.0.1 and
takes about half a minute.

    .venv/bin/python docs/screenshots.py            # writes docs/img/page-*.png
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

from chatchain.stores import open_store
from chatchain.testing import OpenAITestServer
from chatchain.users import Users

IMG = Path(__file__).parent / "img"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]

REPLIES = [
    "Three days in Oslo in May, with two children:\n\n"
    "| Day | Morning | Afternoon |\n| --- | --- | --- |\n"
    "| 1 | Vigeland Park | The Opera House roof |\n"
    "| 2 | Fram Museum | Ferry to Hovedøya |\n"
    "| 3 | Holmenkollen ski jump | Frognerseteren for waffles |\n\n"
    "May 17 is Constitution Day: **book early**, and expect parades everywhere.",
    "Here is one way, with the standard library alone:\n\n"
    "```python\nfrom datetime import date\n\n\n"
    "def days_until(day: date) -> int:\n"
    '    """Days from today until `day` (negative once it has passed)."""\n'
    "    return (day - date.today()).days\n\n\n"
    'print(days_until(date(2027, 5, 17)), "days to go")\n```\n\n'
    "`date` subtraction gives a `timedelta`, whose `.days` is what you want.",
]


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(folder: Path, endpoint: OpenAITestServer) -> tuple[subprocess.Popen[bytes], str]:
    """A real ``chatchain serve`` on a free port of 127.0.0.1, once it answers /healthz."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATCHAIN_"))}
    env |= {
        "OPENAI_API_KEY": "sk-screenshots",
        "OPENAI_BASE_URL": endpoint.base_url,
        "OPENAI_MODEL": "gpt-4o-mini",
        "CHATCHAIN_SUMMARIZE": "false",
    }
    store = f"sqlite:///{folder / 'chat.db'}"
    argv = [sys.executable, "-m", "chatchain", "serve", "--port", str(port), "--store", store]
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"chatchain serve did not start: see {folder / 'serve.log'}")
        time.sleep(0.1)


def chat(page: Page, text: str) -> None:
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")
    usage = page.locator(".message.assistant").last.locator(".usage")
    expect(usage).to_be_visible(timeout=30_000)


def main() -> None:
    IMG.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, OpenAITestServer() as endpoint:
        folder = Path(tmp)
        process, url = serve(folder, endpoint)
        try:
            with closing(open_store(f"sqlite:///{folder / 'chat.db'}")) as store:
                token = Users(store).add("ann", daily_usd=1.0)
            with sync_playwright() as driver:
                browser = driver.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
                )
                desktop = browser.new_context(
                    base_url=url, viewport={"width": 1280, "height": 800}, color_scheme="light"
                )
                page = desktop.new_page()
                page.goto("/")
                page.get_by_label("Access token").fill(token)
                page.get_by_role("button", name="Sign in").click()
                expect(page.locator("#empty")).to_be_visible()
                expect(page.locator("#budget")).to_be_visible()
                page.screenshot(path=IMG / "page-empty.png")
                endpoint.queue_replies(*REPLIES)
                chat(page, "Plan three days in Oslo in May with two children")
                page.get_by_role("button", name="New session").click()
                chat(page, "How many days until a date, in Python?")
                page.mouse.move(0, 0)
                page.screenshot(path=IMG / "page-desktop.png")
                session = page.evaluate("location.hash")
                desktop.close()

                phone = browser.new_context(
                    base_url=url,
                    viewport={"width": 390, "height": 844},
                    is_mobile=True,
                    device_scale_factor=2,
                    color_scheme="light",
                )
                page = phone.new_page()
                page.goto(f"/{session}")
                page.get_by_label("Access token").fill(token)
                page.get_by_role("button", name="Sign in").click()
                expect(page.locator(".message.assistant .usage")).to_be_visible()
                page.screenshot(path=IMG / "page-phone.png")
                page.get_by_role("button", name="Sessions").click()
                expect(page.locator("#sessions")).to_be_visible()
                page.wait_for_timeout(400)  # the drawer's slide
                page.screenshot(path=IMG / "page-phone-drawer.png")
                phone.close()
                browser.close()
        finally:
            process.terminate()
            process.wait(20)
    for name in ("page-empty", "page-desktop", "page-phone", "page-phone-drawer"):
        print(IMG / f"{name}.png")


if __name__ == "__main__":
    main()
