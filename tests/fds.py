"""Counting the process's open file descriptors, to show that closing releases them."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["BOTS", "HAS_FDS", "leaked_per_round", "open_fds"]

HAS_FDS = Path("/proc/self/fd").is_dir()  # Linux
BOTS = 12


def open_fds() -> int:
    gc.collect()  # what earlier tests left to the garbage collector is not counted
    return len(os.listdir("/proc/self/fd"))


def leaked_per_round(round_: Callable[[int], object]) -> float:
    """File descriptors still open per call of ``round_`` after it returned (and closed)."""
    round_(-1)  # warm-up: what is opened once for the process (imports, pooled clients)
    kept = []  # closed things stay referenced: only closing may release their files
    before = open_fds()
    for index in range(BOTS):
        kept.append(round_(index))
    return (open_fds() - before) / BOTS
