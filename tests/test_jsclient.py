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
