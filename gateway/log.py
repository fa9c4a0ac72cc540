"""Logging through picologging (the stdlib API in C): cheap enough that the
gateway can log every connection event; never per message on the hot path."""
import sys

import picologging as logging

# picologging 0.9 garbles %(asctime)s without a datefmt and ignores precision
# specifiers such as %(created).3f, so the time format is given explicitly.
FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATEFMT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get(name: str):
    return logging.getLogger(name)
