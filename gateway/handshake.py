"""The WebSocket listener's HTTP/1.1 side: a strict parser for the one request
a connection may send, the opening-handshake rules of RFC 6455 section 4.2.1,
and the HTTP error answers.

Kept apart from the connection so the rules can be read (and tested) in one
place. Every rejection is an `HttpReject` carrying the status and headers the
client gets; the connection writes it and closes. Nothing here does I/O.
"""
import base64
import hashlib
import re
from dataclasses import dataclass, field

#: the request line and headers must fit in this many bytes (else 431)
MAX_REQUEST = 8192
WS_PATH = "/ws"
SUBPROTOCOL = "switchboard.v1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: headers that must not appear twice (a second Host or Key is a smuggling attempt or a bug)
_SINGLE = frozenset({"host", "sec-websocket-key", "sec-websocket-version", "origin", "content-length",
                     "upgrade"})

REASONS = {101: "Switching Protocols", 200: "OK", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 426: "Upgrade Required",
           431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}


def response(status: int, headers: list[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """An HTTP/1.1 response; `Content-Length` is added unless status is 101 or 304."""
    lines = [f"HTTP/1.1 {status} {REASONS[status]}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if status not in (101, 304):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpReject(Exception):
    """The request is refused: `status`, a one-line reason (also the body) and extra headers."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] = ()):
        super().__init__(reason)
        self.status = status
        self.headers = list(headers)

    def response(self) -> bytes:
        return response(self.status, [("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close"),
                                      *self.headers], (str(self) + "\n").encode())


@dataclass
class Request:
    method: str
    target: str
    headers: dict = field(default_factory=dict)    # lower-case name -> value (repeats joined with ", ")

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header as a set of lower-case tokens."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}


def request_end(buf, length: int, searched: int = 0) -> int:
    """Offset just past the blank line ending the head, or -1 (search from `searched`)."""
    i = buf.find(b"\r\n\r\n", max(0, searched - 3), length)
    return -1 if i < 0 else i + 4


def parse_request(head: bytes) -> Request:
    """Parse the request line and headers (`head` ends with the blank line)."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1].startswith(b"/"):
        raise HttpReject(400, "malformed request line")
    version = parts[2]
    if version != b"HTTP/1.1":
        if re.fullmatch(rb"HTTP/\d\.\d", version):
            raise HttpReject(505, "only HTTP/1.1 is served here")
        raise HttpReject(400, "malformed request line")
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise HttpReject(400, "request target is not ASCII") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            # also catches obsolete line folding (a line starting with a space) and "Name : value"
            raise HttpReject(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in _SINGLE:
                raise HttpReject(400, f"{name.decode()} appears twice")
            headers[key] += ", " + text
        else:
            headers[key] = text
    req = Request(parts[0].decode("ascii"), target, headers)
    if "host" not in headers:
        raise HttpReject(400, "no Host header")
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise HttpReject(400, "requests here have no body")
    return req


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def origin_allowed(origin: str | None, host: str, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), the page's own origin, or one on the allow-list ('*' allows any)."""
    if origin is None:
        return True
    o = origin.rstrip("/").lower()
    if "*" in allowed or o in allowed:
        return True
    return o in (f"http://{host.lower()}", f"https://{host.lower()}")


def upgrade(req: Request, allowed_origins: tuple[str, ...]) -> bytes:
    """The 101 answer to a valid opening handshake on WS_PATH, or HttpReject."""
    if req.method != "GET":
        raise HttpReject(405, "the WebSocket endpoint takes GET", [("Allow", "GET")])
    if "websocket" not in req.tokens("upgrade"):
        raise HttpReject(426, "this endpoint speaks WebSocket: send Upgrade: websocket",
                         [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")])
    if "upgrade" not in req.tokens("connection"):
        raise HttpReject(400, "Connection must include 'Upgrade'")
    if req.headers.get("sec-websocket-version") != "13":
        raise HttpReject(426, "Sec-WebSocket-Version must be 13",
                         [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")])
    key = req.headers.get("sec-websocket-key", "")
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise HttpReject(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    if not origin_allowed(req.headers.get("origin"), req.headers["host"], allowed_origins):
        raise HttpReject(403, "origin not allowed")
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(key))]
    if SUBPROTOCOL in req.tokens("sec-websocket-protocol"):
        headers.append(("Sec-WebSocket-Protocol", SUBPROTOCOL))
    return response(101, headers)
