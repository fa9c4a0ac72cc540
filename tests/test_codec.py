"""Tests of the framing codec: the Cython codec (`_core._codec`) and the
pure-Python reference (`_core.pycodec`), side by side.

Every test that exercises the common API takes the `codec` fixture and runs
once per implementation; the modules are imported directly (not through
`_core.codec` and SWITCHBOARD_CODEC).

The tests named after a failure mode (get_buffer without buffer_updated, a
released get_buffer view, more than the scratch size held after stop) pin
down bugs found and fixed in the Cython decoder.
"""
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _core import _codec, pycodec
from _core import frames as F
from _core.errors import FrameTooLarge, MalformedFrame, ProtocolError, UnexpectedFrame, UnknownFrameType
from _core.protocol import (DEFAULT_MAX_FRAME, FLAG_FATAL, FLAG_GROUP, FLAG_MIRROR, FLAG_MORE, FLAG_SEND_ONLY, HEADER_SIZE,
                            LENGTH_SIZE, MAX_ID_LENGTH, MAX_RECEIVED_IDS, MAX_TOKEN_LENGTH, MIN_FRAME, PRE_AUTH_MAX_FRAME, ErrorCode,
                            FrameType, GoawayCode)

ROOT = Path(__file__).resolve().parents[1]
CODECS = {"cython": _codec, "python": pycodec}
OTHER = {_codec: pycodec, pycodec: _codec}

# function_scoped_fixture: `codec` only hands out a module, there is no per-test state.
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=60)


@pytest.fixture(params=list(CODECS))
def codec(request):
    return CODECS[request.param]


def known_bug(name, reason, raises=AssertionError):
    """Parametrise `codec` with the implementation `name` marked as a strict xfail."""
    return pytest.mark.parametrize("codec", [
        pytest.param(n, marks=pytest.mark.xfail(reason=reason, strict=True, raises=raises)) if n == name else n
        for n in CODECS], indirect=True)


TYPE_OF = {F.Hello: FrameType.HELLO, F.Welcome: FrameType.WELCOME, F.Send: FrameType.SEND,
           F.Ack: FrameType.ACK, F.Deliver: FrameType.DELIVER, F.Received: FrameType.RECEIVED,
           F.Ping: FrameType.PING, F.Pong: FrameType.PONG, F.Error: FrameType.ERROR,
           F.Goaway: FrameType.GOAWAY, F.Receipt: FrameType.RECEIPT, F.Read: FrameType.READ,
           F.Subscribe: FrameType.SUBSCRIBE, F.Presence: FrameType.PRESENCE, F.Typing: FrameType.TYPING,
           F.Privacy: FrameType.PRIVACY, F.Group: FrameType.GROUP, F.GroupInfo: FrameType.GROUP_INFO}

SAMPLES = [
    F.Hello(2, "token-abc", "phone", 42),
    F.Welcome(2, 7, "alice", "phone", 65536, 64000, 30000, 1_700_000_000_000),
    F.Send(1, "bob", b"hello"),
    F.Send(2**64 - 1, "b" * 255, b""),
    F.Ack(1, 2, 3),
    F.Deliver(2, 1_700_000_000_000, "alice", "phone", b"hi bob"),
    F.Deliver(3, 1, "alice", "", b""),
    F.Received((1, 2, 2**64 - 1)),
    F.Received(()),
    F.Ping(0xDEADBEEF),
    F.Pong(2**64 - 1),
    F.Error(ErrorCode.RATE_LIMITED, 9, "slow down", True),
    F.Error(1, 0, "", False),
    F.Goaway(GoawayCode.DRAINING, 5000, "bye \u2603"),
    F.Hello(2, "t", "cli", 0, True),
    F.Deliver(4, 5, "alice", "laptop", b"sent from my laptop", "bob", 77),
    F.Receipt(9, 1, 77, "bob", "phone", 1_700_000_000_000),
    F.Receipt(10, 2, 2**64 - 1, "b" * 255, "", 0),
    F.Read("alice", (1, 2, 3)),
    F.Read("alice", ()),
    F.Subscribe(("alice", "bob"), True),
    F.Subscribe((), False),
    F.Presence("alice", True, 1_700_000_000_000),
    F.Presence("bob", False, 0),
    F.Typing("bob", True),
    F.Typing("alice", False),
    F.Privacy(True),
    F.Privacy(False),
    F.Group(7, 1, "#team", '{"name": "Team", "members": ["bob"]}'),
    F.GroupInfo(7, '{"group": "#team"}'),
    F.GroupInfo(8, '{"group": "#te', True),
    F.Deliver(11, 12, "alice", "phone", b"to the team", "#team", 99, True),
]


# -- strategies -------------------------------------------------------------------

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def _utf8_len_ok(lo, hi):
    return lambda s: lo <= len(s.encode("utf-8")) <= hi


# 1..255 bytes of UTF-8: arbitrary text filtered by encoded length, plus the boundaries.
BOUNDARY_IDS = ["x", "a" * 255, "\u00e9" * 127 + "a", "\u20ac" * 85, "\U0001F600" * 63 + "abc", "\u00e9"]
ids = st.one_of(st.text(min_size=1, max_size=80).filter(_utf8_len_ok(1, MAX_ID_LENGTH)),
                st.text(min_size=60, max_size=255).filter(_utf8_len_ok(1, MAX_ID_LENGTH)),
                st.sampled_from(BOUNDARY_IDS))
opt_ids = st.one_of(st.just(""), ids)
tokens = st.one_of(st.text(max_size=300).filter(_utf8_len_ok(0, MAX_TOKEN_LENGTH)),
                   st.sampled_from(["", "t" * MAX_TOKEN_LENGTH, "\u20ac" * 341 + "a"]))
reasons = st.text(max_size=200)
payloads = st.binary(max_size=4096)
msg_ids = st.lists(U64, max_size=64).map(tuple)

