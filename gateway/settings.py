"""Where a gateway's settings come from: defaults < TOML file < environment < flags.

Generic over the fields of `GatewayConfig`: a field `max_frame` is the TOML key
`max_frame`, the variable `SWITCHBOARD_MAX_FRAME` and the `serve` flag
`--max-frame` (cli.py adds a flag for every field that has none by hand). Its
documentation is the `#:` comment above the field; docs/configuration.md is
generated from all of that (`python -m gateway.settings --write-docs`).

A bad value is refused at start with one line naming the setting, the value and
where it came from (`SettingError`; `switchboard serve` exits 2).
"""
import ast
import dataclasses
import difflib
import inspect
import os
import sys
import tomllib
import types
import typing
from pathlib import Path

from .config import GatewayConfig

ENV_PREFIX = "SWITCHBOARD_"
#: fields that are not settings (the supervisor sets them per worker)
INTERNAL = {"worker_index"}
#: environment variables with the prefix that are not settings
NOT_SETTINGS = {"SWITCHBOARD_CONFIG", "SWITCHBOARD_DEBUG", "SWITCHBOARD_CODEC"}
#: defaults computed at start, as the documentation shows them
DEFAULT_TEXT = {"workers": "number of cores", "data_dir": "`switchboard-data`"}
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class SettingError(ValueError):
    """A bad setting: one line naming it, its value and its source."""


def fields() -> list:
    return [f for f in dataclasses.fields(GatewayConfig) if f.name not in INTERNAL]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def docs() -> dict:
    """field name -> its `#:` comment (or `metadata["doc"]`)."""
    out = {}
    tree = ast.parse(inspect.getsource(GatewayConfig))
    lines = inspect.getsource(GatewayConfig).splitlines()
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                comment.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if comment:
                out[node.target.id] = " ".join(comment)
    for f in dataclasses.fields(GatewayConfig):
        if "doc" in f.metadata:
            out[f.name] = f.metadata["doc"]
    return out


def _kind(f) -> type:
    """The base type of a field: int, float, bool, str or tuple (X | None -> X)."""
    t = f.type
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    t = typing.get_origin(t) or t
    return tuple if t in (tuple, list) else t


def _int(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in SIZE_UNITS:
        return int(float(t[:-1]) * SIZE_UNITS[t[-1]])
    return int(t)


def parse_text(f, text: str):
    """A setting's value from text (environment; TOML strings for numbers)."""
    kind = _kind(f)
    if f.name in ("ws_port", "admin_port") and text.strip().lower() == "off":
        return -1
    if kind is bool:
        low = text.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"not a boolean: {text!r} (true/false)")
        return low in ("1", "true", "yes", "on")
    if kind is int:
        try:
            return _int(text)
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
    if kind is tuple:
        return tuple(filter(None, (i.strip() for i in text.split(","))))
    return text


def parse_toml(f, value):
    """A setting's value from a TOML value (type checked; strings parsed like the environment's)."""
    kind = _kind(f)
    if isinstance(value, str) and kind is not str:
        return parse_text(f, value)
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (list,)}.get(kind, (object,))
    if not isinstance(value, ok) or (kind in (int, float) and isinstance(value, bool)):
        raise ValueError(f"expected {'a list' if kind is tuple else kind.__name__}, got {value!r}")
    if kind is tuple:
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return tuple(value)
    return float(value) if kind is float else value


def load_file(path: str) -> dict:
    """{field: (value, source)} from a TOML file; unknown keys are errors (with a did-you-mean)."""
    try:
        with open(path, "rb") as fp:
            data = tomllib.load(fp)
    except OSError as exc:
        raise SettingError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"config file {path}: not valid TOML: {exc}") from None
    known = {f.name: f for f in fields()}
    out = {}
    for key, value in data.items():
        source = f"config file {path}, key {key}"
        f = known.get(key)
        if f is None:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else " (docs/configuration.md lists the settings)"
            raise SettingError(f"unknown setting {key!r} in config file {path}{hint}")
        try:
            out[key] = (parse_toml(f, value), source)
        except ValueError as exc:
            raise SettingError(f"bad {key} in {source}: {exc}") from None
    return out


def load_env(environ) -> dict:
    out = {}
    for f in fields():
        name = env_name(f.name)
        if name in environ:
            try:
                out[f.name] = (parse_text(f, environ[name]), f"environment variable {name}")
            except ValueError as exc:
                raise SettingError(f"bad {f.name} in environment variable {name}: {exc}") from None
    return out


def resolve(flags: dict, environ=None, config_file: str | None = None) -> GatewayConfig:
    """The gateway's settings: defaults < file < environment < `flags` ({field: (value, source)}),
    validated; SettingError names the first bad setting and where its value came from."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("SWITCHBOARD_CONFIG") or None
    chosen = {}
    if config_file:
        chosen.update(load_file(config_file))
    chosen.update(load_env(environ))
    chosen.update(flags)
    if chosen.get("port", (None,))[0] == 0:          # a test gateway: every listener on a free port
        for name in ("ws_port", "admin_port"):
            if name not in chosen:
                chosen[name] = (0, "--port 0")
    cfg = GatewayConfig(**{k: v for k, (v, _) in chosen.items()})
    try:
        cfg.validate()
    except ValueError as exc:
        raise SettingError(_blame(chosen, exc)) from None
    return cfg


def _blame(chosen: dict, exc: ValueError) -> str:
    """Which chosen value the validation error is about: the last one (flags before the
    environment before the file) without which the error goes away or changes."""
    values = {k: v for k, (v, _) in chosen.items()}
    for name in reversed(chosen):
        try:
            GatewayConfig(**{k: v for k, v in values.items() if k != name}).validate()
        except ValueError as err:
            if str(err) == str(exc):
                continue
        value, source = chosen[name]
        return f"bad {name} = {value!r} from {source}: {exc}"
    return f"bad settings: {exc}"


# -- documentation -------------------------------------------------------------------------

def table(flags: dict) -> str:
    """The settings table of docs/configuration.md; `flags`: field -> its serve flag."""
    doc = docs()
    rows = ["| setting (TOML key) | environment | flag | default | meaning |", "|---|---|---|---|---|"]
    for f in fields():
        if f.name in DEFAULT_TEXT:
            default = DEFAULT_TEXT[f.name]
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = f"`{value!r}`" if not isinstance(value, str) else (f'`"{value}"`' if value else '`""`')
        meaning = doc.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{env_name(f.name)}` | `{flags.get(f.name, '-')}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


BEGIN, END = "<!-- settings table: generated by python -m gateway.settings --write-docs -->", "<!-- end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def documented_table() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"


def main(argv=None) -> int:
    from .cli import serve_flags
    t = table(serve_flags())
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--write-docs"]:
        text = DOC.read_text()
        DOC.write_text(text[:text.index(BEGIN) + len(BEGIN)] + "\n" + t + text[text.index(END):])
        return 0
    print(t, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
