"""Clients with several gateway addresses (seeds) and GOAWAY REDIRECT (issue 13),
against real gateway processes over real sockets: the SDK skips a dead seed,
moves to the next one when its gateway is killed, the CLI takes `--host h1,h2`,
and a gateway whose `redirect_for` names another node (tests/redirecting_gateway.py:
the hook a cluster node overrides) is answered by following the REDIRECT, as the
same session, at most twice in a row (PROTOCOL.md section 3, GOAWAY).
The JavaScript client's side is in tests/test_jsclient.py."""
import asyncio
import functools
import os
import select
import shutil
import signal
import subprocess
import sys

import pytest

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION, GoawayCode
from _core.pycodec import encode
from gateway.client import MAX_REDIRECTS, Client, format_address, parse_seeds
from rawclient import Raw
from wsclient import WsRaw

SWITCHBOARD = os.path.join(os.path.dirname(sys.executable), "switchboard")


def sync(test):
    """Run an async test on a fresh event loop (no pytest plugin for it here)."""
    @functools.wraps(test)
    def run(*args, **kw):
        return asyncio.run(test(*args, **kw))
    return run


def tcp_addr(gw) -> str:
    return format_address((gw.host, gw.port))


# -- seed lists -------------------------------------------------------------------------------

def test_seed_lists_parse_hosts_ports_and_ipv6():
    assert parse_seeds("127.0.0.1", 9400) == [("127.0.0.1", 9400)]
    assert parse_seeds("h1,h2:7500, [::1]:9401,[fe80::1],::1", 9400) == [
        ("h1", 9400), ("h2", 7500), ("::1", 9401), ("fe80::1", 9400), ("::1", 9400)]
    assert parse_seeds(["a", "b:1", ("c", 2)], 9) == [("a", 9), ("b", 1), ("c", 2)]
    assert [format_address(a) for a in parse_seeds("[::1]:9400,h:1", 0)] == ["[::1]:9400", "h:1"]


@pytest.mark.parametrize("entry, says", [
    ("h1,,h2", "empty gateway address"), ("h1:", "the port must be a number"), ("h1:x", "the port must be a number"),
    ("h1:70000", "the port must be a number"), ("[::1", "no ']'"), ("[::1]9400", "may follow ']'"),
    ("[nope]:1", "not an IPv6 address"), ("::g", "in brackets"), ("a b:1", "not a host name")])
