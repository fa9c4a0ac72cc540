"""The `switchboard` command: serve, token, send, recv, chat, presence, group, bench, stats, drain, cluster,
reshard.

Client commands take --host/--port (same defaults as serve; --host may be a
comma-separated seed list, "--host h1,h2:7500", tried in turn) and either
--token T or --data-dir D (a token is derived from the server secret there,
for use on the server's own machine).

In JSON output every id (u64: message ids, origin ids) is a decimal string:
real ids are (ms << 22 | ...), above 2^53, and jq or JavaScript read JSON
numbers as doubles, which round them. Timestamps (ms) stay numbers: they are
far below 2^53.
"""
import argparse
import asyncio
import os
import json
import sys

from . import __version__
from .config import DEFAULT_ADMIN_PORT, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WS_PORT, GatewayConfig, default_data_dir
from .settings import SettingError

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A clear, one-line error for the user; exit status 1."""
    status = EXIT_ERROR


class UsageError(CliError):
    """A flag value the command cannot use (a bad --host entry); exit status 2, as argparse's."""
    status = EXIT_USAGE


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def _non_negative(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or positive: {text!r}")
        return value
    return parse


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M)") from None


#: serve flags for the main limits (docs/limits.md): flag, GatewayConfig field, parser, help
_LIMIT_FLAGS = (
    ("--max-connections", "max_connections", _non_negative(int), "connections per worker (0: no limit)"),
    ("--max-conns-per-ip", "max_connections_per_ip", _non_negative(int),
     "connections from one source address, per worker (0: no limit)"),
    ("--connect-rate", "connect_rate_per_ip", _non_negative(float),
     "new connections per second from one address, per worker (0: no limit)"),
    ("--connect-burst", "connect_burst_per_ip", _positive(int), "new connections from one address at once"),
    ("--msg-rate", "msg_rate", _non_negative(float),
     "SENDs per second per session; past it: ERROR RATE_LIMITED (0: no limit)"),
    ("--msg-burst", "msg_burst", _positive(int), "SENDs a session may make at once"),
    ("--ping-interval-ms", "ping_interval_ms", _positive(int), "ping interval advertised in WELCOME"),
    ("--idle-timeout-pings", "idle_timeout_pings", _non_negative(int),
     "ping intervals without any frame before GOAWAY IDLE_TIMEOUT (0: never)"),
    ("--out-high-water", "out_high_water", _size, "bytes queued to a client before its live messages wait in the log"),
    ("--out-low-water", "out_low_water", _size, "... and resume from the log below this"),
    ("--out-hard-limit", "out_hard_limit", _size, "bytes queued to a paused client before it is disconnected (0: none)"),
    ("--slow-consumer-timeout", "slow_consumer_timeout", _non_negative(float),
     "seconds a paused client may go without draining before it is disconnected (0: never)"),
)


def _add_limits(p) -> None:
    g = p.add_argument_group("limits (docs/limits.md)")
    for flag, name, kind, text in _LIMIT_FLAGS:
        default = getattr(GatewayConfig, name)
        g.add_argument(flag, dest=name, type=kind, default=default, help=f"{text} (default {default})")


def _ws_port(text: str) -> int:
    if text.lower() == "off":
        return -1
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (a number, or 'off')") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return port


def _add_admin_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-host", default=DEFAULT_HOST, help=f"admin listener address (default {DEFAULT_HOST})")
    p.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT,
                   help=f"admin listener port (default {DEFAULT_ADMIN_PORT})")


def _add_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="gateway address, or seeds tried in turn, comma-separated: --host h1,h2:7500 "
                        "(HOST[:PORT], IPv6 as [ADDR]:PORT; the port defaults to --port; a cluster node that "
                        f"does not serve the user sends the client on to the one that does) (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"gateway TCP port, for --host entries without one (default {DEFAULT_PORT})")
    p.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server against the "
                                                      "system's CAs (or --ca)")
    p.add_argument("--ca", metavar="FILE", help="PEM file of the CA(s) to trust for the server's certificate "
                                                "(implies --tls)")


