"""The cluster settings, checked at start: one clear line for each mistake."""
import re
import socket

NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MIN_SHARDS, MAX_SHARDS = 64, 65536


def node_name(cfg) -> str:
    return cfg.node or socket.gethostname().split(".")[0]


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError names `what`."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if m is None:
        raise ValueError(f"{what} must be HOST:PORT (or [IPv6]:PORT), not {text!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) < 65536:
        raise ValueError(f"{what}: port {port} is out of range")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised(cfg, tcp_port: int, ws_port: int) -> tuple[str, str]:
    """The addresses redirects name: the settings', else the listeners' own (a
    wildcard listen address cannot be advertised: validate_cluster refuses it)."""
    tcp = cfg.advertise or join_hostport(cfg.host, tcp_port)
    if cfg.advertise_ws:
        ws = cfg.advertise_ws
    elif ws_port >= 0:
        ws = join_hostport(split_hostport(tcp, "advertise")[0], ws_port)
    else:
        ws = ""
    return tcp, ws


def nats_urls(cfg) -> list[str]:
    return [u.strip() for u in cfg.cluster.split(",") if u.strip()]


def validate_cluster(cfg) -> None:
    for url in nats_urls(cfg):
        if not re.fullmatch(r"(nats|tls)://[^\s/]+(:\d+)?", url):
            raise ValueError(f"cluster: {url!r} is not a NATS URL (nats://HOST:PORT)")
    if not NODE_NAME.fullmatch(node_name(cfg)):
        raise ValueError(f"node name {node_name(cfg)!r}: use 1-64 letters, digits, '-' or '_'")
    for name in cfg.bootstrap:
        if not NODE_NAME.fullmatch(name):
            raise ValueError(f"bootstrap node name {name!r}: use 1-64 letters, digits, '-' or '_'")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", cfg.cluster_name):
        raise ValueError(f"cluster name {cfg.cluster_name!r}: use 1-32 letters, digits, '-' or '_'")
    n = cfg.cluster_shards
    if not (MIN_SHARDS <= n <= MAX_SHARDS) or n & (n - 1):
        raise ValueError(f"cluster shards must be a power of two from {MIN_SHARDS} to {MAX_SHARDS}, got {n}")
    if cfg.advertise:
        split_hostport(cfg.advertise, "advertise")
    elif cfg.host in ("0.0.0.0", "::", ""):
        raise ValueError("a node listening on every address must say where clients reach it: --advertise HOST:PORT")
    if cfg.advertise_ws:
        split_hostport(cfg.advertise_ws, "advertise_ws")
    if not (1.0 <= cfg.lease_ttl <= 300):
        raise ValueError(f"lease ttl must be between 1 and 300 seconds, got {cfg.lease_ttl}")
    if not (0.2 <= cfg.cluster_timeout <= 120):
        raise ValueError(f"cluster timeout must be between 0.2 and 120 seconds, got {cfg.cluster_timeout}")
    if not (1 <= cfg.replicas <= 5):
        raise ValueError(f"replicas must be between 1 and 5 copies, got {cfg.replicas}")
    if not (0.2 <= cfg.replica_timeout <= 120):
        raise ValueError(f"replica timeout must be between 0.2 and 120 seconds, got {cfg.replica_timeout}")
    if cfg.replica_check_interval and not (0.1 <= cfg.replica_check_interval <= 86400):
        raise ValueError(f"replica check interval must be 0 (off) or 0.1 to 86400 seconds, "
                         f"got {cfg.replica_check_interval}")
    if cfg.store != "log":
        raise ValueError("a cluster node needs the durable log (store = \"log\"): shards move between nodes as logs")
