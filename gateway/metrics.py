"""Metrics: each worker's snapshot, the supervisor's merge, Prometheus text.

A worker answers on a Unix socket of its own (abstract namespace, named by the
cluster id and its index) with one JSON snapshot of its counters, gauges and
histograms. The supervisor's admin thread (gateway/admin.py) asks every
worker, merges the answers and renders them as Prometheus text: one series
per family without a `worker` label (the whole gateway) and one per worker.

Counters never go backwards in the merge: when a worker index answers with a
new pid (the old process died and was restarted), the last snapshot of the
old process is kept and added to the new one's counts. What a worker counted
after the last time it was asked is lost with it; the admin thread asks every
`metrics_refresh` seconds (default 1 s) so that gap stays short.
"""
import asyncio
import json
import math
import os
import socket
import time


from . import log

_log = log.get("switchboard.metrics")

#: family -> (help, label name or None). Counters: values only grow.
COUNTERS = {
    "connects_total": ("connections accepted by the listeners (a connection handed to the user's worker "
                       "counts once, where it was accepted)", "kind"),
    "messages_in_total": ("SEND frames from clients", None),
    "messages_out_total": ("messages pushed to online devices as they were routed (backlog replayed at "
                           "connect is not counted)", None),
    "messages_stored_total": ("messages stored in the shard logs for their recipients", None),
    "forwarded_total": ("SENDs forwarded to the worker owning the recipient's shard", None),
    "duplicates_total": ("retried SENDs answered with their original ACK", None),
    "handoffs_total": ("connections handed to (out) or adopted from (in) another worker after HELLO",
                       "direction"),
    "redirects_total": ("HELLOs answered GOAWAY REDIRECT in place of WELCOME: another node of the cluster "
                        "serves the user", None),
    "receipts_total": ("delivery and read receipts routed", None),
    "errors_total": ("ERROR frames and WebSocket/HTTP refusals sent, by code", "code"),
    "worker_restarts_total": ("worker processes restarted by the supervisor after dying", None),
    "log_lines_dropped_total": ("log lines the worker could not write (its stderr is gone: the process reading "
                                "it exited); it serves on", None),
    "cluster_messages_total": ("NATS messages to and from other nodes' workers (a loop turn's frames for one "
                               "worker are one message)", "direction"),
    "cluster_bytes_total": ("bytes of those NATS messages", "direction"),
    "cluster_fenced_total": ("frames from other nodes refused: not our shard at the sender's map epoch",
                             "kind"),
    "cluster_resets_total": ("links to other nodes' workers restarted after a lost NATS message, a dead "
                             "node or a lost NATS connection (waiting SENDs got UNAVAILABLE)", None),
    "cluster_timeouts_total": ("links whose FWDs went unanswered for cluster_timeout (SENDs got UNAVAILABLE)",
                               None),
    "limit_events_total": ("connection, rate and idle limits that triggered, by kind (docs/limits.md)", "kind"),
    "rate_limited_total": ("SENDs answered RATE_LIMITED (per-session message rate)", None),
    "deferred_total": ("live pushes left in the log for a paused slow consumer (pushed again as it reads)",
                       None),
    "storage_full_total": ("times a shard log ran out of disk space (its SENDs get STORAGE_FULL until a "
                           "segment can be made again)", None),
    "storage_refused_total": ("records a full shard log refused for lack of space (SENDs answered "
                              "STORAGE_FULL, receipts and mirrors dropped, new devices refused at HELLO)", None),
    "log_segment_failures_total": ("tries to make a log segment that found no space (while a shard is full: at "
                                   "most one per second, and one after each segment deleted)", None),
}
#: family -> (help, label name or None). Gauges: the current value.
GAUGES = {
    "connections": ("open client connections (TCP listener, WebSocket listener)", "kind"),
    "online_users": ("users with at least one device online", None),
    "offline_pending": ("stored messages waiting for a device to acknowledge them (inbox entries)", None),
    "log_bytes": ("bytes written in the live log segments", None),
    "log_segments": ("live log segment files", None),
    "log_shards": ("shard logs open", None),
    "log_shards_full": ("shard logs out of disk space now (refusing content; acknowledgements use the reserve)",
                        None),
    "log_unrecorded_acks": ("acknowledged entries not yet written to a log for lack of space (written once "
                            "space returns; delivered again if the worker dies first)", None),
}
#: family -> help. Histograms: {"bounds": [...], "counts": [per bucket, +Inf last], "sum": seconds}
HISTOGRAMS = {
    "route_latency_seconds": "SEND decoded to its ACK queued: the local log append, or the FWD_ACK from the "
                             "owning worker (the group commit's fdatasync is in fsync_seconds)",
    "fsync_seconds": "fdatasync rounds of the group commit (every loop turn's appends in always mode, "
                     "every flush interval in interval mode)",
}
PREFIX = "switchboard_"


def socket_name(cluster: str, worker: int) -> str:
    return f"\0switchboard-{cluster}-admin{worker}"


# -- the worker's side ---------------------------------------------------------------

