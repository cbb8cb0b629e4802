"""History stores: where sessions live. One module per backend."""

from chatchain.stores._base import HistoryStore
from chatchain.stores._memory import MemoryStore

__all__ = ["HistoryStore", "MemoryStore"]