frames_st = st.one_of(
    st.builds(F.Hello, version=U16, token=tokens, device=ids, resume_after=U64, send_only=st.booleans()),
    st.builds(F.Welcome, version=U16, session_id=U64, user=ids, device=ids, max_frame=U32,
              max_payload=U32, ping_interval_ms=U32, server_time_ms=U64),
    st.builds(F.Send, seq=U64, to=ids, payload=payloads),
    st.builds(F.Ack, seq=U64, msg_id=U64, timestamp_ms=U64),
    st.builds(F.Deliver, msg_id=U64, timestamp_ms=U64, sender=ids, sender_device=opt_ids, payload=payloads),
    st.builds(F.Deliver, msg_id=U64, timestamp_ms=U64, sender=ids, sender_device=opt_ids, payload=payloads,
              peer=ids, origin_id=U64),
    st.builds(F.Receipt, id=U64, kind=st.integers(0, 255), msg_id=U64, by=ids, by_device=opt_ids,
              timestamp_ms=U64),
    st.builds(F.Read, peer=ids, msg_ids=msg_ids),
    st.builds(F.Subscribe, users=st.lists(ids, max_size=8).map(tuple), on=st.booleans()),
    st.builds(F.Presence, user=ids, online=st.booleans(), last_seen_ms=U64),
    st.builds(F.Typing, peer=ids, typing=st.booleans()),
    st.builds(F.Privacy, hide_last_seen=st.booleans()),
    st.builds(F.Group, request_id=U64, op=st.integers(0, 255), group=ids, arg=reasons),
    st.builds(F.GroupInfo, request_id=U64, info=reasons, more=st.booleans()),
    st.builds(F.Deliver, msg_id=U64, timestamp_ms=U64, sender=ids, sender_device=opt_ids, payload=payloads,
              peer=ids, origin_id=U64, group=st.just(True)),
    st.builds(F.Received, msg_ids=msg_ids),
    st.builds(F.Ping, nonce=U64),
    st.builds(F.Pong, nonce=U64),
    st.builds(F.Error, code=U16, ref=U64, reason=reasons, fatal=st.booleans()),
    st.builds(F.Goaway, code=U16, reconnect_ms=U32, reason=reasons),
)


# -- helpers ----------------------------------------------------------------------

class Collector:
    """A sink that copies every frame out while its view is valid."""

    def __init__(self, decode_with=None):
        self.raw = []            # (ftype, flags, body bytes)
        self.decoded = []
        self._decode = decode_with

    def __call__(self, ftype, flags, body):
        self.raw.append((ftype, flags, bytes(body)))
        if self._decode is not None:
            self.decoded.append(self._decode(ftype, flags, body))


def raw_of(wire):
    """The (ftype, flags, body) triples of a stream of whole frames, parsed independently of the codecs."""
    out, pos = [], 0
    while pos < len(wire):
        length, ftype, flags = struct.unpack_from("!IBB", wire, pos)
        out.append((ftype, flags, wire[pos + HEADER_SIZE:pos + LENGTH_SIZE + length]))
        pos += LENGTH_SIZE + length
    return out


def frame_ends(wire):
    ends, pos = [], 0
    while pos < len(wire):
        pos += LENGTH_SIZE + struct.unpack_from("!I", wire, pos)[0]
        ends.append(pos)
    return ends


def split(data, cuts):
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def read_into(dec, chunk, read_size=None):
    """Deliver `chunk` the way asyncio's BufferedProtocol path does: get_buffer(-1),
    copy into the view (as much as fits, or `read_size`), let go of the view, then
    buffer_updated(n). Returns the frames dispatched.

    The data is written through a slice that we release; the object get_buffer()
    returned is dropped with `del`, not `.release()`d (see
    test_get_buffer_view_released_by_caller for why)."""
    n = 0
    mv = memoryview(chunk)
    while len(mv):
        buf = dec.get_buffer(-1)
        assert len(buf) > 0, "get_buffer() returned an empty buffer"
        k = min(len(buf), len(mv), read_size or len(mv))
        w = buf[:k]
        w[:] = mv[:k]
        w.release()
        del buf
        n += dec.buffer_updated(k)
        mv = mv[k:]
    return n


def deliver(dec, chunk, path, read_size=None):
    if path == "feed":
        return dec.feed(chunk)
    return read_into(dec, chunk, read_size)


PATHS = ["feed", "get_buffer"]


def encode_all(codec, frames):
    return b"".join(codec.encode(f) for f in frames)


# -- constants: the Cython enums agree with protocol.py ------------------------------

def test_every_frame_type_encodes_with_its_type_byte(codec):
    assert {type(f) for f in SAMPLES} == set(TYPE_OF)
    assert set(TYPE_OF.values()) == set(FrameType)
    for frame in SAMPLES:
        wire = codec.encode(frame)
        length, ftype, flags = struct.unpack_from("!IBB", wire)
        assert ftype == TYPE_OF[type(frame)]
        assert length == len(wire) - LENGTH_SIZE
        expected = (FLAG_FATAL if isinstance(frame, F.Error) and frame.fatal
                    else FLAG_SEND_ONLY if isinstance(frame, F.Hello) and frame.send_only
                    else (FLAG_GROUP if frame.group else FLAG_MIRROR) if isinstance(frame, F.Deliver) and frame.peer
                    else FLAG_MORE if isinstance(frame, F.GroupInfo) and frame.more
                    else 0)
        assert flags == expected


def test_ping_header_layout(codec):
    wire = codec.encode(F.Ping(0x0102030405060708))
    assert wire == b"\x00\x00\x00\x0a" + b"\x07" + b"\x00" + bytes(range(1, 9))
    assert len(wire) == HEADER_SIZE + 8
    assert struct.unpack("!IBBQ", wire) == (10, FrameType.PING, 0, 0x0102030405060708)


def test_fatal_flag(codec):
    assert codec.encode(F.Error(1, 2, "x", True))[5] == FLAG_FATAL
    assert codec.encode(F.Error(1, 2, "x", False))[5] == 0
    body = struct.pack("!HQH", 1, 2, 1) + b"x"
    assert codec.decode_body(FrameType.ERROR, FLAG_FATAL, body).fatal is True
    assert codec.decode_body(FrameType.ERROR, 0, body).fatal is False
    assert codec.decode_body(FrameType.ERROR, 0xFF & ~FLAG_FATAL, body).fatal is False


def test_decoder_accepts_exactly_the_known_type_bytes(codec):
    known = {int(t) for t in FrameType}
    for t in range(256):
        sink = Collector()
        dec = codec.Decoder(sink)
        frame = struct.pack("!IBB", MIN_FRAME, t, 0)
        if t in known:
            assert dec.feed(frame) == 1
            assert sink.raw == [(t, 0, b"")]
        else:
            with pytest.raises(UnknownFrameType) as ei:
                dec.feed(frame)
            assert ei.value.code == ErrorCode.UNKNOWN_FRAME_TYPE
            assert sink.raw == []


