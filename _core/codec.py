"""The codec in use: Cython (`_codec`) by default, the pure-Python reference
(`pycodec`) with SWITCHBOARD_CODEC=python. Both have the same API."""
import os

IMPLEMENTATION = os.environ.get("SWITCHBOARD_CODEC", "cython").lower()

if IMPLEMENTATION == "python":
    from .pycodec import Decoder, WriteBuffer, decode_body, encode, encode_into  # noqa: F401
elif IMPLEMENTATION == "cython":
    from ._codec import Decoder, WriteBuffer, decode_body, encode, encode_into  # noqa: F401
else:
    raise ImportError(f"SWITCHBOARD_CODEC must be 'cython' or 'python', not {IMPLEMENTATION!r}")
