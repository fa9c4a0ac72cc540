"""asyncio client SDK: connect, send (-> server message id), iterate over
delivered messages, ack, and reconnect with resume.

Each message reaches the application once: DELIVERs at or below the highest
id already handed out are dropped (ids increase within a recipient's stream),
and `resume_after` tells the server what was already processed.

Sends are an ordered outbox (PROTOCOL.md section 6): each SEND carries the next
seq of this client's producer; one refused for now (UNAVAILABLE, STORAGE_FULL,
RATE_LIMITED, OUT_OF_ORDER) is sent again, with every later refused one, in seq
order, after a backoff that doubles while refusals continue. So the server
stores a device's messages once and in the order they were sent.

A client has seeds (`host` may be a list, or "h1,h2:7500"): gateways it tries
in turn, the next one after a failed connect or a lost connection. A gateway
of a cluster that does not serve the user answers HELLO with GOAWAY REDIRECT
naming the node that does; the client goes there at once, as the same session
(PROTOCOL.md section 3, GOAWAY).
"""
import collections
import asyncio
import ipaddress
import itertools
import json
import os
import random
from dataclasses import dataclass

from _core import frames
from _core.codec import Decoder, decode_body, encode
from _core.errors import ProtocolError, ServerError
from _core.protocol import (DEFAULT_MAX_FRAME, MAX_SUBSCRIBE, PROTOCOL_VERSION, ErrorCode, GoawayCode, GroupOp,
                            ReceiptKind)

__all__ = ["Client", "Message", "Receipt", "SendResult", "ServerError", "ConnectionClosed", "parse_seeds",
           "format_address"]

#: REDIRECTs in a row without a WELCOME: the third is not followed (two nodes with
#: different shard maps could bounce a client forever); the client goes on with its seeds
MAX_REDIRECTS = 3


def parse_address(entry: str, default_port: int | None) -> tuple[str, int]:
    """`HOST[:PORT]` (IPv6 as `[ADDR]:PORT`, or a bare IPv6 address) -> (host, port).
    `default_port` None: the port is required (a REDIRECT's address). ValueError with
    a one-line reason otherwise."""
    text = entry.strip()
    form = "write HOST[:PORT], IPv6 as [ADDR]:PORT"
    if not text:
        raise ValueError(f"empty gateway address ({form})")
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad gateway address {entry!r}: no ']' after the IPv6 address ({form})")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad gateway address {entry!r}: ':PORT' or nothing may follow ']' ({form})")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad gateway address {entry!r}: {host!r} is not an IPv6 address ({form})") from None
    elif text.count(":") > 1:                  # a bare IPv6 address: it has no port
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"bad gateway address {entry!r}: put an IPv6 address in brackets ({form})") from None
        host = text
    else:
        host, _, port_text = text.partition(":") if ":" in text else (text, "", None)
        if not host or any(c.isspace() or c in "/[]@" for c in host):
            raise ValueError(f"bad gateway address {entry!r}: {host!r} is not a host name or address ({form})")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"bad gateway address {entry!r}: no port ({form})")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad gateway address {entry!r}: the port must be a number 1..65535 ({form})")
    return host, int(port_text)


def parse_seeds(host, port: int) -> list[tuple[str, int]]:
    """The gateways to try, in order: `host` is one address, a comma-separated list
    ("h1,h2:7500,[::1]:7400"), or a list of such strings or (host, port) pairs;
    entries without a port get `port`."""
    if isinstance(host, str):
        entries = host.split(",")
    else:
        entries = list(host)
    seeds = [tuple(e) if isinstance(e, tuple) else parse_address(e, port) for e in entries]
    if not seeds:
        raise ValueError("no gateway address given")
    return seeds


def format_address(address: tuple[str, int]) -> str:
    """(host, port) -> `HOST:PORT`, IPv6 as `[ADDR]:PORT` (the REDIRECT reason's form)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Redirect(Exception):
    """GOAWAY REDIRECT came in place of WELCOME: connect to `address` next."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _RoundFailed(Exception):
    """No seed gave a WELCOME in one round. `unreachable`: every try failed to connect
    (refused, timed out, TLS); `last` is the last such error."""

    def __init__(self, unreachable: bool, last: BaseException | None):
        super().__init__(str(last))
        self.unreachable, self.last = unreachable, last


