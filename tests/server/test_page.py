"""The chat page in a real browser: headless Debian Chromium driven by Playwright, against a
real ``chatchain serve`` (uvicorn) over loopback and the package's OpenAI-compatible test
server.

Chromium comes from Debian (``bash .ci/services`` installs it, as ``make test`` does); the
tests fail, not skip, when it is missing. Playwright never downloads a browser here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, Playwright, expect, sync_playwright

from chatchain.stores import open_store
from chatchain.testing import Fault, OpenAITestServer, ScriptedCall
from chatchain.users import Users
from tests.server.conftest import Service, start_service

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# What Chromium needs here: no sandbox as root in CI, and none of its background connections
# to Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USAGE_LINE = re.compile(r"^\d+ tokens \(\d+ prompt \+ \d+ completion\), ")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Debian's headless Chromium, with a fresh profile (Playwright makes one per launch)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the page tests need Debian's chromium. Install it with "
            "`bash .ci/services` (as `make test` does) or `apt-get install -y chromium`."
        )
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    """A page in a browser context of its own (its own sessionStorage), at the service."""
    context = browser.new_context(base_url=service.url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    context.close()


def sign_in(page: Page, token: str, path: str = "/") -> None:
    page.goto(path)
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_label("Message")).to_be_visible()


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")


def last_reply(page: Page) -> str:
    return page.locator(".message.assistant .body").last.inner_text()


def wait_for_reply(page: Page) -> None:
    """Until the last reply has its usage line (the stream's `usage` event came)."""
    usage = page.locator(".message.assistant").last.locator(".usage")
    expect(usage).to_be_visible(timeout=30_000)  # a loaded machine, a reply that pauses


def wait_for_stored(service: Service, token: str, session_id: str, count: int) -> list[dict]:
    """The session's messages once the service holds ``count`` of them (a stopped stream's
    partial reply is saved as the service notices the client left)."""
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}) as api:
        deadline = time.monotonic() + 30
        while True:
            response = api.get(f"/v1/sessions/{session_id}/messages")
            if response.status_code == 200 and len(response.json()["messages"]) >= count:
                return response.json()["messages"]
            assert time.monotonic() < deadline, response.text
            time.sleep(0.1)


def current_session(page: Page) -> str:
    """The open session's id (the URL's fragment)."""
    return str(page.evaluate("decodeURIComponent(location.hash.slice(1))"))


