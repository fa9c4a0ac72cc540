"""`switchboard bench ...`: the benchmark commands' flags (kept here so the
gateway's CLI module stays about serving and messaging)."""
import argparse
import asyncio
import signal
import sys


def _int(text: str) -> int:
    """1000000, 1_000_000, 1M or 20k."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1000, "m": 1000_000}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


DENSITY_SERVERS = ("switchboard", "floor", "websockets", "nats", "redis")
ROUTING_SERVERS = ("switchboard", "nats", "websockets")     # the floor and redis route no messages


def _servers(allowed: tuple):
    """A comma list of server names, each one of `allowed`."""
    def parse(text: str) -> str:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown server {', '.join(bad) or repr(text)}; "
                                             f"choose from {', '.join(allowed)}")
        return ",".join(names)
    return parse


def _server_flags(p, default_workers: int) -> None:
    p.add_argument("--workers", type=_int, default=default_workers,
                   help="gateway worker processes when the benchmark starts its own (default %(default)s)")
    p.add_argument("--durability", choices=["always", "interval", "never"], default="interval",
                   help="log durability of the gateway it starts (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bench_verb", metavar="BENCHMARK", required=True)

    p = kinds.add_parser("density", help="idle authenticated sessions: memory and CPU per session",
                         description="Open idle sessions in steps from many client processes (one 127.0.x.y "
                                     "source address each) and measure, per step: server memory per session "
                                     "(RSS and USS over all its processes, minus the baseline), kernel memory, "
                                     "connect rate, failures with reasons, idle CPU, and a message round trip "
                                     "on a sample. Every session must answer a PING at the end. Starts its own "
                                     "gateway unless --port is given.")
    p.add_argument("--sessions", type=_int, default=20_000, help="sessions to reach, e.g. 1M (default 20k)")
    p.add_argument("--step", type=_int, default=None, help="sessions added per step (default: a fifth)")
    p.add_argument("--against", default="switchboard", type=_servers(DENSITY_SERVERS),
                   help="comma list of servers measured one after another in this run: switchboard, floor "
                        "(bare uvloop), websockets, nats, redis (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address of a running gateway (with --port)")
    p.add_argument("--port", type=int, default=0, help="measure the gateway already listening here "
                                                       "(its processes are found by this port)")
    p.add_argument("--data-dir", help="the running gateway's data dir (tokens are made from its secret)")
    p.add_argument("--ping-interval", type=float, default=30.0,
                   help="seconds between keepalive PINGs per session (default %(default)s; 0: none, and a "
                        "gateway closes sessions silent for 3 of its ping intervals)")
    p.add_argument("--concurrency", type=_int, default=256, help="handshakes in flight per client (default 256)")
    p.add_argument("--clients", type=_int, default=None,
                   help="client processes (default: enough for 19,000 sessions each)")
    p.add_argument("--idle-window", type=float, default=3.0,
                   help="seconds of idle CPU measured after each step (default %(default)s)")
    p.add_argument("--warmup", type=_int, default=1000,
                   help="sessions opened before the baseline is taken, so that every shard's log is mapped "
                        "(their fixed cost is reported apart; default %(default)s)")
    p.add_argument("--check", type=_int, default=20, help="messages round-tripped per step (default 20)")
    p.add_argument("--step-timeout", type=float, default=600.0, help="give up on a step after S seconds")
    p.add_argument("--plot", metavar="PNG", help="plot memory per session and total memory (needs matplotlib)")
    _server_flags(p, default_workers=2)


    p = kinds.add_parser("throughput", help="routed messages/s, latency, server CPU, exactly-once check",
                         description="Flows of 1:1 pairs (or group fan-out) across shards, closed loop with "
                                     "--window messages in flight per flow or open loop at --rate msgs/s; "
                                     "reports delivered msgs/s, latency p50/p99/p99.9, server and load CPU, "
                                     "and checks every message sent arrived exactly once, in order. Starts "
                                     "its own gateway unless --port is given.")
    _throughput_flags(p, against="switchboard")
    p.add_argument("--host", default="127.0.0.1", help="address of a running gateway (with --port)")
    p.add_argument("--port", type=int, default=0, help="measure the gateway already listening here (start it "
                                                       "with --msg-rate 0: its per-session message rate limit "
                                                       "would otherwise be what is measured)")
    p.add_argument("--data-dir", help="the running gateway's data dir (tokens are made from its secret)")
    _server_flags(p, default_workers=1)

    p = kinds.add_parser("cluster", help="a 3-node cluster on NATS against a single node: within and across "
                                         "nodes, group fan-out, NATS bytes per message",
                         description="Starts a 3-server NATS cluster and three gateway nodes (127.0.0.11-13) "
                                     "and a single gateway, and measures 1:1 flows on the single node, within "
                                     "one node of the cluster and across two, and group fan-out with members "
                                     "on all three; every message checked to arrive once (docs/cluster.md).")
    _throughput_flags(p, against=None)
    p.add_argument("--shards", type=int, default=1024, help="the cluster's shard count (default 1024)")
    p.add_argument("--replicas", default="1", help="copies of each shard, or a list to run the cluster once "
                                                   "per value in the same run, e.g. 1,2 (default %(default)s)")
    _server_flags(p, default_workers=1)

    p = kinds.add_parser("compare", help="Switchboard and its peers on the same workloads, with ratios",
                         description="Runs density (idle sessions in one server process each) and 1:1 "
                                     "throughput against Switchboard and the peers in one run, with the same "
                                     "client machinery, and prints ratios.")
    p.add_argument("--sessions", type=_int, default=15_000,
                   help="idle sessions per server for the density part (one process each; default 15k)")
    p.add_argument("--peers", default="floor,redis,nats,websockets", type=_servers(DENSITY_SERVERS),
                   help="peers besides switchboard (default %(default)s)")
    _throughput_flags(p, against=None)
    p.add_argument("--plot", metavar="PNG", help="plot of the density part (needs matplotlib)")
    _server_flags(p, default_workers=1)

    p = kinds.add_parser("soak", help="kill -9 loops under pipelined load: lost, duplicated, reordered",
                         description="Pipelined SDK senders and receivers while the gateway (whole process "
                                     "group, restarted on the same port and data dir) or one worker "
                                     "(restarted by the supervisor) is killed with SIGKILL every --every "
                                     "ACKs. Reports ACKed, delivered, lost, duplicates, reorderings per "
                                     "(sender, recipient) and the unavailability after each kill; exits 1 "
                                     "unless lost, duplicates and reorderings are all 0.")
    p.add_argument("--cycles", type=_int, default=50, help="kills (default %(default)s)")
    p.add_argument("--kill", choices=["gateway", "worker", "node"], default="gateway",
                   help="what is killed (default %(default)s); node: one node of a 3-node cluster with "
                        "--replicas copies, its shards failing over")
    p.add_argument("--replicas", type=_int, default=2, help="copies of each shard with --kill node "
                                                             "(default %(default)s)")
    p.add_argument("--shards", type=_int, default=64, help="the cluster's shards with --kill node "
                                                           "(default %(default)s)")
    p.add_argument("--lease-ttl", type=float, default=3.0, help="node lease with --kill node, seconds: the "
                                                                 "failure detection time (default %(default)s)")
    p.add_argument("--every", type=_int, default=500, help="ACKs between kills (default %(default)s)")
    p.add_argument("--senders", type=_int, default=4, help="sending devices (default %(default)s)")
    p.add_argument("--recipients", type=_int, default=4, help="receiving users (default %(default)s)")
    p.add_argument("--window", type=_int, default=64, help="SENDs in flight per sender (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default %(default)s)")
    _server_flags(p, default_workers=2)


    p = kinds.add_parser("catchup", help="a node's copies coming back after kill -9: returning and rebuilt, MB/s",
                         description="A 3-node cluster with --replicas copies, filled with --mb of stored "
                                     "messages; n3 is killed with SIGKILL and started again on its data dir, "
                                     "then on an empty one; each time from READY to every shard in sync, and "
                                     "the bytes the replica streams shipped (bench/catchup.py).")
    p.add_argument("--mb", type=_int, default=256, help="MB of messages stored before the kill (default %(default)s)")
    p.add_argument("--size", type=_int, default=4000, help="payload bytes (default %(default)s)")
    p.add_argument("--replicas", type=_int, default=2, help="copies of each shard (default %(default)s)")
    p.add_argument("--shards", type=_int, default=64, help="the cluster's shards (default %(default)s)")
    _server_flags(p, default_workers=1)


def _throughput_flags(p, against) -> None:
    if against:
        p.add_argument("--against", default=against, type=_servers(ROUTING_SERVERS),
                       help="comma list of servers measured in this run: switchboard, nats, websockets "
                            "(default %(default)s)")
    p.add_argument("--pairs", type=_int, default=100, help="flows (sender + receivers) (default 100)")
    p.add_argument("--window", type=_int, default=8, help="messages in flight per flow (default 8)")
    p.add_argument("--size", default="32", help="payload bytes, or a comma list, 32..4096 (default 32)")
    p.add_argument("--mode", choices=["pairs", "group"], default="pairs",
                   help="1:1 pairs, or fan-out: each flow is a group of --group-size members")
    p.add_argument("--group-size", type=_int, default=10, help="members per group in --mode group")
    p.add_argument("--rate", type=_int, default=None, help="open loop: total msgs/s to send (default: closed loop)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5, at most 120)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    p.add_argument("--clients", type=_int, default=1, help="load processes (default 1)")
    p.add_argument("--receipts", choices=["on", "off"], default="on",
                   help="on: senders are devices, every delivery makes a stored DELIVERED receipt (the "
                        "product's path); off: senders are send-only sessions (default on)")


class Terminated(Exception):
    """SIGTERM: the benchmark stops, and its finally blocks stop every server and
    load process it started (nodes and nats-servers run in process groups of
    their own, which would outlive it)."""


def _terminated(signum, frame):
    raise Terminated()


def stop_on_sigterm() -> None:
    """Inside a benchmark's event loop: SIGTERM cancels its main task (an exception
    raised by a signal handler in the middle of a loop callback is lost there)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def stop():
        global _stopped
        _stopped = True
        main.cancel()
    loop.add_signal_handler(signal.SIGTERM, stop)


