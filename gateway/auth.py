"""Tokens: HMAC-SHA256 over user id, device id and expiry, keyed by the server secret.

Format (opaque to clients): ``sb1.<body>.<mac>``, both parts base64url without
padding; body = u8 len | user | u8 len | device | u64 expiry (Unix seconds,
big-endian); mac = HMAC-SHA256(secret, b"switchboard-token-v1\\0" + body).
An empty device means the token is valid for any device id the client names.
"""
import base64
import hashlib
import hmac
import os
import struct
import time
from pathlib import Path

from _core.ids import id_problem, user_id_problem
from _core.protocol import ErrorCode

_DOMAIN = b"switchboard-token-v1\0"
_PREFIX = "sb1."
SECRET_FILE = "secret"
SECRET_BYTES = 32


class AuthError(Exception):
    def __init__(self, reason: str, code: ErrorCode = ErrorCode.AUTH_FAILED):
        super().__init__(reason)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_secret(data_dir: str | os.PathLike) -> bytes:
    """The server secret in `data_dir/secret`, created (0600) on first start."""
    path = Path(data_dir) / SECRET_FILE
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        secret = os.urandom(SECRET_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:            # another process created it first
            return load_secret(data_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        return secret
    if len(secret) < 16:
        raise ValueError(f"{path} holds {len(secret)} bytes; a secret needs at least 16")
    return secret


def load_secret(data_dir: str | os.PathLike) -> bytes:
    path = Path(data_dir) / SECRET_FILE
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no server secret at {path}: start the server once with --data-dir {data_dir}, "
            "or pass --token") from None
    if len(secret) < 16:
        raise ValueError(f"{path} holds {len(secret)} bytes; a secret needs at least 16")
    return secret


def _check_id(kind: str, value: str, allow_empty: bool) -> bytes:
    """The id's bytes, or ValueError if it is not a legal id (_core/ids.py)."""
    if allow_empty and value == "":
        return b""
    problem = user_id_problem(value) if kind == "user" else id_problem(value)
    if problem is not None:
        raise ValueError(f"not a legal {kind} id: {value!r}: {problem}")
    return value.encode("utf-8")


class TokenAuthority:
    """Issues and verifies tokens with one server secret."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, _DOMAIN + body, hashlib.sha256).digest()

    def issue(self, user: str, device: str = "", ttl: float = 86400, now: float | None = None) -> str:
        u = _check_id("user", user, False)
        d = _check_id("device", device, True)
        expiry = int((time.time() if now is None else now) + ttl)
        body = bytes([len(u)]) + u + bytes([len(d)]) + d + struct.pack("!Q", max(expiry, 0))
        return _PREFIX + _b64(body) + "." + _b64(self._mac(body))

    @staticmethod
    def claimed_user(token: str) -> str | None:
        """The user a token names, NOT verified (None if it names none): enough to
        choose the worker a connection goes to; that worker verifies it (grant)."""
        if not token.startswith(_PREFIX):
            return None
        body_text = token[len(_PREFIX):].partition(".")[0]
        try:
            body = _unb64(body_text)
            return body[1:1 + body[0]].decode("utf-8") or None
        except (ValueError, TypeError, IndexError, UnicodeDecodeError):
            return None

    def verify(self, token: str, device: str, now: float | None = None) -> tuple[str, str]:
        """(user, device) the token grants, or AuthError."""
        return self.grant(token, device, now)[:2]

    def grant(self, token: str, device: str, now: float | None = None) -> tuple[str, str, int]:
        """(user, device, expiry in Unix seconds) the token grants, or AuthError.
        A session opened with it ends at the expiry (gateway/limits.py)."""
        if not token.startswith(_PREFIX) or token.count(".") != 2:
            raise AuthError("malformed token")
        body_text, mac_text = token[len(_PREFIX):].split(".")
        try:
            body = _unb64(body_text)
            mac = _unb64(mac_text)
        except (ValueError, TypeError):
            raise AuthError("malformed token") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise AuthError("bad token signature")
        try:
            ulen = body[0]
            user = body[1:1 + ulen].decode("utf-8")
            dlen = body[1 + ulen]
            bound = body[2 + ulen:2 + ulen + dlen].decode("utf-8")
            (expiry,) = struct.unpack_from("!Q", body, 2 + ulen + dlen)
        except (IndexError, UnicodeDecodeError, struct.error):
            raise AuthError("malformed token") from None
        if not user or len(body) != 2 + ulen + dlen + 8:     # as issue() makes them: a user id, nothing after
            raise AuthError("malformed token")
        problem = user_id_problem(user)
        if problem is not None:           # a token made before the id rule, or by another issuer
            raise AuthError(f"the token's user is not a legal user id: {problem}")
        if expiry <= (time.time() if now is None else now):
            raise AuthError("token expired", ErrorCode.TOKEN_EXPIRED)
        if bound and bound != device:
            raise AuthError(f"token is for device {bound!r}, not {device!r}")
        return user, device, expiry
