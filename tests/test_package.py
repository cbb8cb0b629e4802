"""What the package carries: one version, its types (PEP 561) and its license, in the wheel."""

from __future__ import annotations

import email.parser
import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import chatchain

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_carries_the_types_the_license_and_the_version(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("chatchain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"chatchain-{chatchain.__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(
            archive.read(f"{dist_info}/METADATA").decode("utf-8")
        )
        license_text = archive.read(f"{dist_info}/licenses/LICENSE").decode("utf-8")
    assert "chatchain/py.typed" in names
    assert metadata["Version"] == chatchain.__version__
    assert metadata["License-Expression"] == "MIT"
    assert license_text.startswith("MIT License\n")
    assert license_text == (ROOT / "LICENSE").read_text(encoding="utf-8")