def test_default_max_frame_and_min_frame(codec):
    dec = codec.Decoder(Collector())
    assert dec.max_frame == DEFAULT_MAX_FRAME
    sink = Collector()
    assert codec.Decoder(sink).feed(struct.pack("!IBB", MIN_FRAME, FrameType.PONG, 0)) == 1
    with pytest.raises(MalformedFrame):
        codec.Decoder(Collector()).feed(struct.pack("!I", MIN_FRAME - 1))


def test_id_token_and_received_limits(codec):
    # MAX_ID_LENGTH
    ok = F.Send(1, "a" * MAX_ID_LENGTH, b"")
    assert codec.decode_body(FrameType.SEND, 0, codec.encode(ok)[HEADER_SIZE:]) == ok
    with pytest.raises(ValueError):
        codec.encode(F.Send(1, "a" * (MAX_ID_LENGTH + 1), b""))
    # MAX_TOKEN_LENGTH, both directions
    ok = F.Hello(2, "t" * MAX_TOKEN_LENGTH, "d", 0)
    assert codec.decode_body(FrameType.HELLO, 0, codec.encode(ok)[HEADER_SIZE:]) == ok
    with pytest.raises(ValueError):
        codec.encode(F.Hello(2, "t" * (MAX_TOKEN_LENGTH + 1), "d", 0))
    long_token = struct.pack("!HH", 1, MAX_TOKEN_LENGTH + 1) + b"t" * (MAX_TOKEN_LENGTH + 1) + b"\x01d" + bytes(8)
    with pytest.raises(MalformedFrame):
        codec.decode_body(FrameType.HELLO, 0, long_token)
    # MAX_RECEIVED_IDS, both directions
    ok = F.Received(tuple(range(MAX_RECEIVED_IDS)))
    assert codec.decode_body(FrameType.RECEIVED, 0, codec.encode(ok)[HEADER_SIZE:]) == ok
    with pytest.raises(ValueError):
        codec.encode(F.Received(tuple(range(MAX_RECEIVED_IDS + 1))))
    n = MAX_RECEIVED_IDS + 1
    with pytest.raises(MalformedFrame):
        codec.decode_body(FrameType.RECEIVED, 0, struct.pack(f"!H{n}Q", n, *range(n)))
    with pytest.raises(MalformedFrame):
        codec.decode_body(FrameType.RECEIVED, 0, struct.pack("!H", 0xFFFF))


# -- round trip -------------------------------------------------------------------

@SETTINGS
@given(frame=frames_st)
def test_round_trip_and_cross_encode(codec, frame):
    wire = codec.encode(frame)
    assert wire == OTHER[codec].encode(frame), "the two codecs encode differently"
    wb = codec.WriteBuffer()
    codec.encode_into(wb, frame)
    assert wb.getvalue() == wire
    length, ftype, flags = struct.unpack_from("!IBB", wire)
    assert length == len(wire) - LENGTH_SIZE
    assert ftype == TYPE_OF[type(frame)]

    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    assert dec.feed(wire) == 1
    assert dec.buffered == 0
    assert sink.decoded == [frame]
    body = sink.raw[0][2]
    assert OTHER[codec].decode_body(ftype, flags, body) == frame
    assert codec.decode_body(ftype, flags, bytearray(body)) == frame
    assert codec.decode_body(ftype, flags, memoryview(body)) == frame


def test_round_trip_samples(codec):
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    assert dec.feed(encode_all(codec, SAMPLES)) == len(SAMPLES)
    assert sink.decoded == SAMPLES


# -- re-chunking ------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(frames=st.lists(frames_st, min_size=1, max_size=12), data=st.data())
def test_arbitrary_rechunking(codec, path, frames, data):
    wire = encode_all(codec, frames)
    cuts = data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=25), label="cuts")
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    ends = frame_ends(wire)
    pos = total = 0
    for chunk in split(wire, cuts):
        total += deliver(dec, chunk, path)
        pos += len(chunk)
        complete = [e for e in ends if e <= pos]
        assert total == len(complete)
        assert dec.buffered == pos - (complete[-1] if complete else 0)
    assert dec.buffered == 0
    assert sink.decoded == frames
    assert sink.raw == raw_of(wire)


@pytest.mark.parametrize("path", PATHS)
def test_one_byte_at_a_time(codec, path):
    wire = encode_all(codec, SAMPLES * 2)
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    total = 0
    for i in range(len(wire)):
        total += deliver(dec, wire[i:i + 1], path)
    assert total == len(SAMPLES) * 2
    assert sink.decoded == SAMPLES * 2
    assert dec.buffered == 0


@pytest.mark.parametrize("path", PATHS)
def test_many_frames_in_one_read(codec, path):
    frames = [F.Send(i, "bob", i.to_bytes(4, "big") * 8) for i in range(1000)]
    wire = encode_all(codec, frames)
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    if path == "feed":
        assert dec.feed(wire) == 1000
    else:
        buf = dec.get_buffer(-1)
        assert len(buf) >= len(wire)     # one read carries the whole batch
        buf[:len(wire)] = wire
        del buf
        assert dec.buffer_updated(len(wire)) == 1000
    assert sink.decoded == frames
    assert dec.buffered == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("read", [7, 1000, 4096, 16385, 65536])
def test_large_frame_split_across_reads(codec, path, read):
    big = F.Send(77, "recipient", bytes(range(256)) * 240)        # 60 KiB payload
    frames = [F.Ping(1), big, F.Ping(2)]
    wire = encode_all(codec, frames)
    assert len(wire) < DEFAULT_MAX_FRAME
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    ends = frame_ends(wire)
    pos = total = 0
    for chunk in split(wire, range(read, len(wire), read)):
        total += deliver(dec, chunk, path)
        pos += len(chunk)
        done = [e for e in ends if e <= pos]
        assert total == len(done)
        assert dec.buffered == pos - (done[-1] if done else 0)
    assert sink.decoded == frames


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("read", [None, 65536, 100_000])
def test_batch_larger_than_256k(codec, path, read):
    frames = [F.Send(i, "bob", bytes([i % 256]) * 1024) if i % 3 else F.Deliver(i, i, "al", "", bytes(1000))
              for i in range(300)]
    wire = encode_all(codec, frames)
    assert len(wire) > 256 * 1024
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    if path == "feed":
        assert dec.feed(wire) == 300
    else:
        assert read_into(dec, wire, read) == 300
    assert sink.decoded == frames
    assert dec.buffered == 0


