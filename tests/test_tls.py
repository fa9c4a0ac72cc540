"""TLS on both listeners, with a throwaway CA made by the openssl CLI at test
time (no private key is committed): handshake, a client trusting another CA,
hand-offs between workers over TLS, wss://, and certificate reload on SIGHUP."""
import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid

import pytest

from _core import frames as F
from _core.pycodec import Decoder, decode_body, encode
from gateway.client import Client
from gateway.tls import client_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d, name):
    """A CA (`name`.pem) and a server certificate for localhost/127.0.0.1 signed by it
    (`name`-srv.pem, `name`-srv.key)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    _openssl("req", *ec, "-keyout", f"{name}-srv.key", "-out", f"{name}-srv.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}-srv.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
             "-CAcreateserial", "-out", f"{name}-srv.pem", "-days", "1", "-extfile", "san.cnf", cwd=d)
    return d / f"{name}.pem", d / f"{name}-srv.pem", d / f"{name}-srv.key"


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca1, cert1, key1 = make_ca(d, "ca1")
    ca2, cert2, key2 = make_ca(d, "ca2")
    live_cert, live_key = d / "server.pem", d / "server.key"      # what the gateway is told to load
    shutil.copy(cert1, live_cert)
    shutil.copy(key1, live_key)
    return {"ca1": ca1, "ca2": ca2, "cert1": cert1, "key1": key1, "cert2": cert2, "key2": key2,
            "cert": live_cert, "key": live_key}


@pytest.fixture
def tls_gw(gateway_factory, pki):
    return gateway_factory("--workers", "2", "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]))


def uid(p):
    return f"{p}-{uuid.uuid4().hex[:8]}"


def sb(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "gateway", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def wait_log(gw, pattern, count=1, timeout=10.0):
    """Until the server's output has `count` lines matching `pattern` (its own report, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, gw.text)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} x {pattern!r} in:\n{gw.text[-3000:]}")


def served_cert(port, ca):
    """The DER certificate a fresh TLS connection gets, verified against `ca`."""
    ctx = client_context(str(ca))
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            return t.getpeercert(binary_form=True)


def der(pem):
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_tls_handshake_and_messages_across_workers(tls_gw, pki):
    """Users on both workers: connections accepted by the other worker are relayed to the owner."""
    gw = tls_gw
    assert "with TLS" in gw.text and "wss://" in gw.text

    async def main():
        ctx = client_context(str(pki["ca1"]))
        users = [uid(f"t{i}") for i in range(8)]
        clients = [Client(gw.host, gw.port, gw.token(u), "main", ssl=ctx, reconnect=False) for u in users]
        for c in clients:
            await c.connect()
        for i, c in enumerate(clients):
            await c.send(users[(i + 1) % len(users)], f"over tls {i}", timeout=10)
        for i, c in enumerate(clients):
            m = await c.recv(timeout=10)
            assert (m.sender, m.text) == (users[i - 1], f"over tls {(i - 1) % len(users)}")
            await c.ack(m)
        for c in clients:
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 60))
    assert served_cert(gw.port, pki["ca1"]) == der(pki["cert1"])
    gw.stop()
    handoffs = sum(int(n) for n in re.findall(r"handoffs_out=(\d+)", gw.text))
    assert handoffs >= 1, gw.text          # 8 users on 2 workers: some were relayed


