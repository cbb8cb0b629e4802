"""Spend against a user's USD cap under attack: what chatchain recorded vs what the endpoint billed.

Starts `chatchain.testing.OpenAITestServer` in this process (it counts what it bills) and
``chatchain serve --workers 2`` over a SQLite file in a temporary folder, adds one user with a
daily USD cap, prices the model ($0.001 a token both ways, ``CHATCHAIN_PRICES``), then sends
requests from 40 concurrent clients, half on the native route and half on the OpenAI route
(stateless), 5 each whether refused or not, and prints the spend chatchain recorded,
what the test server billed, and the cap. Everything is on 127.0.0.1; each scenario takes
some seconds (most of it starting the service).

Scenarios (issue 18):

- ``cut``: item 1, a cap 9.5 reply tokens above a short prompt ($0.0265 in the reported
  attack, with the token counting of then) and ``CHATCHAIN_MAX_TOKENS=10``, prompts lengthened a
  character at a time (against a user whose cap pays for nothing, reading the refusals) until
  a turn cannot hold 10 reply tokens but exactly 9.
- ``english``: item 2, English prompts, ``CHATCHAIN_MAX_TOKENS=50``, a $0.50 cap.
- ``cjk``: item 2, CJK prompts, same settings, with the test server's own billing of CJK text.
- ``ignore``: item 3, an endpoint that ignores ``max_tokens`` (2,000-token replies),
  ``CHATCHAIN_MAX_TOKENS=50``, a $0.50 cap.

``--service-python`` runs the service from another checkout (its virtual environment's
python), so that the same harness measures before and after a change::

    .venv/bin/python benchmarks/attack_caps.py                                   # this checkout
    .venv/bin/python benchmarks/attack_caps.py --service-python ../base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from chatchain.stores import open_store
from chatchain.testing import Fault, OpenAITestServer, echo_reply
from chatchain.testing._stores import free_port
from chatchain.usage import UsageLedger
from chatchain.users import Users

PRICE = 1000.0  # USD per million tokens, prompt and reply: $0.001 a token
MODEL = "gpt-4o-mini"
REQUESTS = 40  # concurrent clients
ROUNDS = 5  # requests per client, refused or not
PAUSE = 0.05  # seconds between a client's requests
LONG_REPLY = "lorem ipsum " * 665  # about 2,000 tokens by the test server's count
CHUNK_INTERVAL = 0.005  # seconds between streamed chunks: 200 a second, a fast model


@dataclass(frozen=True)
class Scenario:
    name: str
    cap_usd: float
    max_tokens: int
    prompts: Callable[[int], str]
    reply: Callable[[list[dict[str, Any]]], str] = echo_reply
    ignore_max_tokens: bool = False


def _english(i: int) -> str:
    return f"Request {i}: please summarise the plot of a long novel about the sea and a whale."


def _cjk(i: int) -> str:
    text = f"请求{i}：请详细总结一部关于大海和鲸鱼的长篇小说的情节，包括人物、主题和结局。"  # noqa: RUF001
    return text * 3


SCENARIOS = {
    # Prompts sized by `fit_nine`; replies long enough that every one is cut to 9 tokens.
    "cut": Scenario("cut", 0.0265, 10, lambda i: "hi", reply=lambda m: LONG_REPLY),
    "english": Scenario("english", 0.50, 50, _english),
    "cjk": Scenario("cjk", 0.50, 50, _cjk),
    "ignore": Scenario(
        "ignore", 0.50, 50, _english, reply=lambda m: LONG_REPLY, ignore_max_tokens=True
    ),
}


def _env(endpoint: OpenAITestServer, scenario: Scenario) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATCHAIN_"))}
    clean.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {
        **clean,
        "OPENAI_API_KEY": "sk-attack-0123456789abcdef",
        "OPENAI_BASE_URL": endpoint.base_url,
        "OPENAI_MODEL": MODEL,
        "CHATCHAIN_PRICES": json.dumps({MODEL: {"input": PRICE, "output": PRICE}}),
        "CHATCHAIN_MAX_TOKENS": str(scenario.max_tokens),
        "CHATCHAIN_MAX_RETRIES": "0",
        "CHATCHAIN_SUMMARIZE": "false",
        "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "0",
        "CHATCHAIN_SERVER_STREAMS_PER_USER": "100",
    }


@contextmanager
def service(python: str, store_url: str, env: dict[str, str], folder: Path) -> Iterator[str]:
    port = free_port()
    argv = [python, "-m", "chatchain", "serve", "--port", str(port), "--workers", "2"]
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(
        [*argv, "--store", store_url], env=env, cwd=folder, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a busy machine takes its time
        while True:
            if process.poll() is not None:
                raise RuntimeError((folder / "serve.log").read_text())
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chatchain serve did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def add_user(store_url: str, name: str, cap: float) -> str:
    """A user with a daily cap (as ``chatchain users add --daily-usd`` adds them)."""
    with closing(open_store(store_url)) as store:
        return Users(store).add(name, daily_usd=cap)


def recorded(store_url: str) -> dict[str, Any]:
    """What the attacker's turns recorded in the ledger."""
    with closing(open_store(store_url)) as store:
        entries = UsageLedger(store).entries(user_id="attacker")
    return {
        "entries": len(entries),
        "tokens": sum(e.total_tokens for e in entries),
        "usd": sum(e.cost_usd or 0.0 for e in entries),
    }


def _post(client: httpx.Client, route: str, session: str, text: str) -> httpx.Response:
    if route == "native":
        return client.post(f"/v1/sessions/{session}/messages", json={"text": text})
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", json=body)


