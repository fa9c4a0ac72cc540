"""Limits and abuse against a real gateway process (docs/limits.md): each limit
triggered and reported, a reader that stops reading, a garbage flood and a
slowloris while a real client keeps chatting. 127.0.0.x source addresses stand
for distinct clients."""
import asyncio
import collections
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_metrics import scrape, value

from _core import frames as F
from _core.protocol import ErrorCode, GoawayCode
from _core.pycodec import Decoder, encode

from rawclient import Raw

HERE = Path(__file__).resolve().parent


class RawFrom(Raw):
    """A Raw client from a chosen source address (and receive buffer)."""

    def __init__(self, gw, ip: str, timeout: float = 5.0, rcvbuf: int = 0):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.bind((ip, 0))
        s.connect((gw.host, gw.port))
        self.sock = s
        self.frames = collections.deque()
        self.decoder = Decoder(self._sink, 1 << 24)
        self.closed = False


def wait_for_log(gw, pattern: str, timeout: float = 15.0) -> re.Match:
    """The server's own log line (a real signal), polled until the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, gw.text)
        if m:
            return m
        time.sleep(0.02)
    raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:\n{gw.text[-3000:]}")


def refused(r: Raw, code: ErrorCode) -> None:
    frames, closed = r.until_eof()
    assert closed and len(frames) == 1, frames
    err = frames[0]
    assert isinstance(err, F.Error) and err.fatal and err.code == code, err



def admitted_again(gw, addr: str, refused_with: int | None = None, within: float = 5.0) -> None:
    """Retry a HELLO from `addr` until it gets WELCOME (within `within` s); a
    refusal in between must carry `refused_with` when that is given."""
    deadline = time.monotonic() + within
    while True:
        with RawFrom(gw, addr) as r:
            r.send(encode(F.Hello(2, gw.token("again"), "raw", 0)))
            f = r.frame()
        if isinstance(f, F.Welcome):
            return
        if refused_with is not None:
            assert isinstance(f, F.Error) and f.code == refused_with, f
        assert time.monotonic() < deadline, f
        time.sleep(0.05)                                 # pacing the retries, as a client backs off

def test_connections_per_ip(gateway_factory):
    gw = gateway_factory("--workers", "1", "--max-conns-per-ip", "3")
    held = [RawFrom(gw, "127.0.0.2") for _ in range(3)]
    for i, r in enumerate(held):
        r.hello(gw.token(f"u{i}"))
    with RawFrom(gw, "127.0.0.2") as fourth:
        refused(fourth, ErrorCode.RATE_LIMITED)
    with RawFrom(gw, "127.0.0.3") as other:             # another address is not affected
        other.hello(gw.token("other"))
    held.pop().close()
    wait_for_log(gw, r"event=limit kind=max_connections_per_ip count=1 peer=127\.0\.0\.2")
    admitted_again(gw, "127.0.0.2")                     # the server sees the close, then admits again
    for r in held:
        r.close()
    assert len(re.findall(r"kind=max_connections_per_ip count=1 ", gw.text)) == 1   # logged once


def test_connections_per_worker(gateway_factory):
    """Past the limit every new connection is refused, however many were refused before
    (a refused one was once counted as closing an open one), and /metrics counts the open."""
    gw = gateway_factory("--workers", "1", "--max-connections", "2")
    a, b = RawFrom(gw, "127.0.0.4"), RawFrom(gw, "127.0.0.5")
    a.hello(gw.token("a"))
    b.hello(gw.token("b"))
    for i in range(3):
        with RawFrom(gw, f"127.0.0.{6 + i}") as c:
            refused(c, ErrorCode.UNAVAILABLE)
        # a round trip on an open session: the server has run the refused one's close by then
        a.send(encode(F.Ping(i)))
        assert a.frame() == F.Pong(i)
    wait_for_log(gw, r"event=limit kind=max_connections count=1")
    assert value(scrape(gw), "connections", kind="tcp") == 2
    a.close()
    b.close()


def test_connect_rate_per_ip(gateway_factory):
    gw = gateway_factory("--workers", "1", "--connect-rate", "5", "--connect-burst", "3")
    for i in range(3):
        with RawFrom(gw, "127.0.0.7") as r:
            r.hello(gw.token(f"r{i}"))
    with RawFrom(gw, "127.0.0.7") as r:
        refused(r, ErrorCode.RATE_LIMITED)
    with RawFrom(gw, "127.0.0.8") as r:                  # its own bucket
        r.hello(gw.token("other"))
    wait_for_log(gw, r"event=limit kind=connect_rate_per_ip count=1 peer=127\.0\.0\.7")
    admitted_again(gw, "127.0.0.7", ErrorCode.RATE_LIMITED)   # refilled at 5/s


def test_message_rate_limited_then_ok(gateway_factory):
    """Past the burst a SEND is refused for now (RATE_LIMITED, non-fatal); the SDK
    sends it again after its backoff, in order, and it is stored once."""
    gw = gateway_factory("--workers", "1", "--msg-rate", "20", "--msg-burst", "5")

    async def main():
        async with gw.client("alice") as a, gw.client("bob") as b:
            for i in range(5):
                await a.send("bob", f"m{i}", timeout=5)
            later = await a.send("bob", "over", timeout=10)   # refused, then resent by the SDK
            assert a.connected and later.id > 0             # non-fatal: the session went on
            got = [(await b.recv(timeout=5)).text for _ in range(6)]
            assert got == ["m0", "m1", "m2", "m3", "m4", "over"]     # once, in order
    asyncio.run(main())
    wait_for_log(gw, r"event=limit kind=msg_rate count=\d+ ")
    samples = scrape(gw)                                 # operators see it in /metrics
    refused = value(samples, "rate_limited_total")
    assert 1 <= refused <= 4, refused                    # the backoff (from 50 ms) outwaits a 50 ms refill
    assert value(samples, "errors_total", code="RATE_LIMITED") == refused


def test_idle_timeout(gateway_factory):
    gw = gateway_factory("--workers", "1", "--ping-interval-ms", "200", "--idle-timeout-pings", "2")

    async def main():
        async with gw.client("pinger") as c:             # the SDK PINGs every interval: stays
            with RawFrom(gw, "127.0.0.9", timeout=10) as r:
                w = r.hello(gw.token("silent"))
                assert w.ping_interval_ms == 200
                t0 = time.monotonic()
                frames, closed = await asyncio.to_thread(r.until_eof)
                assert closed and len(frames) == 1 and isinstance(frames[0], F.Goaway), frames
                assert frames[0].code == GoawayCode.IDLE_TIMEOUT
                assert time.monotonic() - t0 >= 0.4      # at least 2 intervals of silence
            assert c.connected and c.reconnects == 0
            await c.send("pinger", "still here", timeout=5)
    asyncio.run(main())
    wait_for_log(gw, r"event=limit kind=idle_timeout count=1 user=silent")


def _rss_anon_kb(pid: int) -> int:
    """Anonymous resident memory (heap, buffers; not the mapped log) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


