"""The gateway process: a uvloop TCP listener in front of one Router."""
import asyncio
import os
import random
import select
import shutil
import signal
import socket
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
from .config import DEFAULT_ADMIN_PORT, DEFAULT_PORT, GatewayConfig, default_data_dir
from .bus import LocalBus
from .connection import Connection
from .limits import Limits
from .webfiles import WebFiles
from .wsconn import WsConnection

_log = log.get("switchboard.gateway")


class Gateway:
    """Owns the listener, the router, the token authority and the live connections."""

    def __init__(self, config: GatewayConfig):
        config.validate()
        self.config = config
        self.loop = None
        self.router = None
        self.authority = None
        #: connections without a session yet (before HELLO, or being handed over); those
        #: with one are reached through their sessions (`all_connections`): a set of every
        #: connection was ~33 B of each idle session
        self.opening: set[Connection] = set()
        #: (websocket, handed over) -> the protocol class of such connections to this gateway
        self._protocols = {(ws, handed): (WsConnection if ws else Connection).for_gateway(self, handed)
                           for ws in (False, True) for handed in (False, True)}
        self.errors: Counter = Counter()
        self._server = None
        self._ws_server = None
        self.ws_port = -1
        self.web = WebFiles()
        self._stopping = None
        self.exit_code = 0
        self.bus = None
        self.shards = None
        self.handoffs_out = 0
        self.handoffs_in = 0
        self.redirects = 0               # HELLOs answered GOAWAY REDIRECT (metrics)
        self.limits = Limits(self)
        self.tls = None                      # tls.Reloader: the listeners' SSLContext, reloaded on SIGHUP
        self.admin_server = None             # the Unix socket the supervisor's admin thread asks (gateway/metrics.py)
        self.connects = [0, 0]           # accepted on the [TCP, WebSocket] listener (metrics)
        self.open_conns = [0, 0]         # open now, [TCP, WebSocket]
        self.ready = False               # serving (gateway/metrics.py reports it for /readyz)
        self.draining = False
        self.drained = 0                 # sessions told to go by drain()
        self.parent_fd = -1              # readable (EOF) once the supervisor is gone; -1: no supervisor
        self.cluster = None              # gateway/cluster/node.py: set when serving as a node of a cluster

    @staticmethod
    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    def count_error(self, code: int) -> None:
        self.errors[ErrorCode(code).name] += 1

    def redirect_for(self, user: str, websocket: bool) -> str | None:
        """Where `user` is served if not on this node: the `HOST:PORT` of that node's
        listener of the same kind (WebSocket or TCP), for GOAWAY REDIRECT; None to
        serve it here. A single node serves everyone; a cluster node asks the shard map
        (raising ProtocolError UNAVAILABLE while the user's node is down or its shard moves)."""
        return self.cluster.redirect_for(user, websocket) if self.cluster is not None else None

    async def start(self, listen_sock=None, cluster: str | None = None, ws_sock=None) -> tuple[str, int]:
        """Recover the stores, join the bus (several workers), then accept: on
        `listen_sock` and `ws_sock` (made by the supervisor, one pair per worker)
        or on sockets of our own."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.authority = TokenAuthority(load_or_create_secret(cfg.data_dir))
        if cfg.cluster:
            from .cluster.node import ClusterNode
            self.cluster = ClusterNode(cfg, cfg.worker_index, cfg.workers)
            await self.cluster.connect()          # the map says which shards are ours: before any is opened
            self.shards = self.cluster.shards
            if cfg.store == "log":
                check_layout(cfg.data_dir, self.shards.shards)     # the cluster's count, or a clear refusal
        else:
            layout = check_layout(cfg.data_dir) if cfg.store == "log" else None
            self.shards = ShardMap(layout["shards"] if layout else DEFAULT_SHARDS, cfg.workers, cfg.worker_index)
        if cfg.store == "log":
            store = ShardedLog(Path(cfg.data_dir) / "log", cfg.log_config(), self.shards, lock_wait=cfg.lock_wait)
            store.open(self._parent_gone_now)  # the owned shards' locks, then recovery: before anyone is served
            store.start(self.loop)
            store.on_fatal = self._store_failed
        else:
            store = MemoryStore(cfg.max_pending_per_recipient)
        self.router = Router(store, loop=self.loop, max_frame=cfg.max_frame, dedup_window=cfg.dedup_window,
                             max_devices=cfg.max_devices, max_group_members=cfg.max_group_members)
        if self.cluster is not None:        # ids unique across every worker of every node
            from .cluster.idgen import GENERATOR_BITS
            self.router.set_generator(self.cluster.generator, GENERATOR_BITS)
        else:
            self.router.set_worker(cfg.worker_index)
        self.router.msg_rate, self.router.msg_burst = cfg.msg_rate, cfg.msg_burst
        self.router.backlog_chunk = cfg.out_high_water       # a long backlog goes out as the client reads it
        self._stopping = asyncio.Event()
        if cfg.workers > 1:
            self.bus = LocalBus(cluster or "solo", cfg.worker_index, cfg.workers, self.router, self.shards,
                                self.adopt, self._bus_pressure)
            self.bus.start(self.loop)
        if self.cluster is not None:
            self.cluster.attach(self.router, self.bus, self._bus_pressure)
            await self.cluster.start_bus(self)
        self.router.groups.recover()        # group messages stored but not yet fanned out
        tls = {}
        if cfg.tls_cert:
            from .tls import Reloader
            self.tls = Reloader(cfg.tls_cert, cfg.tls_key, cfg.worker_index)
            tls = {"ssl": self.tls.context, "ssl_handshake_timeout": cfg.hello_timeout}
        if listen_sock is not None:
            self._server = await self.loop.create_server(self._protocols[False, False], sock=listen_sock,
                                                         backlog=cfg.backlog, **tls)
        else:
            self._server = await self.loop.create_server(
                self._protocols[False, False], cfg.host, cfg.port, backlog=cfg.backlog, reuse_address=True, **tls)
        if ws_sock is not None:
            self._ws_server = await self.loop.create_server(self._protocols[True, False], sock=ws_sock,
                                                            backlog=cfg.backlog, **tls)
        elif listen_sock is None and cfg.ws_port >= 0:
            self._ws_server = await self.loop.create_server(
                self._protocols[True, False], cfg.host, cfg.ws_port, backlog=cfg.backlog, reuse_address=True, **tls)
        self.limits.start()
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        if self._ws_server is not None:
            self.ws_port = self._ws_server.sockets[0].getsockname()[1]
        if self.cluster is not None:
            await self.cluster.hold_lease(port, self.ws_port)
        self.ready = True
        _log.info("event=worker_ready worker=%d workers=%d listen=tcp://%s:%d ws=%d tls=%s pid=%d",
                  cfg.worker_index, cfg.workers, host, port, self.ws_port, "on" if self.tls else "off", os.getpid())
        return host, port

    def adopt(self, fd: int, data: bytes, websocket: bool = False) -> None:
        """A connection handed over by another worker (its user is on our shards)."""
        factory = self._protocols[websocket, True]
        try:
            sock = socket.socket(fileno=fd)          # checks that it is a socket, and its family
        except OSError as exc:
            os.close(fd)
            _log.info("event=handoff_lost error=%s", log.q(repr(exc)))
            return
        sock.setblocking(False)
        family = sock.family
        sock.detach()                                # the fd is the transport's, not this object's
        self.handoffs_in += 1

        async def start():
            if isinstance(self.loop, uvloop.Loop):
                _ADOPTED.fd, _ADOPTED.family = fd, family
                sock = _ADOPTED
            else:                                    # asyncio's transports do their I/O on the object
                sock = socket.socket(fileno=fd)
            try:
                _, conn = await self.loop.connect_accepted_socket(factory, sock)
            except OSError as exc:
                # raised after uvloop took the fd (it closes it with the transport);
                # before that (a bad fd) socket() above has already refused it
                _log.info("event=handoff_lost error=%s", log.q(repr(exc)))
                return
            conn.feed_handed_off(data)
        self.loop.create_task(start())

    def reload_tls(self) -> None:
        """SIGHUP: load the certificate files again for new connections (a bad pair keeps the old one)."""
        if self.tls is None:
            _log.info("event=sighup action=none reason=no_tls")
        else:
            self.tls.reload()

    def all_connections(self) -> list:
        """Every open client connection: those opening and those of the router's sessions."""
        conns = list(self.opening)
        for s in self.router.every_session():
            c = s.transport.get_protocol()
            if c is not None:
                conns.append(c)
        return conns

    @property
    def open_connections(self) -> int:
        return self.open_conns[0] + self.open_conns[1]

    def _bus_pressure(self, paused: bool) -> None:
        """A link to another worker is backed up: stop reading clients until it drains."""
        for c in self.all_connections():
            if not c.transport.is_closing():
                (c.transport.pause_reading if paused else c.transport.resume_reading)()

    def _parent_gone_now(self) -> bool:
        """Polled while waiting for shard locks (no event loop watches the pipe yet)."""
        return self.parent_fd >= 0 and bool(select.select([self.parent_fd], [], [], 0)[0])

    def parent_gone(self) -> None:
        """The supervisor died: stop listening at once (so a new one can bind), then stop."""
        _log.warning("event=supervisor_gone action=stop")
        for server in (self._server, self._ws_server):
            if server is not None:
                server.close()
        self.request_stop()

    def _store_failed(self, exc: BaseException) -> None:
        _log.critical("event=stopping reason=store_failed error=%s", log.q(repr(exc)))
        self.exit_code = 3
        self.request_stop()

    def drain(self, batch: int, pause: float) -> int:
        """`switchboard drain` (through the supervisor): stop accepting, send the
        sessions GOAWAY(SHUTTING_DOWN) `batch` at a time with `pause` seconds between
        batches (each with a reconnect hint spread over the pause), then stop as on
        SIGTERM. Returns how many sessions it will tell."""
        if self.draining or self._server is None:
            return 0
        self.draining = True
        if self.cluster is not None:
            self.loop.create_task(self._cluster_drain(batch, pause))
            return len(self.router.all_sessions())
        for server in (self._server, self._ws_server):
            if server is not None:
                server.close()
        sessions = self.router.all_sessions() + [s for ss in self.router._send_only.values() for s in ss]
        self.loop.create_task(self._drain(sessions, batch, pause))
        return len(sessions)

    async def _cluster_drain(self, batch: int, pause: float) -> None:
        """A cluster node hands its shards to the other nodes first (their sessions are
        told to reconnect as each shard moves), then drains what is left as a single gateway does."""
        t0 = time.monotonic()
        done = await self.cluster.mover.hand_over_all(timeout=max(60.0, self.config.lock_wait))
        _log.info("event=shards_handed_over worker=%d complete=%s seconds=%.2f", self.config.worker_index,
                  done, time.monotonic() - t0)
        if not done:
            _log.warning("event=drain_kept_shards worker=%d reason=no_node_took_them shards=%d",
                         self.config.worker_index, len(self.shards.owned_shards()))
        for server in (self._server, self._ws_server):
            if server is not None:
                server.close()
        sessions = self.router.all_sessions() + [s for ss in self.router._send_only.values() for s in ss]
        await self._drain(sessions, batch, pause)

    async def _drain(self, sessions: list, batch: int, pause: float) -> None:
        hint_ms = int(pause * 1000)
        for i in range(0, len(sessions), batch):
            if i:
                await asyncio.sleep(pause)
            for s in sessions[i:i + batch]:
                if not s.closed:
                    s.goaway(GoawayCode.SHUTTING_DOWN, random.randint(0, hint_ms), "server draining")
                    self.drained += 1
        _log.info("event=drained worker=%d sessions=%d", self.config.worker_index, self.drained)
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
        self.ready = False
        self._server.close()
        if self._ws_server is not None:
            self._ws_server.close()
        self.limits.stop()
        spread = self.config.reconnect_spread_ms
        for s in self.router.all_sessions():
            s.goaway(GoawayCode.SHUTTING_DOWN, random.randint(0, spread), "server shutting down")
        for c in list(self.opening):
            if c.session is None:
                c.transport.close()
        deadline = self.loop.time() + self.config.shutdown_grace
        while self.open_connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for c in self.all_connections():
            c.transport.abort()
        await asyncio.sleep(0)               # let connection_lost run (it records last-seen times)
        if self.bus is not None:
            self.bus.close()
        if self.cluster is not None:
            await self.cluster.close()
        self.router.store.close()
        self._server = None
        _log.info("event=worker_stopping worker=%d handoffs_in=%d handoffs_out=%d forwarded=%d routed=%d",
                  self.config.worker_index, self.handoffs_in, self.handoffs_out, self.router.forwarded,
                  self.router.messages_routed)


