"""What the kernel says about processes and sockets (/proc), for benchmarks
that must measure a server from outside: memory, CPU and socket counts."""
import os
import signal
import subprocess

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def memory(pids) -> dict:
    """Summed over `pids`, in bytes: RSS; USS (private pages, freed if the
    process exited: forked workers' shared code is not counted N times); anon,
    the heap and other anonymous pages (a server's per-connection objects);
    and file, the mapped file pages (Switchboard's log segments, which are
    page cache the kernel can write back and reclaim)."""
    out = {"rss": 0, "uss": 0, "anon": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Rss":
                        out["rss"] += int(rest.split()[0]) * 1024
                    elif key in ("Private_Clean", "Private_Dirty"):
                        out["uss"] += int(rest.split()[0]) * 1024
                    elif key == "Anonymous":
                        out["anon"] += int(rest.split()[0]) * 1024
        except OSError:
            pass
    out["file"] = out["rss"] - out["anon"]
    return out


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / _TICK


def kernel() -> dict:
    """Socket counts and kernel memory: TCP sockets in use, their buffer pages,
    and slab (socket, inode and file objects live there)."""
    out = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                d = dict(zip(parts[::2], map(int, parts[1::2])))
                out["tcp_inuse"] = d.get("inuse", 0)
                out["tcp_mem_bytes"] = d.get("mem", 0) * _PAGE
            elif line.startswith("sockets:"):
                out["sockets_used"] = int(line.split()[2])
    with open("/proc/meminfo") as f:
        mi = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
    out["slab_bytes"] = mi.get("Slab", 0)
    out["mem_available"] = mi.get("MemAvailable", 0)
    return out


def _listen_inodes(port: int) -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(fields[9]))
        except OSError:
            pass
    return inodes


def listening_pids(port: int) -> list[int]:
    """Processes holding a socket that listens on `port`: how a running server's
    workers are found without being told their PIDs."""
    wanted = {f"socket:[{i}]" for i in _listen_inodes(port)}
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                if os.readlink(f"/proc/{d}/fd/{fd}") in wanted:
                    pids.append(int(d))
                    break
        except OSError:
            pass
    return sorted(pids)


def stop(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
