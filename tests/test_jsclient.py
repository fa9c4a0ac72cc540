"""The web page's protocol client (gateway/web/switchboard.js) against a real gateway,
run by Node with its WebSocket (no browser needed): ids count bytes (PROTOCOL.md
sections 1 and 2), GROUP requests fit in one frame and GROUP_INFO answers in several
frames are joined (section 3), SUBSCRIBE frames of long ids fit in max_frame.
Skipped, with the reason, where Node is missing."""
import json
import shutil
import subprocess

import pytest

from conftest import ROOT

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")


def member_id(i: int) -> str:
    u = f"j{i:03d}" + ("\u20ac" * 83 + "xy" if i % 2 else "y" * 251)
    assert len(u.encode()) == 255
    return u


def test_js_client_long_ids_and_group_answers_in_pieces(gateway_factory):
    gw = gateway_factory("--workers", "2", "--max-frame", "1024", "--pre-auth-max-frame", "1024",
                         "--store", "memory")
    owner = "\u00fc" * 127 + "o"                           # 255 bytes
    device = "\u20ac" * 85                                 # 255 bytes
    members = [member_id(i) for i in range(30)]
    r = subprocess.run([NODE, "--experimental-websocket", "--no-warnings", str(ROOT / "tests/js/ids_and_groups.mjs"),
                        str(ROOT / "gateway/web/switchboard.js"), f"ws://{gw.host}:{gw.ws_port}/ws",
                        gw.token(owner), device, *members], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["idProblems"] == [True, False, True, False, True]
    assert out["longDevice"] == "RangeError"
    assert out["welcome"] == {"user": owner, "device": device, "maxFrame": 1024}
    assert out["tooBig"] == "RangeError"
    assert out["afterAdds"] == 31
    assert out["info"] == {"group": "#js-group", "name": "\u00e9" * 127 + "x",
                           "members": {owner: "admin", **{m: "member" for m in members}}}
    assert out["presences"] == len(members) and out["connected"] is True


def test_js_client_url_lists_fail_over_and_follow_redirects(gateway_proc, dead_port, redirector):
    """Seeds in turn (a dead one skipped, with and without reconnect), a REDIRECT followed
    at once to ws://HOST:PORT/ws keeping scheme and path with the outbox kept, the third
    REDIRECT in a row not followed (PROTOCOL.md section 3, GOAWAY)."""
    gw = gateway_proc
    redirecting, b1, b2 = redirector(gw), redirector(gw), redirector(gw)
    live = f"ws://{gw.host}:{gw.ws_port}/ws"
    redirecting.send_to("unused:1", f"{gw.host}:{gw.ws_port}")
    b1.send_to("unused:1", f"{b2.host}:{b2.ws_port}")
    b2.send_to("unused:1", f"{b1.host}:{b1.ws_port}")
    dead = f"ws://127.0.0.1:{dead_port}/ws"
    urls = [dead, live, f"ws://{redirecting.host}:{redirecting.ws_port}/ws", f"ws://{b1.host}:{b1.ws_port}/ws"]
    r = subprocess.run([NODE, "--experimental-websocket", "--no-warnings", str(ROOT / "tests/js/seeds.mjs"),
                        str(ROOT / "gateway/web/switchboard.js"), *urls, gw.token("jsuser")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["maxRedirects"] == 3
    assert out["once"] == {"url": live, "hops": [dead, live], "acked": True}
    assert out["again"] == {"url": live, "hops": [dead, dead, live], "acked": True}
    assert out["redirected"] == {"url": live, "hops": [urls[2], live], "acked": True}
    b1_url, b2_url = urls[3], f"ws://{b2.host}:{b2.ws_port}/ws"
    assert out["bounced"] == {"url": live, "hops": [b1_url, b2_url, b1_url, live], "acked": True}
    assert out["single"] == {"url": live, "hops": [live], "acked": True}
    assert (redirecting.redirects(), b1.redirects(), b2.redirects()) == (1, 2, 1)
