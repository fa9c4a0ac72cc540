"""TLS for the listeners and the clients (stdlib `ssl`; uvloop runs the handshake).

The server context is made once per worker and kept: a reload (SIGHUP) first
loads the new certificate and key into a fresh context, so a bad pair is
refused with the old one still in place, and only then into the live context,
where it applies to connections accepted from then on (OpenSSL copies the
certificate into each connection when it is made: open connections keep theirs).
"""
import ssl

from . import log

_log = log.get("switchboard.tls")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context with `cert` (PEM chain) and `key`; ValueError saying which file is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, cert, key)
    return ctx


def _load(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"TLS: no such file: {exc.filename}") from None
    except PermissionError as exc:
        raise ValueError(f"TLS: cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise ValueError(f"TLS: cannot load certificate {cert} with key {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise ValueError(f"TLS: cannot load certificate {cert} with key {key}: {exc}") from None


def client_context(ca: str | None = None) -> ssl.SSLContext:
    """A client context verifying the server against `ca` (a PEM file), or the system's CAs."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Reloader:
    """The worker's live server context and how to refresh it from the files."""

    def __init__(self, cert: str, key: str, worker: int):
        self.cert, self.key, self.worker = cert, key, worker
        self.context = server_context(cert, key)
        self.reloads = 0

    def reload(self) -> bool:
        try:
            _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self.cert, self.key)   # refuse a bad pair first
            _load(self.context, self.cert, self.key)
        except ValueError as exc:
            _log.error("event=tls_reload_failed cert=%s action=kept_old error=%s", log.q(self.cert), log.q(exc))
            return False
        self.reloads += 1
        _log.info("event=tls_reloaded cert=%s reloads=%d", log.q(self.cert), self.reloads)
        return True


class _Pipe:
    """One direction of a relay: what one transport reads, the other writes
    (the reader pauses while the writer's buffer is full)."""

    def __init__(self, out=None):
        self.out = out            # the transport written to
        self.transport = None     # our own

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.out.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self.out is not None and not self.out.is_closing():
            self.out.close()

    def pause_writing(self):
        self.out.pause_reading()

    def resume_writing(self):
        if not self.out.is_closing():
            self.out.resume_reading()


async def relay(loop, tls_transport, near) -> None:
    """A TLS connection handed to another worker: relay its plaintext to and from
    the socket pair whose other end that worker serves, until either side closes."""
    try:
        plain, back = await loop.connect_accepted_socket(lambda: _Pipe(tls_transport), near)
    except OSError as exc:
        _log.info("event=relay_failed error=%s", log.q(exc))
        near.close()
        tls_transport.abort()
        return
    if tls_transport.is_closing():
        plain.close()
        return
    tls_transport.set_protocol(_Pipe(plain))
    tls_transport.get_protocol().transport = tls_transport
    back.transport = plain
    tls_transport.resume_reading()