_stopped = False


def run(args) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return _run(args)
    except (Terminated, asyncio.CancelledError):
        if isinstance(sys.exc_info()[1], asyncio.CancelledError) and not _stopped:
            raise
        print("switchboard bench: stopped by SIGTERM; the servers it started are stopped", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


def _run(args) -> int:
    if getattr(args, "duration", 0) > 120:
        raise SystemExit("--duration is at most 120 s")
    for size in str(getattr(args, "size", "32")).split(","):
        if not size.isdigit() or not 16 <= int(size) <= 65_000:
            raise SystemExit(f"--size must be 16..65000 bytes, got {size!r}")
    try:
        if args.bench_verb == "density":
            from . import density
            if args.step is None:
                args.step = max(1, args.sessions // 5)
            return density.run(args)
        if args.bench_verb == "soak":
            from . import soak
            return soak.run(args)
        if args.bench_verb == "catchup":
            from . import catchup
            return catchup.run(args)
        if args.bench_verb == "cluster":
            from . import cluster
            return cluster.run(args)
        if args.bench_verb == "throughput":
            from . import throughput
            return throughput.run(args)
        from . import compare
        return compare.run(args)
    except RuntimeError as exc:          # a server that would not start, a client process that died
        raise SystemExit(f"switchboard bench: {exc}") from None
