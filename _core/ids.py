"""Which ids are legal: one rule for user, device and group ids (docs/PROTOCOL.md
section 1, "Ids").

An id is 1..255 bytes of UTF-8 in Unicode normalisation form C, without a
character of the general categories C (control, format, surrogate, private
use, unassigned) or Z (space, line and paragraph separators): no NUL, no space
or tab, no zero-width or bidirectional marks. That is `str.isprintable()` with
no space, judged by the server's Unicode database. Ids are compared byte for
byte, so they are case-sensitive. Group ids start with `#`; user ids may not.

Why: ids are keys. The log keys a device's inbox as ``user NUL device``, so a
NUL inside an id would name another user's inbox; and two ids that look the
same (a trailing space, a zero-width character, another normalisation of the
same letters) would be two users that nobody can tell apart.

The SEND path (`_core/_routing.pyx`) checks ASCII recipients in C and calls
`id_problem` only for the rest (about 0.2 us for a short non-ASCII id).
"""
import unicodedata

from .protocol import GROUP_PREFIX, MAX_ID_LENGTH


def id_problem(text: str) -> str | None:
    """Why `text` is not a legal id of any kind, or None if it is one."""
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "an id must be UTF-8 (it holds a lone surrogate)"
    if not 1 <= n <= MAX_ID_LENGTH:
        return f"an id is 1..{MAX_ID_LENGTH} bytes of UTF-8, not {n}"
    if not text.isprintable() or " " in text:          # categories C and Z (isprintable allows " ")
        bad = next(c for c in text if not c.isprintable() or c == " ")
        return f"an id may not contain {bad!r} (U+{ord(bad):04X}, {unicodedata.category(bad)})"
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        return "an id must be in Unicode normalisation form C (NFC)"
    return None


def user_id_problem(text: str) -> str | None:
    """Why `text` is not a legal user id, or None."""
    problem = id_problem(text)
    if problem is None and text.startswith(GROUP_PREFIX):
        problem = f"user ids may not start with {GROUP_PREFIX!r} (group ids do)"
    return problem


def group_id_problem(text: str) -> str | None:
    """Why `text` is not a legal group id, or None."""
    problem = id_problem(text)
    if problem is None and not text.startswith(GROUP_PREFIX):
        problem = f"group ids start with {GROUP_PREFIX!r}"
    return problem


def is_user_id(text: str) -> bool:
    return user_id_problem(text) is None