def _add_identity(p: argparse.ArgumentParser, device: str) -> None:
    _add_endpoint(p)
    p.add_argument("--as", dest="user", metavar="USER", help="the user to act as (required without --token)")
    p.add_argument("--token", help="a token from `switchboard token issue`")
    p.add_argument("--data-dir", default=None,
                   help="derive a token from the server secret in this directory "
                        f"(default: $SWITCHBOARD_DATA_DIR or ./{default_data_dir()})")
    p.add_argument("--device", default=device, help=f"device id (default {device})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description="Switchboard messaging gateway.")
    parser.add_argument("--version", action="version", version=f"switchboard {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    p = verbs.add_parser("serve", help="run a gateway", description="Run a gateway until SIGTERM/SIGINT.")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"listen address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port, 0 picks one (default {DEFAULT_PORT})")
    p.add_argument("--ws-port", type=_ws_port, default=None,
                   help=f"WebSocket port for browsers (the chat page at /, the protocol at /ws); 0 picks one, "
                        f"'off' turns it off (default {DEFAULT_WS_PORT}, or 0 when --port is 0)")
    p.add_argument("--ws-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (e.g. https://chat.example.com) allowed to open WebSockets besides "
                        "the page's own; repeatable; '*' allows any. Clients without Origin are always allowed")
    p.add_argument("--data-dir", default=None,
                   help=f"where the server secret and data live (default: $SWITCHBOARD_DATA_DIR or ./{default_data_dir()})")
    p.add_argument("--workers", type=_positive(int), default=os.cpu_count() or 1,
                   help="worker processes; users are sharded across them (default: number of cores, %(default)s)")
    p.add_argument("--hello-timeout", type=_positive(float), default=GatewayConfig.hello_timeout,
                   help="seconds a new connection has to complete HELLO (default %(default)s)")
    p.add_argument("--max-frame", type=_positive(int), default=GatewayConfig.max_frame,
                   help="largest frame after WELCOME, in bytes (default %(default)s)")
    p.add_argument("--max-pending", type=_positive(int), default=GatewayConfig.max_pending_per_recipient,
                   help="undelivered messages kept per recipient (default %(default)s)")
    p.add_argument("--max-devices", type=_positive(int), default=GatewayConfig.max_devices,
                   help="devices of one user online at once (default %(default)s)")
    p.add_argument("--max-group-members", type=_positive(int), default=GatewayConfig.max_group_members,
                   help="members of one group, 1..2048 (default %(default)s)")
    p.add_argument("--store", choices=["log", "memory"], default=GatewayConfig.store,
                   help="where undelivered messages live: the durable log (default) or memory")
    p.add_argument("--durability", choices=["always", "interval", "never"], default=GatewayConfig.durability,
                   help="always: fsync before ACKs (group commit); interval: fsync every "
                        "--flush-interval-ms; never: kernel writeback. A killed process loses "
                        "nothing ACKed in any mode (default %(default)s)")
    p.add_argument("--flush-interval-ms", type=_positive(int), default=GatewayConfig.flush_interval_ms,
                   help="fsync period for --durability interval (default %(default)s)")
    p.add_argument("--segment-size", type=_size, default=GatewayConfig.segment_size,
                   help="log segment file size, e.g. 64M (default 64M)")
    p.add_argument("--message-ttl", type=_positive(float), default=GatewayConfig.message_ttl,
                   help="seconds an undelivered message is kept (default 30 days)")
    p.add_argument("--admin-host", default=GatewayConfig.admin_host,
                   help="address of the admin listener: /metrics, /healthz, /readyz, POST /drain "
                        "(default %(default)s; it has no authentication: keep it off public networks)")
    p.add_argument("--admin-port", type=_ws_port, default=None,
                   help=f"admin listener port; 0 picks one, 'off' turns it off "
                        f"(default {DEFAULT_ADMIN_PORT}, or 0 when --port is 0)")
    p.add_argument("--metrics-refresh", type=_positive(float), default=GatewayConfig.metrics_refresh,
                   help="seconds between the supervisor's polls of the workers' counters (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _add_limits(p)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML file of settings (docs/configuration.md); environment variables "
                        "SWITCHBOARD_<SETTING> override it, flags override both (default: $SWITCHBOARD_CONFIG)")

    p = verbs.add_parser("token", help="issue tokens", description="Issue tokens from the server secret.")
    tverbs = p.add_subparsers(dest="token_verb", metavar="ACTION", required=True)
    t = tverbs.add_parser("issue", help="print a token for USER")
    t.add_argument("user", metavar="USER")
    t.add_argument("--device", default="", help="bind the token to one device id (default: any device)")
    t.add_argument("--ttl", type=_positive(float), default=86400.0, help="seconds until it expires (default 86400)")
    t.add_argument("--data-dir", default=None, help="server data directory holding the secret")

    p = verbs.add_parser("send", help="send one message and wait for the server ACK",
                         description="Send TEXT and print the server message id once it is stored: a decimal "
                                     "u64 on one line (above 2^53: keep it as a string; jq and JavaScript "
                                     "round it as a number), or with --json {\"id\": \"...\", \"ts\": ms}.")
    _add_identity(p, "cli-send")
    p.add_argument("--to", required=True, metavar="USER", help="recipient user id")
    p.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds to wait for the ACK (default 10)")
    p.add_argument("--json", action="store_true", help="print the ACK as JSON: the id as a string, ts in ms")
    p.add_argument("text", metavar="TEXT")

    p = verbs.add_parser("recv", help="print delivered messages and receipts as JSON lines; ack them",
                         description="Print delivered messages as JSON lines (from, id, text, ts, device; "
                                     "peer and origin_id for copies of what this user sent from another "
                                     "device, group and origin_id for group messages) and acknowledge them; "
                                     "receipts for this user's messages are printed as lines with a receipt "
                                     "field (delivered/read, msg_id, by, device, ts). Ids are JSON strings "
                                     "(u64 above 2^53: exact in jq and JavaScript); ts is a number (ms).")
    _add_identity(p, "main")
    p.add_argument("--count", type=_positive(int), default=None, help="exit after N messages")
    p.add_argument("--timeout", type=_positive(float), default=None,
                   help="give up after S seconds (exit 1 if --count was not reached)")

    p = verbs.add_parser("group", help="create and manage groups",
                         description="Group operations; prints the group as JSON (name, members with roles). "
                                     "Group ids start with '#'; send to a group with `send --to '#id'`.")
    _add_identity(p, "cli-group")
    p.add_argument("action", choices=["create", "add", "remove", "promote", "demote", "leave", "rename", "info"])
    p.add_argument("group", metavar="GROUP", help="group id, starting with #")
    p.add_argument("users", nargs="*", metavar="USER", help="members to add/remove/promote/demote (create: "
                                                             "initial members)")
    p.add_argument("--name", help="display name (create, rename)")
    p.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds to wait (default 10)")

    p = verbs.add_parser("presence", help="follow users' presence and last seen",
                         description="Print presence changes of WATCHED users as JSON lines "
                                     "(user, online, last_seen ms or null when hidden/unknown).")
    _add_identity(p, "presence")
    p.add_argument("watched", nargs="*", metavar="WATCHED", help="users to follow")
    p.add_argument("--count", type=_positive(int), default=None, help="exit after N updates")
    p.add_argument("--timeout", type=_positive(float), default=None, help="exit after S seconds")
    p.add_argument("--hide-last-seen", choices=["on", "off"], default=None,
                   help="set whether others see this user's last-seen time")

    p = verbs.add_parser("bench", help="benchmarks: density, throughput, compare",
                         description="Benchmarks with a progress bar, a table, JSON and a plot; peers "
                                     "(bare uvloop, websockets, nats-server, redis) run in the same run "
                                     "with the same client machinery. See docs/benchmarks.md.")
    from bench.cli import add_arguments as add_bench_arguments
    add_bench_arguments(p)

    p = verbs.add_parser("stats", help="live view of a running gateway's metrics",
                         description="Scrape the admin listener's /metrics every --interval seconds and print "
                                     "per-worker and total connections, rates (from successive scrapes), "
                                     "backlog, log size, errors, restarts and latency quantiles.")
    _add_admin_endpoint(p)
    p.add_argument("--interval", type=_positive(float), default=1.0, help="seconds between scrapes (default 1)")
    p.add_argument("--once", action="store_true", help="two scrapes --interval apart, one table, exit")
    p.add_argument("--count", type=_positive(int), default=None, help="exit after N tables")

    p = verbs.add_parser("drain", help="rolling restart: move clients away in batches, then exit",
                         description="Tell a running gateway to drain: /readyz turns 503 and new connections "
                                     "are refused at once, connected sessions get GOAWAY --batch at a time "
                                     "every --pause seconds (they reconnect, to another instance behind a load "
                                     "balancer or to this one's successor), and the gateway exits when they "
                                     "are gone.")
    _add_admin_endpoint(p)
    p.add_argument("--batch", type=_positive(int), default=None,
                   help=f"sessions per batch, over all workers (default {GatewayConfig.drain_batch})")
    p.add_argument("--pause", type=float, default=None,
                   help=f"seconds between batches (default {GatewayConfig.drain_pause:g})")
    p.add_argument("--wait", type=_positive(float), default=None, metavar="S",
                   help="wait up to S seconds for the gateway to exit")

    p = verbs.add_parser("cluster", help="a cluster node's view: nodes, leases, shards, moves, traffic",
                         description="Ask a cluster node's admin listener (/cluster) what it knows: the nodes "
                                     "and their leases, shards per node, moves in progress and each worker's "
                                     "traffic to other nodes over NATS.")
    cverbs = p.add_subparsers(dest="cluster_verb", required=True, metavar="status")
    c = cverbs.add_parser("status", help="nodes, leases, shards per node, moves in progress, cross-node traffic")
    _add_admin_endpoint(c)
    c.add_argument("--json", action="store_true", help="every worker's view as JSON")

    p = verbs.add_parser("reshard", help="split a stopped gateway's data dir into more shards (offline)",
                         description="Split the shards of a data dir into N (a power-of-two multiple of their "
                                     "count, at most 65536), with every message, device, last seen, privacy "
                                     "setting, group and producer (dedup) state, so that it can join a cluster "
                                     "of N shards (docs/cluster.md, Carrying a data dir over). The gateway must "
                                     "be stopped. A kill at any moment leaves the old data dir as it was or the "
                                     "new one complete: run it again (or start the gateway) and it finishes. "
                                     "Prints a line per phase and a summary; exits 0 when done or when there is "
                                     "nothing to do, 1 with one line saying why when refused or failed.")
    p.add_argument("--data-dir", required=True, help="the gateway's data dir (holding layout.json and log/)")
    p.add_argument("--shards", type=_positive(int), required=True, metavar="N",
                   help="the shard count to split into: the cluster's --cluster-shards (e.g. 1024)")
    p.add_argument("--dry-run", action="store_true",
                   help="read every shard (recovery, as a start would) and say what would be written; write nothing")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout (the phase lines go to stderr)")
    p.add_argument("--dedup-window", type=_positive(int), default=GatewayConfig.dedup_window, metavar="N",
                   help="the gateway's dedup_window setting: answers per device and shard kept for retries; "
                        "give the value the gateway runs with if it is not the default (default %(default)s)")
    p.add_argument("--segment-size", type=_size, default=GatewayConfig.segment_size, metavar="SIZE",
                   help="largest segment the new shards are written in, e.g. 64M or 256K (default 64M; a new "
                        "shard's first segment is 1 MiB, or SIZE if smaller, and they double up to SIZE)")

    p = verbs.add_parser("chat", help="interactive chat",
                         description="Type lines to send them; '/to USER' switches recipient; Ctrl-D quits.")
    _add_identity(p, "main")
    p.add_argument("--to", metavar="USER", help="first recipient")
    _add_setting_flags(verbs.choices["serve"])
    return parser


#: serve flags whose destination is not the setting's name
_FLAG_FIELDS = {"max_pending": "max_pending_per_recipient", "ws_origin": "ws_origins"}


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """Every setting is a serve flag: one for each GatewayConfig field without a flag of its own.
    Setting flags default to None (not given), so that the environment and the config
    file apply below them (gateway/settings.py); help keeps the real default."""
    from .settings import docs, fields, flag_name, parse_text
    doc = docs()
    have = {_FLAG_FIELDS.get(a.dest, a.dest) for a in p._actions}
    for f in fields():
        if f.name in have or flag_name(f.name) in p._option_string_actions:
            continue

        def parse(text, f=f):
            try:
                return parse_text(f, text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        p.add_argument(flag_name(f.name), type=parse, default=None, metavar=f.name.upper(),
                       help=doc.get(f.name, "") + " (see docs/configuration.md)")
    names = {f.name for f in fields()}
    for a in p._actions:
        if _FLAG_FIELDS.get(a.dest, a.dest) in names and a.default is not None:
            if a.help:
                a.help = a.help.replace("%(default)s", str(a.default))
            a.default = None


def serve_flags() -> dict:
    """setting -> its serve flag (for the documentation)."""
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    from .settings import fields
    names = {f.name for f in fields()}
    return {_FLAG_FIELDS.get(a.dest, a.dest): max(a.option_strings, key=len) for a in serve._actions
            if _FLAG_FIELDS.get(a.dest, a.dest) in names}


def _token_for(args) -> str:
    if args.token:
        return args.token
    if not args.user:
        raise CliError("give --as USER (with a data dir holding the server secret) or --token T")
    from .auth import TokenAuthority, load_secret
    data_dir = args.data_dir or default_data_dir()
    try:
        secret = load_secret(data_dir)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return TokenAuthority(secret).issue(args.user, args.device, ttl=3600)


async def _connect(args, send_only: bool = False):
    import ssl
    from .client import Client, ServerError, format_address, parse_seeds
    from .tls import client_context
    try:
        seeds = parse_seeds(args.host, args.port)
    except ValueError as exc:
        raise UsageError(f"--host: {exc}") from None
    where = ", ".join(map(format_address, seeds))
    try:
        tls = client_context(args.ca) if (args.tls or args.ca) else None
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load CA file {args.ca}: {getattr(exc, 'strerror', None) or exc}") from None
    client = Client(seeds, args.port, _token_for(args), args.device, reconnect=False, send_only=send_only,
                    ssl=tls)
    try:
        await client.connect()
    except ServerError as exc:
        raise CliError(f"server refused the session: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise CliError(f"TLS: the server's certificate is not trusted ({exc.verify_message}); "
                       f"pass --ca with the CA that signed it") from None
    except ssl.SSLError as exc:
        raise CliError(f"TLS handshake with {where} failed: {exc.reason or exc} "
                       f"(is the server using TLS?)") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise CliError(f"cannot connect to {where}: {getattr(exc, 'strerror', None) or exc or 'timed out'}") from None
    if args.user and client.welcome.user != args.user:
        await client.close()
        raise CliError(f"the token is for {client.welcome.user!r}, not {args.user!r}")
    return client


async def _send(args) -> int:
    from .client import ServerError
    client = await _connect(args, send_only=True)
    try:
        result = await client.send(args.to, args.text, timeout=args.timeout)
    except ServerError as exc:
        raise CliError(f"not sent: {exc}") from None
    except asyncio.TimeoutError:
        raise CliError(f"no ACK within {args.timeout:g} s: the message may or may not be stored") from None
    finally:
        await client.close()
    print(json.dumps({"id": str(result.id), "ts": result.timestamp_ms}) if args.json else result.id)
    return 0


def _json_line(m) -> str:
    try:
        body = {"text": m.payload.decode("utf-8")}
    except UnicodeDecodeError:
        import base64
        body = {"payload_b64": base64.b64encode(m.payload).decode("ascii")}
    extra = {}
    if m.peer:
        extra = {"peer": m.peer, "origin_id": str(m.origin_id)}
    elif m.group:
        extra = {"group": m.group, "origin_id": str(m.origin_id)}
    return json.dumps({"from": m.sender, "device": m.sender_device, "id": str(m.id), "ts": m.timestamp_ms, **body,
                       **extra}, ensure_ascii=False)


def _receipt_line(r) -> str:
    return json.dumps({"receipt": r.kind, "msg_id": str(r.msg_id), "by": r.by, "device": r.by_device,
                       "ts": r.timestamp_ms}, ensure_ascii=False)


async def _recv(args) -> int:
    """Messages (counted by --count) and receipts for this user's sent messages, as JSON lines."""
    from .client import ConnectionClosed
    client = await _connect(args)
    got = 0
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + args.timeout
    receipts = loop.create_task(client.recv_receipt())
    messages = loop.create_task(client.recv())
    try:
        while args.count is None or got < args.count:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise asyncio.TimeoutError
            done, _ = await asyncio.wait({receipts, messages}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise asyncio.TimeoutError
            if receipts in done:
                print(_receipt_line(receipts.result()), flush=True)
                receipts = loop.create_task(client.recv_receipt())
            if messages in done:
                msg = messages.result()
                print(_json_line(msg), flush=True)
                await client.ack(msg)
                got += 1
                messages = loop.create_task(client.recv())
    except asyncio.TimeoutError:
        if args.count is not None:
            raise CliError(f"timed out after {args.timeout:g} s with {got} of {args.count} messages") from None
    except ConnectionClosed as exc:
        raise CliError(f"connection closed: {exc}") from None
    finally:
        receipts.cancel()
        messages.cancel()
        await client.close()
    return 0


async def _chat(args) -> int:
    from .client import ConnectionClosed, ServerError
    client = await _connect(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    peer = args.to
    me = client.welcome.user
    print(f"connected as {me}. Type a message and press Enter; '/to USER' picks the recipient; Ctrl-D quits.",
          flush=True)

    async def show_incoming():
        async for m in client:
            print(f"[{m.sender}] {m.text}", flush=True)
            await client.ack(m)

    incoming = loop.create_task(show_incoming())
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            if text.startswith("/to "):
                peer = text[4:].strip() or peer
                print(f"now talking to {peer}", flush=True)
                continue
            if not text:
                continue
            if not peer:
                print("pick a recipient first: /to USER", flush=True)
                continue
            try:
                await client.send(peer, text, timeout=10)
            except (ServerError, asyncio.TimeoutError) as exc:
                print(f"! not sent: {exc or 'timeout'}", flush=True)
            except ConnectionClosed as exc:
                raise CliError(f"connection closed: {exc}") from None
    finally:
        incoming.cancel()
        await client.close()
    return 0


async def _group(args) -> int:
    from .client import ServerError
    client = await _connect(args, send_only=True)
    try:
        arg = {"members": args.users}
        if args.name is not None:
            arg["name"] = args.name
        info = await client.group(args.action, args.group, timeout=args.timeout, **arg)
    except ServerError as exc:
        raise CliError(f"{args.action} refused: {exc}") from None
    except asyncio.TimeoutError:
        raise CliError(f"no answer within {args.timeout:g} s") from None
    finally:
        await client.close()
    print(json.dumps(info, ensure_ascii=False, sort_keys=True))
    return 0


async def _presence(args) -> int:
    client = await _connect(args, send_only=True)     # a watcher, not a device that gets messages
    got = 0
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + args.timeout
    try:
        if args.hide_last_seen is not None:
            await client.set_privacy(args.hide_last_seen == "on")
            await client.ping()
        if not args.watched:
            return 0
        await client.subscribe(*args.watched)
        while args.count is None or got < args.count:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            try:
                p = await client.recv_presence(timeout=left)
            except asyncio.TimeoutError:
                break
            print(json.dumps({"user": p.user, "online": p.online, "last_seen": p.last_seen_ms or None}),
                  flush=True)
            got += 1
    finally:
        await client.close()
    if args.count is not None and got < args.count:
        raise CliError(f"timed out after {args.timeout:g} s with {got} of {args.count} updates")
    return 0


def _serve(args) -> int:
    """Settings from the flags given, over the environment and --config (gateway/settings.py)."""
    from .server import run
    from .settings import fields, resolve
    names = {f.name for f in fields()}
    flags = {}
    for dest, value in vars(args).items():
        name = _FLAG_FIELDS.get(dest, dest)
        if name in names and value is not None:
            if name == "ws_origins":
                value = tuple(o.rstrip("/").lower() for o in value)
            flags[name] = (value, f"flag --{dest.replace('_', '-')}")
    return run(resolve(flags, config_file=args.config))


def _token(args) -> int:
    from .auth import TokenAuthority, load_or_create_secret
    try:
        secret = load_or_create_secret(args.data_dir or default_data_dir())
        print(TokenAuthority(secret).issue(args.user, args.device, ttl=args.ttl))
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "serve":
            return _serve(args)
        if args.verb == "token":
            return _token(args)
        if args.verb == "cluster":
            from .cluster.status import run_status
            from .stats import AdminError
            try:
                return run_status(args.admin_host, args.admin_port, args.json)
            except AdminError as exc:
                raise CliError(str(exc)) from None
        if args.verb in ("stats", "drain"):
            from .stats import AdminError, run_drain, run_stats
            try:
                if args.verb == "stats":
                    return run_stats(args.admin_host, args.admin_port, args.interval, args.once, args.count)
                return run_drain(args.admin_host, args.admin_port, args.batch, args.pause, args.wait)
            except AdminError as exc:
                raise CliError(str(exc)) from None
        if args.verb == "reshard":
            from .reshard import run as run_reshard
            return run_reshard(args)
        if args.verb == "bench":
            from bench.cli import run as run_bench
            return run_bench(args)
        import uvloop
        runner = {"send": _send, "recv": _recv, "chat": _chat, "presence": _presence,
                  "group": _group}[args.verb]
        return uvloop.run(runner(args))
    except CliError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return exc.status
    except SettingError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