def snapshot(gw) -> dict:
    """Everything this worker counts, as plain JSON-able values."""
    r = gw.router
    store = r.store
    stats = store.stats() if hasattr(store, "stats") else {}
    committer = getattr(store, "committer", None)
    from _core.log import SYNC_BOUNDS
    errors = dict(gw.errors)
    for code, n in r.errors_sent.items():
        errors[code] = errors.get(code, 0) + n
    bounds, counts, total = r.route_latency()
    node = gw.cluster
    bus = node.bus.stats() if node is not None and node.bus is not None else {}
    return {
        "pid": os.getpid(), "worker": gw.config.worker_index, "draining": gw.draining,
        "ready": gw.ready and (node is None or node.serving()),
        "not_serving": None if node is None or node.serving() else node.problem(),
        "cluster": node.status() if node is not None else None,
        "counters": {
            "connects_total": {"tcp": gw.connects[0], "ws": gw.connects[1]},
            "messages_in_total": r.messages_in,
            "messages_out_total": r.messages_delivered_live,
            "messages_stored_total": r.messages_routed,
            "forwarded_total": r.forwarded,
            "duplicates_total": r.duplicates_dropped,
            "handoffs_total": {"in": gw.handoffs_in, "out": gw.handoffs_out},
            "redirects_total": gw.redirects,
            "log_lines_dropped_total": log.dropped_lines(),
            "cluster_messages_total": {"in": bus.get("msgs_in", 0), "out": bus.get("msgs_out", 0)},
            "cluster_bytes_total": {"in": bus.get("bytes_in", 0), "out": bus.get("bytes_out", 0)},
            "cluster_fenced_total": {"forwards": r.forwards_fenced, "receipts": r.receipts_fenced,
                                     "controls": bus.get("controls_fenced", 0)},
            "cluster_resets_total": bus.get("resets", 0),
            "cluster_timeouts_total": bus.get("timeouts", 0),
            "receipts_total": r.receipts_sent,
            "errors_total": errors,
            "limit_events_total": dict(gw.limits.events),
            "rate_limited_total": r.rate_limited,
            "deferred_total": r.deferred,
            "storage_full_total": stats.get("full_episodes", 0),
            "storage_refused_total": stats.get("refused", 0),
            "log_segment_failures_total": stats.get("segment_failures", 0),
        },
        "gauges": {
            "connections": {"tcp": gw.open_conns[0], "ws": gw.open_conns[1]},
            "online_users": r.online_users,
            "offline_pending": stats.get("pending", store.pending_count() if hasattr(store, "pending_count") else 0),
            "log_bytes": stats.get("bytes", 0),
            "log_segments": stats.get("segments", 0),
            "log_shards": stats.get("shards", 0),
            "log_shards_full": stats.get("shards_full", 0),
            "log_unrecorded_acks": stats.get("unrecorded_consumes", 0),
        },
        "hists": {
            "route_latency_seconds": {"bounds": list(bounds), "counts": counts, "sum": total},
            "fsync_seconds": {"bounds": list(SYNC_BOUNDS),
                              "counts": list(committer.sync_buckets) if committer else [0] * (len(SYNC_BOUNDS) + 1),
                              "sum": committer.sync_seconds if committer else 0.0},
        },
    }


class _AdminProtocol(asyncio.Protocol):
    """One command line in, one JSON answer out, then close: `stats`, or
    `drain BATCH PAUSE` (tell this worker's sessions to go, BATCH every PAUSE s)."""

    def __init__(self, gw):
        self.gw = gw
        self.transport = None
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if b"\n" not in self.buf:
            if len(self.buf) > 256:
                self.transport.close()
            return
        words = self.buf.split(b"\n", 1)[0].decode("ascii", "replace").split()
        try:
            if words == ["stats"]:
                answer = snapshot(self.gw)
            elif len(words) == 3 and words[0] == "drain":
                answer = {"sessions": self.gw.drain(int(words[1]), float(words[2]))}
            else:
                answer = {"error": f"unknown command {words!r}"}
        except Exception as exc:                  # the admin socket never takes the worker down
            _log.exception("event=admin_command_failed command=%r", words)
            answer = {"error": repr(exc)}
        self.transport.write(json.dumps(answer, separators=(",", ":")).encode())
        self.transport.close()


async def serve_worker(gw, cluster: str):
    """Answer the supervisor's admin thread on this worker's Unix socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_name(cluster, gw.config.worker_index))
    except OSError as exc:
        sock.close()
        _log.error("event=admin_socket_failed worker=%d error=%r", gw.config.worker_index, exc)
        return None
    sock.listen(16)
    sock.setblocking(False)
    return await asyncio.get_running_loop().create_unix_server(lambda: _AdminProtocol(gw), sock=sock)


# -- the supervisor's side -------------------------------------------------------------

def ask(cluster: str, worker: int, command: str, timeout: float) -> dict | None:
    """One command to one worker; None if it does not answer in time (dead,
    restarting, stopped)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_name(cluster, worker))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while True:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None


