"""WebSocket benchmark: Switchboard's WebSocket endpoint against its own TCP
endpoint and against the same small router built on the `websockets` and
`picows` libraries, in one run, with ratios.

    pip install -e '.[bench]'
    python bench/ws_bench.py                       # all targets, 3 s per phase, 10,000 idle connections
    python bench/ws_bench.py --duration 2 --idle 2000 --targets sb-ws,websockets

Targets (each a fresh server process, one worker / one process, stopped by PID):
  sb-ws       switchboard serve --workers 1 --store memory, WebSocket listener
  sb-tcp      the same server's TCP listener (no WebSocket layer)
  websockets  a router on websockets' asyncio server (default settings) in this file
  picows      the same router on picows' server (default settings)

The router speaks the subset of the Switchboard protocol the load needs
(HELLO->WELCOME, SEND->ACK+DELIVER, PING->PONG, RECEIVED ignored), parses every
protocol frame of a message and answers each connection with one message per
incoming message: no store, no auth, no receipts. So the comparison flatters
the libraries: Switchboard also stores every message and keeps per-device inboxes.

Phases, per target:
  idle memory  N connections (handshake + HELLO/WELCOME, then idle): server RSS delta / N
  handshakes   32 concurrent loops of connect, opening handshake, close (WebSocket targets)
  echo         50 connections x 16 PINGs in flight, one PING per WebSocket message: PONGs/s
  routed       50 sender->recipient pairs x 16 SENDs in flight, one SEND (32-byte payload) per
               message as a browser sends them; senders are send-only (no receipts), recipients
               acknowledge with one RECEIVED per server message: DELIVERs/s
Rates are given per wall second and per second of server CPU (the load client
shares this machine's cores with the server; the CPU figure is the server's capacity).
"""
import argparse
import asyncio
import base64
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _core.frames import Hello                    # noqa: E402  (after the path is set)
from _core.protocol import PROTOCOL_VERSION       # noqa: E402
from _core.pycodec import encode                  # noqa: E402

HDR = struct.Struct("!IBB")
U64 = struct.Struct("!Q")
T_HELLO, T_WELCOME, T_SEND, T_ACK, T_DELIVER, T_RECEIVED, T_PING, T_PONG = 1, 2, 3, 4, 5, 6, 7, 8
T_ERROR = 0x09                  # _core/protocol.py FrameType.ERROR
KEY = base64.b64encode(b"0123456789abcdef").decode()


# -- the router the library servers run --------------------------------------------------------

class Router:
    """user -> send(bytes) of its connection; `handle` answers one incoming message."""

    def __init__(self):
        self.users = {}
        self.next_id = 1

    def handle(self, state, data, send):
        out = {}                                      # send function -> [frames], one message each
        pos, n = 0, len(data)
        while pos + 6 <= n:
            length, ftype, _ = HDR.unpack_from(data, pos)
            body = data[pos + 6:pos + 4 + length]
            pos += 4 + length
            if ftype == T_SEND:
                rl = body[8]
                to = bytes(body[9:9 + rl])
                payload = body[9 + rl:]
                msg_id = self.next_id
                self.next_id += 1
                ts = int(time.time() * 1000)
                out.setdefault(send, []).append(HDR.pack(26, T_ACK, 0) + body[:8] + U64.pack(msg_id) + U64.pack(ts))
                target = self.users.get(to)
                if target is not None:
                    sender = state[0]
                    d = U64.pack(msg_id) + U64.pack(ts) + bytes([len(sender)]) + sender + b"\x00" + payload
                    out.setdefault(target, []).append(HDR.pack(len(d) + 2, T_DELIVER, 0) + d)
            elif ftype == T_PING:
                out.setdefault(send, []).append(HDR.pack(10, T_PONG, 0) + body)
            elif ftype == T_HELLO:
                tl = int.from_bytes(body[2:4], "big")
                user = bytes(body[4:4 + tl])                 # the "token" is the user id here
                state[0] = user
                self.users[user] = send
                w = (struct.pack("!HQ", PROTOCOL_VERSION, 1) + bytes([len(user)]) + user + b"\x01d"
                     + struct.pack("!IIIQQI", 65536, 64742, 30000, 0, 1, 1024))
                out.setdefault(send, []).append(HDR.pack(len(w) + 2, T_WELCOME, 0) + w)
        return out

    def gone(self, state, send):
        if state[0] is not None and self.users.get(state[0]) is send:
            del self.users[state[0]]


