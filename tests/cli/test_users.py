"""``chatchain users``: add, list, revoke, rotate and caps, against the store of --store."""

from __future__ import annotations

import re

import pytest

from chatchain.users import Users
from tests.cli.conftest import Chatchain, stable

TOKEN = re.compile(r"cc_[A-Za-z0-9_-]{43}")


def test_add_prints_the_token_alone_on_stdout(chatchain: Chatchain) -> None:
    result = chatchain("users", "add", "alice", "--daily-usd", "1.5", "--budget-usd", "10")
    assert result.exit_code == 0
    assert TOKEN.fullmatch(result.stdout.rstrip("\n")) and result.stdout.count("\n") == 1
    assert result.stderr == "Added user alice. Their token, shown this once:\n"
    token = result.stdout.strip()
    with chatchain.store() as store:
        user = Users(store).authenticate(token)
    assert user is not None
    assert (user.name, user.budget_usd, user.daily_usd, user.monthly_usd) == (
        "alice",
        10.0,
        1.5,
        None,
    )


def test_list_shows_users_and_caps_never_tokens(chatchain: Chatchain) -> None:
    assert chatchain("users", "list").output == (
        "No users yet: add one with chatchain users add NAME.\n"
    )
    token = chatchain("users", "add", "alice", "--daily-usd", "1").stdout.strip()
    chatchain("users", "add", "bob", "--monthly-usd", "0.125", "--budget-usd", "20")
    chatchain("users", "revoke", "bob")
    result = chatchain("users", "list")
    assert result.exit_code == 0
    assert stable(result.output).splitlines() == [
        "user   created           budget  daily  monthly  req/min  streams  status",
        "alice  DATE       -  $1.00        -  default  default  active",
        "bob    DATE  $20.00      -   $0.125  default  default  revoked",
    ]
    assert token not in result.output and token[3:13] not in result.output


def test_revoke_then_rotate(chatchain: Chatchain) -> None:
    old = chatchain("users", "add", "alice").stdout.strip()
    result = chatchain("users", "revoke", "alice")
    assert result.exit_code == 0
    assert result.stdout == (
        "Revoked alice's token. chatchain users rotate alice gives them a new one.\n"
    )
    with chatchain.store() as store:
        assert Users(store).authenticate(old) is None
    result = chatchain("users", "rotate", "alice")
    assert result.exit_code == 0
    new = result.stdout.strip()
    assert TOKEN.fullmatch(new) and new != old
    assert "the old one no longer works" in result.stderr
    with chatchain.store() as store:
        users = Users(store)
        assert users.authenticate(old) is None
        assert users.authenticate(new).name == "alice"  # type: ignore[union-attr]


def test_caps_shows_sets_and_removes(chatchain: Chatchain) -> None:
    chatchain("users", "add", "alice", "--daily-usd", "1", "--budget-usd", "5")
    assert chatchain("users", "caps", "alice").stdout == (
        "alice: budget $5.00, daily $1.00, monthly -, requests per minute default, "
        "streams default\n"
    )
    result = chatchain("users", "caps", "alice", "--daily-usd", "none", "--monthly-usd", "2.5")
    assert result.exit_code == 0
    assert result.stdout == (
        "alice: budget $5.00, daily -, monthly $2.50, requests per minute default, "
        "streams default\n"
    )
    with chatchain.store() as store:
        user = Users(store).get("alice")
    assert user is not None and (user.daily_usd, user.monthly_usd) == (None, 2.5)


def test_small_caps_are_shown_with_the_precision_they_need(chatchain: Chatchain) -> None:
    chatchain("users", "add", "tiny", "--budget-usd", "0.00002", "--daily-usd", "0.0265")
    assert chatchain("users", "caps", "tiny").stdout == (
        "tiny: budget $0.000020, daily $0.0265, monthly -, requests per minute default, "
        "streams default\n"  # never $2e-05 or $0.0000
    )
    listed = chatchain("users", "list").stdout
    assert "$0.000020" in listed and "$0.0265" in listed and "e-0" not in listed


def test_a_users_own_rate_limits_are_added_shown_changed_and_given_back(
    chatchain: Chatchain,
) -> None:
    added = chatchain("users", "add", "ann", "--requests-per-minute", "100", "--streams", "0")
    assert added.exit_code == 0
    chatchain("users", "add", "bob")
    assert chatchain("users", "caps", "ann").stdout == (
        "ann: budget -, daily -, monthly -, requests per minute 100, streams unlimited\n"
    )
    changed = chatchain("users", "caps", "ann", "--requests-per-minute", "none", "--streams", "3")
    assert changed.stdout == (
        "ann: budget -, daily -, monthly -, requests per minute default, streams 3\n"
    )
    assert stable(chatchain("users", "list").output).splitlines()[1:] == [
        "ann   DATE       -      -        -  default        3  active",
        "bob   DATE       -      -        -  default  default  active",
    ]
    with chatchain.store() as store:
        ann = Users(store).get("ann")
    assert ann is not None and (ann.requests_per_minute, ann.streams) == (None, 3)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["add", "alice"],
            "error: There is a user 'alice' already: pick another name, or give them a new "
            "token with chatchain users rotate alice.",
        ),
        (
            ["add", "bad:name"],
            "error: 'bad:name' cannot name a user: use 1 to 64 letters, digits and _ . @ -, "
            "starting with a letter or digit (e.g. alice or alice@example.com).",
        ),
        (
            ["add", "carol", "--daily-usd", "-1"],
            "error: --daily-usd '-1' is not an amount of USD: give a number like 1.50.",
        ),
        (
            ["add", "carol", "--budget-usd", "none"],
            "error: --budget-usd 'none' is not an amount of USD: give a number like 1.50.",
        ),
        (
            ["caps", "alice", "--monthly-usd", "lots"],
            "error: --monthly-usd 'lots' is not an amount of USD: give a number like 1.50 "
            "(or none to remove the cap).",
        ),
        (
            ["add", "carol", "--streams", "-1"],
            "error: --streams '-1' is not a limit: give a whole number, 0 for no limit.",
        ),
        (
            ["caps", "alice", "--requests-per-minute", "1.5"],
            "error: --requests-per-minute '1.5' is not a limit: give a whole number, 0 for no "
            "limit (or none for the deployment's).",
        ),
        (
            ["revoke", "ghost"],
            "error: There is no user 'ghost': see chatchain users list, or add them with "
            "chatchain users add ghost.",
        ),
        (
            ["rotate", "ghost"],
            "error: There is no user 'ghost': see chatchain users list, or add them with "
            "chatchain users add ghost.",
        ),
        (
            ["caps", "ghost"],
            "error: There is no user 'ghost': see chatchain users list, or add them with "
            "chatchain users add ghost.",
        ),
    ],
)
def test_errors_are_one_line_saying_what_to_do(
    chatchain: Chatchain, args: list[str], error: str
) -> None:
    chatchain("users", "add", "alice")
    result = chatchain("users", *args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == error + "\n"
    with chatchain.store() as store:
        assert [u.name for u in Users(store).list()] == ["alice"]
