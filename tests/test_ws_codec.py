"""The Cython WebSocket codec (_core/_ws) on its own: random frames, random
fragmentation, random mask keys and random read boundaries (hypothesis) must
give the protocol decoder exactly the frames that were sent; the writer's
messages hold whole protocol frames; the reader's state survives a hand-off."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from _core import frames as F
from _core._codec import Decoder
from _core._ws import WsReader, WsWriter, close_code_valid, close_frame
from _core.errors import WebSocketError
from _core.pycodec import decode_body, encode
from wsclient import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, ws_frame

PROTO = st.one_of(
    st.builds(F.Ping, st.integers(0, 2 ** 64 - 1)),
    st.builds(F.Send, st.integers(0, 2 ** 64 - 1), st.text(min_size=1, max_size=20).filter(
        lambda s: len(s.encode()) <= 255), st.binary(max_size=3000)),
    st.builds(F.Received, st.lists(st.integers(0, 2 ** 64 - 1), max_size=20).map(tuple)),
)


class Sinks:
    def __init__(self, max_message=1 << 20):
        self.frames, self.control = [], []
        self.decoder = Decoder(lambda t, f, b: self.frames.append(decode_body(t, f, bytes(b))), 1 << 20)
        self.reader = WsReader(self.decoder, lambda op, p: self.control.append((op, p)), max_message)


@st.composite
def streams(draw):
    """(wire bytes, protocol frames, pings) for several messages, each fragmented at random."""
    wire, sent, pings = b"", [], []
    for _ in range(draw(st.integers(1, 5))):
        frames = draw(st.lists(PROTO, min_size=1, max_size=4))
        sent += frames
        data = b"".join(encode(f) for f in frames)
        cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
        parts = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        for i, part in enumerate(parts):
            key = draw(st.sampled_from([b"\0\0\0\0", b"\xff\x00\xff\x00", None]))
            wire += ws_frame(OP_BINARY if i == 0 else OP_CONT, part, fin=i == len(parts) - 1,
                             key=key or draw(st.binary(min_size=4, max_size=4)))
            if draw(st.booleans()):
                ping = draw(st.binary(max_size=125))
                pings.append(ping)
                wire += ws_frame(OP_PING, ping)
    return wire, sent, pings


@settings(max_examples=150, deadline=None)
@given(streams(), st.data())
def test_random_chunking(stream, data):
    wire, sent, pings = stream
    s = Sinks()
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=30))))
    for a, b in zip([0] + cuts, cuts + [len(wire)]):
        s.reader.feed(wire[a:b])
    assert s.frames == sent
    assert s.control == [(OP_PING, p) for p in pings]
    assert s.reader.buffered == 0 and s.decoder.buffered == 0


def test_byte_at_a_time_through_buffered_protocol_calls():
    s = Sinks()
    wire = ws_frame(OP_BINARY, encode(F.Send(1, "bob", b"z" * 70000)), length_form=127) + ws_frame(OP_PONG, b"p")
    for i in range(0, len(wire)):
        buf = s.reader.get_buffer(-1)
        buf[0] = wire[i]
        s.reader.buffer_updated(1)
    assert s.frames == [F.Send(1, "bob", b"z" * 70000)] and s.control == [(OP_PONG, b"p")]


def test_idle_reader_holds_only_a_split_header():
    s = Sinks()
    wire = ws_frame(OP_BINARY, encode(F.Ping(1)))
    s.reader.feed(wire[:3])
    assert s.reader.buffered == 3
    s.reader.feed(wire[3:])
    assert s.reader.buffered == 0 and s.frames == [F.Ping(1)]


def test_handoff_state_round_trip():
    """Stop the inner decoder in the middle of a frame (as HELLO for another worker
    does), move state and raw rest to a fresh reader, and finish there."""
    hello = encode(F.Hello(2, "t", "d", 0))
    after = encode(F.Send(1, "bob", b"abc" * 50))
    wire = ws_frame(OP_BINARY, hello + after[:20], fin=False) + ws_frame(OP_CONT, after[20:]) + \
        ws_frame(OP_BINARY, encode(F.Ping(3)))
    frames = []

    def stop_at_hello(t, f, b):
        frames.append(decode_body(t, f, bytes(b)))
        d1.stop()
    d1 = Decoder(stop_at_hello, 1 << 20)
    r1 = WsReader(d1, lambda op, p: None, 1 << 20)
    r1.feed(wire[:len(wire) - 5])
    assert frames == [F.Hello(2, "t", "d", 0)]
    state, proto, rest = r1.take_state(), d1.take_buffered(), r1.take_rest() + wire[len(wire) - 5:]
    s = Sinks()
    s.reader.set_state(state)
    s.decoder.feed(proto)
    s.reader.feed(rest)
    assert s.frames == [F.Send(1, "bob", b"abc" * 50), F.Ping(3)]


@pytest.mark.parametrize("wire,code", [
    (ws_frame(OP_BINARY, b"", mask=False), 1002),
    (ws_frame(OP_PING, b"x" * 126), 1002),
    (ws_frame(OP_BINARY, b"\0" * 200), 1009),
    (ws_frame(OP_CLOSE, struct.pack("!H", 1006)), 1002),
])
def test_reader_errors(wire, code):
    s = Sinks(max_message=100)
    with pytest.raises(WebSocketError) as info:
        s.reader.feed(wire)
    assert info.value.close_code == code


def test_close_codes():
    assert all(close_code_valid(c) for c in (1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999))
    assert not any(close_code_valid(c) for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535))
    assert close_frame(1000, "x" * 200)[:4] == b"\x88\x7d\x03\xe8"      # reason cut to 123 bytes


def test_writer_cuts_messages_at_frame_boundaries():
    out = []

    class Transport:
        write = staticmethod(out.append)
    w = WsWriter(Transport(), 1000)
    frames = [encode(F.Ping(i)) for i in range(200)] + [encode(F.Send(1, "b", b"q" * 3000))]
    w.write(b"".join(frames))
    data, messages = out[0], []
    while data:
        assert data[0] == 0x82
        n = data[1]
        off = 2
        if n == 126:
            n, off = struct.unpack("!H", data[2:4])[0], 4
        messages.append(data[off:off + n])
        data = data[off + n:]
    assert b"".join(messages) == b"".join(frames)
    assert all(len(m) <= 1000 for m in messages[:-1]) and len(messages[-1]) == len(frames[-1])
    assert all(int.from_bytes(m[:4], "big") + 4 <= len(m) for m in messages)
    assert w.last_type == 0x03
