"""Embedding Switchboard's router in your own asyncio server.

This server is not the Switchboard gateway: it is a plain `asyncio.start_server`
with its own (trusting) login — the first line a client sends is
``LOGIN <user> <device>`` — as a server behind an authenticating proxy might
do. After the login line the connection speaks Switchboard's binary protocol
(docs/PROTOCOL.md) from SEND onwards, and the router does all routing,
acknowledgement and offline storage.

    python examples/embed_asyncio.py --port 7500
"""
import argparse
import asyncio

from _core import frames
from _core.codec import Decoder
from _core.errors import ProtocolError
from _core.protocol import PROTOCOL_VERSION
from router import MemoryStore, Router


async def handle(router: Router, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    parts = line.decode("utf-8", "replace").split()
    if len(parts) != 3 or parts[0] != "LOGIN":
        writer.write(b"expected: LOGIN <user> <device>\n")
        writer.close()
        return
    _, user, device = parts
    welcome = frames.Welcome(PROTOCOL_VERSION, 0, user, device, router.max_frame, router.max_payload, 30_000, 0)
    session = router.open_session(user, device, writer.write, writer.close, welcome=welcome)
    decoder = Decoder(session, router.max_frame)
    try:
        while data := await reader.read(65536):
            decoder.feed(data)      # frames go straight to the router's Cython hot path
    except ProtocolError as exc:
        session.error(exc.code, exc.reason, 0, True)
    except ConnectionError:
        pass
    finally:
        router.close_session(session)   # undelivered messages stay in the store


async def main(host: str, port: int) -> None:
    router = Router(MemoryStore())
    server = await asyncio.start_server(lambda r, w: handle(router, r, w), host, port)
    print(f"embedded router listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7500)
    args = ap.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
