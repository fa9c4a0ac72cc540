"""Baseline for bench/e2e_throughput.py: a bare uvloop BufferedProtocol that
echoes every complete frame back, one write per read batch. No auth, no
routing, no store: the floor any routed message has to pay for."""
import argparse
import asyncio
import struct

import uvloop


class Echo(asyncio.BufferedProtocol):
    def __init__(self):
        self.buf = bytearray(262144)
        self.view = memoryview(self.buf)
        self.n = 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.view[self.n:]

    def buffer_updated(self, nbytes):
        self.n += nbytes
        pos = 0
        while self.n - pos >= 4:
            (length,) = struct.unpack_from("!I", self.buf, pos)
            if self.n - pos - 4 < length:
                break
            pos += 4 + length
        if pos:
            self.transport.write(bytes(self.view[:pos]))
            self.buf[:self.n - pos] = self.buf[pos:self.n]
            self.n -= pos


async def main(port):
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port)
    print(f"listening on tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    uvloop.run(main(ap.parse_args().port))
