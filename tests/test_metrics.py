"""The admin listener of a real 2-worker gateway: /metrics counted exactly
against known traffic, kept across a kill -9 of a worker, /readyz while the
workers start, `switchboard stats --once`."""
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from _core import frames as F
from _core.pycodec import encode
from conftest import ADMIN, READY, ROOT
from gateway.metrics import parse
from rawclient import Raw
from test_workers import users_on, wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(gw) -> dict:
    status, text = get(gw.admin_port, "/metrics")
    assert status == 200, text
    check_exposition(text)
    return parse(text)


def value(samples: dict, name: str, default=None, **labels) -> float:
    """One sample: `worker` omitted means the gateway's total series."""
    key = ("switchboard_" + name, frozenset((k, str(v)) for k, v in labels.items()))
    if default is not None and key not in samples:
        return default
    assert key in samples, f"no sample {key}; have {sorted(k for k in samples if k[0].endswith(name))}"
    return samples[key]


SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+$|^[a-z_]+(\{.*\})? \+Inf$')


def check_exposition(text: str) -> None:
    """Prometheus text format: HELP and TYPE before each family's samples, every
    sample line well formed, histogram buckets cumulative and ending at +Inf == count."""
    declared = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif not line.startswith("#"):
            assert SAMPLE.match(line), line
            name = line.split("{")[0].split(" ")[0]
            assert re.sub(r"_(bucket|sum|count)$", "", name) in declared or name in declared, line
    buckets: dict = {}
    for (name, labels), v in parse(text).items():
        if name.endswith("_bucket"):
            d = dict(labels)
            le = float(d.pop("le"))
            buckets.setdefault((name[:-7], frozenset(d.items())), []).append((le, v))
    assert buckets
    samples = parse(text)
    for (name, labels), series in buckets.items():
        series.sort()
        counts = [v for _, v in series]
        assert counts == sorted(counts), (name, labels, series)
        assert series[-1][0] == float("inf") and series[-1][1] == samples[(name + "_count", labels)]


