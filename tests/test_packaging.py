"""What the builds carry: an editable install that warns about nothing; one version, the types
(PEP 561) and the license in the wheel."""

from __future__ import annotations

import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import chatchain

ROOT = Path(__file__).resolve().parent.parent

# The PEP 660 hook pip calls for `pip install -e .`, run as pip runs it: in another process.
BUILD_EDITABLE = """
import sys
from setuptools import build_meta
print(build_meta.build_editable(sys.argv[1]))
"""


# The PEP 517 hook pip calls for `pip wheel .` (and a release build).
BUILD_WHEEL = """
import sys
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""


def _checkout(tmp_path: Path) -> Path:
    """A copy of what a build reads, away from the repository's build/ and egg-info."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "config.py"):
        shutil.copy(ROOT / name, checkout / name)
    shutil.copytree(
        ROOT / "chatchain", checkout / "chatchain", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "wheel").mkdir()
    return checkout


def test_an_editable_install_is_a_path_entry_and_warns_about_nothing(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", BUILD_EDITABLE, str(tmp_path / "wheel")],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # setuptools' "Please be careful with folders in your working directory with the same name
    # as your package" came with the import finder it used for an undeclared flat layout.
    assert "careful with folders" not in result.stderr
    assert "Warning" not in result.stderr, result.stderr
    wheel = tmp_path / "wheel" / result.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as built:
        [pth] = [name for name in built.namelist() if name.endswith(".pth")]
        # The checkout itself on sys.path, as a flat layout is; no finder module.
        assert built.read(pth).decode().strip() == str(checkout)
        assert not [name for name in built.namelist() if name.endswith("finder.py")]


def test_the_version_is_written_once_and_the_metadata_reads_it() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "chatchain.__version__"}
    # The installed metadata: reinstall (make test does) if this fails after a version bump.
    assert importlib.metadata.version("chatchain") == chatchain.__version__


def test_the_changelog_has_a_section_for_the_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{chatchain.__version__}]" in changelog
    assert "## [Unreleased]" in changelog


@pytest.mark.slow  # builds a wheel
def test_the_wheel_carries_the_types_the_license_and_the_version(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", BUILD_WHEEL, str(tmp_path / "wheel")],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    wheel = tmp_path / "wheel" / result.stdout.split()[-1]
    dist_info = f"chatchain-{chatchain.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as built:
        names = set(built.namelist())
        metadata = email.parser.Parser().parsestr(built.read(f"{dist_info}/METADATA").decode())
        license_text = built.read(f"{dist_info}/licenses/LICENSE").decode()
    assert "chatchain/py.typed" in names
    # The chat page of `chatchain serve`, with its vendored libraries and their licences.
    static = ROOT / "chatchain" / "server" / "static"
    page = {path.relative_to(ROOT).as_posix() for path in static.rglob("*") if path.is_file()}
    assert {
        "chatchain/server/static/index.html",
        "chatchain/server/static/vendor/marked/LICENSE",
        "chatchain/server/static/vendor/highlight.js/LICENSE",
        "chatchain/server/static/favicon.svg",
    } <= page
    assert page <= names, sorted(page - names)
    assert metadata["Version"] == chatchain.__version__
    assert metadata["License-Expression"] == "MIT"
    assert license_text.startswith("MIT License\n")
    assert license_text == (ROOT / "LICENSE").read_text(encoding="utf-8")


def _tested_pythons() -> list[str]:
    """The versions `make test` runs on: requires-python's lowest, then NEWER_PYTHONS."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = re.fullmatch(r">=(3\.\d+)", project["requires-python"])
    newer = re.search(r"^NEWER_PYTHONS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert lowest is not None and newer is not None
    return [lowest[1], *newer[1].split()]


def test_the_classifiers_and_the_readme_name_exactly_the_tested_pythons() -> None:
    tested = _tested_pythons()
    classifiers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["classifiers"]
    named = [c.rpartition(" :: ")[2] for c in classifiers if re.search(r":: 3\.\d+$", c)]
    assert named == tested
    assert sys.version.startswith(tuple(f"{version}." for version in tested))  # this one too
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"Tested on Python ([\d., and]+?)[:.]\s", readme)
    assert listed is not None, "the README says which Pythons are tested"
    assert re.findall(r"3\.\d+", listed[1]) == tested
