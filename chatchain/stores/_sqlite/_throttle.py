"""The SQLite store's throttle (`ThrottleBackend`): each user's requests in the moving window
(rows of ``throttle_requests``) and the leases of their open streams (rows of
``throttle_streams``).

Each check is one ``BEGIN IMMEDIATE`` transaction: it takes the file's write lock first, so
the processes sharing the file check and count one at a time and never let more through
than the limit between them. Times are the machine's clock (``time.time``), which every
process on the file shares.
"""

from __future__ import annotations

import time

from chatchain.stores._sqlite._connection import _Connections

__all__ = ["_Throttle"]


class _Throttle(_Connections):
    """Requests per minute and open streams per user (`ThrottleBackend`)."""

    def count_request(self, user: str, limit: int, window: float) -> float | None:
        with self._write("count a request") as conn:
            now = time.time()
            conn.execute(
                "DELETE FROM throttle_requests WHERE user_name = ? AND at <= ?",
                (user, now - window),
            )
            counted, oldest = conn.execute(
                "SELECT count(*), min(at) FROM throttle_requests WHERE user_name = ?", (user,)
            ).fetchone()
            if counted >= limit:
                return max(0.0, float(oldest) + window - now)
            conn.execute("INSERT INTO throttle_requests (user_name, at) VALUES (?, ?)", (user, now))
            return None

    def take_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        with self._write("take a stream slot") as conn:
            now = time.time()
            conn.execute(
                "DELETE FROM throttle_streams WHERE user_name = ? AND expires_at <= ?",
                (user, now),
            )
            (held,) = conn.execute(
                "SELECT count(*) FROM throttle_streams WHERE user_name = ?", (user,)
            ).fetchone()
            if held >= limit:
                return False
            conn.execute(
                "INSERT INTO throttle_streams (slot, user_name, expires_at) VALUES (?, ?, ?)",
                (slot, user, now + lease),
            )
            return True

    def renew_stream(self, user: str, slot: str, lease: float) -> bool:
        with self._write("renew a stream slot") as conn:
            now = time.time()
            return (
                conn.execute(
                    "UPDATE throttle_streams SET expires_at = ? "
                    "WHERE slot = ? AND user_name = ? AND expires_at > ?",
                    (now + lease, slot, user, now),
                ).rowcount
                == 1
            )

    def release_stream(self, user: str, slot: str) -> None:
        with self._write("give back a stream slot") as conn:
            conn.execute(
                "DELETE FROM throttle_streams WHERE slot = ? AND user_name = ?", (slot, user)
            )
