"""The offline-store interface the router hands messages to, and the in-memory store.

Every message is appended before its sender gets an ACK and stays until the
recipient acknowledges delivery (RECEIVED). The durable memory-mapped log
(its own issue) implements the same interface.
"""
from typing import Iterable, NamedTuple, Protocol

from _core._producers import ProducerTable
from _core.errors import StoreError


class StoredMessage(NamedTuple):
    msg_id: int
    timestamp_ms: int
    sender: str
    sender_device: str
    payload: bytes
    #: 0 a message; MIRROR: a copy of what this user sent from another device (conversation =
    #: the peer, ref = the id it got); RECEIPT: payload[0] is the kind, ref the message id
    flags: int = 0
    conversation: str = ""
    ref: int = 0


MIRROR = 0x02
RECEIPT = 0x01
GROUP = 0x04          # a member's copy of a group message (conversation = the group, ref = its id)


def inbox_key(user: str, device: str = "") -> str:
    return f"{user}\x00{device}" if device else user


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
    """Process-memory store: fast, bounded per inbox, lost with the process.

    For embedding and tests; the gateway uses the durable log. Same semantics:
    one inbox per registered device, plus a shared inbox for users with none.
    """

    def __init__(self, max_pending_per_recipient: int = 10_000):
        self._inboxes: dict[str, dict[int, StoredMessage]] = {}
        self._devices: dict[str, dict[str, int]] = {}
        self._meta: dict[str, bytes] = {}
        self.max_pending = max_pending_per_recipient
        self._last_id = 0
        #: idempotent-send state (PROTOCOL.md section 6); kept as long as the store, like the messages
        self.producers = ProducerTable()

    def append(self, recipient, msg_id, timestamp_ms, sender, sender_device, payload, client_id=0, *,
               device="", flags=0, conversation="", producer=0):
        key = inbox_key(recipient, device)
        inbox = self._inboxes.get(key)
        if inbox is None:
            inbox = self._inboxes[key] = {}
        elif len(inbox) >= self.max_pending:
            from _core.protocol import ErrorCode
            raise StoreError(f"{recipient} has {len(inbox)} undelivered messages (the limit)",
                             ErrorCode.QUOTA_EXCEEDED)
        inbox[msg_id] = StoredMessage(msg_id, timestamp_ms, sender, sender_device, bytes(payload), flags,
                                      conversation, client_id)
        self._last_id = max(self._last_id, msg_id)

    def _keys(self, recipient, device):
        return (inbox_key(recipient, device), recipient) if device else (recipient,)

    def pending(self, recipient, device=""):
        out = []
        for key in self._keys(recipient, device):
            out.extend(self._inboxes.get(key, {}).values())
        return sorted(out) if device else out

    def consume_entries(self, recipient, msg_ids, device=""):
        """Drop acknowledged entries; returns what was dropped."""
        done = []
        ids = list(msg_ids)
        for key in self._keys(recipient, device):
            inbox = self._inboxes.get(key)
            if not inbox:
                continue
            for i in ids:
                m = inbox.pop(i, None)
                if m is not None:
                    done.append(m)
            if not inbox:
                del self._inboxes[key]
        return done

    def consume(self, recipient, msg_ids, device=""):
        return len(self.consume_entries(recipient, msg_ids, device))

    def consume_through(self, recipient, msg_id, device=""):
        return self.consume(recipient, [m.msg_id for m in self.pending(recipient, device) if m.msg_id <= msg_id],
                            device)

    def pending_count(self, recipient: str | None = None, device: str = "") -> int:
        if recipient is not None:
            return len(self._inboxes.get(inbox_key(recipient, device), ()))
        return sum(map(len, self._inboxes.values()))

    def devices_of(self, user):
        return tuple(sorted(self._devices.get(user, ())))

    def register_device(self, user, device, now):
        devs = self._devices.setdefault(user, {})
        new = device not in devs
        devs[device] = now
        return new

    def touch_device(self, user, device, now):
        if device in self._devices.get(user, ()):
            self._devices[user][device] = now

    def last_seen(self, user):
        return max(self._devices.get(user, {}).values(), default=0)

    def meta_get_for(self, user, key):
        return self._meta.get(key)

    def meta_put_for(self, user, key, value):
        if value:
            self._meta[key] = value
        else:
            self._meta.pop(key, None)

    def meta_keys_local(self, prefix):
        return [k for k in self._meta if k.startswith(prefix)]

    def commit(self, then, arg):
        then(arg)     # memory is as durable as it gets

    def last_id(self):
        return self._last_id

    def close(self):
        pass