@pytest.mark.parametrize("n", [20_000])
def test_stalled_reader_paused_cut_and_resumes_exactly_once(gateway_factory, n):
    gw = gateway_factory("--workers", "1", "--msg-rate", "0", "--out-high-water", "64K", "--out-low-water", "16K",
                         "--out-hard-limit", "1M", "--slow-consumer-timeout", "2", "--max-pending", "100000")
    worker = gw.worker_pids()[0]
    payload = b"x" * 1000
    stalled = RawFrom(gw, "127.0.0.10", rcvbuf=4096)
    stalled.hello(gw.token("bob"), device="slow")        # ...and never reads again
    rss0 = _rss_anon_kb(worker)
    peak = rss0

    async def pour():
        nonlocal peak
        async with gw.client("alice") as a:
            sem = asyncio.Semaphore(256)

            async def one(i):
                async with sem:
                    await a.send("bob", b"%06d" % i + payload, timeout=60)
            for start in range(0, n, 2000):
                await asyncio.gather(*(one(i) for i in range(start, min(n, start + 2000))))
                peak = max(peak, _rss_anon_kb(worker))
    asyncio.run(asyncio.wait_for(pour(), 120))
    poured_kb = n * len(payload) // 1024
    growth = peak - rss0
    print(f"\nstalled reader: poured {poured_kb} KiB, worker RssAnon {rss0} -> peak {peak} KiB (+{growth})")
    assert growth < poured_kb // 2, (growth, poured_kb)       # the 20 MB stayed in the log, not in buffers
    wait_for_log(gw, r"event=limit kind=slow_consumer_paused count=1 user=bob")
    wait_for_log(gw, r"event=limit kind=slow_consumer_(timeout|hard_limit) count=1 user=bob")
    stalled.close()

    # reconnect and read: every message once, in order, straight from the log (as it drains)
    with RawFrom(gw, "127.0.0.10", timeout=30) as r:
        r.hello(gw.token("bob"), device="slow")
        seen = []
        while len(seen) < n:
            f = r.frame()
            assert isinstance(f, F.Deliver), f
            seen.append((f.msg_id, int(f.payload[:6])))
        ids = [m for m, _ in seen]
        assert ids == sorted(ids) and len(set(ids)) == n
        assert [i for _, i in seen] == list(range(n))


