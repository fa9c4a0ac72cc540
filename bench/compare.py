"""`switchboard bench compare`: Switchboard and its peers on the same
workloads, in one run, with the same clients; ratios at the end.

Density: every server holds --sessions idle sessions in one process (a
process may hold 20,000 files, so this is the fair per-process comparison;
the million-session run is `bench density`). Throughput: 1:1 flows against
Switchboard, nats-server and the websockets relay (the floor and redis do
not route messages)."""
import argparse
import sys

from . import density, report, throughput


def run(args) -> int:
    names = ["switchboard"] + [p for p in args.peers.split(",") if p and p != "switchboard"]
    dargs = argparse.Namespace(**vars(args))
    dargs.port, dargs.step, dargs.ping_interval, dargs.concurrency, dargs.clients = 0, args.sessions // 3, 30.0, 256, None
    dargs.idle_window, dargs.check, dargs.step_timeout, dargs.warmup = 2.0, 10, 300.0, 1000
    dens = []
    for name in names:
        server = density.peers.start(name, workers=1, durability=args.durability)
        try:
            dens.append(density.measure(server, dargs, name))
        finally:
            server.stop()
        print(density.summary(dens[-1]), file=sys.stderr, flush=True)
    targs = argparse.Namespace(**vars(args))
    targs.port = 0
    routing = [n for n in names if n in ("switchboard", "nats", "websockets")]
    tput = throughput.run_all(targs, routing)

    floor = next((d for d in dens if d["server"] == "floor"), None)
    drows = []
    for d in dens:
        last = d["steps"][-1]
        drows.append({"server": d["server"], "sessions": last["sessions"], "heap": last["anon_per_session"],
                      "vs_floor": last["anon_per_session"] / floor["steps"][-1]["anon_per_session"] if floor else None,
                      "kernel": last["kernel_per_session"], "conn_s": last["connects_per_s"],
                      "answered": d["final_answered"]})
    print("Idle sessions, one server process each:")
    print(report.table(drows, [("server", "server", ""), ("sessions", "sessions", ","),
                               ("heap", "heap B/session", ",.0f"), ("vs_floor", "x floor", ".2f"),
                               ("kernel", "kernel B/session", ",.0f"), ("conn_s", "connects/s", ","),
                               ("answered", "answered PING", ",")]))
    sb = {r["payload_bytes"]: r for r in tput if r["server"].startswith("switchboard")}
    for r in tput:
        base = sb.get(r["payload_bytes"])
        r["switchboard_vs"] = base["msgs_per_s"] / r["msgs_per_s"] if base and r["msgs_per_s"] else None
    print("\n1:1 routed messages (Switchboard persists each one to its log before the ACK):")
    print(report.table(tput, throughput.COLUMNS + [("switchboard_vs", "switchboard / this", ".2f")]))
    if args.json:
        report.write_json(args.json, {"command": " ".join(sys.argv), "density": dens, "throughput": tput})
    if args.plot:
        why = report.plot_density(args.plot, {d["server"]: d["steps"] for d in dens})
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    ok = all(r["exactly_once"] for r in tput if r["server"] != "nats") and \
        all(d["final_answered"] >= d["final_sessions"] for d in dens)
    return 0 if ok else 1
