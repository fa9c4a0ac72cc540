"""The router embedded in a different asyncio server (examples/embed_asyncio.py)."""
import re
import socket
import subprocess
import sys

import pytest

from _core import frames, pycodec
from conftest import ROOT


@pytest.fixture
def embedded_server():
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "embed_asyncio.py"), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on ([\d.]+):(\d+)", line)
    try:
        assert m, f"example did not start: {line!r}"
        yield m.group(1), int(m.group(2))
    finally:
        proc.terminate()
        proc.wait(10)


class RawClient:
    def __init__(self, addr, user, device="d1"):
        self.sock = socket.create_connection(addr, timeout=5)
        self.frames = []
        self.decoder = pycodec.Decoder(lambda t, f, b: self.frames.append(pycodec.decode_body(t, f, b)))
        self.sock.sendall(f"LOGIN {user} {device}\n".encode())

    def send(self, frame):
        self.sock.sendall(pycodec.encode(frame))

    def next(self, kind):
        while True:
            for i, f in enumerate(self.frames):
                if isinstance(f, kind):
                    return self.frames.pop(i)
            data = self.sock.recv(65536)
            assert data, f"connection closed while waiting for {kind.__name__}"
            self.decoder.feed(data)

    def close(self):
        self.sock.close()


def test_embedded_router_routes_and_stores(embedded_server):
    alice = RawClient(embedded_server, "alice")
    assert alice.next(frames.Welcome).user == "alice"
    alice.send(frames.Send(1, "bob", b"stored while bob is away"))
    stored = alice.next(frames.Ack)
    bob = RawClient(embedded_server, "bob")
    got = bob.next(frames.Deliver)
    assert (got.msg_id, got.sender, got.payload) == (stored.msg_id, "alice", b"stored while bob is away")
    bob.send(frames.Received((got.msg_id,)))
    alice.send(frames.Send(2, "bob", b"live"))
    live_ack = alice.next(frames.Ack)
    live = bob.next(frames.Deliver)
    assert (live.msg_id, live.payload) == (live_ack.msg_id, b"live")
    assert live.msg_id > got.msg_id
    alice.close()
    bob.close()