@pytest.mark.parametrize("path", PATHS)
def test_single_frame_larger_than_256k(codec, path):
    big = F.Deliver(1, 2, "alice", "phone", bytes(range(256)) * 1200)     # 300 KiB
    frames = [F.Ping(1), big, F.Ping(2)]
    wire = encode_all(codec, frames)
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink, max_frame=1 << 20)
    for chunk in split(wire, range(50_000, len(wire), 50_000)):
        deliver(dec, chunk, path)
    assert sink.decoded == frames
    assert dec.buffered == 0


# -- body views -------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_body_view_is_invalid_after_the_call(codec, path):
    kept, copies = [], []

    def sink(ftype, flags, body):
        assert isinstance(body, memoryview)
        kept.append(body)
        copies.append(bytes(body))

    dec = codec.Decoder(sink)
    first = [F.Send(1, "bob", b"first payload"), F.Ping(5)]
    deliver(dec, encode_all(codec, first), path)
    # more traffic through the same buffers
    deliver(dec, encode_all(codec, [F.Send(2, "eve", b"X" * 13), F.Ping(6)] * 50), path)
    assert len(kept) == 102
    for view in kept:
        with pytest.raises(ValueError):
            bytes(view)
        with pytest.raises(ValueError):
            view[0]
    # data copied out inside the callback survives
    assert [codec.decode_body(t, 0, c) for t, c in zip((FrameType.SEND, FrameType.PING), copies)] == first
    assert copies[0] == raw_of(codec.encode(first[0]))[0][2]


# -- limits and malformed input ---------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("length", [DEFAULT_MAX_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF])
def test_oversized_length_rejected_on_the_prefix(codec, path, length):
    sink = Collector()
    dec = codec.Decoder(sink)
    prefix = struct.pack("!I", length)
    assert deliver(dec, prefix[:3], path) == 0      # not decidable yet
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge) as ei:
            deliver(dec, prefix[3:], path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
    assert dec.buffered <= LENGTH_SIZE
    assert peak < 1 << 20, f"{peak} bytes allocated for a {length}-byte frame that was refused"
    assert sink.raw == []


def test_max_frame_boundary(codec):
    sink = Collector()
    dec = codec.Decoder(sink, max_frame=PRE_AUTH_MAX_FRAME)
    body = bytes(PRE_AUTH_MAX_FRAME - 2)
    assert dec.feed(struct.pack("!IBB", PRE_AUTH_MAX_FRAME, FrameType.SEND, 0) + body) == 1
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack("!I", PRE_AUTH_MAX_FRAME + 1))


@pytest.mark.parametrize("length", [0, 1])
def test_length_below_minimum(codec, length):
    dec = codec.Decoder(Collector())
    with pytest.raises(MalformedFrame) as ei:
        dec.feed(struct.pack("!I", length))
    assert ei.value.code == ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ftype", [0x00, max(FrameType) + 1, 0xFF])
def test_unknown_type_rejected_on_the_type_byte(codec, path, ftype):
    dec = codec.Decoder(Collector())
    head = struct.pack("!IB", 100, ftype)
    assert deliver(dec, head[:4], path) == 0
    with pytest.raises(UnknownFrameType):
        deliver(dec, head[4:], path)
    with pytest.raises(UnknownFrameType):
        codec.decode_body(ftype, 0, b"")


def _fixed_part(frame, body):
    """Length of the part of the body that is not the trailing payload."""
    if isinstance(frame, (F.Send, F.Deliver)):
        return len(body) - len(frame.payload)
    return len(body)


@FEW
@given(frame=frames_st)
def test_truncated_and_trailing_bytes(codec, frame):
    wire = codec.encode(frame)
    ftype, flags = wire[4], wire[5]
    body = wire[HEADER_SIZE:]
    for k in range(_fixed_part(frame, body)):
        with pytest.raises(MalformedFrame):
            codec.decode_body(ftype, flags, body[:k])
    if isinstance(frame, (F.Send, F.Deliver)):
        assert codec.decode_body(ftype, flags, body + b"!").payload == frame.payload + b"!"
    else:
        for extra in (b"\x00", b"\x00" * 7, b"\xff" * 8):
            with pytest.raises(MalformedFrame):
                codec.decode_body(ftype, flags, body + extra)


def test_truncated_fields_in_every_frame_type(codec):
    for frame in SAMPLES:
        wire = codec.encode(frame)
        body = wire[HEADER_SIZE:]
        for k in range(_fixed_part(frame, body)):
            with pytest.raises(MalformedFrame):
                codec.decode_body(wire[4], wire[5], body[:k])


def _bodies_with_text(t):
    """(ftype, body) pairs putting the text `t` in each string field of each frame type."""
    q, d = struct.pack("!Q", 1), b"\x01d"
    s8, s16 = bytes([len(t)]) + t, struct.pack("!H", len(t)) + t
    return [
        (FrameType.SEND, q + s8 + b"payload"),
        (FrameType.DELIVER, q + q + s8 + d + b"payload"),
        (FrameType.DELIVER, q + q + d + s8 + b"payload"),
        (FrameType.HELLO, struct.pack("!H", 2) + s16 + d + q + q),
        (FrameType.HELLO, struct.pack("!HH", 2, 3) + b"tok" + s8 + q + q),
        (FrameType.WELCOME, struct.pack("!H", 2) + q + s8 + d + bytes(12) + q + q + bytes(4)),
        (FrameType.WELCOME, struct.pack("!H", 2) + q + d + s8 + bytes(12) + q + q + bytes(4)),
        (FrameType.ERROR, struct.pack("!H", 1) + q + s16),
        (FrameType.GOAWAY, struct.pack("!HI", 1, 0) + s16),
    ]


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"ab\x80", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_in_strings(codec, bad):
    for (ftype, good_body), (_, bad_body) in zip(_bodies_with_text(b"ok"), _bodies_with_text(bad)):
        codec.decode_body(ftype, 0, good_body)       # the frame is otherwise well formed
        with pytest.raises(MalformedFrame):
            codec.decode_body(ftype, 0, bad_body)