def test_bad_seed_entries_are_one_clear_error(entry, says):
    with pytest.raises(ValueError, match=says) as ei:
        Client(entry, 1)
    assert "\n" not in str(ei.value) and "HOST[:PORT]" in str(ei.value)
    r = subprocess.run([SWITCHBOARD, "send", "--token", "t", "--to", "bob", "hi", "--host", entry, "--port", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- failover -----------------------------------------------------------------------------------

@sync
async def test_sdk_skips_a_dead_seed(gateway_proc, dead_port):
    gw = gateway_proc
    async with Client(f"127.0.0.1:{dead_port},{tcp_addr(gw)}", 1, gw.token("alice"), "phone") as c:
        assert c.address == (gw.host, gw.port)
        ack = await c.send("alice", "to myself", timeout=10)
        m = await c.recv(timeout=10)
        assert (m.id, m.text) == (ack.id, "to myself")


def _kill9(gw) -> None:
    """kill -9 the supervisor (so nothing restarts) and its workers, and wait until they are gone."""
    workers = list(gw.worker_pids().values())
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    for pid in workers:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            assert select.select([fd], [], [], 10)[0], f"worker {pid} did not die"
        finally:
            os.close(fd)


@sync
async def test_sdk_moves_to_the_next_seed_when_its_gateway_is_killed(gateway_factory, tmp_path):
    """Seeds [A, B], two single-node gateways with one secret (so one token works on
    both) but separate stores: A is killed mid-stream, the client goes on at B with
    its outbox. B then holds exactly the stream's tail from the first SEND A did not
    answer: in order, each once, through the last."""
    a = gateway_factory("--workers", "1")
    (tmp_path / "b").mkdir()
    shutil.copy(a.data_dir / "secret", tmp_path / "b" / "secret")
    b = gateway_factory("--workers", "1", data_dir=tmp_path / "b")
    c = Client(f"{tcp_addr(a)},{tcp_addr(b)}", 0, a.token("alice"), "phone", max_backoff=0.5)
    await c.connect()
    assert c.address == (a.host, a.port)
    for i in range(10):
        await c.send("bob", str(i), timeout=10)
    tail = [asyncio.create_task(c.send("bob", str(i), timeout=30)) for i in range(10, 60)]
    await tail[0]
    _kill9(a)
    after = [asyncio.create_task(c.send("bob", str(i), timeout=30)) for i in range(60, 70)]
    await asyncio.gather(*tail, *after)
    assert c.address == (b.host, b.port) and c.reconnects == 1
    await c.close()

    got = []
    async with Client(tcp_addr(b), 0, b.token("bob"), "phone") as r:
        while not got or got[-1] != 69:
            m = await r.recv(timeout=10)
            got.append(int(m.text))
            await r.ack(m)
    assert 11 <= got[0] <= 60 and got == list(range(got[0], 70)), got


def test_cli_send_with_a_seed_list(gateway_proc, dead_port):
    gw = gateway_proc
    r = subprocess.run([SWITCHBOARD, "send", "--as", "alice", "--to", "bob", "hi", "--data-dir", gw.data_dir,
                        "--host", f"127.0.0.1:{dead_port},{gw.host}", "--port", str(gw.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout)
    r = subprocess.run([SWITCHBOARD, "send", "--as", "alice", "--to", "bob", "hi", "--data-dir", gw.data_dir,
                        "--host", f"127.0.0.1:{dead_port},[::1]:{dead_port}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot connect to 127.0.0.1:{dead_port}, [::1]:{dead_port}" in r.stderr, r.stderr


# -- REDIRECT -----------------------------------------------------------------------------------

def test_s3_redirect_is_sent_in_place_of_welcome_on_tcp_and_websocket(gateway_proc, redirector):
    """Section 3, GOAWAY: REDIRECT (reconnect_ms 0, reason HOST:PORT of the listener of
    the connection's kind) answers a valid HELLO, then the server closes; a frame
    pipelined behind the HELLO is not served."""
    gw = gateway_proc
    r = redirector(gw)
    r.send_to("10.1.2.3:9400", "[2001:db8::7]:9401")
    hello = encode(F.Hello(PROTOCOL_VERSION, gw.token("alice"), "phone", 0, False, 0))
    with Raw(r) as c:
        c.send(hello + encode(F.Ping(7)))
        frames, closed = c.until_eof()
    assert closed and frames == [F.Goaway(GoawayCode.REDIRECT, 0, "10.1.2.3:9400")], frames
    with WsRaw(r.host, r.ws_port) as w:
        w.upgrade()
        w.send_proto(F.Hello(PROTOCOL_VERSION, gw.token("alice"), "phone", 0, False, 0))
        code, _, before = w.close_code()
    assert code == 1001 and before == [F.Goaway(GoawayCode.REDIRECT, 0, "[2001:db8::7]:9401")], (code, before)
    with Raw(r) as c:                            # a bad token is refused as always, not redirected
        c.send(encode(F.Hello(PROTOCOL_VERSION, "sb1.bad.token", "phone", 0, False, 0)))
        frames, closed = c.until_eof()
    assert closed and type(frames[0]) is F.Error
    assert r.redirects() == 2


@sync
async def test_s3_redirect_the_sdk_follows_it_as_the_same_session(gateway_proc, redirector):
    """Section 3, GOAWAY: a client MUST connect to the REDIRECT's address next, keeping its
    state: a SEND queued before the connect is stored there, once."""
    gw = gateway_proc
    r = redirector(gw)
    r.send_to(tcp_addr(gw), f"{gw.host}:{gw.ws_port}")
    c = Client(f"{r.host}:{r.port}", 0, gw.token("alice"), "phone")
    queued = asyncio.create_task(c.send("alice", "queued before the connect", timeout=20))
    await asyncio.sleep(0)                       # let the send take its seq (no connection yet)
    assert c.pending_sends() == 1
    await c.connect()
    ack = await queued
    assert c.address == (gw.host, gw.port) and c.redirects == 1 and c.reconnects == 0
    m = await c.recv(timeout=10)
    assert (m.id, m.text) == (ack.id, "queued before the connect")
    await c.close()
    assert r.redirects() == 1


@sync
async def test_s3_redirect_the_third_in_a_row_is_not_followed(gateway_proc, redirector):
    """Section 3, GOAWAY: two nodes that send a client to each other: the third REDIRECT
    is not followed; the client goes on with its next seed."""
    gw = gateway_proc
    r1, r2 = redirector(gw), redirector(gw)
    r1.send_to(f"{r2.host}:{r2.port}", "unused:1")
    r2.send_to(f"{r1.host}:{r1.port}", "unused:1")
    async with Client(f"{r1.host}:{r1.port},{tcp_addr(gw)}", 0, gw.token("alice"), "phone") as c:
        assert c.address == (gw.host, gw.port)
        assert c.redirects == MAX_REDIRECTS - 1 == 2
    assert (r1.redirects(), r2.redirects()) == (2, 1)