async def serve_websockets(port):
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed
    router = Router()

    async def handler(ws):
        state = [None]
        try:
            async for message in ws:
                for target, frames in router.handle(state, message, ws).items():
                    try:
                        await target.send(b"".join(frames))      # the library's documented send
                    except ConnectionClosed:
                        pass
        finally:
            router.gone(state, ws)
    async with serve(handler, "127.0.0.1", port, compression=None) as server:
        print(f"listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", flush=True)
        await asyncio.Future()


async def serve_picows(port):
    from picows import WSListener, WSMsgType, ws_create_server
    router = Router()

    class Listener(WSListener):
        def on_ws_connected(self, transport):
            self.state = [None]
            self.send = lambda data: transport.send(WSMsgType.BINARY, data)

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.BINARY:
                for send, frames in router.handle(self.state, frame.get_payload_as_memoryview(), self.send).items():
                    send(b"".join(frames))
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport):
            router.gone(self.state, self.send)
    server = await ws_create_server(lambda request: Listener(), "127.0.0.1", port)
    print(f"listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", flush=True)
    await asyncio.Future()


# -- processes ---------------------------------------------------------------------------------

class Server:
    """A server process started for one target; stopped by PID."""

    def __init__(self, target, data_dir):
        self.target = target
        if target in ("sb-ws", "sb-tcp"):
            cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--workers", "1", "--store", "memory",
                   "--data-dir", data_dir, "--log-level", "WARNING", "--max-pending", "1000000", "--msg-rate", "0", "--connect-rate", "0"]
        else:
            cmd = [sys.executable, __file__, "--serve", target]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on tcp://[\d.]+:(\d+) and ws://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1) if target == "sb-tcp" else m.group(2))
                break
            m = re.search(r"listening on ws://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            line = ""
        if not hasattr(self, "port"):
            self.stop()
            raise SystemExit(f"{target} did not start: {line}")
        self.pid = self.proc.pid
        # keep reading its output (a full pipe would stall the server); keep the tail for errors
        self.tail = []
        threading.Thread(target=self._drain, daemon=True).start()
        if target.startswith("sb-"):                 # measure the worker, not the supervisor
            for _ in range(100):
                kids = _children(self.proc.pid)
                if kids:
                    self.pid = kids[0]
                    break
                time.sleep(0.02)
        self.auth = None
        if target.startswith("sb-"):
            from gateway.auth import TokenAuthority, load_secret
            self.auth = TokenAuthority(load_secret(data_dir))

    def _drain(self):
        for line in self.proc.stdout:
            self.tail = (self.tail + [line])[-20:]

    @property
    def websocket(self):
        return self.target != "sb-tcp"

    def token(self, user):
        return self.auth.issue(user, "", ttl=3600) if self.auth else user

    def rss(self):
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024

    def cpu(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


# -- the load client ----------------------------------------------------------------------------

def ws_wrap(data: bytes) -> bytes:
    """A client frame with the all-zero mask key (legal; the server still unmasks)."""
    n = len(data)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + data


def frame(ftype, body):
    return HDR.pack(len(body) + 2, ftype, 0) + body


def hello(token, send_only=False):
    """Built by the project's own encoder, so the bench speaks the protocol the server does."""
    return encode(Hello(PROTOCOL_VERSION, token, "d", send_only=send_only))


class Conn(asyncio.Protocol):
    """One load connection. `on_frames(conn, [(type, body)])` gets the protocol frames of each server message."""

    def __init__(self, websocket, port, on_frames=None):
        self.websocket, self.port, self.on_frames = websocket, port, on_frames
        self.ready = asyncio.get_running_loop().create_future()
        self.upgraded = not websocket
        self.buf = b""
        self.welcome = None

    def connection_made(self, transport):
        self.transport = transport
        if self.websocket:
            transport.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                             f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                             f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        elif not self.ready.done():
            self.ready.set_result(None)

    def send(self, data):
        self.transport.write(ws_wrap(data) if self.websocket else data)

    def send_each(self, frames):
        """Each protocol frame as its own WebSocket message (as a browser's ws.send() per
        chat message does), all in one TCP write."""
        self.transport.write(b"".join(map(ws_wrap, frames)) if self.websocket else b"".join(frames))

    def data_received(self, data):
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise SystemExit(f"handshake refused: {buf[:80]!r}")
            self.upgraded = True
            buf = buf[end + 4:]
            if not self.ready.done():
                self.ready.set_result(None)
        frames, pos, n = [], 0, len(buf)
        if self.websocket:
            while pos + 2 <= n:
                ln = buf[pos + 1] & 0x7F
                h = 2
                if ln == 126:
                    if pos + 4 > n:
                        break
                    ln, h = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
                elif ln == 127:
                    if pos + 10 > n:
                        break
                    ln, h = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                if pos + h + ln > n:
                    break
                if buf[pos] & 0x0F == 2:
                    _proto(buf, pos + h, pos + h + ln, frames)
                pos += h + ln
        else:
            pos = _proto(buf, 0, n, frames)
        self.buf = buf[pos:]
        if frames:
            for ftype, body in frames:
                if ftype == T_WELCOME and self.welcome is None:
                    self.welcome = True
                    self.hello_done.set_result(None)
                elif ftype == T_ERROR and self.welcome is None and not self.hello_done.done():
                    self.hello_done.set_exception(ConnectionError(f"HELLO refused: {bytes(body)!r}"))
            if self.on_frames is not None:
                self.on_frames(self, frames)

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost: {exc}"))
        hello_done = getattr(self, "hello_done", None)
        if hello_done is not None and not hello_done.done():     # closed before WELCOME: say so, never hang
            hello_done.set_exception(ConnectionError(f"closed before WELCOME: {exc}"))

    async def login(self, token, send_only=False):
        self.hello_done = asyncio.get_running_loop().create_future()
        self.send(hello(token, send_only))
        await self.hello_done


def _proto(buf, pos, end, out):
    while pos + 6 <= end:
        length, ftype, _ = HDR.unpack_from(buf, pos)
        if pos + 4 + length > end:
            break
        out.append((ftype, buf[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return pos


async def connect(server, on_frames=None):
    loop = asyncio.get_running_loop()
    _, c = await loop.create_connection(lambda: Conn(server.websocket, server.port, on_frames),
                                        "127.0.0.1", server.port)
    await c.ready
    return c


async def phase_idle(server, count):
    """Server RSS per idle session: handshake + HELLO/WELCOME, then nothing."""
    base = server.rss()
    conns = []
    sem = asyncio.Semaphore(200)

    async def one(i):
        async with sem:
            c = await connect(server)
            await c.login(server.token(f"idle{i}"))
            conns.append(c)
    await asyncio.gather(*(one(i) for i in range(count)))
    await asyncio.sleep(0.5)                      # let the server settle (no reads pending)
    per = (server.rss() - base) / count
    for c in conns:
        c.transport.close()
    await settle(server)
    return per


async def settle(server, limit=20.0):
    """Wait until the server has finished with what the last phase left (its CPU goes quiet)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = server.cpu()
        await asyncio.sleep(0.25)
        if server.cpu() - c0 < 0.02:
            return


async def phase_handshakes(server, duration):
    loop = asyncio.get_running_loop()
    done = 0
    stop = loop.time() + duration

    close = bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big")

    async def worker():
        nonlocal done
        while loop.time() < stop:
            c = await connect(server)
            c.transport.write(close)             # a polite goodbye (Close 1000), then hang up
            c.transport.close()
            done += 1
    cpu = server.cpu()
    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(32)))
    wall = loop.time() - start
    return done / wall, done / max(server.cpu() - cpu, 1e-9)


async def phase_echo(server, duration, conns_n=50, window=16):
    state = {"count": 0, "running": True}
    ping = frame(T_PING, U64.pack(7))

    def on_frames(c, frames):
        k = sum(1 for t, _ in frames if t == T_PONG)
        state["count"] += k
        if k and state["running"]:
            c.send_each([ping] * k)
    conns = [await connect(server, on_frames) for _ in range(conns_n)]
    for i, c in enumerate(conns):
        await c.login(server.token(f"echo{i}"))
    try:
        return await _measure(server, duration, conns, lambda c: c.send_each([ping] * window), lambda: state["count"])
    finally:
        state["running"] = False
        for c in conns:
            c.transport.close()


async def _measure(server, duration, conns, kick, counter):
    """Start the load, warm up 0.5 s, then count for `duration`: (per wall second, per server CPU second)."""
    for c in conns:
        kick(c)
    await asyncio.sleep(0.5)                       # warm up
    n0, cpu0, t0 = counter(), server.cpu(), time.monotonic()
    await asyncio.sleep(duration)
    n1, cpu1, t1 = counter(), server.cpu(), time.monotonic()
    return (n1 - n0) / (t1 - t0), (n1 - n0) / max(cpu1 - cpu0, 1e-9)


async def phase_routed(server, duration, pairs=50, window=16):
    delivered = 0
    payload = b"x" * 32
    state = {"running": True}

    def sends(c, k):
        """The next k SENDs of this sender: its producer's seqs run 1, 2, 3, ... (PROTOCOL.md section 6)."""
        out = []
        for _ in range(k):
            c.seq += 1
            out.append(frame(T_SEND, U64.pack(c.seq) + bytes([len(c.peer)]) + c.peer + payload))
        return out

    def on_sender(c, frames):
        k = sum(1 for t, _ in frames if t == T_ACK)
        errors = [bytes(b) for t, b in frames if t == T_ERROR]
        if errors:                                   # a refused SEND would shrink the window unseen
            state.setdefault("errors", errors)
        if k and state["running"]:
            c.send_each(sends(c, k))

    def on_recipient(c, frames):
        nonlocal delivered
        ids = [bytes(b[:8]) for t, b in frames if t == T_DELIVER]
        if ids:
            delivered += len(ids)
            c.send(frame(T_RECEIVED, len(ids).to_bytes(2, "big") + b"".join(ids)))
    senders, recipients = [], []
    for i in range(pairs):
        r = await connect(server, on_recipient)
        await r.login(server.token(f"rcpt{i}"))
        s = await connect(server, on_sender)
        await s.login(server.token(f"send{i}"), send_only=True)     # no receipts: the libraries' router has none
        s.peer, s.seq = f"rcpt{i}".encode(), 0
        senders.append(s)
        recipients.append(r)

    try:
        rates = await _measure(server, duration, senders, lambda c: c.send_each(sends(c, window)), lambda: delivered)
        if "errors" in state:
            raise SystemExit(f"{server.target}: the server refused SENDs: {state['errors'][0]!r}")
        return rates
    finally:
        state["running"] = False
        for c in senders + recipients:
            c.transport.close()


def codec_rates(messages=200_000, size=64):
    """Client frames parsed and unmasked per second by one core, on the same bytes:
    our WsReader (payloads streamed into the protocol Decoder, which counts SENDs at
    C level) and the websockets library's sans-I/O ServerProtocol (what its server runs)."""
    import random
    from _core._codec import Decoder, SendCounter
    from _core._ws import WsReader
    send = frame(T_SEND, U64.pack(1) + b"\x03bob" + b"x" * (size - 18))
    key = bytes(random.randrange(256) for _ in range(4))
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(send))
    one = bytes([0x82, 0x80 | len(send)]) + key + masked
    wire = one * messages
    chunks = [wire[i:i + 65536] for i in range(0, len(wire), 65536)]
    out = {}
    counter = SendCounter()
    reader = WsReader(Decoder(counter, 1 << 20), lambda op, p: None, 1 << 20)
    t = time.perf_counter()
    for c in chunks:
        reader.feed(c)
    out["switchboard"] = messages / (time.perf_counter() - t)
    assert counter.sends == messages
    try:
        from websockets.server import ServerProtocol
        from websockets.protocol import State
    except ImportError:
        return out
    proto = ServerProtocol(max_size=None)
    proto.receive_data((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    proto.send_response(proto.accept(proto.events_received()[0]))
    assert proto.state is State.OPEN
    got = 0
    t = time.perf_counter()
    for c in chunks:
        proto.receive_data(c)
        got += len(proto.events_received())
    out["websockets"] = messages / (time.perf_counter() - t)
    assert got == messages
    return out


async def run_target(target, args, data_dir):
    server = Server(target, data_dir)
    res = {"target": target}
    try:
        res["idle_bytes"] = await phase_idle(server, args.idle)
        if server.websocket:
            res["handshakes"], res["handshakes_cpu"] = await phase_handshakes(server, args.duration)
            await settle(server)
        res["echo"], res["echo_cpu"] = await phase_echo(server, args.duration)
        await settle(server)
        res["routed"], res["routed_cpu"] = await phase_routed(server, args.duration)
    finally:
        server.stop()
    return res


def table(results):
    by = {r["target"]: r for r in results}
    cols = [("idle_bytes", "idle B/conn", "{:,.0f}"), ("handshakes", "handshakes/s", "{:,.0f}"),
            ("handshakes_cpu", "handshakes/CPU-s", "{:,.0f}"), ("echo", "echo/s", "{:,.0f}"),
            ("echo_cpu", "echo/CPU-s", "{:,.0f}"), ("routed", "routed/s", "{:,.0f}"),
            ("routed_cpu", "routed/CPU-s", "{:,.0f}")]
    lines = ["| target | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['target']} | " + " | ".join(
            c[2].format(r[c[0]]) if c[0] in r else "—" for c in cols) + " |")
    sb = by.get("sb-ws")
    if sb:
        for other in ("sb-tcp", "websockets", "picows"):
            o = by.get(other)
            if not o:
                continue
            cells = []
            for key, _, _ in cols:
                if key in sb and key in o and o[key]:
                    ratio = sb[key] / o[key]
                    if key == "idle_bytes":
                        ratio = o[key] / sb[key]          # smaller is better: how many times less memory
                    cells.append(f"{ratio:.2f}x")
                else:
                    cells.append("—")
            lines.append(f"| sb-ws vs {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main(args):
    results = []
    codec = codec_rates()
    print("codec, client frames of 64 bytes parsed+unmasked per second (one core): "
          + ", ".join(f"{k} {v:,.0f}" for k, v in codec.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        for i, target in enumerate(args.targets.split(",")):
            r = await run_target(target, args, os.path.join(tmp, f"d{i}"))
            print(json.dumps(r), flush=True)
            results.append(r)
    print()
    print(table(results))
    print("\n(idle ratios: how many times less memory sb-ws uses; others: sb-ws / other)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="sb-ws,sb-tcp,websockets,picows",
                    help="comma-separated: sb-ws, sb-tcp, websockets, picows (default: all)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per throughput phase (default 3)")
    ap.add_argument("--idle", type=int, default=10_000,
                    help="connections held for the idle-memory phase (default 10000; at most 15000)")
    ap.add_argument("--serve", choices=["websockets", "picows"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop
        uvloop.run(serve_websockets(0) if a.serve == "websockets" else serve_picows(0))
    else:
        if not 1 <= a.idle <= 15_000 or not 0.5 <= a.duration <= 30:
            ap.error("--idle must be 1..15000 and --duration 0.5..30 (the machine is shared)")
        import uvloop
        uvloop.run(main(a))