class _AdoptedFd:
    """What uvloop's connect_accepted_socket reads of a socket (its type, family and
    fd, all before the call's first await) for an fd another worker handed over.
    One shared instance instead of a `socket` object per adopted connection: uvloop
    keeps that object as long as the transport (96 B of each idle session, and 63 of
    64 sessions are adopted at 64 workers). The transport's handle closes the fd
    itself and then calls close() on this, which has nothing left to do."""
    type = socket.SOCK_STREAM

    def __init__(self):
        self.fd, self.family = -1, socket.AF_INET

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        pass


_ADOPTED = _AdoptedFd()


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


def banner(host: str, port: int, data_dir: str, ws_port: int = -1, tls: bool = False,
           admin: tuple | None = None) -> str:
    cli = _cli_name()
    default_dir = os.path.abspath(data_dir) == os.path.abspath(default_data_dir())
    dd = "" if default_dir else f" --data-dir {data_dir}"
    pp = "" if port == DEFAULT_PORT else f" --port {port}"
    s = "s" if tls else ""
    ws = f" and ws{s}://{host}:{ws_port}/ws" if ws_port >= 0 else ""
    web = f"  web chat:     http{s}://{host}:{ws_port}/  (log in with a token)\n" if ws_port >= 0 else ""
    if admin is not None:
        ap = "" if admin[1] == DEFAULT_ADMIN_PORT else f" --admin-port {admin[1]}"
        web += (f"  metrics:      http://{admin[0]}:{admin[1]}/metrics  (/healthz, /readyz; "
                f"live view: {cli} stats{ap})\n")
    if tls:
        pp += " --tls --ca CA.pem"
    return (f"switchboard: listening on tcp://{host}:{port}{' with TLS' if tls else ''}{ws}\n"
            f"{web}"
            f"  data dir:     {os.path.abspath(data_dir)}\n"
            f"  get a token:  {cli} token issue alice{dd}\n"
            f"  receive:      {cli} recv --as bob{pp}{dd}\n"
            f"  send:         {cli} send --as alice --to bob 'hello'{pp}{dd}\n"
            f"  chat:         {cli} chat --as alice --to bob{pp}{dd}\n"
            f"  protocol:     docs/PROTOCOL.md; stop with Ctrl-C\n")