def test_the_page_is_served_with_a_strict_content_security_policy(service: Service) -> None:
    response = httpx.get(f"{service.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "Access token" in response.text
    for asset in ("app.js", "style.css", "vendor/dompurify/purify.es.js"):
        assert httpx.get(f"{service.url}/static/{asset}").status_code == 200


def test_sign_in_send_and_watch_the_reply_stream(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    # Two words, then a pause of two seconds (keep-alive comments), then the rest: the page
    # must show the first words before the rest exists.
    endpoint.add_fault(Fault(keep_alive=2.0, stall_after=2, interval=0.1))
    sign_in(page, user[1])
    page.evaluate(
        """() => {
          window.seen = [];
          new MutationObserver(() => {
            const bodies = document.querySelectorAll('.message.assistant .body');
            const text = bodies.length ? bodies[bodies.length - 1].textContent : '';
            if (text && text !== window.seen.at(-1)) window.seen.push(text);
          }).observe(document.getElementById('transcript'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )
    box = page.get_by_label("Message")
    box.fill("streaming to the page")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("word by word")
    expect(page.locator(".message")).to_have_count(0)
    box.press("Enter")

    wait_for_reply(page)
    assert page.locator(".message.user .body").inner_text() == (
        "streaming to the page\nword by word"
    )
    final = "Echo: streaming to the page\nword by word"
    assert last_reply(page) == final
    # Every text the reply showed, in order (textContent: the rendered <br> adds nothing).
    seen = [text.strip() for text in page.evaluate("window.seen")]
    flat = final.replace("\n", "")
    assert seen[-1] == flat
    # The first words before the pause, then the rest (pieces that come within a few ms of
    # each other go out as one event, so the rest may come at once).
    assert len(seen) >= 2, seen
    assert "Echo: streaming" in seen, seen  # shown while the reply paused
    assert all(flat.startswith(text) for text in seen), seen
    usage = page.locator(".message.assistant .usage").inner_text()
    assert USAGE_LINE.match(usage), usage
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    expect(page.locator("#session-list li")).to_have_count(1)


def test_stop_keeps_the_partial_reply_which_shows_interrupted_after_a_reload(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    # Three words, then nothing but keep-alive comments for a minute: stopped long before.
    endpoint.add_fault(Fault(keep_alive=60.0, stall_after=3, interval=0.2))
    sign_in(page, user[1])
    send(page, "one two three four five")
    reply = page.locator(".message.assistant").last
    expect(reply.locator(".body")).to_have_text("Echo: one two")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_enabled()
    stop.click()
    expect(reply.locator(".badge")).to_have_text("interrupted: stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    session_id = current_session(page)
    stored = wait_for_stored(service, user[1], session_id, 2)
    assert stored[1] == {"role": "assistant", "text": "Echo: one two", "interrupted": True}
    page.reload()
    reply = page.locator(".message.assistant")
    expect(reply).to_have_count(1)
    expect(reply.locator(".body")).to_have_text("Echo: one two")
    expect(reply.locator(".badge")).to_have_text("interrupted")
    expect(page.locator(".message.user .body")).to_have_text("one two three four five")


def test_reload_shows_the_history_and_sessions_switch_and_delete(
    page: Page, service: Service, user: tuple[str, str]
) -> None:
    sign_in(page, user[1])
    send(page, "the first session")
    wait_for_reply(page)
    first = current_session(page)
    page.get_by_role("button", name="New session").click()
    expect(page.locator(".message")).to_have_count(0)
    send(page, "the second session")
    wait_for_reply(page)
    second = current_session(page)
    assert first != second

    page.reload()  # still signed in (the tab's sessionStorage), in the same session
    expect(page.locator("#session-title")).to_have_text("the second session")
    assert current_session(page) == second
    expect(page.locator(".message .body")).to_have_text(
        ["the second session", "Echo: the second session"]
    )
    sessions = page.locator("#session-list .open .name")
    expect(sessions).to_have_text(["the second session", "the first session"])  # newest first

    page.locator("#session-list .open", has_text="the first session").click()
    expect(page.locator(".message .body")).to_have_text(
        ["the first session", "Echo: the first session"]
    )

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete session the first session").click()
    expect(sessions).to_have_text(["the second session"])
    expect(page.locator("#session-title")).to_have_text("the second session")
    assert current_session(page) == second
    with service.client(user[1]) as api:
        assert api.get(f"/v1/sessions/{first}/messages").status_code == 404


def test_declining_the_delete_keeps_the_session(
    page: Page, service: Service, user: tuple[str, str]
) -> None:
    sign_in(page, user[1])
    send(page, "keep me")
    wait_for_reply(page)
    asked: list[str] = []

    def decline(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", decline)
    page.get_by_role("button", name="Delete session keep me").click()
    expect(page.locator("#session-list li")).to_have_count(1)
    assert asked == ["Delete session keep me and its messages?"]


def test_another_users_session_is_refused(
    page: Page, service: Service, user: tuple[str, str], other: tuple[str, str]
) -> None:
    with service.client(user[1]) as api:
        answer = api.post("/v1/sessions/secret-plans/messages", json={"text": "my secret"})
        assert answer.status_code == 200

    sign_in(page, other[1], "/#secret-plans")
    error = page.get_by_role("alert")
    expect(error).to_contain_text("There is no session 'secret-plans' among yours")
    expect(error).to_contain_text("HTTP 404")
    expect(error).not_to_contain_text("GET /v1/sessions")  # API advice is not for people
    expect(page.locator("#session-list .open .name")).not_to_have_text(["secret-plans"])
    assert current_session(page) != "secret-plans"
    assert "my secret" not in page.content()

    # Writing to that id makes the other user's own session, not a way into the first's.
    send(page, "mine now")
    wait_for_reply(page)
    with service.client(user[1]) as api:
        messages = api.get("/v1/sessions/secret-plans/messages").json()["messages"]
    assert [m["text"] for m in messages] == ["my secret", "Echo: my secret"]


def test_markup_in_a_reply_is_shown_as_text_and_never_run(
    page: Page, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    attack = (
        '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>\n\n'
        "**bold** and [a link](javascript:window.pwned=3) and ![pic](/static/style.css?leak)"
    )
    endpoint.queue_replies(attack)
    sign_in(page, user[1])
    send(page, '<img src=y onerror="window.pwned=4">')
    wait_for_reply(page)

    transcript = page.locator("#transcript")
    for tag in ("img", "script", "iframe", "[onerror]", "a[href^='javascript']"):
        expect(transcript.locator(tag)).to_have_count(0)
    assert page.evaluate("window.pwned") is None
    reply = last_reply(page)
    assert '<img src=x onerror="window.pwned=1">' in reply
    assert "<script>window.pwned=2</script>" in reply
    expect(transcript.locator(".message.assistant strong")).to_have_text("bold")
    links = transcript.locator(".message.assistant a")
    expect(links).to_have_text(["a link", "pic"])
    expect(links.last).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(page.locator(".message.user .body")).to_have_text('<img src=y onerror="window.pwned=4">')


def test_a_bad_token_shows_the_sign_in_error(page: Page, user: tuple[str, str]) -> None:
    page.goto("/")
    page.get_by_label("Access token").fill("cc_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    error = page.locator("#signin-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("That token was refused")
    expect(page.get_by_label("Message")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, user[1])  # the right token then works
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def test_a_revoked_token_returns_to_sign_in_and_sign_out_forgets_it(
    page: Page, service: Service, user: tuple[str, str], other: tuple[str, str]
) -> None:
    sign_in(page, user[1])
    with closing(open_store(service.store_url)) as store:
        Users(store).revoke(user[0])
    send(page, "anyone there?")
    error = page.locator("#signin-error")
    expect(error).to_contain_text("Your token was refused")
    expect(page.get_by_label("Access token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, other[1])
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Access token")).to_be_visible()
    page.reload()
    expect(page.get_by_label("Access token")).to_be_visible()  # the token is gone
    expect(page.locator("#signin-error")).to_be_hidden()


@pytest.fixture(scope="module")
def strict_service(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service whose users may spend 1 token each and make 4 requests a minute."""
    folder = tmp_path_factory.mktemp("strict")
    env = {
        "CHATCHAIN_MAX_RETRIES": "0",
        "CHATCHAIN_BUDGET_USER_TOKENS": "1",
        "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "4",
    }
    running = start_service(f"sqlite:///{folder / 'chat.db'}", endpoint, folder, env=env)
    yield running
    running.stop()


def test_refusals_show_the_servers_message_and_keep_the_text(
    browser: Browser, strict_service: Service
) -> None:
    _, token = strict_service.add_user()
    context = browser.new_context(base_url=strict_service.url)
    page = context.new_page()
    sign_in(page, token)  # requests 1 and 2 of the minute (the sessions, the header)
    send(page, "over budget")  # 3
    error = page.get_by_role("alert")
    expect(error).to_contain_text("HTTP 402 BudgetExceeded")
    expect(error).to_contain_text("Budget exceeded: the cap for user")
    expect(page.get_by_label("Message")).to_have_value("over budget")
    expect(page.locator(".message")).to_have_count(0)  # nothing was stored, nothing shows
    page.get_by_role("button", name="Dismiss the error").click()
    expect(error).to_be_hidden()

    page.get_by_label("Message").press("Enter")  # 4
    expect(error).to_contain_text("HTTP 402")
    page.get_by_label("Message").press("Enter")  # 5: over the requests per minute
    expect(error).to_contain_text(
        re.compile(
            r"You have sent more requests than this server allows for now\. "
            r"Try again in \d+ s\. \(HTTP 429 TooManyRequests\)"
        )
    )
    expect(error).not_to_contain_text("CHATCHAIN_")
    context.close()


def test_an_endpoint_failure_is_worded_for_the_person_and_logged_for_the_operator(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    sign_in(page, user[1])
    endpoint.add_fault(Fault(status=500))
    send(page, "endpoint down")
    error = page.get_by_role("alert")
    expect(error).to_contain_text("The assistant could not answer just now. Try again")
    expect(error).to_contain_text(re.compile(r"\(HTTP 50\d \w+\)"))
    expect(error).not_to_contain_text("CHATCHAIN_")  # the operator's settings stay in the log
    expect(page.get_by_label("Message")).to_have_value("endpoint down")
    expect(page.locator(".message")).to_have_count(0)
    log = service.log.read_text()
    assert f"A turn of user {user[0]} failed: ServerError: " in log


GATED_TOOLS = '''
import time
from pathlib import Path

GATE = Path({gate!r})


def slow_weather(city: str) -> str:
    """The weather in a city today (waits until the test opens the gate)."""
    deadline = time.monotonic() + 60
    while not GATE.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"Sunny in {{city}}"


def broken_weather(city: str) -> str:
    """Fails, on purpose."""
    raise RuntimeError("<b>no</b> weather today")


TOOLS = [slow_weather, broken_weather]
'''


@pytest.fixture(scope="module")
def tool_service(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path]]:
    """``chatchain serve --tools`` whose ``slow_weather`` runs until the gate file exists."""
    folder = tmp_path_factory.mktemp("page-tools")
    gate = folder / "gate"
    module = folder / "gated_tools.py"
    module.write_text(GATED_TOOLS.format(gate=str(gate)))
    running = start_service(
        f"sqlite:///{folder / 'chat.db'}", endpoint, folder, args=["--tools", str(module)]
    )
    yield running, gate
    running.stop()


def test_tool_calls_show_as_lines_while_streaming_and_after_a_reload(
    browser: Browser, tool_service: tuple[Service, Path], endpoint: OpenAITestServer
) -> None:
    service, gate = tool_service
    endpoint.queue_tool_calls(
        ScriptedCall("slow_weather", {"city": "Oslo"}, id="call_1"),
        ScriptedCall("broken_weather", {"city": "<i>Bergen</i>"}, id="call_2"),
    )
    endpoint.queue_replies("Sunny in Oslo; no news from Bergen.")
    _, token = service.add_user()
    context = browser.new_context(base_url=service.url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        sign_in(page, token)
        send(page, "Weather?")
        reply = page.locator(".message.assistant").last
        running = reply.locator(".tools p", has_text="slow_weather")
        # The call has started and not finished (the tool waits for the gate): the line is
        # there while the reply is still streaming.
        expect(running).to_have_text('tool slow_weather(city="Oslo") …')
        expect(reply).to_have_attribute("aria-busy", "true")
        gate.touch()
        wait_for_reply(page)
        lines = [
            'tool slow_weather(city="Oslo") ok',
            'tool broken_weather(city="<i>Bergen</i>") error: '
            "RuntimeError: <b>no</b> weather today",
        ]
        expect(reply.locator(".tools p")).to_have_text(lines)
        assert last_reply(page) == "Sunny in Oslo; no news from Bergen."
        expect(reply.locator(".tools i, .tools b")).to_have_count(0)  # text, never markup

        page.reload()
        reply = page.locator(".message.assistant")
        expect(reply).to_have_count(1)
        expect(reply.locator(".tools p")).to_have_text(lines)
        expect(reply.locator(".body")).to_have_text("Sunny in Oslo; no news from Bergen.")
        expect(reply.locator(".tools i, .tools b")).to_have_count(0)
    finally:
        context.close()


# --- The page people choose to use (issue 22) -------------------------------------------


def test_a_favicon_and_no_missing_file(page: Page, user: tuple[str, str]) -> None:
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
    sign_in(page, user[1])
    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert icon is not None
    answer = page.request.get(icon)
    assert answer.status == 200 and answer.headers["content-type"].startswith("image/svg")
    page.wait_for_load_state("networkidle")
    assert missing == []


def test_a_new_user_is_invited_and_the_session_is_titled_by_its_first_message(
    page: Page, service: Service, user: tuple[str, str]
) -> None:
    sign_in(page, user[1])
    empty = page.locator("#empty")
    expect(empty).to_be_visible()
    expect(empty).to_contain_text("What would you like to talk about?")
    expect(page.locator("#session-title")).to_have_text("New chat")
    send(page, "Plan a trip to Oslo in May\nwith two children")
    expect(empty).to_be_hidden()
    wait_for_reply(page)

    title = "Plan a trip to Oslo in May with two children"
    names = page.locator("#session-list .open .name")
    expect(names).to_have_text([title])
    expect(page.locator("#session-title")).to_have_text(title)
    # The list shows a short date; hovering shows it whole, with the year and the seconds.
    meta = page.locator("#session-list .open small")
    full = meta.get_attribute("title") or ""
    assert full.startswith("Last message ") and str(time.gmtime().tm_year) in full, full
    assert re.search(r"\d:\d\d:\d\d", full), full


def test_a_session_is_renamed_and_keeps_its_title_after_a_reload(
    page: Page, service: Service, user: tuple[str, str]
) -> None:
    sign_in(page, user[1])
    send(page, "What should I pack for Oslo?")
    wait_for_reply(page)
    page.once("dialog", lambda dialog: dialog.accept("  Packing   list "))
    page.get_by_role("button", name="Rename session What should I pack for Oslo?").click()
    names = page.locator("#session-list .open .name")
    expect(names).to_have_text(["Packing list"])
    expect(page.locator("#session-title")).to_have_text("Packing list")

    page.reload()
    expect(names).to_have_text(["Packing list"])  # kept in the store, not in the page
    with service.client(user[1]) as api:
        listed = api.get("/v1/sessions").json()["sessions"]
    assert [s["title"] for s in listed] == ["Packing list"]

    page.once("dialog", lambda dialog: dialog.accept(""))  # empty: the first message again
    page.get_by_role("button", name="Rename session Packing list").click()
    expect(names).to_have_text(["What should I pack for Oslo?"])


def test_each_replys_usage_is_still_shown_after_a_reload(page: Page, user: tuple[str, str]) -> None:
    sign_in(page, user[1])
    send(page, "first")
    wait_for_reply(page)
    send(page, "second")
    expect(page.locator(".message.assistant .usage")).to_have_count(2)

    page.reload()
    usage = page.locator(".message.assistant .usage")
    expect(usage).to_have_count(2)
    for line in usage.all_inner_texts():
        assert re.match(r"^\d+ tokens \(\d+ prompt \+ \d+ completion\), \$\d", line), line


def test_a_reply_keeps_streaming_while_another_session_is_open(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    # Two words, then four seconds of keep-alive comments, then the rest.
    endpoint.add_fault(Fault(keep_alive=4.0, stall_after=2, interval=0.1))
    sign_in(page, user[1])
    send(page, "alpha beta gamma delta")
    first = current_session(page)
    expect(page.locator(".message.assistant .body")).to_have_text("Echo: alpha")

    page.get_by_role("button", name="New session").click()
    expect(page.locator(".message")).to_have_count(0)
    writing = page.locator("#session-list .open", has_text="alpha beta").locator(".writing")
    expect(writing).to_have_text("writing…")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()  # this session is free

    page.go_back()  # Back: to the session still writing, whose reply goes on
    assert current_session(page) == first
    wait_for_reply(page)
    expect(page.locator(".message.assistant .body")).to_have_text("Echo: alpha beta gamma delta")
    expect(page.locator(".message.assistant .badge")).to_have_count(0)
    expect(writing).to_have_count(0)
    stored = wait_for_stored(service, user[1], first, 2)
    assert stored[1]["interrupted"] is False


def test_a_reply_finishes_while_its_session_is_away(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    endpoint.add_fault(Fault(keep_alive=1.0, stall_after=2, interval=0.1))
    sign_in(page, user[1])
    send(page, "one two three")
    first = current_session(page)
    expect(page.locator(".message.assistant .body")).to_have_text("Echo: one")
    page.get_by_role("button", name="New session").click()
    writing = page.locator("#session-list .writing")
    expect(writing).to_have_count(1)
    expect(writing).to_have_count(0, timeout=30_000)  # it ended while away
    page.locator("#session-list .open", has_text="one two three").click()
    assert current_session(page) == first
    expect(page.locator(".message.assistant .body")).to_have_text("Echo: one two three")
    expect(page.locator(".message.assistant .badge")).to_have_count(0)
    expect(page.locator(".message.assistant .usage")).to_have_count(1)


def test_back_and_forward_move_between_sessions(page: Page, user: tuple[str, str]) -> None:
    sign_in(page, user[1])
    send(page, "in the first")
    wait_for_reply(page)
    first = current_session(page)
    page.get_by_role("button", name="New session").click()
    send(page, "in the second")
    wait_for_reply(page)
    second = current_session(page)
    bodies = page.locator(".message .body")

    page.go_back()
    expect(page.locator("#session-title")).to_have_text("in the first")
    expect(bodies).to_have_text(["in the first", "Echo: in the first"])
    assert current_session(page) == first
    page.go_forward()
    expect(page.locator("#session-title")).to_have_text("in the second")
    expect(bodies).to_have_text(["in the second", "Echo: in the second"])
    assert current_session(page) == second
    expect(page.get_by_label("Message")).to_be_visible()  # still in the app


def test_escape_stops_a_reply(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    endpoint.add_fault(Fault(keep_alive=60.0, stall_after=3, interval=0.2))
    sign_in(page, user[1])
    send(page, "one two three four five")
    reply = page.locator(".message.assistant").last
    expect(reply.locator(".body")).to_have_text("Echo: one two")
    page.keyboard.press("Escape")
    expect(reply.locator(".badge")).to_have_text("interrupted: stopped")
    stored = wait_for_stored(service, user[1], current_session(page), 2)
    assert stored[1]["interrupted"] is True


CODE_REPLY = """Here you are:

```python
def greet(name):
    return f"Hello {name}"
```

| city | weather |
| --- | --- |
| Oslo | sunny |
"""


def test_copy_buttons_highlighted_code_and_bordered_tables(
    browser: Browser, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    context = browser.new_context(base_url=service.url)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.url)
    page = context.new_page()
    try:
        endpoint.queue_replies(CODE_REPLY)
        sign_in(page, user[1])
        send(page, "a greeting in Python, and the weather")
        wait_for_reply(page)
        reply = page.locator(".message.assistant").last
        code = reply.locator("pre code")
        expect(code).to_have_class(re.compile(r"\bhljs\b"))
        expect(code.locator(".hljs-keyword").first).to_have_text("def")
        cell = reply.locator("td").first
        assert cell.evaluate("c => getComputedStyle(c).borderTopStyle") == "solid"

        reply.get_by_role("button", name="Copy code").click()
        expect(reply.get_by_role("button", name="Copied")).to_be_visible()
        clipboard = page.evaluate("navigator.clipboard.readText()")
        assert clipboard == 'def greet(name):\n    return f"Hello {name}"\n'
        reply.get_by_role("button", name="Copy", exact=True).click()
        expect(reply.locator("footer").get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == CODE_REPLY
    finally:
        context.close()


def test_the_header_shows_the_model_and_the_budget_left(
    page: Page, service: Service, user: tuple[str, str]
) -> None:
    _, capped = service.add_user(daily_usd=1.0)
    sign_in(page, capped)
    expect(page.locator("#model")).to_have_text("gpt-4o-mini")
    budget = page.locator("#budget")
    expect(budget).to_have_text("$1.00 left of your daily cap of $1.00 ($0.00 spent)")
    send(page, "spend a little")
    wait_for_reply(page)
    # A few millionths of a dollar spent: shown as they are, never as $0.0000 or 2e-06.
    expect(budget).to_have_text(
        re.compile(r"^\$0\.99 left of your daily cap of \$1\.00 \(\$0\.00000\d{2} spent\)$")
    )
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, user[1])  # no cap: no budget shown
    expect(page.locator("#model")).to_have_text("gpt-4o-mini")
    expect(page.locator("#budget")).to_be_hidden()


def test_on_a_phone_the_chat_fills_the_screen_and_the_sessions_are_a_drawer(
    browser: Browser, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    context = browser.new_context(
        base_url=service.url, viewport={"width": 390, "height": 844}, is_mobile=True
    )
    page = context.new_page()
    try:
        endpoint.queue_replies("A long line of code:\n\n```\n" + "x = 1; " * 40 + "\n```")
        sign_in(page, user[1])
        send(page, "from my phone")
        wait_for_reply(page)
        # Nothing is wider than the screen: long code scrolls inside its block.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        expect(page.get_by_role("button", name="Sign out")).to_be_in_viewport()
        sessions = page.locator("#sessions")
        expect(sessions).to_be_hidden()
        transcript = page.locator("#transcript").bounding_box()
        assert transcript is not None and transcript["y"] < 844 * 0.25, transcript
        box = page.get_by_label("Message").bounding_box()
        assert box is not None and box["y"] + box["height"] <= 844, box

        menu = page.get_by_role("button", name="Sessions")
        menu.click()
        expect(sessions).to_be_visible()
        expect(menu).to_have_attribute("aria-expanded", "true")
        page.get_by_role("button", name="New session").click()
        expect(sessions).to_be_hidden()  # choosing closes the drawer
        menu.click()
        page.locator("#session-list .open", has_text="from my phone").click()
        expect(sessions).to_be_hidden()
        expect(page.locator(".message.user .body")).to_have_text("from my phone")
        menu.click()
        page.keyboard.press("Escape")
        expect(sessions).to_be_hidden()
    finally:
        context.close()


def test_regenerate_the_last_reply_and_edit_the_last_message(
    page: Page, service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    sign_in(page, user[1])
    send(page, "first")
    wait_for_reply(page)
    endpoint.queue_replies("A first try.", "A second try.")
    send(page, "tell me something")
    expect(page.locator(".message.assistant .body").last).to_have_text("A first try.")
    wait_for_reply(page)
    regenerate = page.get_by_role("button", name="Regenerate")
    expect(regenerate).to_have_count(1)  # under the last reply only

    regenerate.click()
    bodies = page.locator(".message .body")
    expect(bodies).to_have_text(["first", "Echo: first", "tell me something", "A second try."])
    wait_for_reply(page)
    session = current_session(page)
    stored = wait_for_stored(service, user[1], session, 4)
    assert [m["text"] for m in stored] == [
        "first",
        "Echo: first",
        "tell me something",
        "A second try.",
    ]

    page.get_by_role("button", name="Edit").click()
    box = page.get_by_label("Message")
    expect(box).to_have_value("tell me something")
    expect(page.locator("#composer-help")).to_contain_text("Editing your last message")
    box.fill("tell me something else")
    box.press("Enter")
    expect(bodies).to_have_text(
        ["first", "Echo: first", "tell me something else", "Echo: tell me something else"]
    )
    wait_for_reply(page)
    page.reload()
    expect(bodies).to_have_text(
        ["first", "Echo: first", "tell me something else", "Echo: tell me something else"]
    )
    with service.client(user[1]) as api:
        rows = api.get("/v1/usage").json()["rows"]
    assert sum(r["turns"] for r in rows if r["session"] == session) == 4  # replaced ones billed


def test_a_refused_regeneration_keeps_the_last_turn(
    page: Page, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    sign_in(page, user[1])
    send(page, "keep this")
    wait_for_reply(page)
    endpoint.add_fault(Fault(status=500))
    page.get_by_role("button", name="Regenerate").click()
    expect(page.get_by_role("alert")).to_contain_text("could not answer just now")
    bodies = page.locator(".message .body")
    expect(bodies).to_have_text(["keep this", "Echo: keep this"])
    page.reload()
    expect(bodies).to_have_text(["keep this", "Echo: keep this"])