def held_prompt(client: httpx.Client, route: str, text: str) -> int:
    """The prompt tokens the service holds for ``text`` on ``route``, read from a refusal
    (a user whose cap pays for nothing: the turn needs its prompt and one reply token)."""
    answer = _post(client, route, "probe", text)
    needed = re.search(r"needs at least \$([0-9]+\.[0-9]+)", answer.text)
    if needed is None:
        raise RuntimeError(f"no refusal to read: {answer.status_code} {answer.text}")
    return round(float(needed.group(1)) * 1e6 / PRICE) - 1


def fit_nine(url: str, probe_token: str, store_url: str) -> tuple[dict[str, str], float]:
    """Per route, a prompt whose turn cannot hold 10 reply tokens under the cap but exactly 9,
    found as the attacker did: by lengthening the prompt a token at a time; and that cap.

    The reported attack's cap ($0.0265) left 17 prompt tokens, fewer than an exact count of the
    shortest prompt: the cap is set from the probe instead, 3 tokens above it (and then set as
    the attacker's daily cap), so that the same cut happens whatever the counter."""
    prompts: dict[str, str] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {probe_token}"}) as c:
        target = max(held_prompt(c, route, "hi") for route in ("native", "openai")) + 3
        cap = (target + 9.5) * PRICE / 1e6  # prompt + 9 fits, prompt + 10 does not
        for route in ("native", "openai"):
            text = "hi"
            while held_prompt(c, route, text) < target - 1:
                text += " x"
            # The last token: an exact tokenizer merges some characters into the token
            # before them, so try a few endings until one adds exactly one token.
            for extra in ("", "x", " y", "!", " 1", " the", " z"):
                if held_prompt(c, route, text + extra) == target:
                    prompts[route] = text + extra
                    break
            else:
                raise RuntimeError(f"{route}: no prompt holds exactly {target} tokens")
    with closing(open_store(store_url)) as store:
        Users(store).set_caps("attacker", daily_usd=cap)
    return prompts, cap


def attack(url: str, token: str, prompts: Callable[[int], str]) -> dict[str, int]:
    """40 concurrent clients, even ones on the native route, odd ones on the OpenAI route,
    each sending `ROUNDS` requests, refused or not, as an attacker would keep trying."""
    headers = {"Authorization": f"Bearer {token}"}

    def one(i: int) -> list[int | str]:
        route = "native" if i % 2 == 0 else "openai"
        statuses = []
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            for round_ in range(ROUNDS):
                try:
                    status: int | str = _post(
                        client, route, f"s{i}-{round_}", prompts(i)
                    ).status_code
                except httpx.TransportError as exc:  # counted, not fatal: the figures still hold
                    status = type(exc).__name__
                statuses.append(status)
                time.sleep(PAUSE)
        return statuses

    with ThreadPoolExecutor(REQUESTS) as pool:
        statuses = [s for mine in pool.map(one, range(REQUESTS)) for s in mine]
    return {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)}


def settled(endpoint: OpenAITestServer) -> dict[str, int]:
    """What the endpoint billed, once its streams have all ended (the count stops moving)."""
    last, still = endpoint.billed, 0
    while still < 5:
        time.sleep(0.1)
        now = endpoint.billed
        still = still + 1 if now == last else 0
        last = now
    return last


def run(python: str, scenario: Scenario) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        OpenAITestServer(reply=scenario.reply, chunk_interval=CHUNK_INTERVAL) as endpoint,
    ):
        folder = Path(tmp)
        if scenario.ignore_max_tokens:
            endpoint.add_fault(Fault(ignore_max_tokens=True, times=sys.maxsize))
        store_url = f"sqlite:///{folder / 'chat.db'}"
        env = _env(endpoint, scenario)
        token = add_user(store_url, "attacker", scenario.cap_usd)
        cap = scenario.cap_usd
        with service(python, store_url, env, folder) as url:
            prompts = scenario.prompts
            if scenario.name == "cut":
                sized, cap = fit_nine(url, add_user(store_url, "probe", 1e-6), store_url)
                prompts = lambda i: sized["native" if i % 2 == 0 else "openai"]  # noqa: E731
            statuses = attack(url, token, prompts)
            billed = settled(endpoint)
        spent = recorded(store_url)
    billed_usd = (billed["prompt_tokens"] + billed["completion_tokens"]) * PRICE / 1e6
    return {
        "scenario": scenario.name,
        "cap_usd": cap,
        "statuses": statuses,
        "recorded": spent,
        "billed": {**billed, "usd": billed_usd},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--service-python",
        default=sys.executable,
        help="python of the checkout whose `chatchain serve` is attacked (default: this one)",
    )
    parser.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="default: all four"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = []
    print(
        f"service: {args.service_python}; {REQUESTS} concurrent clients, {ROUNDS} requests "
        "each, $0.001 a token"
    )
    print(
        f"{'scenario':<9} {'cap':>8} {'recorded':>10} {'billed':>10} {'over cap':>9}  "
        "entries/calls  statuses"
    )
    for name in args.scenario or list(SCENARIOS):
        result = run(args.service_python, SCENARIOS[name])
        results.append(result)
        spent, billed = result["recorded"], result["billed"]
        over = billed["usd"] / result["cap_usd"]
        calls = f"{spent['entries']:>3}/{billed['requests']:<3}"
        print(
            f"{name:<9} ${result['cap_usd']:>7.4f} ${spent['usd']:>9.4f} "
            f"${billed['usd']:>9.4f} {over:>8.2f}x  {calls}        {result['statuses']}",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
