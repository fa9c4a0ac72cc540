"""One density client process: opens idle sessions from one source address
and keeps them alive with PINGs, on command from `bench.density` (JSON lines
on stdin, one JSON reply per command on stdout).

A process is capped at 20,000 open files, and a source address has ~64k
ports per destination, so the orchestrator runs many of these, each bound to
its own 127.0.0.x address."""
import argparse
import asyncio
import collections
import errno
import json
import os
import socket
import sys
import time
from collections import Counter

import uvloop

from . import dialects, procstat

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Source ports we hand out (below the kernel's ephemeral range, so the two never meet).
FIRST_PORT, LAST_PORT = 10_000, 32_000


class Session(asyncio.Protocol):
    __slots__ = ("client", "transport", "pending", "ready", "user", "waiter", "index", "why", "seq")

    def __init__(self, client, user, index):
        self.client = client
        self.transport = None
        self.pending = b""
        self.ready = False
        self.user = user
        self.index = index
        self.waiter = None
        self.why = None          # what the server said before closing (GOAWAY, ERROR)
        self.seq = 0             # SEND seqs of this session's producer (PROTOCOL.md section 6)

    def connection_made(self, transport):
        self.transport = transport
        greeting = self.client.dialect.greeting(self.user)
        if greeting:
            transport.write(greeting)
        else:
            self.on_ready()

    def data_received(self, data):
        self.client.dialect.feed(self, data)

    def write(self, data):
        self.transport.write(data)

    def on_ready(self):
        self.ready = True
        self._wake(None)

    def on_failed(self, reason):
        self.why = reason
        self._wake(reason)
        self.transport.close()

    def on_pong(self):
        self.client.pongs += 1
        self.client.awaiting.discard(self)

    def on_message(self, tail):
        self.client.on_message(self, tail)

    def _wake(self, result):
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(result)

    def connection_lost(self, exc):
        self._wake("closed by server before ready")
        if self.ready:
            self.client.lost[self.why or (type(exc).__name__ if exc else "closed by server")] += 1
            self.client.live.pop(self.index, None)


class Client:
    def __init__(self, args):
        self.args = args
        self.dialect = dialects.make(args.dialect, args.data_dir)
        self.live: dict[int, Session] = {}
        self.lost = Counter()
        self.next_index = 0
        self.next_port = FIRST_PORT
        self.pongs = 0
        self.awaiting = set()          # sessions that have not answered the last ping_all
        self.due = collections.deque()  # (last PING or HELLO time, session), oldest first
        self.loop = asyncio.get_running_loop()
        self.messages = {}

    def user(self, i: int) -> str:
        return f"{self.args.prefix}{i}"

    async def _open_one(self, failed: Counter) -> None:
        i = self.next_index
        self.next_index += 1
        s = Session(self, self.user(i), i)
        s.waiter = waiter = self.loop.create_future()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._bind(sock)
            sock.setblocking(False)
            await self.loop.sock_connect(sock, (self.args.host, self.args.port))
            await self.loop.create_connection(lambda: s, sock=sock)
            reason = await asyncio.wait_for(waiter, self.args.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {os.strerror(exc.errno)}" if getattr(exc, "errno", None) \
                else type(exc).__name__
        if reason is None:
            self.live[i] = s
            self.due.append((time.monotonic(), s))
        else:
            failed[reason] += 1
            if s.transport is not None:
                s.transport.abort()
            else:
                sock.close()

    def _bind(self, sock) -> None:
        """Bind the next free source port ourselves. Letting the kernel pick one
        searches the port space per connect, and with thousands of connections
        per address that search was 94% of this process's time (2-4 k connects/s).
        SO_REUSEADDR lets a port be bound again while an earlier run's
        connection from it sits in TIME_WAIT (connect still checks the 4-tuple)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while self.next_port <= LAST_PORT:
            port, self.next_port = self.next_port, self.next_port + 1
            try:
                sock.bind((self.args.src, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.args.src, 0))            # our range is used up: the kernel's search

    async def open(self, n: int) -> dict:
        """Open `n` more sessions, at most `concurrency` handshakes at a time."""
        failed = Counter()
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.args.concurrency)

        async def one():
            async with sem:
                await self._open_one(failed)

        async def progress():
            while True:
                await asyncio.sleep(0.25)
                print(json.dumps({"progress": len(self.live)}), flush=True)
        reporter = self.loop.create_task(progress())
        try:
            await asyncio.gather(*(one() for _ in range(n)))
        finally:
            reporter.cancel()
        return {"opened": n - sum(failed.values()), "failed": dict(failed), "secs": time.perf_counter() - t0,
                "live": len(self.live), "lost": dict(self.lost)}

    async def ping_all(self, timeout: float) -> dict:
        """PING every live session; count answers (a dead session never answers)."""
        want = len(self.live)
        self.awaiting = set(self.live.values())
        ping = self.dialect.ping()
        for s in list(self.awaiting):
            s.transport.write(ping)
        deadline = time.monotonic() + timeout
        while self.awaiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        answered = want - len(self.awaiting)
        self.awaiting = set()
        return {"sessions": want, "answered": answered}

    def on_message(self, session, tail):
        fut = self.messages.pop(bytes(tail), None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    async def check(self, pairs: int, timeout: float) -> dict:
        """Round-trip a message between `pairs` pairs of live sessions."""
        if not isinstance(self.dialect, dialects.Switchboard):
            r = await self.ping_all_sample(pairs, timeout)
            return r
        live = list(self.live.values())
        ok, rtts, failed = 0, [], 0
        import random
        for k in range(min(pairs, len(live) // 2)):
            a, b = random.sample(live, 2)
            tag = os.urandom(16)
            fut = self.loop.create_future()
            self.messages[tag] = fut
            t0 = time.perf_counter()
            a.seq += 1
            a.write(self.dialect.send(a.seq, b.user, b"density check " + tag))
            try:
                t1 = await asyncio.wait_for(fut, timeout)
                ok += 1
                rtts.append((t1 - t0) * 1000)
            except asyncio.TimeoutError:
                failed += 1
                self.messages.pop(tag, None)
        return {"ok": ok, "failed": failed, "rtt_ms": rtts}

    async def ping_all_sample(self, k, timeout):
        """Peers without messaging: a PING round trip on `k` sessions stands in."""
        sample = list(self.live.values())[:k]
        self.awaiting = set(sample)
        t0 = time.perf_counter()
        for s in sample:
            s.transport.write(self.dialect.ping())
        deadline = time.monotonic() + timeout
        while self.awaiting and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        missing = len(self.awaiting)
        self.awaiting = set()
        return {"ok": len(sample) - missing, "failed": missing, "rtt_ms": [(time.perf_counter() - t0) * 1000]}

    async def keepalive(self) -> None:
        """PING each session once per interval after its last PING (or its
        HELLO), paced by the clock: sessions wait in a queue ordered by when they
        are due, so every gap is one interval however late a tick comes (a
        session silent for 3 of the server's ping intervals is closed as idle)."""
        interval = self.args.ping_interval
        if interval <= 0:
            return
        ping = self.dialect.ping()
        due = self.due
        while True:
            await asyncio.sleep(0.1)
            limit = time.monotonic() - interval
            while due and due[0][0] <= limit:
                _, s = due.popleft()
                if s.index in self.live:                     # closed ones drop out here
                    s.transport.write(ping)
                    due.append((limit + interval, s))


async def main(args) -> None:
    client = Client(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    keepalive = loop.create_task(client.keepalive())
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "open":
            reply = await client.open(cmd["n"])
        elif op == "ping_all":
            reply = await client.ping_all(cmd.get("timeout", 30))
        elif op == "check":
            reply = await client.check(cmd["pairs"], cmd.get("timeout", 10))
        elif op == "memory":
            reply = procstat.memory([os.getpid()])
        elif op == "exit":
            break
        else:
            reply = {"error": f"unknown op {op}"}
        print(json.dumps(reply), flush=True)
    keepalive.cancel()
    for s in client.live.values():
        s.transport.abort()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialect", required=True, choices=["switchboard", "floor", "websockets", "nats", "redis"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--src", default="127.0.0.1", help="source address to bind")
    ap.add_argument("--prefix", default="u", help="user names are PREFIX0, PREFIX1, ...")
    ap.add_argument("--data-dir", help="server data dir (Switchboard tokens)")
    ap.add_argument("--ping-interval", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=20.0)
    return ap.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
