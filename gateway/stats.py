"""`switchboard stats` (a live terminal view of /metrics) and `switchboard drain`
(POST /drain): clients of the admin listener (gateway/admin.py)."""
import http.client
import json
import sys
import time
import urllib.error
import urllib.request

from .metrics import PREFIX, parse


class AdminError(Exception):
    pass


def fetch(host: str, port: int, path: str, method: str = "GET", timeout: float = 10.0) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        # HTTPException: the listener closed mid-answer (a gateway exiting at the end of a drain)
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin listener at {host}:{port}: {getattr(reason, 'strerror', None) or reason}") from None


def scrape(host: str, port: int) -> tuple[float, dict]:
    status, text = fetch(host, port, "/metrics")
    if status != 200:
        raise AdminError(f"/metrics answered {status}: {text.strip()[:200]}")
    return time.monotonic(), parse(text)


def _value(samples: dict, name: str, worker=None, **labels) -> float:
    """Sum of the samples of `name` for `worker` (None: the gateway's total
    series) matching `labels` (a label not given is summed over)."""
    total = 0.0
    for (n, ls), v in samples.items():
        if n != PREFIX + name:
            continue
        d = dict(ls)
        if d.get("worker") != (None if worker is None else str(worker)):
            continue
        if all(d.get(k) == str(val) for k, val in labels.items()):
            total += v
    return total


def quantile(samples: dict, name: str, q: float, worker=None) -> float | None:
    """The q-quantile from a histogram's buckets (the bucket's upper bound)."""
    buckets = []
    for (n, ls), v in samples.items():
        d = dict(ls)
        if n == PREFIX + name + "_bucket" and d.get("worker") == (None if worker is None else str(worker)):
            buckets.append((float(d["le"]), v))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    want = q * buckets[-1][1]
    for le, cum in buckets:
        if cum >= want:
            return le
    return None


def _workers(samples: dict) -> list[str]:
    return sorted({dict(ls)["worker"] for (n, ls) in samples if n == PREFIX + "worker_up" and "worker" in dict(ls)},
                  key=int)


def _ms(v) -> str:
    if v is None:
        return "-"
    return "inf" if v == float("inf") else f"{v * 1000:.2f}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COLUMNS = ["worker", "up", "tcp", "ws", "users", "conn/s", "in/s", "out/s", "fwd/s", "in", "out", "fwd",
           "handoffs", "pending", "log", "segs", "errors", "restarts", "p50 ms", "p99 ms", "fsync p99 ms"]


def rows(prev: tuple[float, dict] | None, cur: tuple[float, dict]) -> list[list[str]]:
    """One row per worker and a total row; rates from the two scrapes."""
    t1, s1 = cur
    out = []
    for w in [*_workers(s1), None]:
        def rate(name, **labels):
            if prev is None or t1 <= prev[0]:
                return "-"
            d = _value(s1, name, w, **labels) - _value(prev[1], name, w, **labels)
            return f"{max(d, 0) / (t1 - prev[0]):,.0f}"
        v = (lambda name, **labels: _value(s1, name, w, **labels))
        up = "" if w is None else ("yes" if v("worker_up") else "NO")
        out.append([
            "all" if w is None else w, up, f"{v('connections', kind='tcp'):,.0f}", f"{v('connections', kind='ws'):,.0f}",
            f"{v('online_users'):,.0f}", rate("connects_total"), rate("messages_in_total"),
            rate("messages_out_total"), rate("forwarded_total"), f"{v('messages_in_total'):,.0f}",
            f"{v('messages_out_total'):,.0f}", f"{v('forwarded_total'):,.0f}", f"{v('handoffs_total', direction='in'):,.0f}",
            f"{v('offline_pending'):,.0f}", _size(v("log_bytes")), f"{v('log_segments'):,.0f}",
            f"{v('errors_total'):,.0f}", f"{v('worker_restarts_total'):,.0f}",
            _ms(quantile(s1, "route_latency_seconds", 0.5, w)), _ms(quantile(s1, "route_latency_seconds", 0.99, w)),
            _ms(quantile(s1, "fsync_seconds", 0.99, w)),
        ])
    return out


def table(prev, cur) -> str:
    body = rows(prev, cur)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(COLUMNS, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    s = cur[1]
    state = "ready" if _value(s, "ready") else "draining" if _value(s, "draining") else "NOT READY"
    return "\n".join(lines) + f"\ngateway: {state}; latency = SEND decoded -> ACK queued (bucket upper bounds)\n"


def run_stats(host: str, port: int, interval: float, once: bool, count: int | None) -> int:
    """Print the view every `interval` s (rates from successive scrapes). `once`:
    two scrapes `interval` apart, one table, exit."""
    prev = scrape(host, port)
    shown = 0
    tty = sys.stdout.isatty() and not once
    while count is None or shown < count:
        time.sleep(interval)
        cur = scrape(host, port)
        text = table(prev, cur)
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + f"{host}:{port}\n")
        sys.stdout.write(text)
        sys.stdout.flush()
        shown += 1
        prev = cur
        if once:
            break
    return 0


def run_drain(host: str, port: int, batch: int | None, pause: float | None, wait: float | None) -> int:
    """POST /drain, print what the gateway said; with `wait`, return once the
    gateway has exited (its admin listener stops answering), at most `wait` s."""
    q = "&".join(f"{k}={v}" for k, v in (("batch", batch), ("pause", pause)) if v is not None)
    status, text = fetch(host, port, "/drain" + (f"?{q}" if q else ""), method="POST")
    if status != 202:
        raise AdminError(f"drain refused ({status}): {text.strip()}")
    a = json.loads(text)
    print(f"draining: {a['sessions']} sessions on {a['workers']} workers, {a['batch']} per batch every "
          f"{a['pause']:g} s ({a['batches']} batches, about {a['seconds']:.1f} s); new connections are refused "
          f"and /readyz answers 503; the gateway exits when its sessions are gone", flush=True)
    if wait is None:
        return 0
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            fetch(host, port, "/healthz", timeout=1.0)
        except AdminError:
            print("drained: the gateway has exited", flush=True)
            return 0
        time.sleep(0.1)
    raise AdminError(f"the gateway was still running after {wait:g} s")