def test_empty_ids_rejected_where_required(codec):
    q = struct.pack("!Q", 1)
    for ftype, body in [(FrameType.SEND, q + b"\x00payload"),
                        (FrameType.DELIVER, q + q + b"\x00\x01dpayload"),
                        (FrameType.HELLO, struct.pack("!HH", 2, 0) + b"\x00" + q + q),
                        (FrameType.WELCOME, struct.pack("!H", 2) + q + b"\x00\x01d" + bytes(12) + q + q + bytes(4)),
                        (FrameType.WELCOME, struct.pack("!H", 2) + q + b"\x01u\x00" + bytes(12) + q + q + bytes(4))]:
        with pytest.raises(MalformedFrame):
            codec.decode_body(ftype, 0, body)
    # an empty sender device is allowed in DELIVER
    assert codec.decode_body(FrameType.DELIVER, 0, q + q + b"\x01s\x00") == F.Deliver(1, 1, "s", "", b"")


def test_received_count_limits(codec):
    n = MAX_RECEIVED_IDS + 1
    with pytest.raises(MalformedFrame):
        codec.decode_body(FrameType.RECEIVED, 0, struct.pack(f"!H{n}Q", n, *range(n)))
    with pytest.raises(MalformedFrame):       # count says more ids than there are
        codec.decode_body(FrameType.RECEIVED, 0, struct.pack("!H2Q", 3, 1, 2))
    with pytest.raises(MalformedFrame):       # more ids than the count
        codec.decode_body(FrameType.RECEIVED, 0, struct.pack("!H2Q", 1, 1, 2))


@pytest.mark.parametrize("path", PATHS)
def test_raising_max_frame_mid_stream(codec, path):
    """The gateway decodes with the pre-auth limit and raises it from the HELLO sink."""
    big = F.Send(1, "bob", bytes(20_000))
    decoded = []

    def hello_sink(ftype, flags, body):
        decoded.append(codec.decode_body(ftype, flags, body))
        dec.max_frame = DEFAULT_MAX_FRAME
        dec.set_sink(session_sink)

    def session_sink(ftype, flags, body):
        decoded.append(codec.decode_body(ftype, flags, body))

    dec = codec.Decoder(hello_sink, PRE_AUTH_MAX_FRAME)
    hello = F.Hello(2, "tok", "dev", 0)
    # HELLO and a frame over the pre-auth limit in the same read
    assert deliver(dec, codec.encode(hello) + codec.encode(big), path) == 2
    assert deliver(dec, codec.encode(big), path) == 1
    assert decoded == [hello, big, big]

    # without the raise, the same frame is refused
    dec2 = codec.Decoder(Collector(), PRE_AUTH_MAX_FRAME)
    with pytest.raises(FrameTooLarge):
        deliver(dec2, codec.encode(big), path)


def test_set_sink_applies_to_the_next_frame(codec):
    first, second = [], []

    def a(t, f, b):
        first.append(bytes(b))
        dec.set_sink(lambda t, f, b: second.append(bytes(b)))

    dec = codec.Decoder(a)
    assert dec.feed(encode_all(codec, [F.Ping(1), F.Ping(2), F.Ping(3)])) == 3
    assert len(first) == 1 and len(second) == 2


# -- random input: never a crash, both codecs agree -------------------------------

def _raw_frames(draw_list):
    out = b""
    for ftype, flags, body, delta in draw_list:
        out += struct.pack("!IBB", max(0, len(body) + 2 + delta), ftype, flags) + body
    return out


_frame_types = st.one_of(st.sampled_from([int(t) for t in FrameType]), st.integers(0, 255))
garbage = st.one_of(
    st.binary(max_size=2000),
    # frames with sane headers and random bodies, sometimes a wrong length
    st.lists(st.tuples(_frame_types, st.integers(0, 255), st.binary(max_size=120),
                       st.one_of(st.just(0), st.just(0), st.integers(-3, 3))),
             max_size=16).map(_raw_frames).map(lambda b: b[:2000]),
    # valid frames with a few bytes overwritten
    st.tuples(st.lists(frames_st, max_size=8).map(lambda fs: b"".join(_codec.encode(f) for f in fs)[:2000]),
              st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), max_size=3)).map(
        lambda t: _flips(*t)),
)


def _flips(data, changes):
    for at, value in changes:
        data = _flip(data, at, value)
    return data


def _run(codec, chunks, path, max_frame):
    """Returns (raw frames, decode results, error class or None). decode_body
    results are frames or ProtocolError subclasses; anything else escapes."""
    results = []

    def sink(ftype, flags, body):
        raw = (ftype, flags, bytes(body))
        try:
            results.append((raw, codec.decode_body(ftype, flags, body)))
        except ProtocolError as exc:
            results.append((raw, type(exc)))

    dec = codec.Decoder(sink, max_frame)
    err = None
    try:
        for chunk in chunks:
            deliver(dec, chunk, path)
    except ProtocolError as exc:
        err = type(exc)
        assert exc.code in ErrorCode.__members__.values()
        with pytest.raises(type(exc)):                    # stays failed
            dec.feed(codec.encode(F.Ping(1)))
    return results, err, (dec.buffered if err is None else None)


@SETTINGS
@given(data=garbage, max_frame=st.sampled_from([2, 64, 4096] + [DEFAULT_MAX_FRAME] * 3), cut_data=st.data())
def test_random_bytes_decode_or_protocol_error_and_codecs_agree(codec, data, max_frame, cut_data):
    cuts = cut_data.draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=10), label="cuts")
    chunks = split(data, cuts)
    reference = _run(OTHER[codec], [data], "feed", max_frame)
    assert _run(codec, chunks, "feed", max_frame) == reference
    assert _run(codec, chunks, "get_buffer", max_frame) == reference
    assert _run(codec, [data], "feed", max_frame) == reference


@SETTINGS
@given(ftype=_frame_types, flags=st.integers(0, 255),
       body=st.one_of(st.binary(max_size=300),
                      frames_st.map(lambda f: _codec.encode(f)[HEADER_SIZE:]),
                      st.tuples(frames_st, st.integers(0, 2000), st.integers(0, 255)).map(
                          lambda t: _flip(_codec.encode(t[0])[HEADER_SIZE:], t[1], t[2]))))
