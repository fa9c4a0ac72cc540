"""Logging through picologging (the stdlib API in C): cheap enough that the
gateway can log every connection event; never per message on the hot path.

Every line is one event: `TIME level=L logger=NAME worker=W event=E key=value...`
(worker is the worker index, or `sup` for the supervisor). Values with spaces
or quotes are written with `q()` (JSON string quoting); a traceback is folded
into the same line. Levels: `log_level` for everything, `log_levels`
("switchboard.conn=DEBUG,switchboard.bus=WARNING") per component.
"""
import sys

import picologging as logging

from _core.logfmt import q  # noqa: F401  (re-exported: log.q(value) quotes a value with spaces)

# picologging 0.9 garbles %(asctime)s without a datefmt and ignores precision
# specifiers such as %(created).3f, so the time format is given explicitly.
FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s worker={worker} %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _OneLine(logging.Formatter):
    """A traceback stays on its event's line (` | ` between its lines)."""

    def format(self, record):
        return super().format(record).replace("\n", " | ")


def parse_levels(level: str, levels: str = "") -> dict:
    """{logger name: LEVEL} from `log_level` and `log_levels`; ValueError names what is wrong."""
    if level.upper() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    out = {"": level.upper()}
    for item in filter(None, (i.strip() for i in levels.split(","))):
        name, eq, lvl = item.partition("=")
        if not eq or not name.strip() or lvl.strip().upper() not in LEVELS:
            raise ValueError(f"log levels must be COMPONENT=LEVEL[,...] with LEVEL one of "
                             f"{', '.join(LEVELS)}, not {item!r}")
        out[name.strip()] = lvl.strip().upper()
    return out


class _Stderr(logging.StreamHandler):
    """stderr, where a line that cannot be written is lost, not raised: picologging
    raises the write's OSError into the caller, so a gateway whose log reader went
    away (a pipe to a process that exited) failed every HELLO it logged about and
    stopped opening sessions. Lost lines are counted (`log_lines_dropped_total`)."""
    dropped = 0

    def emit(self, record):
        try:
            super().emit(record)
        except OSError:
            _Stderr.dropped += 1


def dropped_lines() -> int:
    """Log lines this process could not write (metrics)."""
    return _Stderr.dropped


def setup(level: str = "INFO", levels: str = "", worker: str = "sup") -> None:
    handler = _Stderr(sys.stderr)
    handler.setFormatter(_OneLine(FORMAT.format(worker=worker), datefmt=DATEFMT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    for name, lvl in parse_levels(level, levels).items():
        (logging.getLogger(name) if name else root).setLevel(lvl)


def get(name: str):
    return logging.getLogger(name)
