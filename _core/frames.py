"""Decoded frames as plain objects, shared by the Cython and pure-Python codecs.

These are for the general Python API (client SDK, tests, tools). The server's
hot path never builds them: it reads fields straight out of the read buffer.
"""
from dataclasses import dataclass


@dataclass(slots=True)
class Hello:
    version: int
    token: str
    device: str
    resume_after: int = 0
    send_only: bool = False
    #: the producer whose sequence this client continues (from an earlier WELCOME); 0: a new one
    producer: int = 0


@dataclass(slots=True)
class Welcome:
    version: int
    session_id: int
    user: str
    device: str
    max_frame: int
    max_payload: int
    ping_interval_ms: int
    server_time_ms: int
    #: the producer this session's SENDs belong to; their seqs continue its sequence
    producer: int = 0
    #: the most SENDs the client may have without an answer
    send_window: int = 0


@dataclass(slots=True)
class Send:
    seq: int                # this producer's sequence number: 1, 2, 3, ...
    to: str
    payload: bytes


@dataclass(slots=True)
class Ack:
    seq: int
    msg_id: int
    timestamp_ms: int


@dataclass(slots=True)
class Deliver:
    msg_id: int
    timestamp_ms: int
    sender: str
    sender_device: str
    payload: bytes
    #: a copy of a message this user sent from another device: to whom, and its id there;
    #: or, with group=True, the group it was sent to and the id its sender got
    peer: str = ""
    origin_id: int = 0
    group: bool = False


@dataclass(slots=True)
class Receipt:
    id: int            # acknowledge with RECEIVED, like a message
    kind: int          # ReceiptKind
    msg_id: int        # the message (the id its sender got in ACK)
    by: str
    by_device: str
    timestamp_ms: int


@dataclass(slots=True)
class Read:
    peer: str          # who sent the messages
    msg_ids: tuple


@dataclass(slots=True)
class Received:
    msg_ids: tuple


@dataclass(slots=True)
class Ping:
    nonce: int


@dataclass(slots=True)
class Pong:
    nonce: int


@dataclass(slots=True)
class Error:
    code: int
    ref: int
    reason: str
    fatal: bool = False


@dataclass(slots=True)
class Goaway:
    code: int
    reconnect_ms: int
    reason: str


@dataclass(slots=True)
class Subscribe:
    users: tuple
    on: bool = True      # False: unsubscribe


@dataclass(slots=True)
class Presence:
    user: str
    online: bool
    last_seen_ms: int    # 0: unknown or hidden by the user


@dataclass(slots=True)
class Typing:
    peer: str            # client -> server: to whom; server -> client: who is typing
    typing: bool


@dataclass(slots=True)
class Privacy:
    hide_last_seen: bool


@dataclass(slots=True)
class Group:
    request_id: int
    op: int              # GroupOp
    group: str
    arg: str = "{}"      # JSON object: {"name": ..., "members": [...]}


@dataclass(slots=True)
class GroupInfo:
    request_id: int
    info: str            # JSON object: {"group", "name", "members": {user: "admin"|"member"}}, or a piece of it
    #: the answer continues in the next GROUP_INFO (flag MORE): join the pieces' `info` in order
    more: bool = False


ALL = (Hello, Welcome, Send, Ack, Deliver, Received, Ping, Pong, Error, Goaway, Receipt, Read, Subscribe, Presence, Typing, Privacy, Group, GroupInfo)
