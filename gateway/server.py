"""The gateway process: a uvloop TCP listener in front of one Router."""
import asyncio
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import uvloop

from _core.protocol import ErrorCode, GoawayCode
from _core.log import ShardedLog
from router import MemoryStore, Router
from router.sharding import DEFAULT_SHARDS, ShardMap, check_layout

from . import log
from .auth import TokenAuthority, load_or_create_secret
from .config import DEFAULT_PORT, GatewayConfig, default_data_dir
from .connection import Connection

_log = log.get("switchboard.gateway")


class Gateway:
    """Owns the listener, the router, the token authority and the live connections."""

    def __init__(self, config: GatewayConfig):
        config.validate()
        self.config = config
        self.loop = None
        self.router = None
        self.authority = None
        self.connections: set[Connection] = set()
        self.errors: Counter = Counter()
        self._server = None
        self._stopping = None
        self.exit_code = 0

    @staticmethod
    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    def count_error(self, code: int) -> None:
        self.errors[ErrorCode(code).name] += 1

    async def start(self) -> tuple[str, int]:
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.authority = TokenAuthority(load_or_create_secret(cfg.data_dir))
        self.shards = ShardMap(DEFAULT_SHARDS, cfg.workers, cfg.worker_index)
        if cfg.store == "log":
            check_layout(cfg.data_dir, DEFAULT_SHARDS)
            store = ShardedLog(Path(cfg.data_dir) / "log", cfg.log_config(), self.shards)
            store.open()                     # recovery: before anyone is served
            store.start(self.loop)
            store.on_fatal = self._store_failed
        else:
            store = MemoryStore(cfg.max_pending_per_recipient)
        self.router = Router(store, loop=self.loop, max_frame=cfg.max_frame, dedup_window=cfg.dedup_window)
        self._stopping = asyncio.Event()
        self._server = await self.loop.create_server(
            lambda: Connection(self), cfg.host, cfg.port, backlog=cfg.backlog, reuse_address=True)
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        _log.info("listening on tcp://%s:%d (pid %d)", host, port, os.getpid())
        return host, port

    def _store_failed(self, exc: BaseException) -> None:
        _log.critical("event=stopping reason=store_failed error=%r", exc)
        self.exit_code = 3
        self.request_stop()

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, GOAWAY every session with a jittered reconnect hint,
        give connections `shutdown_grace` seconds to finish, then cut the rest."""
        if self._server is None:
            return
        self._server.close()
        spread = self.config.reconnect_spread_ms
        for s in self.router.all_sessions():
            s.goaway(GoawayCode.SHUTTING_DOWN, random.randint(0, spread), "server shutting down")
        for c in list(self.connections):
            if c.session is None:
                c.transport.close()
        deadline = self.loop.time() + self.config.shutdown_grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.transport.abort()
        self.router.store.close()
        self._server = None
        _log.info("stopped")


def _cli_name() -> str:
    """How the user can invoke this same CLI: `switchboard` if that is on PATH,
    else the path of the script that started us (e.g. .venv/bin/switchboard)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "switchboard":
        on_path = shutil.which("switchboard")
        if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
            return "switchboard"
        return os.path.relpath(argv0)
    return f"{os.path.relpath(sys.executable)} -m gateway"


def banner(host: str, port: int, data_dir: str) -> str:
    cli = _cli_name()
    default_dir = os.path.abspath(data_dir) == os.path.abspath(default_data_dir())
    dd = "" if default_dir else f" --data-dir {data_dir}"
    pp = "" if port == DEFAULT_PORT else f" --port {port}"
    return (f"switchboard: listening on tcp://{host}:{port}\n"
            f"  data dir:     {os.path.abspath(data_dir)}\n"
            f"  get a token:  {cli} token issue alice{dd}\n"
            f"  receive:      {cli} recv --as bob{pp}{dd}\n"
            f"  send:         {cli} send --as alice --to bob 'hello'{pp}{dd}\n"
            f"  chat:         {cli} chat --as alice --to bob{pp}{dd}\n"
            f"  protocol:     docs/PROTOCOL.md; stop with Ctrl-C\n")


def run(config: GatewayConfig) -> int:
    """Run a gateway in this process until SIGTERM/SIGINT."""
    log.setup(config.log_level)

    async def main() -> None:
        gw = Gateway(config)
        host, port = await gw.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gw.request_stop)
        print(banner(host, port, config.data_dir), flush=True)
        await gw.wait_stopped()
        return gw.exit_code

    try:
        return uvloop.run(main())
    except OSError as exc:
        _log.error("cannot start: %s", exc)
        return 1
