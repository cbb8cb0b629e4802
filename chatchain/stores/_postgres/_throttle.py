"""The PostgreSQL store's throttle (`ThrottleBackend`): one row of ``<prefix>_throttle`` per
user, holding the times of their requests in the moving window and the leases of their open
streams.

Every check is one statement, one round trip: an upsert whose ``ON CONFLICT DO UPDATE``
locks the user's row and judges its newest version, so the instances sharing the database
check and count one at a time per user and never let more through than the limit between
them. Times are the database's clock.
"""

from __future__ import annotations

from chatchain.stores._postgres._connection import _Connections

__all__ = ["_Throttle"]


class _Throttle(_Connections):
    """Requests per minute and open streams per user (`ThrottleBackend`)."""

    def count_request(self, user: str, limit: int, window: float) -> float | None:
        params = {"user": user, "limit": limit, "window": float(window)}
        [(counted, wait)] = self._fetch(self._sql.count_request, params)
        return None if counted else _wait(wait, window)

    async def acount_request(self, user: str, limit: int, window: float) -> float | None:
        params = {"user": user, "limit": limit, "window": float(window)}
        [(counted, wait)] = await self._afetch(self._sql.count_request, params)
        return None if counted else _wait(wait, window)

    def take_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        params = {"user": user, "slot": slot, "limit": limit, "lease": float(lease)}
        return bool(self._fetch(self._sql.take_stream, params))

    async def atake_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        params = {"user": user, "slot": slot, "limit": limit, "lease": float(lease)}
        return bool(await self._afetch(self._sql.take_stream, params))

    def renew_stream(self, user: str, slot: str, lease: float) -> bool:
        params = {"user": user, "slot": slot, "lease": float(lease)}
        return bool(self._fetch(self._sql.renew_stream, params))

    async def arenew_stream(self, user: str, slot: str, lease: float) -> bool:
        params = {"user": user, "slot": slot, "lease": float(lease)}
        return bool(await self._afetch(self._sql.renew_stream, params))

    def release_stream(self, user: str, slot: str) -> None:
        self._fetch(self._sql.release_stream, {"user": user, "slot": slot})

    async def arelease_stream(self, user: str, slot: str) -> None:
        await self._afetch(self._sql.release_stream, {"user": user, "slot": slot})


def _wait(wait: float | None, window: float) -> float:
    # None: the row was made by another instance after this statement began (all its
    # requests are newer than anything this statement saw), so a whole window is safe.
    return window if wait is None else max(0.0, float(wait))
