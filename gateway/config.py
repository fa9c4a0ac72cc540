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
    """Every setting of a gateway. Each field is configurable from the TOML file
    (its name), the environment (SWITCHBOARD_<NAME>) and a `serve` flag
    (gateway/settings.py); the `#:` comment above it is its documentation
    (docs/configuration.md is generated from them)."""
    #: listen address of the TCP and WebSocket listeners
    host: str = DEFAULT_HOST
    #: TCP listener port (the binary protocol); 0 picks a free one
    port: int = DEFAULT_PORT
    #: WebSocket listener port; 0 picks a free one, -1 turns it off
    ws_port: int = DEFAULT_WS_PORT
    #: browser origins (scheme://host[:port]) allowed to open a WebSocket besides the page's own; "*": any
    ws_origins: tuple = ()
    #: where the server secret, the shard layout and the message log live
    data_dir: str = field(default_factory=default_data_dir)
    #: worker processes; users are sharded across them (1..64; default: number of cores)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: which worker this process is (0..workers-1); set by the supervisor
    worker_index: int = 0
    #: seconds a connection has to complete HELLO (and the TLS handshake) before ERROR HELLO_TIMEOUT
    hello_timeout: float = 10.0
    #: largest frame after WELCOME (value of the length field); advertised to clients
    max_frame: int = DEFAULT_MAX_FRAME
    #: largest frame before WELCOME: a stranger can't make us buffer more
    pre_auth_max_frame: int = PRE_AUTH_MAX_FRAME
    #: keepalive interval advertised to clients in WELCOME
    ping_interval_ms: int = 30_000
    #: undelivered messages kept per recipient before senders get QUOTA_EXCEEDED
    max_pending_per_recipient: int = 10_000
    #: devices of one user online at once (each registered device gets every message)
    max_devices: int = 4
    #: members of one group (1..2048: a full group's state fits in one record of the smallest log segment)
    max_group_members: int = 1024
    #: the send window: SENDs a device may have unanswered; each shard remembers that many answers per device
    dedup_window: int = 256
    #: seconds before a dead worker is restarted (doubling per quick death, at most 5 s)
    restart_backoff: float = 0.1
    #: SIGTERM: seconds connections get to finish before they are cut
    shutdown_grace: float = 5.0
    #: seconds a worker waits for shard logs another process holds (a drained predecessor still exiting) before
    #: it gives up (exit 4)
    lock_wait: float = 300.0
    #: GOAWAY reconnect hints are spread uniformly over this many ms
    reconnect_spread_ms: int = 5_000
    #: listen(2) queue of each listening socket
    backlog: int = 4096
    #: level of every logger: DEBUG, INFO, WARNING, ERROR
    log_level: str = "INFO"
    #: per-component levels over log_level, e.g. "switchboard.conn=DEBUG,switchboard.bus=WARNING"
    log_levels: str = ""
    #: "log": the durable memory-mapped log (default); "memory": lost on restart (tests, benchmarks)
    store: str = "log"
    #: always (fsync before every ACK batch) | interval (fsync every flush_interval_ms) | never
    durability: str = "interval"
    #: fsync period of durability "interval"
    flush_interval_ms: int = 1000
    #: largest log segment file (accepts K/M/G suffixes; 256K..2G): a shard's segments start at 1 MiB and
    #: double up to this. Small disks: "256K" (docs/storage.md, Space)
    segment_size: int = 64 << 20
    #: log segments each shard makes ahead so appends do not wait for one (0..8; up to 2x+1 after a stall),
    #: besides its reserve, which only acknowledgements, new devices and compaction may use on a full disk. Disk
    #: per shard: 2 + log_spares segments, 4 MiB for a new shard at the defaults (256 MiB for all 64); small
    #: disks: 0 with segment_size "256K" (512 KiB per shard, 32 MiB for 64)
    log_spares: int = 1
    #: a consumed segment's file becomes the shard's next segment instead of a new zero-filled one (half the
    #: disk writes, and the log's thread does not write zeros); off: deleted. Segments made so are version 3,
    #: which releases before it do not read (docs/storage.md, Recycling)
    log_recycle: bool = True
    #: seconds an undelivered message is kept (30 days, as WhatsApp does)
    message_ttl: float = 30 * 86400
    #: PEM certificate chain: TLS on the TCP and WebSocket listeners (with tls_key); reloaded on SIGHUP
    tls_cert: str = ""
    #: PEM private key of tls_cert
    tls_key: str = ""

    # -- limits and abuse (docs/limits.md); per worker process, 0 turns a limit off --------------------------
    #: connections one worker holds at once, authenticated or not; new ones past it are refused
    max_connections: int = 100_000
    #: connections from one source address held by one worker
    max_connections_per_ip: int = 20_000
    #: new connections per second from one source address (token bucket per worker)
    connect_rate_per_ip: float = 1_000.0
    #: how many new connections from one address may arrive at once (the bucket's size)
    connect_burst_per_ip: int = 20_000
    #: SENDs per second per session (token bucket); past it the SEND gets the non-fatal ERROR RATE_LIMITED
    msg_rate: float = 1_000.0
    #: SENDs a session may make at once (the bucket's size)
    msg_burst: int = 5_000
    #: a session from which nothing arrives, not even PING, for this many ping intervals gets GOAWAY IDLE_TIMEOUT
    #: (never earlier; within a quarter interval later)
    idle_timeout_pings: int = 3
    #: slow consumer: past this many bytes queued to a client (transport buffer), its live messages stay in the log
    out_high_water: int = 256 << 10
    #: ... and are pushed again, from the log, once the queue is below this
    out_low_water: int = 64 << 10
    #: a paused client with more than this queued is disconnected (GOAWAY SLOW_CONSUMER)
    out_hard_limit: int = 4 << 20
    #: a client paused this long without draining is disconnected (GOAWAY SLOW_CONSUMER)
    slow_consumer_timeout: float = 30.0
    #: period of the limits sweep (at most an eighth of a ping interval): slow consumers, sessions near their idle
    #: timeout or token expiry, log summaries
    limits_sweep_interval: float = 1.0
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
    #: NATS servers of a cluster (nats://HOST:PORT, comma-separated); empty: a single gateway, no NATS
    cluster: str = ""
    #: this node's name in the cluster (letters, digits, '-', '_'; default: the host name)
    node: str = ""
    #: HOST:PORT at which clients reach this node's TCP listener (redirects name it); default: host:port
    advertise: str = ""
    #: HOST:PORT of this node's WebSocket listener for redirects; default: advertise's host and ws_port
    advertise_ws: str = ""
    #: prefix of the cluster's KV buckets and subjects: several clusters may share one NATS
    cluster_name: str = "switchboard"
    #: virtual shards of a new cluster's shard map (a power of two, 64..65536); a data dir keeps the count
    #: it was made with (64 for a single node); `switchboard reshard` splits it offline (docs/cluster.md,
    #: Carrying a data dir over)
    cluster_shards: int = 1024
    #: nodes that share the shards when a new cluster's map is made (comma-separated names); empty: the first
    #: node takes every shard and the others get theirs as they join
    bootstrap: tuple = ()
    #: seconds a node's lease lives without renewal (renewed every third of it): how long a dead node's
    #: shards look alive, so with replicas the failure detection time before they fail over
    lease_ttl: float = 5.0
    #: seconds a FWD to another node may stay unanswered before its SEND gets UNAVAILABLE (the client retries)
    cluster_timeout: float = 3.0
    #: copies of each shard's log in a cluster, the owner's included (1-5): with 2 or more a SEND is ACKed
    #: only once every in-sync replica holds it (under `durability`), and a replica takes the shard over
    #: when its owner's lease expires (docs/cluster.md, Replication); with fewer live nodes than this,
    #: SENDs are refused (UNAVAILABLE) unless degraded_writes. 1: a dead node's shards wait for it
    replicas: int = 2
    #: with fewer live copies than `replicas`, ACK with the copies there are (a shard whose replicas are all
    #: gone is then on one machine: losing it loses what was ACKed meanwhile); off: ACKs wait until a
    #: replica is back or replaced and has caught up
    degraded_writes: bool = False
    #: seconds a replica may leave a shipment unanswered before its stream is restarted (and, with
    #: degraded_writes, dropped from the in-sync set)
    replica_timeout: float = 2.0
    #: seconds between checks of one owned shard's replica copies against its log (xxh3_128 of its sealed
    #: segments, up to 256 MiB, round-robin over the shards): a copy that differs is rebuilt. 0: off
    replica_check_interval: float = 30.0

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
        from router.groups import MAX_GROUP_MEMBERS
        if not (1 <= self.max_group_members <= MAX_GROUP_MEMBERS):
            raise ValueError(f"max group members must be between 1 and {MAX_GROUP_MEMBERS}, "
                             f"got {self.max_group_members}")
        if self.hello_timeout <= 0:
            raise ValueError("hello timeout must be positive")
        if not (1024 <= self.max_frame <= 16 * 1024 * 1024):
            raise ValueError("max frame must be between 1 KiB and 16 MiB")
        if not (64 <= self.pre_auth_max_frame <= self.max_frame):
            raise ValueError("pre-auth max frame must be between 64 bytes and max frame")
        for name in ("max_connections", "max_connections_per_ip", "connect_burst_per_ip", "msg_burst",
                     "idle_timeout_pings", "out_hard_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive, got {getattr(self, name)}")
        for name in ("connect_rate_per_ip", "msg_rate", "slow_consumer_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive, got {getattr(self, name)}")
        if self.connect_rate_per_ip > 0 and self.connect_burst_per_ip < 1:
            raise ValueError("connect_burst_per_ip must be at least 1 when connect_rate_per_ip is set")
        if self.msg_rate > 0 and self.msg_burst < 1:
            raise ValueError("msg_burst must be at least 1 when msg_rate is set")
        if self.ping_interval_ms < 50:
            raise ValueError(f"ping_interval_ms must be at least 50, got {self.ping_interval_ms}")
        if not (0 < self.out_low_water < self.out_high_water):
            raise ValueError(f"out_low_water ({self.out_low_water}) must be positive and below "
                             f"out_high_water ({self.out_high_water})")
        if self.out_hard_limit and self.out_hard_limit <= self.out_high_water:
            raise ValueError(f"out_hard_limit ({self.out_hard_limit}) must be above out_high_water "
                             f"({self.out_high_water}) or 0")
        if self.limits_sweep_interval <= 0:
            raise ValueError("limits_sweep_interval must be positive")
        if not (-1 <= self.admin_port <= 65535):
            raise ValueError(f"admin port must be 0..65535 (or off), got {self.admin_port}")
        if not self.admin_host:
            raise ValueError("admin host must not be empty")
        if not (0.05 <= self.metrics_refresh <= 3600):
            raise ValueError(f"metrics refresh must be between 0.05 and 3600 seconds, got {self.metrics_refresh}")
        if not (0 <= self.lock_wait <= 86400):
            raise ValueError(f"lock wait must be between 0 and 86400 seconds, got {self.lock_wait}")
        if self.drain_batch < 1:
            raise ValueError(f"drain batch must be at least 1, got {self.drain_batch}")
        if not (0 <= self.drain_pause <= 3600):
            raise ValueError(f"drain pause must be between 0 and 3600 seconds, got {self.drain_pause}")
        if self.cluster:
            from .cluster.config import validate_cluster
            validate_cluster(self)
        if self.store not in ("log", "memory"):
            raise ValueError(f"store must be 'log' or 'memory', not {self.store!r}")
        self.log_config().validate()
        if self.segment_size < 4 * self.max_frame:
            raise ValueError(f"segment size ({self.segment_size}) must be at least 4x max frame ({self.max_frame}): "
                             "a segment holds whole messages")
        from .log import parse_levels
        parse_levels(self.log_level, self.log_levels)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate (tls_cert) and its key (tls_key)")
        if self.tls_cert:
            from .tls import server_context
            server_context(self.tls_cert, self.tls_key)

    def log_config(self):
        from _core.log import LogConfig
        return LogConfig(segment_size=self.segment_size, durability=self.durability,
                         interval_ms=self.flush_interval_ms, ttl_s=self.message_ttl,
                         max_pending=self.max_pending_per_recipient, dedup_window=self.dedup_window,
                         spares=self.log_spares, max_record=self.max_frame + 1024, recycle=self.log_recycle)