@dataclass(frozen=True, slots=True)
class Receipt:
    """`by` received (DELIVERED) or read (READ) the message `msg_id` this user sent."""
    kind: str
    msg_id: int
    by: str
    by_device: str
    timestamp_ms: int

_FATAL_AUTH = {ErrorCode.AUTH_FAILED, ErrorCode.TOKEN_EXPIRED, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.FENCED}
#: a SEND refused with these is sent again (same seq, in order); any other code fails it
_RESEND = {ErrorCode.UNAVAILABLE, ErrorCode.STORAGE_FULL, ErrorCode.RATE_LIMITED, ErrorCode.OUT_OF_ORDER}
#: resend backoff: first delay and cap (seconds); jittered to 50-100%
RESEND_FIRST, RESEND_MAX = 0.05, 2.0


def _retrieved(fut: asyncio.Future) -> None:
    """Done callback: mark the exception as seen, so a send the application gave
    up waiting for does not log "Future exception was never retrieved"."""
    if not fut.cancelled():
        fut.exception()


class _Outgoing:
    """One SEND in the outbox: its frame, its future, and whether it must be resent."""
    __slots__ = ("data", "fut", "refused")

    def __init__(self, data: bytes, fut: asyncio.Future):
        self.data, self.fut, self.refused = data, fut, False


class ConnectionClosed(ConnectionError):
    """The connection ended and the client is not (or no longer) reconnecting."""


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    timestamp_ms: int
    sender: str
    sender_device: str
    payload: bytes
    #: set when this is a copy of a message this user sent from another device
    peer: str = ""
    origin_id: int = 0
    #: the group a group message was sent to ("" for 1:1); origin_id is then its id at the sender
    group: str = ""

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class SendResult:
    seq: int
    #: the server's message id; 0 for a retry of a SEND stored so long ago that the server no longer knows it
    id: int
    timestamp_ms: int


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, client: "Client"):
        self.client = client
        self.transport = None
        self.decoder = Decoder(self._frame, DEFAULT_MAX_FRAME * 256)
        self.lost = asyncio.get_running_loop().create_future()
        # this connection's WELCOME (or why none came): one per connection, so that a
        # previous try closing late cannot fail the next one's
        self.welcome = asyncio.get_running_loop().create_future()
        self.welcome.add_done_callback(_retrieved)
        self.pinged = False      # the keepalive has started (its first PING goes one interval later)

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        try:
            self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.client._protocol_error(self, exc)
            self.transport.abort()

    def _frame(self, ftype, flags, body):
        self.client._on_frame(self, decode_body(ftype, flags, body))

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)
        self.client._on_lost(self, exc)


