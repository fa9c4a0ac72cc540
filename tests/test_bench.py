"""`switchboard bench ...` at a small scale: the commands a user runs, with
real servers, real client processes and their JSON results."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def bench(*args, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "gateway", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env} if env else None)


def test_density_switchboard_and_peers(tmp_path):
    out = tmp_path / "d.json"
    peers = ["floor"] + (["redis"] if shutil.which("redis-server") else [])
    r = bench("density", "--sessions", "300", "--step", "150", "--warmup", "40", "--workers", "2",
              "--idle-window", "0.5", "--against", ",".join(["switchboard", *peers]), "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    results = {x["server"]: x for x in json.loads(out.read_text())["results"]}
    assert set(results) == {"switchboard", *peers}
    for name, res in results.items():
        assert [s["sessions"] for s in res["steps"]] == [150, 300], name
        assert res["final_sessions"] == res["final_answered"] == 300, name
        assert res["failed_reasons"] == {}, name
        assert res["steps"][-1]["check_failed"] == 0, name
        assert res["steps"][-1]["anon_per_session"] > 0, name
    sb = results["switchboard"]
    assert sb["server_processes"] == 3                        # a supervisor and two workers
    assert sb["steps"][-1]["check_ok"] > 0 and sb["steps"][-1]["check_rtt_p50_ms"] > 0
    assert "heap B/sess" in r.stdout and "final PING: 300 of 300" in r.stdout


def test_density_against_a_running_gateway(gateway_factory, tmp_path):
    gw = gateway_factory("--workers", "2")
    out = tmp_path / "d.json"
    r = bench("density", "--port", str(gw.port), "--data-dir", str(gw.data_dir), "--sessions", "200",
              "--warmup", "20", "--idle-window", "0.5", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())["results"][0]
    assert res["server_processes"] == 3                       # found by the listening port
    assert res["final_answered"] == 200
    assert gw.alive()                                         # a gateway it did not start keeps running


def test_density_reports_refused_sessions(gateway_factory, tmp_path):
    """Tokens from another secret: every HELLO is refused, and the run says why and fails."""
    gw = gateway_factory()
    other = gateway_factory()
    out = tmp_path / "d.json"
    r = bench("density", "--port", str(gw.port), "--data-dir", str(other.data_dir), "--sessions", "20",
              "--warmup", "1", "--idle-window", "0.2", "--json", str(out))
    assert r.returncode == 1
    reasons = json.loads(out.read_text())["results"][0]["failed_reasons"]
    assert sum(reasons.values()) == 20 and all(k.startswith("ERROR ") for k in reasons), reasons


def test_density_without_a_server_is_a_clear_error():
    r = bench("density", "--port", "1", "--sessions", "10")
    assert r.returncode != 0 and "nothing listens on port 1" in r.stderr


def test_throughput_is_exactly_once(tmp_path):
    """Two payload sizes against the same servers: each run has fresh users (a
    server remembers the client ids it answered, and would rightly drop repeats)."""
    out = tmp_path / "t.json"
    against = ["switchboard", "websockets"] + (["nats"] if shutil.which("nats-server") else [])
    r = bench("throughput", "--pairs", "6", "--window", "4", "--duration", "1", "--warmup", "0.3",
              "--size", "32,4096", "--workers", "2", "--against", ",".join(against), "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(row["server"].split(" ")[0], row["payload_bytes"]) for row in rows] == \
        [(name, size) for name in against for size in (32, 4096)]
    for row in rows:
        assert row["exactly_once"], row
        assert row["delivered"] == row["expected"] == row["sent"] > 0
        assert row["msgs_per_s"] > 0 and row["p50_ms"] > 0
    for sb in rows[:2]:
        assert sb["server"].startswith("switchboard (2w") and sb["acked"] == sb["sent"]
        assert sb["receipts"] == sb["delivered"]          # one DELIVERED receipt per message, acknowledged


def test_throughput_group_fan_out_and_open_loop(tmp_path):
    out = tmp_path / "t.json"
    r = bench("throughput", "--mode", "group", "--group-size", "3", "--pairs", "2", "--rate", "400",
              "--duration", "1", "--warmup", "0.3", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads(out.read_text())["results"][0]
    assert row["exactly_once"] and row["delivered"] == 3 * row["sent"] > 0
    assert row["sends_per_s"] <= 400 * 1.2                   # the rate holds (plus the first tick)


def test_throughput_group_runs_twice_against_one_running_gateway(gateway_factory, tmp_path):
    """Each invocation names its users and groups afresh: the second one used to
    meet the first one's groups (GROUP_EXISTS) and stop."""
    gw = gateway_factory("--msg-rate", "0")
    for k in range(2):
        out = tmp_path / f"t{k}.json"
        r = bench("throughput", "--port", str(gw.port), "--data-dir", str(gw.data_dir), "--mode", "group",
                  "--group-size", "3", "--pairs", "2", "--duration", "0.5", "--warmup", "0.2", "--json", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        row = json.loads(out.read_text())["results"][0]
        assert row["exactly_once"] and row["delivered"] == 3 * row["sent"] > 0
    assert gw.alive()


def test_throughput_rejects_bad_sizes():
    r = bench("throughput", "--size", "8")
    assert r.returncode != 0 and "--size must be 16..65000" in r.stderr


def test_density_keeps_sessions_alive_past_the_idle_timeout(gateway_factory, tmp_path):
    """Keepalives paced by the clock: with a 0.3 s ping interval and a 0.6 s idle
    timeout, 300 sessions held for 2 s are all still there; without keepalives
    the gateway closes them as idle and the run says so and fails."""
    gw = gateway_factory("--workers", "2", "--ping-interval-ms", "300", "--idle-timeout-pings", "2")
    out = tmp_path / "d.json"
    r = bench("density", "--port", str(gw.port), "--data-dir", str(gw.data_dir), "--sessions", "300",
              "--warmup", "10", "--ping-interval", "0.3", "--idle-window", "2", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())["results"][0]
    assert res["final_answered"] == res["final_sessions"] == 300 and res["steps"][-1]["lost"] == 0

    r = bench("density", "--port", str(gw.port), "--data-dir", str(gw.data_dir), "--sessions", "50",
              "--warmup", "1", "--ping-interval", "0", "--idle-window", "2", "--json", str(out))
    assert r.returncode == 1
    last = json.loads(out.read_text())["results"][0]["steps"][-1]
    assert last["lost_reasons"].get("GOAWAY IDLE_TIMEOUT", 0) > 0, last


def test_unknown_or_non_routing_servers_are_clear_errors():
    r = bench("density", "--against", "switchboard,nosuch")
    assert r.returncode == 2 and "unknown server nosuch" in r.stderr
    r = bench("throughput", "--against", "redis")           # redis routes no messages
    assert r.returncode == 2 and "unknown server redis" in r.stderr
    assert "choose from switchboard, nats, websockets" in r.stderr


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    """nats-server missing from PATH: one line naming it, exit status 1, no traceback."""
    env = {**os.environ, "PATH": str(tmp_path)}              # no nats-server here
    r = subprocess.run([sys.executable, "-m", "gateway", "bench", "throughput", "--against", "nats",
                        "--duration", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stderr
    assert "switchboard bench: nats-server is not installed" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kill,durability", [("gateway", "interval"), ("gateway", "always"), ("worker", "interval")])
def test_soak_kill_9_loops_lose_duplicate_and_reorder_nothing(tmp_path, kill, durability):
    """Issue 12's acceptance in small: `switchboard bench soak` kills the whole gateway
    (or a worker) with SIGKILL under pipelined senders, 3 times; every ACKed message
    reaches its recipient once, in the order its device sent it, and the unavailability
    after each kill is measured."""
    out = tmp_path / "soak.json"
    r = bench("soak", "--kill", kill, "--durability", durability, "--cycles", "3", "--every", "200",
              "--senders", "3", "--recipients", "3", "--window", "32", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["cycles"] == 3 and res["acked"] >= 600
    assert (res["lost"], res["duplicates"], res["reorderings"]) == (0, 0, 0)
    assert res["delivered"] == res["acked"]
    assert 0 < res["unavailable_s"]["min"] <= res["unavailable_s"]["max"] < 30


def test_soak_kill_9_of_a_cluster_node_loses_duplicates_and_reorders_nothing(tmp_path):
    """Issue 14's acceptance in small: three nodes with two copies of every shard,
    one node killed with SIGKILL twice under pipelined senders (its shards fail
    over to their replicas, it returns and catches up); every ACKed message reaches
    its recipient once, in order, and each failover is measured."""
    out = tmp_path / "soak.json"
    logs = tmp_path / "node-logs"
    logs.mkdir()
    r = bench("soak", "--kill", "node", "--cycles", "2", "--every", "800", "--workers", "1", "--senders", "4",
              "--recipients", "6", "--window", "16", "--replicas", "2", "--timeout", "150", "--json", str(out),
              env={"SWITCHBOARD_BENCH_NODE_LOGS": str(logs)})
    assert r.returncode == 0, r.stdout + r.stderr + "".join(
        f"\n--- {p.name} (last 40 lines)\n" + "".join(p.read_text().splitlines(True)[-40:]) for p in sorted(logs.glob("*.log")))
    res = json.loads(out.read_text())
    assert res["cycles"] == 2 and res["acked"] >= 1600 and res["replicas"] == 2
    assert (res["lost"], res["duplicates"], res["reorderings"]) == (0, 0, 0)
    assert res["delivered"] == res["acked"]
    assert 0 < res["unavailable_s"]["min"] <= res["unavailable_s"]["max"] < 30


def test_catchup_measures_a_returning_and_a_rebuilt_node(tmp_path):
    out = tmp_path / "catchup.json"
    r = bench("catchup", "--mb", "8", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert [x["case"] for x in res["runs"]] == ["returning", "rebuilt"]
    assert res["payload_mb"] >= 8
    for run in res["runs"]:
        assert run["seconds"] > 0 and run["shipped_mb"] > 0 and run["mb_per_s"] > 0, run
    # rebuilt from an empty data dir, n3 gets its share of the copies (about 2 of every 3 shards) in full
    assert res["runs"][1]["shipped_mb"] >= res["payload_mb"] / 3, res
    assert "MB/s" in r.stdout


def test_a_benchmark_stopped_with_sigterm_stops_the_servers_it_started():
    """`bench soak --kill node` runs nodes and nats-servers in process groups of
    their own; SIGTERM to the benchmark stops them too, and says so."""
    import signal
    from pathlib import Path

    def leftovers():
        out = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and b"sb-failover-" in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
        return out
    assert leftovers() == []
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "bench", "soak", "--kill", "node", "--cycles", "50",
                             "--every", "300", "--workers", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        seen = b""
        while b"soak: 1/50" not in seen:                 # its cluster is up and it has killed a node once
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        assert leftovers()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (seen + err).decode(errors="replace")
    assert b"stopped by SIGTERM; the servers it started are stopped" in err
    assert leftovers() == []


def test_ws_bench_routes_through_every_target(tmp_path):
    """bench/ws_bench.py at a small scale: every target accepts the HELLOs and routes the
    SENDs (it once spoke an old protocol version and waited forever for WELCOME)."""
    r = subprocess.run([sys.executable, "bench/ws_bench.py", "--duration", "0.5", "--idle", "20",
                        "--targets", "sb-ws,sb-tcp,websockets,picows"], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = {d["target"]: d for d in map(json.loads, (ln for ln in r.stdout.splitlines() if ln.startswith("{")))}
    assert set(results) == {"sb-ws", "sb-tcp", "websockets", "picows"}
    for target, res in results.items():
        assert res["routed"] > 0 and res["echo"] > 0, (target, res)
        assert res["idle_bytes"] > 0, (target, res)
    assert results["sb-ws"]["handshakes"] > 0


def test_a_worker_soak_with_fewer_recipients_than_workers_is_a_clear_error():
    """Each worker kill waits for an ACK to a user of that worker: a run that cannot have
    one says so at once instead of waiting (the recipients are also spread over the workers)."""
    r = bench("soak", "--kill", "worker", "--workers", "2", "--recipients", "1", "--cycles", "1", timeout=60)
    assert r.returncode != 0 and "--recipients >= --workers" in r.stderr + r.stdout, r.stdout + r.stderr
