"""Switchboard's routing brain as a library: sessions, 1:1 routing, offline hand-off.

No sockets inside, so any asyncio server can embed it (see examples/).
"""
from .router import Router, Session, now_ms
from .store import MemoryStore, OfflineStore, StoredMessage
from _core.errors import StoreError

__all__ = ["Router", "Session", "MemoryStore", "OfflineStore", "StoredMessage", "StoreError", "now_ms"]