def test_client_trusting_another_ca_is_refused_clearly(tls_gw, pki):
    gw = tls_gw
    a = uid("ok")
    r = sb("send", "--as", a, "--to", a, "hello", "--port", gw.port, "--data-dir", gw.data_dir,
           "--ca", pki["ca1"])
    assert r.returncode == 0, r.stderr
    r = sb("send", "--as", a, "--to", a, "hello", "--port", gw.port, "--data-dir", gw.data_dir,
           "--ca", pki["ca2"])
    assert r.returncode == 1
    assert "certificate is not trusted" in r.stderr and "--ca" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = sb("recv", "--as", a, "--count", "1", "--timeout", "5", "--port", gw.port, "--data-dir", gw.data_dir,
           "--ca", pki["ca1"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == "hello"
    r = sb("send", "--as", a, "--to", a, "plain", "--port", gw.port, "--data-dir", gw.data_dir, "--timeout", "3")
    assert r.returncode == 1 and "Traceback" not in r.stderr       # plain TCP to a TLS listener


def test_websocket_over_tls(tls_gw, pki):
    from websockets.asyncio.client import connect
    gw = tls_gw
    a, b = uid("wss-a"), uid("wss-b")

    def frames_of(data):
        out = []
        Decoder(lambda t, f, body: out.append(decode_body(t, f, bytes(body))), 1 << 20).feed(data)
        return out

    async def main():
        url = f"wss://127.0.0.1:{gw.ws_port}/ws"
        ctx = client_context(str(pki["ca1"]))
        async with connect(url, ssl=ctx) as wa, connect(url, ssl=ctx) as wb:
            await wa.send(encode(F.Hello(2, gw.token(a), "web", 0)))
            await wb.send(encode(F.Hello(2, gw.token(b), "web", 0)))
            assert isinstance(frames_of(await wa.recv())[0], F.Welcome)
            assert isinstance(frames_of(await wb.recv())[0], F.Welcome)
            await wa.send(encode(F.Send(1, b, b"secure")))
            ack = frames_of(await wa.recv())[0]
            d = frames_of(await wb.recv())[0]
            assert d.msg_id == ack.msg_id and d.payload == b"secure"
    asyncio.run(asyncio.wait_for(main(), 30))


def test_sighup_reloads_the_certificate_for_new_connections(tls_gw, pki):
    gw = tls_gw
    a, b = uid("old"), uid("new")

    async def main():
        old = Client(gw.host, gw.port, gw.token(a), "main", ssl=client_context(str(pki["ca1"])), reconnect=False)
        await old.connect()
        shutil.copy(pki["cert2"], pki["cert"])
        shutil.copy(pki["key2"], pki["key"])
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_log, gw, r"event=tls_reloaded", 2)
        assert await asyncio.to_thread(served_cert, gw.port, pki["ca2"]) == der(pki["cert2"])
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(served_cert, gw.port, pki["ca1"])
        new = Client(gw.host, gw.port, gw.token(b), "main", ssl=client_context(str(pki["ca2"])), reconnect=False)
        await new.connect()
        # the connection made before the reload keeps working, both ways
        await old.send(b, "from the old connection", timeout=10)
        assert (await new.recv(timeout=10)).text == "from the old connection"
        await new.send(a, "to the old connection", timeout=10)
        assert (await old.recv(timeout=10)).text == "to the old connection"

        # a bad new certificate: logged, the one loaded before stays in use
        pki["cert"].write_text("not a certificate\n")
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_log, gw, r"event=tls_reload_failed .*action=kept_old", 2)
        assert await asyncio.to_thread(served_cert, gw.port, pki["ca2"]) == der(pki["cert2"])
        await old.close()
        await new.close()
    asyncio.run(asyncio.wait_for(main(), 60))
    assert gw.alive()
    assert not re.search(r"event=worker_exited", gw.text), gw.text


def test_bad_tls_settings_refused_at_start(tmp_path, pki):
    r = sb("serve", "--port", "0", "--data-dir", tmp_path / "d", "--tls-cert", pki["cert"])
    assert r.returncode == 2
    assert "tls_cert" in r.stderr and "tls_key" in r.stderr, r.stderr
    r = sb("serve", "--port", "0", "--data-dir", tmp_path / "d", "--tls-cert", pki["cert1"], "--tls-key",
           pki["key2"])
    assert r.returncode == 2
    assert "cannot load certificate" in r.stderr and "flag --tls" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "listening" not in r.stdout
