"""``chatchain.cli.main``, the console script, without the ``cli`` extra installed."""

from __future__ import annotations

import sys

import pytest

from chatchain.cli import main


@pytest.mark.parametrize("package", ["click", "prompt_toolkit", "rich", "platformdirs"])
def test_without_the_cli_extra_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], package: str
) -> None:
    for name in list(sys.modules):
        if name.startswith("chatchain.cli."):
            monkeypatch.delitem(sys.modules, name)  # imported again, without the package
        elif name.split(".")[0] == package:
            monkeypatch.setitem(sys.modules, name, None)  # as if never installed
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        f"error: the chatchain command needs {package}: "
        "install it with pip install 'chatchain[cli]'\n"
    )