def test_random_bodies_decode_the_same_in_both_codecs(codec, ftype, flags, body):
    def outcome(mod):
        try:
            return mod.decode_body(ftype, flags, body)
        except ProtocolError as exc:
            return type(exc)
    assert outcome(codec) == outcome(OTHER[codec])


def _flip(body, at, value):
    if not body:
        return body
    at %= len(body)
    return body[:at] + bytes([value]) + body[at + 1:]


# -- failed decoders stay failed ---------------------------------------------------

BAD_STREAMS = {
    "too-large": (struct.pack("!I", DEFAULT_MAX_FRAME + 1), FrameTooLarge),
    "short-length": (struct.pack("!I", 1), MalformedFrame),
    "unknown-type": (struct.pack("!IBB", 2, max(FrameType) + 1, 0), UnknownFrameType),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", list(BAD_STREAMS))
def test_decoder_stays_failed(codec, path, bad):
    data, exc_type = BAD_STREAMS[bad]
    sink = Collector()
    dec = codec.Decoder(sink)
    good = codec.encode(F.Ping(1))
    with pytest.raises(exc_type):
        deliver(dec, good + data + good, path)
    assert len(sink.raw) == 1
    for again in PATHS:
        with pytest.raises(exc_type):
            deliver(dec, good, again)
    with pytest.raises(exc_type):
        dec.feed(b"")
    dec.max_frame = 1 << 24         # raising the limit does not revive it
    with pytest.raises(exc_type):
        deliver(dec, good, path)
    assert len(sink.raw) == 1


def test_sink_protocol_error_fails_the_decoder(codec):
    seen = []

    def sink(ftype, flags, body):
        seen.append(ftype)
        if ftype != FrameType.HELLO:
            raise UnexpectedFrame("expected HELLO")

    dec = codec.Decoder(sink)
    with pytest.raises(UnexpectedFrame):
        dec.feed(encode_all(codec, [F.Ping(1), F.Ping(2)]))
    with pytest.raises(UnexpectedFrame):
        dec.feed(codec.encode(F.Hello(2, "t", "d", 0)))
    assert seen == [FrameType.PING]


def test_no_frame_dispatched_twice_when_the_sink_raises(codec):
    seen = []

    def sink(ftype, flags, body):
        seen.append(bytes(body))
        if len(seen) == 2:
            raise RuntimeError("handler bug")

    dec = codec.Decoder(sink)
    with pytest.raises(RuntimeError):
        dec.feed(encode_all(codec, [F.Ping(1), F.Ping(2), F.Ping(3)]))
    try:
        dec.feed(codec.encode(F.Ping(4)))
    except Exception:
        pass
    assert len(seen) == len(set(seen)), f"frames dispatched twice: {seen}"


# -- BufferedProtocol contract -----------------------------------------------------

def test_buffer_updated_while_the_read_view_is_still_referenced(codec):
    """Like asyncio/uvloop: the view from get_buffer() is alive while buffer_updated() runs."""
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    frames = [F.Ping(1), F.Send(2, "bob", b"x" * 100)]
    wire = encode_all(codec, frames)
    for piece in (wire[:20], wire[20:]):
        buf = dec.get_buffer(-1)
        buf[:len(piece)] = piece
        dec.buffer_updated(len(piece))
    assert sink.decoded == frames


def test_get_buffer_without_buffer_updated_keeps_pending_bytes(codec):
    sink = Collector(decode_with=codec.decode_body)
    dec = codec.Decoder(sink)
    frames = [F.Ping(1), F.Send(2, "bob", b"payload")]
    wire = encode_all(codec, frames)
    dec.feed(wire[:7])
    buf = dec.get_buffer(-1)        # a read that returns no data (EAGAIN)
    del buf
    assert read_into(dec, wire[7:]) == 2
    assert sink.decoded == frames


def test_uvloop_read_that_fills_the_read_buffer(codec):
    import asyncio
    import socket

    import uvloop

    frames = [F.Send(i, "bob", bytes([i % 256]) * 1000) for i in range(300)]
    wire = encode_all(codec, frames)
    first = 256 * 1024                       # ends in the middle of a frame
    assert first not in frame_ends(wire)

    class Proto(asyncio.BufferedProtocol):
        def __init__(self):
            self.sink = Collector(decode_with=codec.decode_body)
            self.dec = codec.Decoder(self.sink)
            self.received = 0
            self.error = None

        def get_buffer(self, sizehint):
            return self.dec.get_buffer(sizehint)

        def buffer_updated(self, nbytes):
            self.received += nbytes
            try:
                self.dec.buffer_updated(nbytes)
            except ProtocolError as exc:
                self.error = exc

    async def wait_for(cond):
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.01)

    async def main():
        ours, peer = socket.socketpair()
        with ours, peer:
            for s in (ours, peer):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            peer.setblocking(False)
            assert peer.send(wire[:first]) == first      # queued before the loop reads anything
            transport, proto = await asyncio.get_running_loop().connect_accepted_socket(Proto, ours)
            await wait_for(lambda: proto.received >= first or proto.error)
            peer.setblocking(True)
            peer.sendall(wire[first:])
            await wait_for(lambda: proto.received >= len(wire) or proto.error)
            transport.close()
            if proto.error:
                raise proto.error
            return proto.sink.decoded

    assert uvloop.run(main()) == frames


