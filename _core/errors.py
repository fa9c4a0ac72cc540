"""Typed protocol errors. Every one carries the wire error code it maps to, so
a connection can answer ERROR(code) and close without guessing."""
from .protocol import ErrorCode


class ProtocolError(Exception):
    """The peer broke the protocol; the connection answers ERROR and closes."""

    code = ErrorCode.MALFORMED_FRAME

    def __init__(self, reason: str, code: ErrorCode | None = None):
        super().__init__(reason)
        if code is not None:
            self.code = code

    @property
    def reason(self) -> str:
        return self.args[0]


class MalformedFrame(ProtocolError):
    code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class UnknownFrameType(ProtocolError):
    code = ErrorCode.UNKNOWN_FRAME_TYPE


class UnexpectedFrame(ProtocolError):
    code = ErrorCode.UNEXPECTED_FRAME


class BodyViewLeaked(RuntimeError):
    """A sink kept a view of a frame body past its call: a bug in the sink.
    Bodies are views valid only during the call; copy with bytes(body)."""


class StoreError(Exception):
    """A store refused an append; the sender gets ERROR(code) and nothing is lost."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.STORAGE_FULL):
        super().__init__(reason)
        self.code = code


class ServerError(Exception):
    """An ERROR frame received by a client."""

    def __init__(self, code: int, reason: str, ref: int = 0):
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"{name}: {reason}")
        self.code = code
        self.reason = reason
        self.ref = ref


class WebSocketError(Exception):
    """The peer broke RFC 6455 (or sent what this endpoint does not accept):
    the connection sends a Close frame with `close_code` and ends."""

    def __init__(self, close_code: int, reason: str):
        super().__init__(reason)
        self.close_code = close_code

    @property
    def reason(self) -> str:
        return self.args[0]


class DataDirInUse(Exception):
    """Another process holds the lock of this directory (a gateway's data dir or one
    shard log): two writers would append over each other's records, so the second
    opener is refused instead of sharing it. `pid` is the holder's, if it wrote it."""

    def __init__(self, directory, pid: int | None):
        self.directory = str(directory)
        self.pid = pid
        super().__init__(f"{self.directory} is in use by another process" + (f" (pid {pid})" if pid else ""))


class LogNotOpen(RuntimeError):
    """An append log was written to (or started) before open() recovered its
    directory: a writer that has not scanned the segments would create segment
    files over the stored ones. Call open() first."""


class ReplicaError(Exception):
    """Replication of a shard log (_core/replica.py) cannot go on as it is."""


class ChangeRefused(ReplicaError):
    """A replica refused a batch of changes that does not follow what it holds (a
    gap, bytes for an unknown segment or at another offset than its end, a segment
    out of order): nothing of the batch was applied. Re-sync it: resume from its
    holdings, or send a snapshot."""


class EpochFenced(ChangeRefused):
    """A replica refused changes of an older epoch than the highest it has seen:
    they come from a deposed owner. Nothing was applied."""


class ReplicaDiverged(ReplicaError):
    """At the owner: a replica's holdings are not a prefix of this log (different
    segments, bytes the owner does not have, a hole, or too far behind: segments
    it lacks were deleted). Only a snapshot brings it back."""
