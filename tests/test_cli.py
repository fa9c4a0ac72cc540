"""The `switchboard` console script, run as a real subprocess against a real gateway."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.auth import AuthError, TokenAuthority, load_secret
from _core.protocol import ErrorCode

SWITCHBOARD = Path(sys.executable).parent / "switchboard"


def sb(*args, input=None, timeout=20, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "SWITCHBOARD_DATA_DIR"}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run([str(SWITCHBOARD), *map(str, args)], input=input, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=env, cwd=cwd)


def endpoint(gw):
    return ["--port", gw.port, "--host", gw.host, "--data-dir", gw.data_dir]


def test_console_script_is_installed():
    assert SWITCHBOARD.exists(), SWITCHBOARD


def test_token_issue(tmp_path):
    d = tmp_path / "data"
    r = sb("token", "issue", "alice", "--data-dir", d)
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    authority = TokenAuthority(load_secret(d))
    assert authority.verify(tok, "any") == ("alice", "any")
    assert authority.verify(tok, "phone") == ("alice", "phone")
    with pytest.raises(AuthError):
        TokenAuthority(os.urandom(32)).verify(tok, "any")

    r = sb("token", "issue", "alice", "--device", "phone", "--ttl", "60", "--data-dir", d)
    assert r.returncode == 0, r.stderr
    bound = r.stdout.strip()
    assert authority.verify(bound, "phone") == ("alice", "phone")     # same secret, reused
    with pytest.raises(AuthError) as ei:
        authority.verify(bound, "laptop")
    assert ei.value.code == ErrorCode.AUTH_FAILED
    with pytest.raises(AuthError) as ei:
        authority.verify(bound, "phone", now=time.time() + 120)
    assert ei.value.code == ErrorCode.TOKEN_EXPIRED


def test_send_then_recv(gateway_proc):
    gw = gateway_proc
    text = "hello bob \u2713"
    r = sb("send", "--as", "alice", "--to", "bob", text, *endpoint(gw))
    assert r.returncode == 0, r.stderr
    msg_id = int(r.stdout.strip())

    r = sb("recv", "--as", "bob", "--count", "1", "--timeout", "5", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    m = json.loads(lines[0])
    assert (m["from"], m["text"], m["id"]) == ("alice", text, str(msg_id))
    assert m["device"] == "cli-send"
    assert isinstance(m["ts"], int) and abs(m["ts"] - time.time() * 1000) < 60_000

    # it was acked: nothing left
    r = sb("recv", "--as", "bob", "--count", "1", "--timeout", "1", *endpoint(gw))
    assert r.returncode == 1
    assert r.stdout == ""
    assert "timed out" in r.stderr


def test_send_with_issued_token(gateway_proc):
    gw = gateway_proc
    tok = sb("token", "issue", "dave", "--data-dir", gw.data_dir).stdout.strip()
    r = sb("send", "--token", tok, "--to", "erin", "via token", "--port", gw.port, "--host", gw.host)
    assert r.returncode == 0, r.stderr
    msg_id = int(r.stdout.strip())
    r = sb("recv", "--as", "erin", "--count", "1", "--timeout", "5", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert (m["from"], m["text"], m["id"]) == ("dave", "via token", str(msg_id))


def test_send_nothing_listening(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    tok = TokenAuthority(os.urandom(32)).issue("alice")
    r = sb("send", "--token", tok, "--to", "bob", "hi", "--port", port, cwd=tmp_path)
    assert r.returncode != 0
    assert "cannot connect" in r.stderr, r.stderr
    assert str(port) in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_send_with_garbage_token(gateway_proc):
    gw = gateway_proc
    r = sb("send", "--token", "garbage", "--to", "bob", "hi", "--port", gw.port, "--host", gw.host)
    assert r.returncode != 0
    assert "AUTH_FAILED" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_recv_without_count_prints_what_arrived(gateway_proc):
    gw = gateway_proc
    ids = []
    for text in ("first", "second"):
        r = sb("send", "--as", "alice", "--to", "bob", text, *endpoint(gw))
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    r = sb("recv", "--as", "bob", "--timeout", "1.5", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(m["id"], m["text"]) for m in got] == list(zip(ids, ["first", "second"]))
    r = sb("recv", "--as", "bob", "--timeout", "1", *endpoint(gw))
    assert (r.returncode, r.stdout) == (0, "")


VERB_FLAGS = {
    "send": ["--host", "--port", "--token", "--data-dir", "--as", "--to", "--timeout", "--device"],
    "recv": ["--host", "--port", "--token", "--data-dir", "--as", "--count", "--timeout", "--device"],
    "chat": ["--host", "--port", "--token", "--data-dir", "--as", "--to", "--device"],
    "serve": ["--host", "--port", "--data-dir", "--workers", "--hello-timeout", "--max-frame"],
    "reshard": ["--data-dir", "--shards", "--dry-run", "--json", "--dedup-window", "--segment-size"],
}


def test_help():
    r = sb("--help")
    assert r.returncode == 0, r.stderr
    for verb in ("serve", "token", "send", "recv", "chat"):
        assert verb in r.stdout
    for verb, flags in VERB_FLAGS.items():
        r = sb(verb, "--help")
        assert r.returncode == 0, (verb, r.stderr)
        missing = [f for f in flags if f not in r.stdout]
        assert not missing, (verb, missing)
    r = sb("token", "--help")
    assert r.returncode == 0 and "issue" in r.stdout
    r = sb("token", "issue", "--help")
    assert r.returncode == 0
    assert all(f in r.stdout for f in ("--device", "--ttl", "--data-dir"))


@pytest.mark.parametrize("workers, message", [("0", "must be positive"), ("65", "between 1 and 64")])
def test_serve_refuses_impossible_worker_counts(tmp_path, workers, message):
    r = sb("serve", "--workers", workers, "--port", "0", "--data-dir", tmp_path / "d", timeout=15)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "listening" not in r.stdout


def test_chat(gateway_proc):
    gw = gateway_proc
    r = sb("chat", "--as", "alice", "--to", "bob", *endpoint(gw),
           input="hello from chat\n/to carol\nhi carol\n")
    assert r.returncode == 0, r.stderr
    assert "connected as alice" in r.stdout
    r = sb("recv", "--as", "bob", "--count", "1", "--timeout", "5", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert (m["from"], m["text"]) == ("alice", "hello from chat")
    r = sb("recv", "--as", "carol", "--count", "1", "--timeout", "5", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["from"], json.loads(r.stdout)["text"]) == ("alice", "hi carol")


def test_serve_logs_readable_lines(gateway_proc):
    """The server's log lines carry a real timestamp and key=value fields (picologging
    garbles some format specifiers, so this is checked on real output)."""
    import re as _re
    gateway_proc.stop()
    text = gateway_proc.text
    line = next(l for l in text.splitlines() if "logger=switchboard.gateway" in l)
    assert _re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d level=INFO logger=switchboard\.gateway ", line), line


def test_presence_command(gateway_proc):
    gw = gateway_proc
    r = sb("presence", "--as", "watcher", "nobody-yet", "--count", "1", "--timeout", "5", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip()) == {"user": "nobody-yet", "online": False, "last_seen": None}
    r = sb("presence", "--as", "watcher", "--hide-last-seen", "on", *endpoint(gw))
    assert r.returncode == 0, r.stderr


def test_recv_shows_receipts_as_well_as_messages(gateway_proc):
    gw = gateway_proc
    # alice's "main" device registers, then sends from it so receipts come back to it
    r = sb("recv", "--as", "alice", "--timeout", "1", *endpoint(gw))
    assert r.returncode == 0, r.stderr

    async def send_and_have_it_read():
        async with gw.client("alice", "main") as a:
            ack = await a.send("bobby", "read me")
        async with gw.client("bobby", "main") as b:
            m = await b.recv(timeout=5)
            await b.ack(m)
            await b.read(m)
            await b.ping()
        return ack.id
    import asyncio as _asyncio
    msg_id = _asyncio.run(send_and_have_it_read())
    r = sb("recv", "--as", "alice", "--timeout", "2", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert {(l["receipt"], l["msg_id"], l["by"]) for l in lines} == {("delivered", str(msg_id), "bobby"),
                                                                     ("read", str(msg_id), "bobby")}


def test_presence_command_is_no_device(gateway_proc):
    """Watching presence from the CLI registers no device: no copies of messages
    pile up for it (the user's real device gets them, nothing else)."""
    import asyncio
    gw = gateway_proc
    r = sb("presence", "--as", "wanda", "someone", "--count", "1", "--timeout", "5", *endpoint(gw))
    assert r.returncode == 0, r.stderr

    async def check():
        async with gw.client("wanda", "phone"):           # wanda's one real device registers
            pass
        async with gw.client("sender") as s:
            await s.send("wanda", "for wanda")
        async with gw.client("wanda", "phone") as phone:
            assert (await phone.recv(timeout=5)).text == "for wanda"
        async with gw.client("wanda", "presence") as ghost:   # a device the CLI would have made
            await ghost.ping()
            with pytest.raises(asyncio.TimeoutError):
                await ghost.recv(timeout=0.05)
    asyncio.run(check())


def as_javascript_reads_it(line: str) -> dict:
    """JSON as JavaScript's JSON.parse and jq 1.6 read it: every number a double."""
    return json.loads(line, parse_int=float)


def test_json_ids_stay_exact_where_numbers_are_doubles(gateway_proc):
    """Ids are ms << 22 | worker << 16 | sequence: those made in the same millisecond
    as another have low bits a double cannot hold. Every id the CLI prints in JSON
    (messages, origin ids of mirror copies and group messages, receipts, send
    --json) is a string, so it survives a parser that reads numbers as doubles."""
    import asyncio
    gw = gateway_proc
    burst = 20

    async def send_burst():
        async with gw.client("big-alice", "other"):       # a second device: it gets mirror copies
            pass
        async with gw.client("big-alice", "main") as a:
            g = await a.group("create", "#big-ids", members=["big-bob"])
            assert set(g["members"]) == {"big-alice", "big-bob"}
            direct = await asyncio.gather(*(a.send("big-bob", f"direct {i}") for i in range(burst)))
            grouped = await asyncio.gather(*(a.send("#big-ids", f"group {i}") for i in range(burst)))
        return [r.id for r in direct], [r.id for r in grouped]
    direct, grouped = asyncio.run(send_burst())
    assert any(float(i) != i for i in direct + grouped), "no id in the burst needs more than a double"

    r = sb("recv", "--as", "big-bob", "--count", 2 * burst, "--timeout", "10", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    got = [as_javascript_reads_it(line) for line in r.stdout.splitlines()]
    assert all(isinstance(m["id"], str) for m in got)
    assert [int(m["id"]) for m in got if "group" not in m] == direct
    assert [m["text"] for m in got if "group" not in m] == [f"direct {i}" for i in range(burst)]
    assert [int(m["origin_id"]) for m in got if m.get("group") == "#big-ids"] == grouped
    assert all(isinstance(m["ts"], float) and m["ts"] == int(m["ts"]) for m in got)   # ms: exact as numbers

    r = sb("recv", "--as", "big-alice", "--device", "other", "--count", burst, "--timeout", "10", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    mirrors = [as_javascript_reads_it(line) for line in r.stdout.splitlines()]
    mirrors = [m for m in mirrors if m.get("peer") == "big-bob"]
    assert [int(m["origin_id"]) for m in mirrors] == direct

    r = sb("recv", "--as", "big-alice", "--device", "main", "--timeout", "2", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    receipts = [as_javascript_reads_it(line) for line in r.stdout.splitlines()]
    delivered = {int(x["msg_id"]) for x in receipts if x.get("receipt") == "delivered" and x["by"] == "big-bob"}
    assert set(direct) <= delivered

    r = sb("send", "--json", "--as", "big-alice", "--to", "big-bob", "one more", *endpoint(gw))
    assert r.returncode == 0, r.stderr
    sent = as_javascript_reads_it(r.stdout)
    assert set(sent) == {"id", "ts"} and isinstance(sent["id"], str) and int(sent["id"]) >> 22 > 0
    r = sb("recv", "--as", "big-bob", "--count", 1, "--timeout", "10", *endpoint(gw))
    assert as_javascript_reads_it(r.stdout)["id"] == sent["id"]
