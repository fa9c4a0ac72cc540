"""Codec microbenchmarks: Cython (`_core._codec`) vs pure Python (`_core.pycodec`).

    .venv/bin/python -m pytest bench/test_codec_bench.py --benchmark-only

Every case processes one batch of 1000 SEND frames (32 B or 1 KiB payload) per
call; groups put the two codecs side by side, and `extra_info["frames_per_s"]`
is 1000 / mean. Decoding goes through the BufferedProtocol path the gateway
uses: get_buffer(-1), copy at most 64 KiB (one socket read), buffer_updated(n).

Sinks: "count" is a Python function that only counts, "decode_body" builds
the frames object for each frame (the client SDK's path), "SendCounter" reads
each SEND's fields without building objects; in Cython it is a cdef FrameSink,
the server's dispatch path (no memoryview, no Python call per frame).
"""
import pytest

from _core import _codec, pycodec
from _core import frames as F

CODECS = {"cython": _codec, "python": pycodec}
N = 1000
PAYLOADS = {"32B": 32, "1KiB": 1024}
READ_SIZE = 65536


def make_frames(size):
    return [F.Send(i, "user-000042", bytes([i % 256]) * size) for i in range(N)]


def wire_of(codec, frames):
    return b"".join(codec.encode(f) for f in frames)


def read_batch(dec, wire):
    """One batch through get_buffer/buffer_updated, in reads of at most READ_SIZE bytes."""
    view = memoryview(wire)
    total = len(wire)
    pos = n = 0
    while pos < total:
        buf = dec.get_buffer(-1)
        k = min(len(buf), READ_SIZE, total - pos)
        buf[:k] = view[pos:pos + k]
        del buf
        n += dec.buffer_updated(k)
        pos += k
    return n


def _frames_per_s(benchmark):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["frames_per_s"] = round(N / stats.stats.mean)


def _sinks(codec):
    count = [0]

    def counting(ftype, flags, body):
        count[0] += 1

    decode_body = codec.decode_body

    def decoding(ftype, flags, body):
        decode_body(ftype, flags, body)

    return {
        "count": counting,              # a Python function that only counts
        "decode_body": decoding,        # builds the frames object, as the client SDK does
        # the server's path: Cython's SendCounter is a cdef FrameSink (no memoryview,
        # no Python call per frame); pycodec's is a Python callable doing the same reads
        "SendCounter": codec.SendCounter(),
    }


@pytest.mark.parametrize("size", list(PAYLOADS))
@pytest.mark.parametrize("sink", ["SendCounter", "count", "decode_body"])
@pytest.mark.parametrize("impl", list(CODECS))
def test_decode(benchmark, impl, sink, size):
    codec = CODECS[impl]
    wire = wire_of(codec, make_frames(PAYLOADS[size]))
    dec = codec.Decoder(_sinks(codec)[sink])
    assert read_batch(dec, wire) == N and dec.buffered == 0
    benchmark.group = f"decode {size} x{N}, {sink} sink"
    benchmark.extra_info.update(impl=impl, bytes_per_batch=len(wire))
    result = benchmark(read_batch, dec, wire)
    assert result == N
    _frames_per_s(benchmark)


@pytest.mark.parametrize("size", list(PAYLOADS))
@pytest.mark.parametrize("impl", list(CODECS))
def test_decode_body_only(benchmark, impl, size):
    """decode_body on 1000 bodies already cut out (no framing)."""
    codec = CODECS[impl]
    bodies = []
    codec.Decoder(lambda t, f, b: bodies.append((t, f, bytes(b)))).feed(wire_of(codec, make_frames(PAYLOADS[size])))
    decode_body = codec.decode_body

    def run():
        for t, f, b in bodies:
            decode_body(t, f, b)
        return len(bodies)

    benchmark.group = f"decode_body {size} x{N}"
    benchmark.extra_info.update(impl=impl)
    assert benchmark(run) == N
    _frames_per_s(benchmark)


@pytest.mark.parametrize("size", list(PAYLOADS))
@pytest.mark.parametrize("impl", list(CODECS))
def test_encode(benchmark, impl, size):
    codec = CODECS[impl]
    frames = make_frames(PAYLOADS[size])
    wb = codec.WriteBuffer()
    encode_into = codec.encode_into

    def run():
        for f in frames:
            encode_into(wb, f)
        return wb.take()

    expected = wire_of(codec, frames)
    assert run() == expected
    benchmark.group = f"encode_into+take {size} x{N}"
    benchmark.extra_info.update(impl=impl, bytes_per_batch=len(expected))
    assert len(benchmark(run)) == len(expected)
    _frames_per_s(benchmark)