def test_metrics_count_known_traffic_and_survive_kill_9(gateway_factory):
    gw = gateway_factory("--workers", "2", "--durability", "always")
    assert gw.admin_port > 0
    a = users_on(0, 2, 1, "ma")[0]                 # worker 0
    b, c = users_on(1, 2, 2, "mb")                 # worker 1; c stays offline
    n, k, bad = 40, 5, 3
    before = scrape(gw)
    assert value(before, "messages_in_total") == 0 and value(before, "ready") == 1

    for _ in range(bad):                           # 3 refused HELLOs: AUTH_FAILED
        raw = Raw(gw)
        raw.send(encode(F.Hello(2, "not-a-token", "raw", 0)))
        assert isinstance(raw.frame(), F.Error)
        raw.close()

    async def traffic():
        async with gw.client(a, send_only=True) as ca, gw.client(b) as cb:
            for i in range(n):
                await ca.send(b, f"m{i}")
            for i in range(k):
                await ca.send(c, f"offline {i}")
            got = [await cb.recv(timeout=10) for _ in range(n)]
            await cb.ack(*got)
            await cb.ping()                        # the server has processed the RECEIVED before this PONG
            await ca.ping()
            return scrape(gw)
    s = asyncio.run(traffic())

    assert value(s, "messages_in_total") == n + k
    assert value(s, "messages_in_total", worker=0) == n + k
    assert value(s, "messages_in_total", worker=1) == 0
    assert value(s, "forwarded_total", worker=0) == n + k
    assert value(s, "messages_stored_total", worker=1) == n + k
    assert value(s, "messages_stored_total", worker=0) == 0
    assert value(s, "messages_out_total", worker=1) == n     # b was online for its n; c was not
    assert value(s, "route_latency_seconds_count") == n + k
    assert value(s, "route_latency_seconds_count", worker=0) == n + k
    assert value(s, "route_latency_seconds_sum") > 0
    assert value(s, "offline_pending", worker=1) == k
    assert value(s, "connections", kind="tcp") == 2 and value(s, "online_users") == 1
    assert value(s, "connects_total", kind="tcp") == 2 + bad
    assert value(s, "errors_total", code="AUTH_FAILED") == bad
    assert value(s, "handoffs_total", direction="in") == value(s, "handoffs_total", direction="out")
    assert value(s, "log_segments", worker=1) >= 1 and value(s, "log_bytes", worker=1) > 0
    assert value(s, "fsync_seconds_count", worker=1) >= 1   # --durability always: a sync before the ACKs
    assert value(s, "worker_up") == 2 and value(s, "worker_restarts_total") == 0

    # the live view: totals from the same counters
    out = subprocess.run([sys.executable, "-m", "gateway", "stats", "--admin-port", str(gw.admin_port), "--once",
                          "--interval", "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0].split()
    total = next(line.split() for line in lines if line.split()[:1] == ["all"])
    # "all" has no "up" cell: shift by one after the worker column
    row = dict(zip([h for h in header if h != "up"], total))
    assert row["in"] == str(n + k) and row["out"] == str(n) and row["fwd"] == str(n + k), out.stdout
    # pending: c's k messages, and the n DELIVERED receipts for a, whose only session is
    # send-only: they wait in a's shared inbox (PROTOCOL.md section 7)
    assert row["pending"] == str(k + n) and "gateway: ready" in out.stdout, out.stdout

    # kill -9 worker 1: its counters stay in the totals; the restart is counted
    old = gw.worker_pids()[1]
    gw_text_len = len(gw.text)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gw.worker_pids().get(1, old) != old and "event=worker_ready worker=1" in gw.text[gw_text_len:],
             "worker 1 restarted")
    wait_for(lambda: get(gw.admin_port, "/readyz")[0] == 200, "ready again")
    s2 = scrape(gw)
    for name, labels in [("messages_stored_total", {"worker": 1}), ("messages_out_total", {"worker": 1}),
                         ("messages_in_total", {}), ("forwarded_total", {}), ("route_latency_seconds_count", {}),
                         ("connects_total", {"kind": "tcp"}), ("errors_total", {"code": "AUTH_FAILED"})]:
        assert value(s2, name, **labels) == value(s, name, **labels), name
    assert value(s2, "worker_restarts_total", worker=1) == 1 and value(s2, "worker_restarts_total") == 1
    assert value(s2, "offline_pending", worker=1) == k        # recovered from the log by the new process

    async def after():
        async with gw.client(a, send_only=True) as ca:
            for i in range(3):
                await ca.send(b, f"after {i}")
        async with gw.client(c) as cc:
            got = [await cc.recv(timeout=10) for _ in range(k)]
            await cc.ack(*got)
            await cc.ping()
            return scrape(gw)
    s3 = asyncio.run(after())
    # the dead process's counts plus the new one's
    assert value(s3, "messages_stored_total", worker=1) == n + k + 3
    # SENDs in count retries too: a SEND that reached worker 0 before its link to the new
    # worker 1 was made got UNAVAILABLE and was sent again with the same client id
    retries = value(s3, "errors_total", 0, code="UNAVAILABLE")
    assert value(s3, "messages_in_total") == n + k + 3 + retries
    assert value(s3, "offline_pending", worker=1) == 3        # b is offline now: its 3; c acknowledged its k


def test_readyz_while_workers_start(tmp_path):
    """503 until every worker is ready (one is held with SIGSTOP before it can be), then 200."""
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--workers", "2", "--data-dir",
           str(tmp_path / "d"), "--segment-size", "2M"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        admin_port, seen = None, ""
        deadline = time.monotonic() + 20
        while stopped is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
            m = ADMIN.search(line)
            if m:
                admin_port = int(m.group(2))
            m = re.search(r"event=worker_started worker=1 pid=(\d+)", line)
            if m:
                stopped = int(m.group(1))
                os.kill(stopped, signal.SIGSTOP)
        assert admin_port and stopped, seen
        status, body = get(admin_port, "/readyz")
        assert status == 503 and "worker 1" in body, (status, body)
        assert get(admin_port, "/healthz") == (200, "ok\n")
        s = parse(get(admin_port, "/metrics")[1])
        assert s[("switchboard_ready", frozenset())] == 0
        assert s[("switchboard_worker_up", frozenset({("worker", "1")}))] == 0
        os.kill(stopped, signal.SIGCONT)
        while not READY.search(seen) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        assert READY.search(seen), seen
        wait_for(lambda: get(admin_port, "/readyz")[0] == 200, "ready after start", timeout=10)
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
