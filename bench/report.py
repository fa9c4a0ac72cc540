"""How benchmark results are shown: a progress bar while running, an aligned
table at the end, JSON for machines and an optional PNG plot (matplotlib,
from the `bench` extra)."""
import json
import sys
import time


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, else a
    line per update at most every few seconds: CI logs stay readable)."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = max(total, 1), label, stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        if not self.tty and now - self._last < 5 and done < self.total:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        rate = done / max(now - self.t0, 1e-9)
        line = f"{self.label} [{bar:<30}] {done:>9,}/{self.total:,} {rate:>9,.0f}/s {note}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """`columns`: (key, heading, format) -> an aligned text table."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def plot_density(path: str, runs: dict[str, list[dict]]) -> str | None:
    """Memory per connection and total memory vs connections, one line per server.
    Returns a reason if no plot could be made (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'switchboard[bench]')"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, rows) in enumerate(runs.items()):
        xs = [r["sessions"] for r in rows]
        color = f"C{i}"                     # one color per server on both plots
        a.plot(xs, [r["anon_per_session"] / 1024 for r in rows], marker="o", color=color, label=name)
        b.plot(xs, [r["server_rss_delta"] / 2**30 for r in rows], marker="o", color=color, label=f"{name} server")
        b.plot(xs, [r["kernel_delta"] / 2**30 for r in rows], linestyle="--", color=color,
               label=f"{name} kernel (both ends)")
    a.set_xlabel("idle sessions")
    a.set_ylabel("server heap KiB per session")
    a.set_ylim(bottom=0)
    a.grid(alpha=0.3)
    a.legend()
    b.set_xlabel("idle sessions")
    b.set_ylabel("GiB above baseline")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.suptitle("Connection density")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
