"""What ``pip install -e .`` builds: chatchain on sys.path, and no warning a user cannot act on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The PEP 660 hook pip calls for `pip install -e .`, run as pip runs it: in another process.
BUILD_EDITABLE = """
import sys
from setuptools import build_meta
print(build_meta.build_editable(sys.argv[1]))
"""


def test_an_editable_install_is_a_path_entry_and_warns_about_nothing(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md", "config.py"):
        shutil.copy(ROOT / name, checkout / name)
    shutil.copytree(
        ROOT / "chatchain", checkout / "chatchain", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "wheel").mkdir()
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
