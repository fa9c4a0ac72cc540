"""The offline-store interface the router hands messages to, and the in-memory store.

Every message is appended before its sender gets an ACK and stays until the
recipient acknowledges delivery (RECEIVED). The durable memory-mapped log
(its own issue) implements the same interface.
"""
from typing import Iterable, NamedTuple, Protocol

from _core.errors import StoreError


class StoredMessage(NamedTuple):
    msg_id: int
    timestamp_ms: int
    sender: str
    sender_device: str
    payload: bytes


class OfflineStore(Protocol):
    def append(self, recipient: str, msg_id: int, timestamp_ms: int,
               sender: str, sender_device: str, payload: bytes, client_id: int = 0) -> None:
        """Keep a message until `recipient` acknowledges it. Raise StoreError to refuse."""

    def pending(self, recipient: str) -> Iterable[StoredMessage]:
        """Unacknowledged messages for `recipient`, oldest first."""

    def consume(self, recipient: str, msg_ids: Iterable[int]) -> int:
        """Drop acknowledged messages; unknown ids are ignored. Returns how many were dropped."""

    def consume_through(self, recipient: str, msg_id: int) -> int:
        """Drop every message up to and including `msg_id` (a client's resume point)."""

    def commit(self, then, arg) -> None:
        """Call `then(arg)` once appends so far are as durable as the store promises.
        The router writes each loop turn's ACKs and DELIVERs from `then`;
        calls complete in order."""

    def last_id(self) -> int:
        """The highest message id ever stored, so new ids keep increasing across restarts."""

    def close(self) -> None:
        ...


class MemoryStore:
    """Process-memory store: fast, bounded per recipient, lost with the process.

    For embedding and tests; the gateway uses the durable log once it exists.
    """

    def __init__(self, max_pending_per_recipient: int = 10_000):
        self._inboxes: dict[str, dict[int, StoredMessage]] = {}
        self.max_pending = max_pending_per_recipient
        self._last_id = 0

    def append(self, recipient, msg_id, timestamp_ms, sender, sender_device, payload, client_id=0):
        inbox = self._inboxes.get(recipient)
        if inbox is None:
            inbox = self._inboxes[recipient] = {}
        elif len(inbox) >= self.max_pending:
            from _core.protocol import ErrorCode
            raise StoreError(f"{recipient} has {len(inbox)} undelivered messages (the limit)",
                             ErrorCode.QUOTA_EXCEEDED)
        inbox[msg_id] = StoredMessage(msg_id, timestamp_ms, sender, sender_device, payload)
        self._last_id = msg_id

    def pending(self, recipient):
        inbox = self._inboxes.get(recipient)
        return list(inbox.values()) if inbox else []

    def consume(self, recipient, msg_ids):
        inbox = self._inboxes.get(recipient)
        if not inbox:
            return 0
        n = 0
        for i in msg_ids:
            if inbox.pop(i, None) is not None:
                n += 1
        if not inbox:
            del self._inboxes[recipient]
        return n

    def consume_through(self, recipient, msg_id):
        inbox = self._inboxes.get(recipient)
        if not inbox:
            return 0
        done = [i for i in inbox if i <= msg_id]
        return self.consume(recipient, done)

    def pending_count(self, recipient: str | None = None) -> int:
        if recipient is not None:
            return len(self._inboxes.get(recipient, ()))
        return sum(map(len, self._inboxes.values()))

    def commit(self, then, arg):
        then(arg)     # memory is as durable as it gets

    def last_id(self):
        return self._last_id

    def close(self):
        pass
