"""Wire protocol constants (see docs/PROTOCOL.md): one place, shared by both codecs.

The Cython codec mirrors these values as `cdef enum`s in `_codec.pxd`;
tests/test_codec.py checks that the two never drift apart.
"""
from enum import IntEnum

#: 2: HELLO/WELCOME carry the producer, SEND's first field is a per-producer seq (PROTOCOL.md section 11)
PROTOCOL_VERSION = 2

#: u32 length prefix, then u8 type and u8 flags. The length counts type+flags+body.
LENGTH_SIZE = 4
HEADER_SIZE = 6
#: smallest legal value of the length field (type + flags, empty body)
MIN_FRAME = 2

#: Defaults the server advertises in WELCOME (values of the length field).
DEFAULT_MAX_FRAME = 65536
#: Before HELLO is accepted only this much is allowed: a stranger can't make us buffer more.
PRE_AUTH_MAX_FRAME = 4096
#: DELIVER adds at most this much around a payload (ids, sender, device, and for
#: a mirrored copy the peer and origin id), so a payload of max_frame -
#: DELIVER_OVERHEAD always fits in any DELIVER frame.
DELIVER_OVERHEAD = 2 + 8 + 8 + 1 + 255 + 1 + 255 + 1 + 255 + 8

MAX_ID_LENGTH = 255          # user and device ids: 1..255 bytes of UTF-8
MAX_TOKEN_LENGTH = 1024
MAX_RECEIVED_IDS = 4096      # ids in one RECEIVED or READ frame


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    SEND = 0x03
    ACK = 0x04
    DELIVER = 0x05
    RECEIVED = 0x06
    PING = 0x07
    PONG = 0x08
    ERROR = 0x09
    GOAWAY = 0x0A
    RECEIPT = 0x0B
    READ = 0x0C
    SUBSCRIBE = 0x0D
    PRESENCE = 0x0E
    TYPING = 0x0F
    PRIVACY = 0x10
    GROUP = 0x11
    GROUP_INFO = 0x12


#: ERROR flag: the server closes the connection after this frame.
FLAG_FATAL = 0x01
#: HELLO flag: a device that only sends (a bot, the CLI's `send`): not registered, gets no DELIVERs.
FLAG_SEND_ONLY = 0x01
#: DELIVER flag: a copy of a message this user sent from another device; `peer` and `origin_id` follow.
FLAG_MIRROR = 0x02
#: DELIVER flag: a group message; `peer` is the group id, `origin_id` the id its sender got.
FLAG_GROUP = 0x04
#: GROUP_INFO flag: this frame holds a piece of the answer; the next GROUP_INFO continues it
FLAG_MORE = 0x01
#: group ids start with this; user ids may not
GROUP_PREFIX = "#"


class GroupOp(IntEnum):
    CREATE = 1
    ADD = 2
    REMOVE = 3
    PROMOTE = 4
    DEMOTE = 5
    LEAVE = 6
    RENAME = 7
    INFO = 8


#: PRIVACY flag: hide this user's last-seen time from others
PRIVACY_HIDE_LAST_SEEN = 0x01
MAX_SUBSCRIBE = 1024         # users in one SUBSCRIBE frame


class ReceiptKind(IntEnum):
    DELIVERED = 1
    READ = 2


class ErrorCode(IntEnum):
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME_TYPE = 3
    UNEXPECTED_FRAME = 4
    UNSUPPORTED_VERSION = 5
    AUTH_FAILED = 10
    TOKEN_EXPIRED = 11
    HELLO_TIMEOUT = 12
    BAD_RECIPIENT = 20
    PAYLOAD_TOO_LARGE = 21
    RATE_LIMITED = 22
    QUOTA_EXCEEDED = 23
    STORAGE_FULL = 24
    #: the recipient's shard is briefly unreachable (its worker is restarting); retry
    UNAVAILABLE = 25
    #: more devices of this user online at once than the server allows
    DEVICE_LIMIT = 26
    NOT_A_MEMBER = 27
    NOT_ADMIN = 28
    GROUP_FULL = 29
    NO_SUCH_GROUP = 30
    GROUP_EXISTS = 31
    BAD_REQUEST = 32
    #: the SEND's seq is not the next this device may send: an earlier one failed, or a gap; resend in order
    OUT_OF_ORDER = 33
    #: a newer producer of this device took over its sequence: this one may not send
    FENCED = 34
    INTERNAL = 50


class GoawayCode(IntEnum):
    SHUTTING_DOWN = 1
    REPLACED = 2
    DRAINING = 3
    #: the session sent nothing, not even PING, for several ping intervals
    IDLE_TIMEOUT = 4
    #: the client did not read what the server sent (stalled or too far behind); reconnect and resume from the log
    SLOW_CONSUMER = 5
    #: in place of WELCOME: another node of the cluster serves this user; `reason` is its
    #: HOST:PORT (same listener kind), where the client goes next, keeping its state
    REDIRECT = 6
