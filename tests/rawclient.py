"""A raw-socket test client: sends bytes, reads decoded frames (for what the SDK hides)."""
import collections
import socket
import struct

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION
from _core.pycodec import Decoder, decode_body, encode


class SocketClient:
    """Owns `self.sock`: close() and use as a context manager (shared by the raw test clients)."""

    sock: socket.socket

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


class Raw(SocketClient):
    """A blocking TCP client that speaks bytes and reads decoded frames."""

    def __init__(self, gw, timeout: float = 5.0, nodelay: bool = False):
        self.sock = socket.create_connection((gw.host, gw.port), timeout=timeout)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.frames = collections.deque()
        self.decoder = Decoder(self._sink, 1 << 24)
        self.closed = False

    def _sink(self, ftype, flags, body):
        self.frames.append(decode_body(ftype, flags, body))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        """One read; EOF or a reset marks the connection closed by the server.
        A socket timeout propagates."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
        else:
            self.decoder.feed(data)

    def frame(self):
        """The next frame; fails if the server closes first or nothing comes in time."""
        while not self.frames:
            assert not self.closed, "server closed the connection while a frame was expected"
            self._read()
        return self.frames.popleft()

    def until_eof(self):
        """Every frame up to EOF: (frames, server_closed). Stops at the socket timeout."""
        try:
            while not self.closed:
                self._read()
        except (socket.timeout, TimeoutError):
            pass
        out = list(self.frames)
        self.frames.clear()
        return out, self.closed

    def hello(self, token: str, device: str = "raw", resume_after: int = 0, producer: int = 0,
              send_only: bool = False) -> F.Welcome:
        self.send(encode(F.Hello(PROTOCOL_VERSION, token, device, resume_after, send_only, producer)))
        w = self.frame()
        assert isinstance(w, F.Welcome), w
        return w

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0), like a crashed client."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
