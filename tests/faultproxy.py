"""A TCP proxy that injects faults between a gateway node and a NATS server.

NATS connections are long-lived TCP: killing the server tests a dead server, not a node
that loses its network. The node connects to `proxy.url` instead of the server:
`cut()` drops every proxied connection and refuses new ones until `restore()` (a node
without NATS); `stall()` stops passing server->client bytes while keeping the connections
open, so the server's writes back up and it sees a slow consumer or a stale connection.

The proxy runs its own asyncio loop in its own thread, so a test's code (sync or async,
on another loop) drives it with plain method calls that return once the fault is in place.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading


class _Pair:
    """One proxied connection: the client's transport and the upstream (server's) one."""

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []        # client bytes that came before upstream connected
        self.client_full = False            # the client's transport buffer is past its high water
        self.upstream_full = False

    def update_upstream_reading(self) -> None:
        """Read from the server only when not stalled and the client can take more."""
        if self.upstream is None or self.upstream.is_closing():
            return
        if self.proxy._stalled or self.client_full:
            self.upstream.pause_reading()
        else:
            self.upstream.resume_reading()

    def close(self) -> None:
        for t in (self.client, self.upstream):
            if t is not None and not t.is_closing():
                t.abort()
        self.proxy._pairs.discard(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        self.pair = _Pair(proxy)

    def connection_made(self, transport):
        proxy = self.proxy
        if proxy._cut:
            proxy.refused += 1
            sock = transport.get_extra_info("socket")
            if sock is not None:        # RST, not FIN: a refused connection, as from a dead host
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return
        proxy.connections += 1
        self.pair.client = transport
        proxy._pairs.add(self.pair)
        transport.pause_reading()       # until upstream is connected
        asyncio.ensure_future(self._connect_upstream())

    async def _connect_upstream(self):
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _UpstreamSide(self.pair), self.proxy.target_host,
                                         self.proxy.target_port)
        except OSError:
            self.pair.close()
            return
        if self.pair.client is None or self.pair.client.is_closing():
            self.pair.close()
            return
        self.pair.client.resume_reading()

    def data_received(self, data):
        self.proxy.bytes_up += len(data)
        if self.pair.upstream is None:
            self.pair.early.append(data)
        else:
            self.pair.upstream.write(data)

    def pause_writing(self):
        self.pair.client_full = True
        self.pair.update_upstream_reading()

    def resume_writing(self):
        self.pair.client_full = False
        self.pair.update_upstream_reading()

    def connection_lost(self, exc):
        self.pair.close()


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, pair: _Pair):
        self.pair = pair

    def connection_made(self, transport):
        self.pair.upstream = transport
        for data in self.pair.early:
            transport.write(data)
        self.pair.early.clear()
        self.pair.update_upstream_reading()

    def data_received(self, data):
        self.pair.proxy.bytes_down += len(data)
        if self.pair.client is not None:
            self.pair.client.write(data)

    def pause_writing(self):        # the server does not read: stop reading the client
        self.pair.upstream_full = True
        if self.pair.client is not None and not self.pair.client.is_closing():
            self.pair.client.pause_reading()

    def resume_writing(self):
        self.pair.upstream_full = False
        if self.pair.client is not None and not self.pair.client.is_closing():
            self.pair.client.resume_reading()

    def connection_lost(self, exc):
        self.pair.close()


class FaultProxy:
    """`FaultProxy(host, port).start()` listens on 127.0.0.1:<free port> and forwards to
    host:port. Counters: connections (proxied), refused (while cut), active, bytes_up
    (client->server), bytes_down (server->client)."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.connections = 0
        self.refused = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._cut = False
        self._stalled = False
        self._pairs: set[_Pair] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def to(cls, url: str) -> FaultProxy:
        """A started proxy in front of "nats://host:port"."""
        host, port = url.rsplit("//", 1)[-1].rsplit(":", 1)
        return cls(host, int(port)).start()

    @property
    def url(self) -> str:
        return f"nats://{self.listen_host}:{self.port}"

    @property
    def active(self) -> int:
        return len(self._pairs)

    def start(self, timeout: float = 5.0) -> FaultProxy:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _ClientSide(self), self.listen_host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:
                failed.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy->{self.target_port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("fault proxy did not start")
        if failed:
            raise failed[0]
        return self

    def _call(self, fn, timeout: float = 5.0):
        """Run fn() on the proxy's loop and wait for it: the fault is in place on return."""
        async def wrapper():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def cut(self) -> None:
        """Close every proxied connection now and refuse new ones until restore()."""
        def do():
            self._cut = True
            for pair in list(self._pairs):
                pair.close()
        self._call(do)

    def restore(self) -> None:
        def do():
            self._cut = False
        self._call(do)

    def stall(self) -> None:
        """Stop passing server->client bytes; connections stay open and client->server flows."""
        def do():
            self._stalled = True
            for pair in self._pairs:
                pair.update_upstream_reading()
        self._call(do)

    def unstall(self) -> None:
        def do():
            self._stalled = False
            for pair in self._pairs:
                pair.update_upstream_reading()
        self._call(do)

    def close(self) -> None:
        """Stop listening, drop every connection, stop the thread."""
        if self._loop is None or self._thread is None:
            return

        def do():
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                pair.close()
        try:
            self._call(do)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.close()