def _run_isolated(script):
    """Run a snippet in a fresh interpreter: used where a codec bug poisons
    process-wide state (the shared scratch view) or corrupts memory."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_get_buffer_view_released_by_caller(codec):
    rc, out = _run_isolated(f"""
        from _core import {codec.__name__.rsplit('.', 1)[1]} as codec, frames as F
        got = []
        wire = codec.encode(F.Ping(1))
        for _ in range(3):
            dec = codec.Decoder(lambda t, f, b: got.append(bytes(b)))
            buf = dec.get_buffer(-1)
            buf[:len(wire)] = wire
            buf.release()
            dec.buffer_updated(len(wire))
        assert len(got) == 3, got
        print("OK")
    """)
    assert rc == 0 and "OK" in out, out


# -- encode errors -----------------------------------------------------------------

BAD_FRAMES = [
    F.Send(1, "a" * 256, b""),
    F.Send(1, "\u00e9" * 128, b""),                  # 256 bytes of UTF-8
    F.Send(1, "", b"x"),
    F.Send(1, "\ud800", b"x"),                       # not encodable as UTF-8
    F.Deliver(1, 2, "", "d", b""),
    F.Deliver(1, 2, "s", "d" * 256, b""),
    F.Hello(2, "t" * (MAX_TOKEN_LENGTH + 1), "d", 0),
    F.Hello(2, "t", "", 0),
    F.Welcome(2, 1, "u", "", 1, 1, 1, 1),
    F.Welcome(2, 1, "u" * 256, "d", 1, 1, 1, 1),
    F.Received(tuple(range(MAX_RECEIVED_IDS + 1))),
    F.Error(1, 0, "r" * 65536),
    F.Goaway(1, 0, "r" * 65536),
]


@pytest.mark.parametrize("frame", BAD_FRAMES, ids=lambda f: type(f).__name__)
def test_encode_rejects_invalid_frames_and_leaves_the_buffer_unchanged(codec, frame):
    with pytest.raises(ValueError):
        codec.encode(frame)
    wb = codec.WriteBuffer()
    codec.encode_into(wb, F.Ping(1))
    before = wb.getvalue()
    with pytest.raises(ValueError):
        codec.encode_into(wb, frame)
    assert wb.getvalue() == before and len(wb) == len(before)
    codec.encode_into(wb, F.Ping(2))
    sink = Collector(decode_with=codec.decode_body)
    codec.Decoder(sink).feed(wb.take())
    assert sink.decoded == [F.Ping(1), F.Ping(2)]


@pytest.mark.parametrize("frame", [F.Send(1, "a", "not bytes"), F.Send(2**64, "a", b""), F.Ack(-1, 0, 0),
                                   F.Error(2**16, 0, "x"), object()], ids=repr)
def test_other_encode_failures_leave_the_buffer_unchanged(codec, frame):
    # The exception type differs (OverflowError vs struct.error); the buffer must not.
    wb = codec.WriteBuffer()
    codec.encode_into(wb, F.Ping(1))
    before = wb.getvalue()
    with pytest.raises(Exception):
        codec.encode_into(wb, frame)
    assert wb.getvalue() == before


def test_empty_sender_device_is_allowed(codec):
    frame = F.Deliver(1, 2, "s", "", b"p")
    assert codec.decode_body(FrameType.DELIVER, 0, codec.encode(frame)[HEADER_SIZE:]) == frame


# -- WriteBuffer -------------------------------------------------------------------

def test_writebuffer_take_getvalue_clear(codec):
    wb = codec.WriteBuffer()
    assert len(wb) == 0 and wb.take() == b"" and wb.getvalue() == b""
    codec.encode_into(wb, F.Ping(1))
    wire = codec.encode(F.Ping(1))
    assert len(wb) == len(wire)
    assert wb.getvalue() == wire and len(wb) == len(wire)     # getvalue does not consume
    assert wb.take() == wire
    assert len(wb) == 0 and wb.take() == b"" and wb.getvalue() == b""
    codec.encode_into(wb, F.Ping(2))
    wb.clear()
    assert len(wb) == 0 and wb.getvalue() == b""
    codec.encode_into(wb, F.Pong(3))
    assert wb.take() == codec.encode(F.Pong(3))


def test_writebuffer_reuse_after_large_take(codec):
    wb = codec.WriteBuffer()
    for _ in range(3):
        frames = [F.Send(i, "bob", bytes(1000)) for i in range(200)]     # > 64 KiB per batch
        for f in frames:
            codec.encode_into(wb, f)
        data = wb.take()
        assert data == encode_all(codec, frames) and len(wb) == 0


@FEW
@given(frames=st.lists(frames_st, max_size=60))
def test_writebuffer_many_frames_decode_back(codec, frames):
    wb = codec.WriteBuffer()
    for f in frames:
        codec.encode_into(wb, f)
    assert len(wb) == sum(len(codec.encode(f)) for f in frames)
    sink = Collector(decode_with=codec.decode_body)
    assert codec.Decoder(sink).feed(wb.take()) == len(frames)
    assert sink.decoded == frames
    assert len(wb) == 0


# -- SendCounter: the Cython one is a cdef FrameSink (the server's dispatch path) ------

def _expected_counts(frames):
    sends = [f for f in frames if isinstance(f, F.Send)]
    return len(frames), len(sends), sum(len(f.payload) for f in sends)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(frames=st.lists(frames_st, min_size=1, max_size=12), data=st.data())
def test_send_counter_sink_with_rechunking(codec, path, frames, data):
    wire = encode_all(codec, frames)
    cuts = data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=25), label="cuts")
    counter = codec.SendCounter()
    dec = codec.Decoder(counter)
    total = sum(deliver(dec, chunk, path) for chunk in split(wire, cuts))
    assert total == len(frames) and dec.buffered == 0
    assert (counter.frames, counter.sends, counter.payload_bytes) == _expected_counts(frames)


@pytest.mark.parametrize("path", PATHS)
def test_switch_from_callable_sink_to_frame_sink_mid_batch(codec, path):
    """The gateway's HELLO sink is a Python callable; it hands over to the session
    (a FrameSink in Cython) from inside the callback."""
    counter = codec.SendCounter()
    seen = []

    def hello_sink(ftype, flags, body):
        seen.append(codec.decode_body(ftype, flags, body))
        dec.set_sink(counter)

    dec = codec.Decoder(hello_sink)
    rest = [F.Send(i, "bob", bytes(i)) for i in range(50)] + [F.Ping(1)]
    assert deliver(dec, encode_all(codec, [F.Hello(2, "t", "d", 0)] + rest), path) == 52
    assert seen == [F.Hello(2, "t", "d", 0)]
    assert (counter.frames, counter.sends, counter.payload_bytes) == _expected_counts(rest)


@pytest.mark.parametrize("body", [b"", bytes(8), bytes(8) + b"\x00", bytes(8) + b"\x05ab"])
def test_send_counter_rejects_malformed_send(codec, body):
    dec = codec.Decoder(codec.SendCounter())
    with pytest.raises(MalformedFrame):
        dec.feed(struct.pack("!IBB", len(body) + 2, FrameType.SEND, 0) + body)
    with pytest.raises(MalformedFrame):          # a FrameSink error fails the decoder too
        dec.feed(codec.encode(F.Ping(1)))


@SETTINGS
@given(data=garbage, cut_data=st.data())
def test_random_bytes_into_send_counter_codecs_agree(codec, data, cut_data):
    cuts = cut_data.draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=10), label="cuts")

    def run(mod, chunks, path):
        counter = mod.SendCounter()
        dec = mod.Decoder(counter)
        err = None
        try:
            for chunk in chunks:
                deliver(dec, chunk, path)
        except ProtocolError as exc:
            err = type(exc)
        return err, counter.frames, counter.sends, counter.payload_bytes

    reference = run(OTHER[codec], [data], "feed")
    assert run(codec, split(data, cuts), "feed") == reference
    assert run(codec, split(data, cuts), "get_buffer") == reference


# -- stop / resume / take_buffered ---------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_stop_keeps_the_rest_buffered(codec, path):
    frames = [F.Ping(1), F.Ping(2), F.Send(3, "bob", b"x" * 50)]
    wire = encode_all(codec, frames)
    seen = []

    def sink(ftype, flags, body):
        seen.append(codec.decode_body(ftype, flags, body))
        dec.stop()

    dec = codec.Decoder(sink)
    assert deliver(dec, wire + wire[:5], path) == 1
    rest = wire[len(codec.encode(frames[0])):] + wire[:5]
    assert dec.buffered == len(rest)
    assert dec.take_buffered() == rest
    assert dec.buffered == 0 and dec.take_buffered() == b""
    assert seen == frames[:1]


@pytest.mark.parametrize("path", PATHS)
def test_stopped_decoder_holds_later_reads(codec, path):
    frames = [F.Ping(i) for i in range(1, 6)]
    wire = encode_all(codec, frames)
    dec = codec.Decoder(Collector())
    dec.stop()
    for chunk in split(wire, [3, 20, 40]):
        assert deliver(dec, chunk, path) == 0
    assert dec.buffered == len(wire)
    assert dec.take_buffered() == wire


def test_resume_dispatches_what_was_held(codec):
    frames = [F.Ping(1), F.Ping(2), F.Ping(3)]
    seen = []
    dec = codec.Decoder(lambda t, f, b: seen.append(codec.decode_body(t, f, b)))
    dec.stop()
    assert dec.feed(encode_all(codec, frames)) == 0
    dec.resume()
    assert dec.feed(b"") == 3
    assert seen == frames and dec.buffered == 0


def test_get_buffer_after_stop_with_more_than_256k_held(codec):
    rc, out = _run_isolated(f"""
        from _core import {codec.__name__.rsplit('.', 1)[1]} as codec, frames as F
        dec = codec.Decoder(lambda t, f, b: None)
        dec.stop()
        wire = codec.encode(F.Ping(1)) * 30000
        dec.feed(wire)                                  # 420 KB held while stopped
        buf = dec.get_buffer(-1)
        assert len(buf) > 0, "empty read buffer"
        del buf
        assert dec.take_buffered() == wire
        print("OK")
    """)
    assert rc == 0 and "OK" in out, f"exit status {rc}: {out[-500:]}"


def test_view_derived_from_body_never_shows_other_bytes(codec):
    """A sink that keeps `body[:]` breaks the contract (bodies are valid only
    during the call). The Cython codec fails the decoder with BodyViewLeaked
    and pins the memory; the reference copies bodies. Either way the kept view
    never shows bytes of a later read."""
    from _core.errors import BodyViewLeaked
    kept = []
    dec = codec.Decoder(lambda t, f, body: kept.append(body[:]))
    first = codec.encode(F.Send(1, "bob", b"A" * 64))
    leaked = False
    for path in ("buffered", "feed"):
        try:
            if path == "buffered":
                buf = dec.get_buffer(-1)
                buf[:len(first)] = first
                del buf
                dec.buffer_updated(len(first))
            else:
                dec.feed(bytes(first))
        except BodyViewLeaked:
            leaked = True
            dec = codec.Decoder(lambda t, f, body: kept.append(body[:]))
    assert leaked == (codec is _codec)
    # other connections reuse the shared read buffer with different bytes
    other = codec.Decoder(lambda t, f, body: None)
    for _ in range(3):
        data = codec.encode(F.Send(9, "eve", b"Z" * 64))
        buf = other.get_buffer(-1)
        buf[:len(data)] = data
        del buf
        other.buffer_updated(len(data))
    expected = first[HEADER_SIZE:]
    assert kept and all(bytes(v) == expected for v in kept)


# -- booleans and the routing core's UTF-8 check (PROTOCOL.md sections 1 and 3) ----------------

@pytest.mark.parametrize("frame,at", [(F.Subscribe(("alice",), True), 0), (F.Typing("bob", True), -1),
                                      (F.Presence("bob", True, 5), 4)], ids=["SUBSCRIBE", "TYPING", "PRESENCE"])
def test_booleans_are_0_or_1(codec, frame, at):
    """Section 1, Booleans: 0 or 1; any other value is MALFORMED_FRAME (both codecs)."""
    wire = bytearray(codec.encode(frame))
    body = wire[HEADER_SIZE:]
    for value, expect in ((0, False), (1, True)):
        body[at] = value
        decoded = codec.decode_body(wire[4], wire[5], bytes(body))
        assert getattr(decoded, {F.Subscribe: "on", F.Typing: "typing", F.Presence: "online"}[type(frame)]) is expect
    for value in (2, 0x80, 0xFF):
        body[at] = value
        with pytest.raises(MalformedFrame):
            codec.decode_body(wire[4], wire[5], bytes(body))


def _python_says_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


UTF8_EDGES = [b"", b"a" * 17, "\u00e9\u20ac\U0001F600".encode(), b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80",
              b"\xed\xa0\x80", b"\xed\x9f\xbf", b"\xf0\x8f\xbf\xbf", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80",
              b"\xf5\x80\x80\x80", b"\xff", b"abcdefg\xc3", b"abcdefgh\xe2\x82", b"\x80", "\u20ac".encode() * 85]


@settings(SETTINGS, max_examples=400)
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=100).map(lambda s: s.encode()),
                      st.sampled_from(UTF8_EDGES),
                      st.tuples(st.text(max_size=20), st.binary(max_size=4)).map(lambda t: t[0].encode() + t[1])))
def test_routing_utf8_check_agrees_with_python(data):
    """The C check the router applies to a SEND's recipient accepts exactly what Python's
    decoder accepts (strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF)."""
    assert _codec.utf8_valid(data) == _python_says_utf8(data)
