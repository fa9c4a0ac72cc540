"""Logging through picologging (the stdlib API in C): cheap enough that the
gateway can log every connection event; never per message on the hot path."""
import sys

import picologging as logging

# picologging 0.9 garbles %(asctime)s; epoch seconds are unambiguous anyway
FORMAT = "ts=%(created).3f level=%(levelname)s logger=%(name)s %(message)s"


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get(name: str):
    return logging.getLogger(name)
