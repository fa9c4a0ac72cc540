"""Settings: defaults < TOML file < SWITCHBOARD_* environment < flags, validation
messages naming the setting and its source (exit 2), and docs/configuration.md
listing every setting."""
import asyncio
import dataclasses
import subprocess
import sys

import pytest

from gateway.cli import build_parser, serve_flags
from gateway.config import GatewayConfig
from gateway.settings import SettingError, documented_table, env_name, fields, resolve, table

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def serve(*args, env=None, timeout=20):
    import os
    return subprocess.run([sys.executable, "-m", "gateway", "serve", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
                               **(env or {})})


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text('max_frame = 16384\nping_interval_ms = 1111\ndedup_window = 7\nws_origins = ["https://a.example"]\n')
    env = {"SWITCHBOARD_MAX_FRAME": "32768", "SWITCHBOARD_PING_INTERVAL_MS": "2222"}
    cfg = resolve({"max_frame": (131072, "flag --max-frame")}, env, str(f))
    assert (cfg.max_frame, cfg.ping_interval_ms, cfg.dedup_window) == (131072, 2222, 7)
    assert cfg.ws_origins == ("https://a.example",)
    assert cfg.hello_timeout == GatewayConfig.hello_timeout          # nobody set it: the default
    cfg = resolve({}, {"SWITCHBOARD_CONFIG": str(f), "SWITCHBOARD_SEGMENT_SIZE": "2M"})
    assert (cfg.max_frame, cfg.segment_size) == (16384, 2 << 20)


def test_precedence_in_a_running_gateway(gateway_factory, tmp_path):
    """What WELCOME advertises comes from the right layer; ws_port = "off" from the file alone."""
    f = tmp_path / "gw.toml"
    f.write_text('max_frame = 16384\nping_interval_ms = 1111\nws_port = "off"\n')
    gw = gateway_factory("--config", str(f), "--max-frame", "131072", "--workers", "1",
                         env={"SWITCHBOARD_MAX_FRAME": "32768", "SWITCHBOARD_PING_INTERVAL_MS": "2222"})
    assert gw.ws_port == -1

    async def main():
        async with gw.client("prec") as c:
            return c.welcome
    w = asyncio.run(asyncio.wait_for(main(), 20))
    assert (w.max_frame, w.ping_interval_ms) == (131072, 2222)


@pytest.mark.parametrize("source, args, env, expect", [
    ("file", ['max_frme = 4096'], {}, ["unknown setting 'max_frme'", "did you mean 'max_frame'"]),
    ("file", ['max_frame = "lots"'], {}, ["bad max_frame", "key max_frame", "not an integer"]),
    ("file", ['max_frame = 1.5'], {}, ["bad max_frame", "expected int"]),
    ("file", ['max_frame = 12'], {}, ["bad max_frame = 12 from config file", "between 1 KiB and 16 MiB"]),
    ("file", ['[section'], {}, ["not valid TOML"]),
    ("env", [], {"SWITCHBOARD_MAX_FRAME": "12"},
     ["bad max_frame = 12 from environment variable SWITCHBOARD_MAX_FRAME", "between 1 KiB"]),
    ("env", [], {"SWITCHBOARD_HELLO_TIMEOUT": "soon"}, ["SWITCHBOARD_HELLO_TIMEOUT", "not a number"]),
    ("env", [], {"SWITCHBOARD_STORE": "disk"}, ["bad store = 'disk' from environment variable", "'log' or"]),
    ("env", [], {"SWITCHBOARD_LOG_LEVELS": "switchboard.conn=LOUD"}, ["log_levels", "COMPONENT=LEVEL"]),
    ("flag", ["--pre-auth-max-frame", "10"], {}, ["bad pre_auth_max_frame = 10 from flag --pre-auth-max-frame"]),
    ("flag", ["--workers", "65"], {}, ["bad workers = 65 from flag --workers", "between 1 and 64"]),
    ("flag", ["--log-spares", "9"], {}, ["bad log_spares = 9 from flag --log-spares", "0 (only the reserve)"]),
    ("flag", ["--segment-size", "128K"], {}, ["bad segment_size = 131072 from flag", "between 256 KiB and 2 GiB"]),
    ("env", ["--segment-size", "256K"], {"SWITCHBOARD_MAX_FRAME": "128K"},
     ["bad segment_size = 262144 from flag --segment-size", "at least 4x max frame (131072)"]),
])
def test_bad_settings_are_refused_with_one_clear_line(tmp_path, source, args, env, expect):
    extra = list(args)
    if source == "file":
        (tmp_path / "bad.toml").write_text("\n".join(args) + "\n")
        extra = ["--config", tmp_path / "bad.toml"]
    r = serve("--port", "0", "--data-dir", tmp_path / "d", *extra, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("switchboard: "), r.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    assert "listening" not in r.stdout


def test_file_errors_name_the_file(tmp_path):
    r = serve("--port", "0", "--data-dir", tmp_path / "d", "--config", tmp_path / "missing.toml")
    assert r.returncode == 2 and "missing.toml" in r.stderr and "No such file" in r.stderr, r.stderr


def test_existing_flags_still_set_their_settings():
    args = build_parser().parse_args(["serve", "--max-pending", "5", "--ws-origin", "HTTPS://X.example/",
                                      "--ws-port", "off", "--segment-size", "4M", "--log-level", "DEBUG"])
    from gateway.cli import _FLAG_FIELDS
    got = {_FLAG_FIELDS.get(k, k): v for k, v in vars(args).items() if v is not None}
    assert got["max_pending_per_recipient"] == 5 and got["ws_port"] == -1 and got["segment_size"] == 4 << 20
    assert got["ws_origins"] == ["HTTPS://X.example/"] and got["log_level"] == "DEBUG"


def test_every_setting_has_a_flag_an_env_var_and_documentation():
    flags = serve_flags()
    names = [f.name for f in fields()]
    assert set(flags) == set(names), set(names) ^ set(flags)
    assert env_name("max_frame") == "SWITCHBOARD_MAX_FRAME"
    rows = [line for line in table(flags).splitlines()[2:]]
    undocumented = [n for n, row in zip(names, rows) if row.rstrip().endswith("|  |")]
    assert not undocumented, f"fields without a #: comment in gateway/config.py: {undocumented}"


def test_docs_list_every_setting():
    """docs/configuration.md's table is the one generated from GatewayConfig; after adding
    or changing a setting run `python -m gateway.settings --write-docs`."""
    doc = documented_table()
    for f in fields():
        assert f"| `{f.name}` |" in doc, f"docs/configuration.md does not list {f.name}"
    assert doc == table(serve_flags()), "docs/configuration.md is stale: python -m gateway.settings --write-docs"


def test_unknown_env_vars_with_the_prefix_are_not_settings():
    cfg = resolve({}, {"SWITCHBOARD_DEBUG": "1", "SWITCHBOARD_CODEC": "python"})
    assert dataclasses.asdict(cfg)["max_frame"] == GatewayConfig.max_frame
    with pytest.raises(SettingError, match="SWITCHBOARD_MAX_DEVICES"):
        resolve({}, {"SWITCHBOARD_MAX_DEVICES": "four"})