class Client:
    """A device's connection to a Switchboard gateway.

    ``async with Client(host, port, token, device="phone") as c:`` connects and
    completes HELLO/WELCOME (over TLS with ``ssl=gateway.tls.client_context(ca)``);
    ``await c.send("bob", b"hi")`` returns once the
    server has stored the message; ``async for m in c`` yields delivered
    messages, which the application acknowledges with ``await c.ack(m)``.
    With ``reconnect=True`` a lost connection is re-established with backoff;
    unanswered sends are sent again with their seqs, in order (the server drops
    duplicates), and delivery resumes where it stopped. At most
    ``welcome.send_window`` sends are in flight; ``send`` waits for room. A
    send whose ``timeout`` expires stays in the outbox and is still delivered.

    ``host`` may name several gateways (seeds): a list, or ``"h1,h2:7500"``
    (entries ``HOST[:PORT]``, IPv6 as ``[ADDR]:PORT``; the port defaults to
    ``port``). A failed connect or a lost connection moves on to the next seed;
    the backoff applies once per round of all seeds. A GOAWAY REDIRECT is
    followed at once (``MAX_REDIRECTS``). ``address`` is the (host, port) of the
    current connection.
    """

    def __init__(self, host: str | list = "127.0.0.1", port: int = 7400, token: str = "", device: str = "main",
                 *, reconnect: bool = True, resume_after: int = 0, connect_timeout: float = 10.0,
                 max_backoff: float = 5.0, send_only: bool = False, ssl=None):
        self.host, self.port, self.token, self.device = host, port, token, device
        #: the gateways to try, in turn (parse_seeds); ValueError here for a bad entry
        self.seeds = parse_seeds(host, port)
        self._seed_next = 0                   # the seed the next round starts with
        #: (host, port) of the connection that got the last WELCOME (a seed, or where a REDIRECT sent us)
        self.address: tuple[str, int] | None = None
        #: REDIRECTs followed, in all
        self.redirects = 0
        #: an ssl.SSLContext for TLS (gateway.tls.client_context(ca=...)), or None for plain TCP
        self.ssl = ssl
        self.reconnect = reconnect
        self.send_only = send_only
        self._receipts: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        self._presence: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        self._typing: asyncio.Queue = asyncio.Queue(maxsize=1_000)
        self._watching: set[str] = set()      # re-subscribed after a reconnect
        self._requests: dict[int, asyncio.Future] = {}    # group operations by request id
        self._info_pieces: dict[int, list[str]] = {}      # a GROUP_INFO answer in pieces (flag MORE), so far
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.welcome: frames.Welcome | None = None
        self._proto: _Protocol | None = None
        self._welcomed: _Protocol | None = None      # the connection whose WELCOME came
        self._ids = itertools.count(int.from_bytes(os.urandom(7), "big"))
        #: the producer this client's seqs belong to (from WELCOME; 0 until the first one)
        self.producer = 0
        self._next_seq = 1
        self._outbox: collections.OrderedDict[int, _Outgoing] = collections.OrderedDict()   # seq order
        self._room = asyncio.Event()
        self._room.set()
        self._resend_timer: asyncio.TimerHandle | None = None
        self._resend_delay = RESEND_FIRST
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._seen_hwm = resume_after      # highest msg id handed to the application
        self._acked_hwm = resume_after     # highest msg id the application acknowledged
        self._pongs: dict[int, asyncio.Future] = {}
        self._closed = False
        self._fatal: BaseException | None = None
        self._reconnect_task: asyncio.Task | None = None
        self._reconnect_hint = 0.0
        self.reconnects = 0
        #: the last GOAWAY from the server (why it asked us to reconnect) and when (the loop's clock)
        self.goaway: frames.Goaway | None = None
        self.goaway_at = 0.0

    # -- lifecycle ---------------------------------------------------------------
    async def connect(self) -> frames.Welcome:
        await asyncio.wait_for(self._open_retrying(), self.connect_timeout)
        return self.welcome

    async def _open_retrying(self) -> None:
        """Rounds of the seeds until one WELCOMEs. A round in which no seed could be
        reached at all raises its last error (the caller decides: connect() reports
        it, the reconnect loop backs off); one that met a restarting worker
        (UNAVAILABLE), a connection dropped before WELCOME or a REDIRECT loop is
        tried again after a backoff, once per round."""
        delay = 0.02
        while True:
            try:
                return await self._round()
            except _RoundFailed as exc:
                if exc.unreachable:
                    raise exc.last from None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.max_backoff)

    async def _round(self) -> None:
        """Try each seed once, starting after the one tried last, following REDIRECTs
        at once (no backoff: it is not a failure); return at the first WELCOME. A
        fatal ServerError other than UNAVAILABLE is raised as it is."""
        unreachable, last = True, None
        # one seed: no timeout per try (connect_timeout bounds it, as always); several:
        # a seed that swallows SYNs must leave time for the others
        per_try = None if len(self.seeds) == 1 else max(self.connect_timeout / len(self.seeds), 0.5)
        for _ in range(len(self.seeds)):
            address = self.seeds[self._seed_next]
            self._seed_next = (self._seed_next + 1) % len(self.seeds)
            hops = 0
            while address is not None:
                try:
                    await asyncio.wait_for(self._open(address), per_try)
                    return
                except _Redirect as r:
                    hops += 1
                    unreachable = False
                    address = None
                    if hops < MAX_REDIRECTS:
                        try:
                            address = parse_address(r.reason, None)
                            self.redirects += 1
                        except ValueError as exc:
                            last = ConnectionClosed(f"GOAWAY REDIRECT to an address that is not HOST:PORT: {exc}")
                except ServerError as exc:
                    if exc.code != ErrorCode.UNAVAILABLE:     # the user's worker is restarting: come back shortly
                        raise
                    unreachable, last, address = False, exc, None
                except ConnectionClosed as exc:
                    unreachable, last, address = False, exc, None   # dropped before WELCOME
                except (OSError, asyncio.TimeoutError) as exc:
                    last, address = exc, None                       # refused, timed out, TLS: the next seed
        raise _RoundFailed(unreachable, last)

    async def _open(self, address: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Protocol(self), *address, ssl=self.ssl)
        self._proto = proto
        try:
            proto.transport.write(encode(frames.Hello(PROTOCOL_VERSION, self.token, self.device, self._acked_hwm,
                                                      self.send_only, self.producer)))
            self.welcome = await proto.welcome
            if proto.lost.done():       # lost between its WELCOME and now: nobody else will reconnect it
                raise ConnectionClosed("connection lost right after WELCOME")
        except BaseException:
            proto.transport.abort()     # a REDIRECT, a refusal or a timeout: this try is over
            raise
        self._welcomed = proto
        self.address = address
        self.producer = self.welcome.producer
        self._keepalive(proto)
        for out in self._outbox.values():           # in seq order, with their seqs: the server drops retries
            out.refused = False
            proto.transport.write(out.data)
        self._write_subscribe(sorted(self._watching), True)

    def _keepalive(self, proto) -> None:
        """PING every ping interval (from WELCOME) while this connection is current:
        the server closes sessions that send nothing for a few intervals."""
        if self._closed or proto is not self._proto or proto.transport is None or proto.transport.is_closing():
            return
        interval = max((self.welcome.ping_interval_ms if self.welcome else 30_000) / 1000, 0.05)
        if proto.pinged:
            proto.transport.write(encode(frames.Ping(next(self._ids))))
        proto.pinged = True
        asyncio.get_running_loop().call_later(interval, self._keepalive, proto)

    async def close(self) -> None:
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
            await self._proto.lost
        self._fail_all(ConnectionClosed("client closed"))

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    @property
    def connected(self) -> bool:
        """This connection got its WELCOME and is up. (During a reconnect `welcome` is
        the previous connection's: a SEND written before the new WELCOME would go out
        ahead of the outbox's resends, and a new seq ahead of older ones is taken for
        a gap they leave: the server would answer those as duplicates.)"""
        return self._proto is not None and self._proto is self._welcomed and not self._proto.lost.done()

    # -- sending -----------------------------------------------------------------
    async def send(self, to: str, payload: bytes | str, timeout: float | None = None) -> SendResult:
        """Send and wait for the server's ACK (the message is stored). Waits for
        room first if ``send_window`` sends are in flight. A timeout stops the
        waiting, not the send: it stays queued and is delivered in order."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self._check_usable()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self._outbox) >= self._send_window():
            self._room.clear()
            await asyncio.wait_for(self._room.wait(), None if deadline is None else max(0, deadline - loop.time()))
            self._check_usable()
        seq = self._next_seq
        data = encode(frames.Send(seq, to, payload))      # a bad recipient raises here: no seq is used up
        self._next_seq += 1
        fut = loop.create_future()
        fut.add_done_callback(_retrieved)
        out = self._outbox[seq] = _Outgoing(data, fut)
        if self.connected:
            self._proto.transport.write(out.data)
        return await asyncio.wait_for(asyncio.shield(fut), None if deadline is None else
                                      max(0, deadline - loop.time()))

    def _send_window(self) -> int:
        return (self.welcome.send_window if self.welcome is not None and self.welcome.send_window else 256)

    def _answered(self, seq: int, result=None, exc: BaseException | None = None) -> None:
        """A SEND is resolved: out of the outbox, its future done, room for one more."""
        out = self._outbox.pop(seq, None)
        if out is None:
            return
        if not out.fut.done():
            if exc is not None:
                out.fut.set_exception(exc)
            else:
                out.fut.set_result(result)
        self._room.set()

    def _refused(self, seq: int) -> None:
        """Refused for now: send it (and every later refused one) again after the backoff."""
        out = self._outbox.get(seq)
        if out is None:
            return
        out.refused = True
        if self._resend_timer is None:
            delay = self._resend_delay * (0.5 + random.random() / 2)
            self._resend_delay = min(self._resend_delay * 2, RESEND_MAX)
            self._resend_timer = asyncio.get_running_loop().call_later(delay, self._resend_refused)

    def _resend_refused(self) -> None:
        """From the lowest refused SEND, every one without an answer, refused or not
        (PROTOCOL.md section 6): a later one's refusal may still be on its way, and a
        resend that skipped it would be stored ahead of it."""
        self._resend_timer = None
        if not self.connected:
            return                    # the reconnect resends the whole outbox
        resending = False
        for out in self._outbox.values():
            resending = resending or out.refused
            if resending:
                out.refused = False
                self._proto.transport.write(out.data)

    def pending_sends(self) -> int:
        """SENDs not answered yet (in flight or waiting to be resent)."""
        return len(self._outbox)

    async def ping(self, timeout: float | None = 10.0) -> float:
        """Round trip time in seconds."""
        self._check_usable()
        loop = asyncio.get_running_loop()
        nonce = next(self._ids)
        fut = self._pongs[nonce] = loop.create_future()
        start = loop.time()
        self._proto.transport.write(encode(frames.Ping(nonce)))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pongs.pop(nonce, None)
        return loop.time() - start

    # -- receiving ---------------------------------------------------------------
    async def recv(self, timeout: float | None = None) -> Message:
        """The next delivered message (not yet acknowledged)."""
        if self._inbox.empty():
            self._check_usable()
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, BaseException):
            self._inbox.put_nowait(item)
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def subscribe(self, *users: str) -> None:
        """Follow these users' presence: a PRESENCE comes at once, then on every change."""
        new = [u for u in users if u not in self._watching]
        self._watching.update(new)
        if self.connected:
            self._write_subscribe(new, True)

    async def unsubscribe(self, *users: str) -> None:
        gone = [u for u in users if u in self._watching]
        self._watching.difference_update(gone)
        if self.connected:
            self._write_subscribe(gone, False)

    def _write_subscribe(self, users: list[str], on: bool) -> None:
        """SUBSCRIBE frames for `users`: at most 1024 users and max_frame bytes each
        (1024 ids of 255 bytes would be 262 KB, over the default limit of 64 KiB)."""
        room = self._max_frame() - 2 - 3            # type, flags; on and count
        batch, size = [], 0
        for u in users:
            cost = 1 + len(u.encode())
            if batch and (len(batch) == MAX_SUBSCRIBE or size + cost > room):
                self._proto.transport.write(encode(frames.Subscribe(tuple(batch), on)))
                batch, size = [], 0
            batch.append(u)
            size += cost
        if batch:
            self._proto.transport.write(encode(frames.Subscribe(tuple(batch), on)))

    def _max_frame(self) -> int:
        return self.welcome.max_frame if self.welcome is not None else DEFAULT_MAX_FRAME

    async def recv_presence(self, timeout: float | None = None) -> frames.Presence:
        """The next presence change (user, online, last_seen_ms; 0 when hidden or unknown)."""
        return await asyncio.wait_for(self._presence.get(), timeout)

    async def typing(self, peer: str, typing: bool = True) -> None:
        """Show (or stop showing) `peer` that this user is typing. A hint: never stored."""
        if self.connected:
            self._proto.transport.write(encode(frames.Typing(peer, typing)))

    async def recv_typing(self, timeout: float | None = None) -> frames.Typing:
        """The next typing indicator (peer is who types)."""
        return await asyncio.wait_for(self._typing.get(), timeout)

    async def set_privacy(self, hide_last_seen: bool) -> None:
        if self.connected:
            self._proto.transport.write(encode(frames.Privacy(hide_last_seen)))

    async def recv_receipt(self, timeout: float | None = None) -> Receipt:
        """The next delivery/read receipt for a message this user sent."""
        return await asyncio.wait_for(self._receipts.get(), timeout)

    async def group(self, action: str, group: str, *, timeout: float | None = 10.0, **arg) -> dict:
        """A group operation (create, add, remove, promote, demote, leave, rename,
        info) with its argument (members=[...], name=...). Returns the group:
        {"group", "name", "members": {user: "admin"|"member"}}. One request must fit in
        one frame (max_frame): add many members with several ADDs (ValueError if not)."""
        self._check_usable()
        op = GroupOp[action.upper()]
        req = next(self._ids)
        text = json.dumps(arg, ensure_ascii=False)
        size = 2 + 8 + 1 + 1 + len(group.encode()) + 2 + len(text.encode())    # the frame's length field
        if size > self._max_frame() or len(text.encode()) > 0xFFFF:
            raise ValueError(f"this {action} request would be a {size}-byte frame, over the server's limit of "
                             f"{self._max_frame()} (or its argument over 65535 bytes): send its members in "
                             "several requests")
        data = encode(frames.Group(req, op, group, text))
        fut = self._requests[req] = asyncio.get_running_loop().create_future()
        self._proto.transport.write(data)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._requests.pop(req, None)
            self._info_pieces.pop(req, None)

    async def read(self, *messages: Message) -> None:
        """Tell the senders these messages were read (READ receipts)."""
        by_peer: dict[str, list[int]] = {}
        for m in messages:
            # a group message is known to its sender by the id it got (origin_id)
            by_peer.setdefault(m.sender, []).append(m.origin_id if m.group else m.id)
        if self.connected:
            for peer, ids in by_peer.items():
                for i in range(0, len(ids), 4096):
                    self._proto.transport.write(encode(frames.Read(peer, tuple(ids[i:i + 4096]))))

    async def ack(self, *messages: Message | int) -> None:
        """Tell the server these messages were processed: it drops them (and, later, tells the sender)."""
        ids = [m.id if isinstance(m, Message) else int(m) for m in messages]
        if not ids:
            return
        self._acked_hwm = max(self._acked_hwm, max(ids))
        if self.connected:
            for i in range(0, len(ids), 4096):
                self._proto.transport.write(encode(frames.Received(tuple(ids[i:i + 4096]))))

    # -- frame handling ------------------------------------------------------------
    def _on_frame(self, proto, frame) -> None:
        t = type(frame)
        if t is frames.Deliver:
            if frame.msg_id <= self._seen_hwm:
                if frame.msg_id <= self._acked_hwm:    # processed already: let the server drop it
                    proto.transport.write(encode(frames.Received((frame.msg_id,))))
                return
            self._seen_hwm = frame.msg_id
            if frame.group:
                m = Message(frame.msg_id, frame.timestamp_ms, frame.sender, frame.sender_device, frame.payload,
                            "", frame.origin_id, frame.peer)
            else:
                m = Message(frame.msg_id, frame.timestamp_ms, frame.sender, frame.sender_device, frame.payload,
                            frame.peer, frame.origin_id)
            self._inbox.put_nowait(m)
        elif t is frames.GroupInfo:
            if frame.request_id not in self._requests:
                return
            pieces = self._info_pieces.setdefault(frame.request_id, [])
            pieces.append(frame.info)
            if frame.more:
                return                  # the answer continues in the next GROUP_INFO
            del self._info_pieces[frame.request_id]
            fut = self._requests.pop(frame.request_id)
            if not fut.done():
                fut.set_result(json.loads("".join(pieces)))
        elif t is frames.Receipt:
            # informational: acknowledged at once (a lost receipt is no lost message)
            proto.transport.write(encode(frames.Received((frame.id,))))
            if frame.id > self._seen_hwm:
                self._seen_hwm = frame.id
                r = Receipt(ReceiptKind(frame.kind).name.lower() if frame.kind in (1, 2) else str(frame.kind),
                            frame.msg_id, frame.by, frame.by_device, frame.timestamp_ms)
                if self._receipts.full():
                    self._receipts.get_nowait()
                self._receipts.put_nowait(r)
        elif t is frames.Presence:
            if frame.user not in self._watching:
                return                  # in flight when the application unsubscribed
            if self._presence.full():
                self._presence.get_nowait()
            self._presence.put_nowait(frame)
        elif t is frames.Typing:
            if self._typing.full():
                self._typing.get_nowait()
            self._typing.put_nowait(frame)
        elif t is frames.Ack:
            if frame.seq in self._outbox:
                self._resend_delay = RESEND_FIRST
                self._answered(frame.seq, SendResult(frame.seq, frame.msg_id, frame.timestamp_ms))
        elif t is frames.Welcome:
            if not proto.welcome.done():
                proto.welcome.set_result(frame)
        elif t is frames.Pong:
            fut = self._pongs.get(frame.nonce)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif t is frames.Error:
            err = ServerError(frame.code, frame.reason, frame.ref)
            req = self._requests.pop(frame.ref, None) if frame.ref else None
            if req is not None:
                if not req.done():
                    req.set_exception(err)
                return
            pending = not frame.fatal and frame.ref in self._outbox
            if pending and frame.code in _RESEND:
                self._refused(frame.ref)            # same seq, in order, after the backoff
            elif pending:
                self._answered(frame.ref, exc=err)  # refused for good (or a code this client does not know)
            elif frame.fatal:
                if not proto.welcome.done():
                    proto.welcome.set_exception(err)
                if frame.code in _FATAL_AUTH:
                    self._fatal = err
        elif t is frames.Goaway:
            self.goaway, self.goaway_at = frame, asyncio.get_running_loop().time()
            if frame.code == GoawayCode.REDIRECT and not proto.welcome.done():
                proto.welcome.set_exception(_Redirect(frame.reason))   # in place of WELCOME: go there
                return
            self._reconnect_hint = frame.reconnect_ms / 1000

    def _protocol_error(self, proto, exc: ProtocolError) -> None:
        if not proto.welcome.done():
            proto.welcome.set_exception(exc)

    def _on_lost(self, proto, exc) -> None:
        if not proto.welcome.done():
            proto.welcome.set_exception(ConnectionClosed(f"connection lost before WELCOME: {exc}"))
        if proto is not self._proto or proto is not self._welcomed:
            return                  # a try that got no WELCOME (refused, redirected): the connecting code decides
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("connection lost"))
        if self._closed:
            return
        if self.reconnect and self._fatal is None and self.welcome is not None:
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())
        else:
            self._closed = True
            self._fail_all(self._fatal or ConnectionClosed(f"connection lost: {exc}"))

    async def _reconnect_loop(self) -> None:
        delay = max(self._reconnect_hint, 0.05)
        self._reconnect_hint = 0.0
        while not self._closed:
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                await asyncio.wait_for(self._open_retrying(), self.connect_timeout)
                self.reconnects += 1
                return
            except ServerError as exc:
                if exc.code in _FATAL_AUTH:
                    self._closed = True
                    self._fail_all(exc)
                    return
            except (OSError, asyncio.TimeoutError, ConnectionClosed):
                pass
            delay = min(delay * 2, self.max_backoff)

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ConnectionClosed("client is closed")

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self._outbox):
            self._answered(seq, exc=exc)
        if self._resend_timer is not None:
            self._resend_timer.cancel()
            self._resend_timer = None
        self._inbox.put_nowait(exc if isinstance(exc, ConnectionClosed) else ConnectionClosed(str(exc)))
