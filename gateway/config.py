"""Gateway settings with their defaults; every limit is a named setting here."""
import os
from dataclasses import dataclass, field

from _core.protocol import DEFAULT_MAX_FRAME, PRE_AUTH_MAX_FRAME

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7400


def default_data_dir() -> str:
    return os.environ.get("SWITCHBOARD_DATA_DIR", "switchboard-data")


@dataclass
class GatewayConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: str = field(default_factory=default_data_dir)
    workers: int = 1
    #: a connection that has not completed HELLO by then gets ERROR HELLO_TIMEOUT
    hello_timeout: float = 10.0
    #: largest frame after WELCOME (value of the length field); advertised to clients
    max_frame: int = DEFAULT_MAX_FRAME
    #: largest frame before WELCOME: a stranger can't make us buffer more
    pre_auth_max_frame: int = PRE_AUTH_MAX_FRAME
    ping_interval_ms: int = 30_000
    #: undelivered messages kept per recipient before senders get QUOTA_EXCEEDED
    max_pending_per_recipient: int = 10_000
    #: remembered client message ids per device, for dropping retried SENDs
    dedup_window: int = 4096
    #: SIGTERM: how long connections get to finish before they are cut
    shutdown_grace: float = 5.0
    #: GOAWAY reconnect hints are spread uniformly over this many ms
    reconnect_spread_ms: int = 5_000
    backlog: int = 4096
    log_level: str = "INFO"

    def validate(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.workers != 1:
            raise ValueError("--workers other than 1 is not supported yet: this release runs one "
                             "worker process (multi-worker sharding is the next milestone)")
        if self.hello_timeout <= 0:
            raise ValueError("hello timeout must be positive")
        if not (1024 <= self.max_frame <= 16 * 1024 * 1024):
            raise ValueError("max frame must be between 1 KiB and 16 MiB")
        if not (64 <= self.pre_auth_max_frame <= self.max_frame):
            raise ValueError("pre-auth max frame must be between 64 bytes and max frame")