def run_worker(config: GatewayConfig, listen_sock, cluster: str, parent_fd: int, ready_fd: int = -1,
               ws_sock=None) -> int:
    """One worker process (forked by the supervisor before any event loop exists)."""
    log.setup(config.log_level, config.log_levels, str(config.worker_index))

    async def main() -> int:
        gw = Gateway(config)
        gw.parent_fd = parent_fd
        await gw.start(listen_sock=listen_sock, cluster=cluster, ws_sock=ws_sock)
        from .metrics import serve_worker
        # the supervisor's admin thread asks here; the server object must be kept:
        # collected, it closes its socket (drain and /metrics then lost this worker)
        gw.admin_server = await serve_worker(gw, cluster)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gw.request_stop)
        loop.add_signal_handler(signal.SIGHUP, gw.reload_tls)

        def parent_readable():
            if not os.read(parent_fd, 1):         # EOF: the supervisor is gone
                loop.remove_reader(parent_fd)
                gw.parent_gone()
        loop.add_reader(parent_fd, parent_readable)
        if ready_fd >= 0:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        await gw.wait_stopped()
        return gw.exit_code

    return uvloop.run(main())


def run(config: GatewayConfig) -> int:
    """`switchboard serve`: a supervisor and its workers, until SIGTERM/SIGINT."""
    from .supervisor import Supervisor
    log.setup(config.log_level, config.log_levels)
    return Supervisor(config).run()
