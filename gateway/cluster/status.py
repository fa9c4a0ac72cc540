"""`switchboard cluster status`: one node's view of the cluster, from its admin
listener's /cluster (every worker's snapshot; worker 0 holds the lease)."""
import json

from ..stats import AdminError, fetch


def run_status(host: str, port: int, as_json: bool) -> int:
    try:
        code, body = fetch(host, port, "/cluster")
    except OSError as exc:
        raise AdminError(f"nothing answers at http://{host}:{port}/ ({exc.strerror or exc}): "
                         "is the node's admin listener there (--admin-host/--admin-port)?") from None
    if code == 404:
        raise AdminError(json.loads(body).get("error", body.strip()))
    if code != 200:
        raise AdminError(f"/cluster answered {code}: {body.strip()}")
    views = json.loads(body)["workers"]
    if as_json:
        print(json.dumps(views, indent=2))
        return 0
    print(render(views))
    return 0


def render(views: dict) -> str:
    if not views:
        return "no worker answered"
    first = views.get("0") or next(iter(views.values()))
    lines = [f"node {first['node']}: map epoch {first['epoch']}, {first['shards']} shards, "
             f"{'serving' if all(v['serving'] for v in views.values()) else 'NOT SERVING'}"]
    lines.append(f"{'node':<16} {'lease':<6} {'shards':>6} {'workers':>7} {'draining':<8} advertise")
    owners = first["owners"]
    for name in sorted(set(first["nodes"]) | set(owners)):
        info = first["nodes"].get(name, {})
        lease = "live" if info.get("alive") else ("gone" if info else "none")
        lines.append(f"{name:<16} {lease:<6} {owners.get(name, 0):>6} {info.get('workers', '-'):>7} "
                     f"{'yes' if info.get('draining') else 'no':<8} {info.get('advertise', '-')}")
    moving = first.get("moving") or {}
    lines.append(f"moves in progress: {len(moving)}" + (
        " (" + ", ".join(f"shard {s} -> {n}" for s, n in sorted(moving.items(), key=lambda x: int(x[0]))[:10])
        + (", ..." if len(moving) > 10 else "") + ")" if moving else ""))
    repl = [v["replication"] for v in views.values() if v.get("replication")]
    if repl:
        in_sync, catching = first.get("replicas") or {}, first.get("catching") or {}
        short = sum(1 for s in range(first["shards"]) if len(in_sync.get(str(s), ())) + 1 < repl[0]["copies"])
        lines.append(f"replicas: {repl[0]['copies']} copies per shard"
                     f"{' (degraded writes allowed)' if repl[0]['degraded_writes'] else ''}; "
                     f"{short} shards with too few in sync, {len(catching)} catching up; this node: "
                     f"{sum(r['replica_copies'] for r in repl)} replica copies, "
                     f"{sum(r['waiting_acks'] for r in repl)} ACK batches waiting, "
                     f"{sum(r['takeovers'] for r in repl)} shards taken over")
        if first.get("disk_full"):
            lines.append(f"no room for replica copies (disk full): {', '.join(first['disk_full'])}")
    lines.append(f"{'worker':<7} {'nats':<5} {'msgs in':>10} {'msgs out':>10} {'MB in':>8} {'MB out':>8} "
                 f"{'resets':>6} {'timeouts':>8}")
    for k in sorted(views, key=int):
        v = views[k]
        b = v.get("bus") or {}
        lines.append(f"{k:<7} {'up' if v['connected'] else 'DOWN':<5} {b.get('msgs_in', 0):>10} "
                     f"{b.get('msgs_out', 0):>10} {b.get('bytes_in', 0) / 1e6:>8.2f} "
                     f"{b.get('bytes_out', 0) / 1e6:>8.2f} {b.get('resets', 0):>6} {b.get('timeouts', 0):>8}")
    return "\n".join(lines)
