"""Gateway settings with their defaults; every limit is a named setting here."""
import os
from dataclasses import dataclass, field

from _core.protocol import DEFAULT_MAX_FRAME, PRE_AUTH_MAX_FRAME

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7400
#: the WebSocket listener (browsers: the chat page at /, the protocol at /ws)
DEFAULT_WS_PORT = 7401
#: the admin HTTP listener (/metrics, /healthz, /readyz, POST /drain)
DEFAULT_ADMIN_PORT = 7402


def default_data_dir() -> str:
    return os.environ.get("SWITCHBOARD_DATA_DIR", "switchboard-data")


@dataclass
class GatewayConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: WebSocket listener port; 0 picks a free one, -1 turns it off
    ws_port: int = DEFAULT_WS_PORT
    #: browser origins (scheme://host[:port]) allowed to open a WebSocket besides the page's own; "*": any
    ws_origins: tuple = ()
    data_dir: str = field(default_factory=default_data_dir)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: which worker this process is (0..workers-1); set by the supervisor
    worker_index: int = 0
    #: a connection that has not completed HELLO by then gets ERROR HELLO_TIMEOUT
    hello_timeout: float = 10.0
    #: largest frame after WELCOME (value of the length field); advertised to clients
    max_frame: int = DEFAULT_MAX_FRAME
    #: largest frame before WELCOME: a stranger can't make us buffer more
    pre_auth_max_frame: int = PRE_AUTH_MAX_FRAME
    ping_interval_ms: int = 30_000
    #: undelivered messages kept per recipient before senders get QUOTA_EXCEEDED
    max_pending_per_recipient: int = 10_000
    #: devices of one user online at once (each registered device gets every message)
    max_devices: int = 4
    #: members of one group
    max_group_members: int = 1024
    #: remembered client message ids per device, for dropping retried SENDs
    dedup_window: int = 4096
    #: a worker that dies is restarted after this backoff (doubling per quick death)
    restart_backoff: float = 0.1
    #: SIGTERM: how long connections get to finish before they are cut
    shutdown_grace: float = 5.0
    #: GOAWAY reconnect hints are spread uniformly over this many ms
    reconnect_spread_ms: int = 5_000
    backlog: int = 4096
    log_level: str = "INFO"
    #: "log": the durable memory-mapped log (default); "memory": lost on restart (tests, benchmarks)
    store: str = "log"
    #: always (fsync before every ACK batch) | interval (fsync every flush_interval_ms) | never
    durability: str = "interval"
    flush_interval_ms: int = 1000
    segment_size: int = 64 << 20
    #: undelivered messages expire after this long (WhatsApp keeps them 30 days)
    message_ttl: float = 30 * 86400
    #: address of the admin HTTP listener (/metrics, /healthz, /readyz, POST /drain); loopback by default
    admin_host: str = DEFAULT_HOST
    #: admin listener port; 0 picks a free one, -1 turns it off
    admin_port: int = DEFAULT_ADMIN_PORT
    #: seconds between the supervisor's polls of the workers' counters (also on every scrape): what a
    #: worker counted since the last poll is lost if it dies
    metrics_refresh: float = 1.0
    #: `switchboard drain` default: sessions told to reconnect per batch (over all workers)
    drain_batch: int = 100
    #: `switchboard drain` default: seconds between batches
    drain_pause: float = 1.0

    def validate(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not (-1 <= self.ws_port <= 65535):
            raise ValueError(f"WebSocket port must be 0..65535 (or off), got {self.ws_port}")
        from urllib.parse import urlsplit
        for o in self.ws_origins:
            u = urlsplit(o)
            if o != "*" and not (u.scheme in ("http", "https") and u.netloc and not u.path and not u.query
                                 and not u.fragment and o == o.lower()):
                raise ValueError(f"WebSocket origin must be '*' or scheme://host[:port] in lower case "
                                 f"without a path, got {o!r}")
        from router.sharding import DEFAULT_SHARDS
        if not (1 <= self.workers <= DEFAULT_SHARDS):
            raise ValueError(f"workers must be between 1 and {DEFAULT_SHARDS} (the number of shards)")
        if self.hello_timeout <= 0:
            raise ValueError("hello timeout must be positive")
        if not (1024 <= self.max_frame <= 16 * 1024 * 1024):
            raise ValueError("max frame must be between 1 KiB and 16 MiB")
        if not (64 <= self.pre_auth_max_frame <= self.max_frame):
            raise ValueError("pre-auth max frame must be between 64 bytes and max frame")
        if not (-1 <= self.admin_port <= 65535):
            raise ValueError(f"admin port must be 0..65535 (or off), got {self.admin_port}")
        if not self.admin_host:
            raise ValueError("admin host must not be empty")
        if not (0.05 <= self.metrics_refresh <= 3600):
            raise ValueError(f"metrics refresh must be between 0.05 and 3600 seconds, got {self.metrics_refresh}")
        if self.drain_batch < 1:
            raise ValueError(f"drain batch must be at least 1, got {self.drain_batch}")
        if not (0 <= self.drain_pause <= 3600):
            raise ValueError(f"drain pause must be between 0 and 3600 seconds, got {self.drain_pause}")
        if self.store not in ("log", "memory"):
            raise ValueError(f"store must be 'log' or 'memory', not {self.store!r}")
        self.log_config().validate()

    def log_config(self):
        from _core.log import LogConfig
        return LogConfig(segment_size=self.segment_size, durability=self.durability,
                         interval_ms=self.flush_interval_ms, ttl_s=self.message_ttl,
                         max_pending=self.max_pending_per_recipient, dedup_window=self.dedup_window)
