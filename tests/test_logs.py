"""The log of a real gateway run: every line is one event with the same leading
keys, and levels are set per component."""
import asyncio
import re
import socket

#: time, level, logger, worker, event, then key=value fields (a value is one word or a JSON string)
LINE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d level=(DEBUG|INFO|WARNING|ERROR|CRITICAL) '
                  r'logger=(switchboard\.[a-z]+) worker=(sup|\d+) event=([a-z_]+)'
                  r'( [a-z_0-9]+=([^\s"]+|"([^"\\]|\\.)*"))*$')
BANNER = re.compile(r"^(switchboard: listening on |  [a-z ]+: |$)")


def _traffic(gw):
    async def main():
        async with gw.client("log-a") as a, gw.client("log-b") as b:
            await a.send("log-b", "hello", timeout=10)
            m = await b.recv(timeout=10)
            await b.ack(m)
    asyncio.run(asyncio.wait_for(main(), 30))
    with socket.create_connection((gw.host, gw.port), timeout=5) as s:     # garbage: a closed connection
        s.sendall(b"\xff" * 64)
        s.settimeout(5)
        while s.recv(4096):
            pass


def test_every_log_line_has_the_keys(gateway_factory):
    gw = gateway_factory("--workers", "2", "--log-level", "DEBUG", "--hello-timeout", "1")
    _traffic(gw)
    gw.stop()
    lines = gw.text.splitlines()
    logged = [line for line in lines if not BANNER.match(line)]
    bad = [line for line in logged if not LINE.match(line)]
    assert not bad, "\n".join(bad)
    events = {LINE.match(line).group(4) for line in logged}
    assert {"worker_started", "worker_ready", "conn_closed", "worker_stopping"} <= events, events
    workers = {LINE.match(line).group(3) for line in logged}
    assert {"sup", "0", "1"} <= workers
    assert not any("event=deliver" in line or "hello" in line.split("event=")[1] for line in logged)


def test_levels_per_component(gateway_factory):
    gw = gateway_factory("--workers", "1", "--log-level", "WARNING",
                         "--log-levels", "switchboard.gateway=INFO,switchboard.conn=ERROR")
    _traffic(gw)
    gw.stop()
    text = gw.text
    assert "logger=switchboard.gateway worker=0 event=worker_ready" in text       # INFO, allowed for it
    assert "event=worker_started" not in text            # supervisor INFO: below WARNING
    assert "event=conn_closed" not in text               # conn INFO: below its ERROR


def test_a_gateway_whose_log_reader_went_away_serves_on(tmp_path):
    """The process reading the gateway's output exits (a pipe to `tee`, a supervisor
    that died): log lines are lost and counted, sessions still open on both workers,
    messages still flow, and SIGTERM still stops it. (picologging raised the write's
    BrokenPipeError into whatever was logging: every HELLO failed, and the client saw
    the connection close without a word.)"""
    import os
    import signal
    import subprocess
    import sys
    from conftest import ADMIN, READY, ROOT
    from gateway.auth import TokenAuthority, load_secret
    from gateway.client import Client
    from router.sharding import shard_of
    from test_metrics import get, parse, value
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0", "--ws-port", "off",
                             "--admin-port", "0", "--workers", "2", "--data-dir", str(tmp_path), "--log-level",
                             "DEBUG", "--segment-size", "2M"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        while not (READY.search(seen) and ADMIN.search(seen)):
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        host, port = READY.search(seen).group(1), int(READY.search(seen).group(2))
        admin = int(ADMIN.search(seen).group(2))
        proc.stdout.close()                        # the reader is gone: every write now fails with EPIPE
        auth = TokenAuthority(load_secret(tmp_path))
        users = [f"gone{i}" for i in range(12)]
        assert {shard_of(u) % 2 for u in users} == {0, 1}

        async def main():
            for u in users:
                async with Client(host, port, auth.issue(u, ttl=600), "d", reconnect=False,
                                  connect_timeout=10) as a, \
                        Client(host, port, auth.issue(u + "x", ttl=600), "d", reconnect=False,
                               connect_timeout=10) as b:
                    await a.send(u + "x", "still here", timeout=10)
                    m = await b.recv(timeout=10)
                    assert m.text == "still here"
                    await b.ack(m)
        try:
            asyncio.run(asyncio.wait_for(main(), 120))
        except (OSError, asyncio.TimeoutError) as exc:
            raise AssertionError(f"{exc!r}; supervisor exit status {proc.poll()}, its workers "
                                 f"{subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True).stdout}")
        status, text = get(admin, "/metrics")
        assert status == 200
        assert value(parse(text), "log_lines_dropped_total") > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
