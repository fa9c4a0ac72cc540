"""Log values for one-line `key=value` events (gateway/log.py has the line format)."""
import json


def q(value) -> str:
    """A log value: as it is when it is one plain word, else a JSON string."""
    if isinstance(value, tuple) and len(value) >= 2:      # a socket address
        value = f"{value[0]}:{value[1]}"
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)
