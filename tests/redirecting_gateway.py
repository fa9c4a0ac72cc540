"""A real single-node gateway whose `Gateway.redirect_for` (the hook a cluster
node overrides) sends every user elsewhere: what a cluster node that does not
serve the user answers, without a cluster. For tests/test_client_seeds.py.

    python tests/redirecting_gateway.py DATA_DIR

prints `listening on tcp://HOST:PORT and ws://HOST:PORT/ws` when ready, then
takes commands on stdin, one per line, each answered with one line:
`to TCP_ADDR WS_ADDR` (where REDIRECT sends TCP and WebSocket sessions) -> `ok`;
`redirects` -> the number of REDIRECTs sent. SIGTERM stops it.
"""
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402

from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import Gateway  # noqa: E402


class RedirectingGateway(Gateway):
    targets = (None, None)         # [TCP, WebSocket] address, or None: serve here

    def redirect_for(self, user: str, websocket: bool) -> str | None:
        return self.targets[websocket]


async def main(data_dir: str) -> None:
    gw = RedirectingGateway(GatewayConfig(port=0, ws_port=0, data_dir=data_dir, workers=1, store="memory",
                                          admin_port=-1))
    host, port = await gw.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, gw.request_stop)

    def command() -> None:
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(sys.stdin)
            return
        words = line.split()
        if words and words[0] == "to" and len(words) == 3:
            gw.targets = (words[1], words[2])
            print("ok", flush=True)
        elif words == ["redirects"]:
            print(gw.redirects, flush=True)
        else:
            print(f"unknown command {line!r}", flush=True)
    loop.add_reader(sys.stdin, command)
    print(f"listening on tcp://{host}:{port} and ws://{host}:{gw.ws_port}/ws", flush=True)
    await gw.wait_stopped()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
