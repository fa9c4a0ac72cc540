"""One density client process: opens idle sessions from one source address
and keeps them alive with PINGs, on command from `bench.density` (JSON lines
on stdin, one JSON reply per command on stdout).

A process is capped at 20,000 open files, and a source address has ~64k
ports per destination, so the orchestrator runs many of these, each bound to
its own 127.0.0.x address.

The sessions are plain non-blocking sockets on one epoll set, and the event
loop watches only that set: an asyncio transport and protocol per session cost
this process about 110 µs of CPU per connect, as much as the server's whole
session open, so the benchmark measured its own client (docs/benchmarks.md,
"Connect rate"). The frames a session writes (a greeting, a PING, a SEND, a
RECEIVED) are a few bytes on an idle socket: one send() each."""
import argparse
import asyncio
import collections
import errno
import json
import os
import random
import select
import socket
import sys
import time
from collections import Counter

import uvloop

from . import dialects, procstat

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Source ports we hand out (below the kernel's ephemeral range, so the two never meet).
FIRST_PORT, LAST_PORT = 10_000, 32_000
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR
_READ = 65536
_BATCH = 4096                       # epoll events taken per poll


class Session:
    """One connection as the dialects see it: `pending` bytes, `write()`, and the
    on_* callbacks of its parser."""
    __slots__ = ("client", "sock", "pending", "ready", "user", "index", "why", "seq", "deadline")

    def __init__(self, client, sock, user, index, deadline):
        self.client = client
        self.sock = sock
        self.pending = b""
        self.ready = False
        self.user = user
        self.index = index
        self.why = None          # what the server said before closing (GOAWAY, ERROR)
        self.seq = 0             # SEND seqs of this session's producer (PROTOCOL.md section 6)
        self.deadline = deadline  # for its handshake (monotonic s)

    def write(self, data):
        try:
            if self.sock.send(data) == len(data):
                return
            why = "send buffer full"
        except BlockingIOError:
            why = "send buffer full"
        except OSError as exc:
            why = f"{type(exc).__name__}: {os.strerror(exc.errno)}" if exc.errno else type(exc).__name__
        self.client.lose(self, why)       # an idle session whose few bytes do not fit is stalled

    def on_ready(self):
        self.ready = True
        self.client.opened(self)

    def on_failed(self, reason):
        self.why = reason
        self.client.lose(self, reason)

    def on_pong(self):
        self.client.pongs += 1
        self.client.awaiting.discard(self)

    def on_message(self, tail):
        self.client.on_message(self, tail)


class Client:
    def __init__(self, args):
        self.args = args
        self.dialect = dialects.make(args.dialect, args.data_dir)
        self.live: dict[int, Session] = {}
        self.by_fd: dict[int, Session] = {}
        self.lost = Counter()
        self.next_index = 0
        self.next_port = FIRST_PORT
        self.pongs = 0
        self.awaiting = set()          # sessions that have not answered the last ping_all
        self.due = collections.deque()  # (last PING or HELLO time, session), oldest first
        self.loop = asyncio.get_running_loop()
        self.messages = {}
        self.epoll = select.epoll()
        self.loop.add_reader(self.epoll.fileno(), self._events)
        self._opening = None            # the open() in progress: [left to start, in flight, failed, done future]

    def user(self, i: int) -> str:
        return f"{self.args.prefix}{i}"

    # -- the epoll set ------------------------------------------------------------
    def _events(self) -> None:
        by_fd, dialect = self.by_fd, self.dialect
        while True:
            events = self.epoll.poll(0, _BATCH)
            for fd, ev in events:
                s = by_fd.get(fd)
                if s is None:
                    continue
                if s.deadline and ev & _OUT:            # a connect finished, or failed
                    err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.lose(s, f"ConnectionError: {os.strerror(err)}")
                        continue
                    self.epoll.modify(fd, _IN)
                    greeting = dialect.greeting(s.user)
                    if greeting:
                        s.write(greeting)
                    else:
                        s.on_ready()
                    continue
                try:
                    data = s.sock.recv(_READ)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.lose(s, f"{type(exc).__name__}: {os.strerror(exc.errno)}")
                    continue
                if not data:
                    self.lose(s, None)
                else:
                    dialect.feed(s, data)
            if len(events) < _BATCH:
                return

    def opened(self, s: Session) -> None:
        """Its handshake is done (WELCOME, first PONG, 101 Switching Protocols)."""
        s.deadline = 0.0
        self.live[s.index] = s
        self.due.append((time.monotonic(), s))
        self._finished_one(None)

    def lose(self, s: Session, why) -> None:
        """The session is closed (by the server, a failed write, a failed handshake)."""
        if self.by_fd.pop(s.sock.fileno(), None) is None:
            return
        try:
            self.epoll.unregister(s.sock)
        except OSError:
            pass
        s.sock.close()
        if s.deadline:                     # still in its handshake
            self._finished_one(why or "closed by server before ready")
        elif self.live.pop(s.index, None) is not None:
            self.lost[s.why or why or "closed by server"] += 1
        self.awaiting.discard(s)

    # -- opening ------------------------------------------------------------------
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

    def _start_one(self):
        """A non-blocking connect from the next source port; the failure's reason, or None."""
        i = self.next_index
        self.next_index += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._bind(sock)
            sock.setblocking(False)
            err = sock.connect_ex(self.target)
        except OSError as exc:
            sock.close()
            return f"{type(exc).__name__}: {os.strerror(exc.errno)}" if exc.errno else type(exc).__name__
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return f"ConnectionError: {os.strerror(err)}"
        s = Session(self, sock, self.user(i), i, time.monotonic() + self.args.timeout)
        self.by_fd[sock.fileno()] = s
        self.epoll.register(sock, _OUT)
        return None

    def _finished_one(self, failure) -> None:
        op = self._opening
        if op is None:
            return
        op[1] -= 1
        if failure is not None:
            op[2][failure] += 1
        self._fill()

    def _fill(self) -> None:
        """Keep `concurrency` handshakes in flight until `n` were started."""
        op = self._opening
        while op[0] > 0 and op[1] < self.args.concurrency:
            op[0] -= 1
            failure = self._start_one()
            if failure is None:
                op[1] += 1
            else:
                op[2][failure] += 1
        if op[0] == 0 and op[1] == 0 and not op[3].done():
            op[3].set_result(None)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for s in [s for s in self.by_fd.values() if s.deadline and s.deadline <= now]:
            self.lose(s, "TimeoutError")

    async def open(self, n: int) -> dict:
        """Open `n` more sessions, at most `concurrency` handshakes at a time."""
        failed = Counter()
        t0 = time.perf_counter()
        self.target = (self.args.host, self.args.port)
        done = self.loop.create_future()
        self._opening = [n, 0, failed, done]
        self._fill()
        try:
            while not done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(done), 0.25)
                except asyncio.TimeoutError:
                    self._expire_handshakes()
                    print(json.dumps({"progress": len(self.live)}), flush=True)
        finally:
            self._opening = None
        return {"opened": n - sum(failed.values()), "failed": dict(failed), "secs": time.perf_counter() - t0,
                "live": len(self.live), "lost": dict(self.lost)}

    # -- idle sessions ------------------------------------------------------------
    async def ping_all(self, timeout: float) -> dict:
        """PING every live session; count answers (a dead session never answers)."""
        want = len(self.live)
        self.awaiting = set(self.live.values())
        ping = self.dialect.ping()
        for s in list(self.awaiting):
            s.write(ping)
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
            s.write(self.dialect.ping())
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
                if self.live.get(s.index) is s:                # closed ones drop out here
                    s.write(ping)
                    due.append((limit + interval, s))

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        for s in list(self.by_fd.values()):
            s.sock.close()
        self.by_fd.clear()
        self.epoll.close()


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
    client.close()


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