def _add(a, b):
    """a + b for counter values: numbers, or dicts of numbers by label."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}
    return (a or 0) + (b or 0)


def _add_hist(a, b):
    if not a:
        return b
    if not b:
        return a
    return {"bounds": a["bounds"], "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
            "sum": a["sum"] + b["sum"]}


class Aggregator:
    """Per worker index: the live process's latest snapshot, plus the counters
    of its dead predecessors (kept, so totals never go backwards)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.current: dict[int, dict] = {}          # index -> latest snapshot
        self.retired: dict[int, dict] = {}          # index -> {"counters": ..., "hists": ...} of dead pids
        self.fresh: dict[int, bool] = {}            # answered the last time it was asked
        self.restarts: dict[int, int] = {}

    def update(self, k: int, snap: dict | None) -> None:
        if snap is None or "pid" not in snap:
            self.fresh[k] = False
            return
        cur = self.current.get(k)
        if cur is not None and cur["pid"] != snap["pid"]:
            old = self.retired.setdefault(k, {"counters": {}, "hists": {}})
            for name, v in cur["counters"].items():
                old["counters"][name] = _add(old["counters"].get(name), v)
            for name, h in cur["hists"].items():
                old["hists"][name] = _add_hist(old["hists"].get(name), h)
        self.current[k] = snap
        self.fresh[k] = True

    def per_worker(self, k: int, live: bool) -> dict:
        """Counters and histograms (the dead predecessors' included); gauges only
        while the process is `live` (a dead worker has no connections)."""
        cur = self.current.get(k, {"counters": {}, "gauges": {}, "hists": {}})
        old = self.retired.get(k, {"counters": {}, "hists": {}})
        counters = {name: _add(old["counters"].get(name), cur["counters"].get(name))
                    for name in COUNTERS if name in cur["counters"] or name in old["counters"]}
        counters["worker_restarts_total"] = self.restarts.get(k, 0)
        hists = {name: _add_hist(old["hists"].get(name), cur["hists"].get(name)) for name in HISTOGRAMS}
        return {"counters": counters, "gauges": cur["gauges"] if live else {}, "hists": hists,
                "up": int(live and self.fresh.get(k, False))}


# -- Prometheus text exposition (format 0.0.4) ---------------------------------------------

def _num(v) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def _labels(pairs) -> str:
    pairs = [(k, v) for k, v in pairs if v is not None]
    if not pairs:
        return ""
    esc = (lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


def render(per_worker: dict[int, dict], extra_gauges: dict) -> str:
    """Prometheus text: each family once without `worker` (the sum over workers)
    and once per worker."""
    out = []
    rows = sorted(per_worker.items())

    def family(name, kind, help_text, label, values):
        full = PREFIX + name
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} {kind}")
        total = None
        for _, v in values:
            total = v if total is None else _add(total, v) if v is not None else total
        for w, v in [(None, total), *values]:
            if v is None:
                continue
            if label and isinstance(v, dict):
                for lv in sorted(v):
                    out.append(f"{full}{_labels([('worker', w), (label, lv)])} {_num(v[lv])}")
            elif not isinstance(v, dict):
                out.append(f"{full}{_labels([('worker', w)])} {_num(v)}")

    for name, (help_text, label) in COUNTERS.items():
        family(name, "counter", help_text, label, [(k, d["counters"].get(name)) for k, d in rows])
    for name, (help_text, label) in GAUGES.items():
        family(name, "gauge", help_text, label, [(k, d["gauges"].get(name, {} if label else 0)) for k, d in rows])
    family("worker_up", "gauge", "1 if the worker process answered the last scrape", None,
           [(k, d["up"]) for k, d in rows])
    for name, help_text in HISTOGRAMS.items():
        full = PREFIX + name
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} histogram")
        hs = [(k, d["hists"].get(name)) for k, d in rows]
        total = None
        for _, h in hs:
            total = _add_hist(total, h)
        for w, h in [(None, total), *hs]:
            if not h:
                continue
            cum = 0
            for bound, n in zip([*h["bounds"], math.inf], h["counts"]):
                cum += n
                le = "+Inf" if math.isinf(bound) else repr(float(bound))
                out.append(f"{full}_bucket{_labels([('worker', w), ('le', le)])} {cum}")
            out.append(f"{full}_sum{_labels([('worker', w)])} {_num(float(h['sum']))}")
            out.append(f"{full}_count{_labels([('worker', w)])} {cum}")
    for name, (help_text, value) in extra_gauges.items():
        out.append(f"# HELP {PREFIX}{name} {help_text}")
        out.append(f"# TYPE {PREFIX}{name} gauge")
        out.append(f"{PREFIX}{name} {_num(value)}")
    return "\n".join(out) + "\n"


def parse(text: str) -> dict:
    """Prometheus text -> {(name, frozenset of (label, value)): float}; enough
    for `switchboard stats` and the tests (our own output: no escapes in values)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        labels = frozenset()
        if "{" in head:
            name, rest = head.split("{", 1)
            labels = frozenset(tuple(p.split("=", 1)) for p in rest.rstrip("}").replace('"', "").split(",") if p)
        else:
            name = head
        samples[(name, labels)] = float(value)
    return samples