def test_reader_that_sends_but_never_reads_is_cut_at_hard_limit(gateway_factory):
    gw = gateway_factory("--workers", "1", "--out-high-water", "64K", "--out-low-water", "16K",
                         "--out-hard-limit", "512K", "--slow-consumer-timeout", "60")
    r = RawFrom(gw, "127.0.0.11", timeout=2, rcvbuf=4096)
    r.hello(gw.token("pinger"), device="p")
    pings = encode(F.Ping(7)) * 100_000                  # 1.4 MB of PINGs: their PONGs pile up unread
    try:
        for _ in range(20):
            r.send(pings)
    except OSError:
        pass                                              # cut: reset, or our send blocked and timed out
    wait_for_log(gw, r"event=limit kind=slow_consumer_hard_limit count=1 user=pinger")
    r.close()
    with RawFrom(gw, "127.0.0.11") as ok:                # the server is fine
        ok.hello(gw.token("after"))


def _p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def test_garbage_flood_and_slowloris_do_not_starve_chat(gateway_factory):
    gw = gateway_factory("--workers", "1", "--hello-timeout", "3", "--msg-rate", "0")

    async def chat(a, b, k, at_least: float = 0.0):
        lat = []
        end = time.monotonic() + at_least
        for i in range(k):
            if i >= 300 and time.monotonic() >= end:
                break
            t0 = time.perf_counter()
            await a.send("bob", f"c{i}", timeout=10)
            m = await b.recv(timeout=10)
            await b.ack(m)
            lat.append(time.perf_counter() - t0)
        return lat

    async def main():
        async with gw.client("alice") as a, gw.client("bob") as b:
            await chat(a, b, 20)                          # warm up
            base = await chat(a, b, 300)
            attack = subprocess.Popen([sys.executable, str(HERE / "attack.py"), gw.host, str(gw.port), "30",
                                       "127.0.0.20", "127.0.0.21", "300"],   # 30 s at most

                                      stdout=subprocess.PIPE, text=True)
            try:
                assert (await asyncio.to_thread(attack.stdout.readline)).startswith("attack: started")
                under = await chat(a, b, 1_000_000, at_least=6.0)   # past the hello timeout (20,000 took 2.2 s)
            finally:
                attack.terminate()
                attack.wait(10)
            return base, under

    base, under = asyncio.run(main())
    p_base, p_under = _p99(base), _p99(under)
    print(f"\nchat round trip p99: {p_base * 1000:.2f} ms alone, {p_under * 1000:.2f} ms under attack "
          f"(median {statistics.median(base) * 1000:.2f} / {statistics.median(under) * 1000:.2f} ms)")
    assert p_under < 20 * p_base + 0.25, (p_base, p_under)
    deadline = time.monotonic() + 15          # the server's log reaches us through a reader thread
    while "code=HELLO_TIMEOUT" not in gw.text and time.monotonic() < deadline:
        time.sleep(0.05)
    text = gw.text
    assert "event=conn_closed" in text and "code=HELLO_TIMEOUT" in text   # slowloris cut at the hello timeout
