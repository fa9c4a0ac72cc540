"""Two real headless Chromium pages (the gateway's own chat page) chat with
each other and with a Python SDK client through a 2-worker gateway: messages,
delivery and read ticks, presence and last seen, typing.

Uses Debian's chromium and chromium-driver (.ci/run installs them; nothing
downloads a browser). Skipped, with the reason, where they are missing.
"""
import asyncio
import os
import shutil
import threading
import uuid

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver")
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip("Debian's chromium and chromium-driver are not installed (bash .ci/run installs them)",
                allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 15


@pytest.fixture
def browsers():
    os.environ["SE_OFFLINE"] = "true"          # selenium-manager must not fetch anything
    started = []

    def open_page(url):
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1100,800", "--disable-extensions", "--no-first-run"):
            opts.add_argument(arg)
        d = webdriver.Chrome(service=Service(DRIVER), options=opts)
        started.append(d)
        d.get(url)
        return d
    yield open_page
    for d in started:
        d.quit()


class Loop:
    """An event loop in a thread for the SDK client, so the test can drive the
    browsers synchronously and the client at once."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=WAIT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait(d, what, cond):
    try:
        return WebDriverWait(d, WAIT, poll_frequency=0.05).until(lambda _: cond())
    except Exception:
        d.save_screenshot(f"/tmp/switchboard-browser-{what.replace(' ', '-')}.png")
        raise AssertionError(f"timed out waiting for {what}; page log: "
                             f"{d.get_log('browser') if hasattr(d, 'get_log') else ''}") from None


def login(d, token, device):
    d.find_element(By.ID, "login-token").send_keys(token)
    dev = d.find_element(By.ID, "login-device")
    dev.clear()
    dev.send_keys(device)
    d.find_element(By.ID, "login-button").click()
    wait(d, "login", lambda: d.execute_script(
        "return !document.getElementById('app').hidden && "
        "document.getElementById('conn-status').textContent === 'online';"))


def open_chat(d, peer):
    if has_contact(d, peer):
        d.execute_script("document.querySelector(`.contact[data-peer='${arguments[0]}']`).click();", peer)
    else:
        d.find_element(By.ID, "add-contact").send_keys(peer)
        d.find_element(By.ID, "add-contact-button").click()
    wait(d, f"chat with {peer}", lambda: d.execute_script("return document.getElementById('peer-name').textContent;")
         == peer)


def send(d, text):
    box = d.find_element(By.ID, "composer-input")
    box.send_keys(text)
    d.find_element(By.ID, "send-button").click()


# The page re-renders by replacing elements: read its state in one script call.
def state_of(d, text):
    """The tick state of this user's message with `text`, or None."""
    return d.execute_script(
        "for (const el of document.querySelectorAll('.msg.mine'))"
        "  if (el.querySelector('.text').textContent === arguments[0]) return el.dataset.state;"
        "return null;", text)


def texts(d):
    return d.execute_script("return [...document.querySelectorAll('.msg .text')].map(e => e.textContent);")


def status(d):
    return d.execute_script("return document.getElementById('peer-status').textContent;")


def has_contact(d, peer):
    return d.execute_script("return !!document.querySelector(`.contact[data-peer='${arguments[0]}']`);", peer)


def test_two_browsers_and_an_sdk_client_chat(gateway_factory, browsers):
    gw = gateway_factory("--workers", "2", "--store", "memory")
    tag = uuid.uuid4().hex[:6]
    alice, bob, carol = f"alice{tag}", f"bob{tag}", f"carol{tag}"
    url = f"http://{gw.host}:{gw.ws_port}/"
    pa, pb = browsers(url), browsers(url)
    login(pa, gw.token(alice), "chrome-a")
    login(pb, gw.token(bob), "chrome-b")

    # alice opens a chat with bob and sees him online
    open_chat(pa, bob)
    wait(pa, "bob online", lambda: status(pa) == "online")

    # alice -> bob: bob's page receives and acknowledges (delivered), then reads it (read)
    send(pa, "hello bob")
    wait(pa, "sent tick", lambda: state_of(pa, "hello bob") in ("sent", "delivered", "read"))
    wait(pb, "message in bob's list", lambda: has_contact(pb, alice))
    wait(pa, "delivered tick", lambda: state_of(pa, "hello bob") == "delivered")
    open_chat(pb, alice)
    wait(pb, "bob sees the text", lambda: "hello bob" in texts(pb))
    wait(pa, "read tick", lambda: state_of(pa, "hello bob") == "read")

    # bob types (alice sees it), then answers
    pb.find_element(By.ID, "composer-input").send_keys("typing a reply")
    wait(pa, "typing indicator", lambda: status(pa) == "typing…")
    pb.find_element(By.ID, "send-button").click()
    wait(pa, "bob's reply", lambda: "typing a reply" in texts(pa))
    wait(pb, "reply read by alice", lambda: state_of(pb, "typing a reply") == "read")

    # a Python SDK client (carol) talks with alice's page
    loop = Loop()
    try:
        c = gw.client(carol, "sdk")
        loop.run(c.connect())
        loop.run(c.subscribe(alice))
        p = loop.run(c.recv_presence(timeout=WAIT))
        assert (p.user, p.online) == (alice, True)
        sent = loop.run(c.send(alice, "hi from python"))
        wait(pa, "carol in alice's list", lambda: has_contact(pa, carol))
        r = loop.run(c.recv_receipt(timeout=WAIT))
        assert (r.kind, r.msg_id, r.by) == ("delivered", sent.id, alice)
        open_chat(pa, carol)
        wait(pa, "carol's text", lambda: "hi from python" in texts(pa))
        r = loop.run(c.recv_receipt(timeout=WAIT))
        assert (r.kind, r.msg_id, r.by) == ("read", sent.id, alice)
        wait(pa, "carol online", lambda: status(pa) == "online")
        send(pa, "hello python")
        m = loop.run(c.recv(timeout=WAIT))
        assert (m.sender, m.text, m.sender_device) == (alice, "hello python", "chrome-a")
        loop.run(c.ack(m))
        wait(pa, "delivered to carol", lambda: state_of(pa, "hello python") == "delivered")
        loop.run(c.read(m))
        wait(pa, "read by carol", lambda: state_of(pa, "hello python") == "read")
        loop.run(c.close())
    finally:
        loop.stop()
    wait(pa, "carol's last seen", lambda: status(pa).startswith("last seen"))

    # bob's page goes away: alice sees him offline with a last-seen time
    pb.quit()
    open_chat(pa, bob)
    wait(pa, "bob's last seen", lambda: status(pa).startswith("last seen"))


def test_ids_above_2_53_stay_exact_in_the_page_its_history_and_its_receipts(gateway_factory, browsers):
    """Ids are ms << 22 | worker << 16 | sequence; those made in the same millisecond
    as another need more than a double. A burst of them reaches the page, is
    acknowledged (RECEIVED) by exact id, survives a reload from the page's
    localStorage history, and is read (READ) by exact id; then the server holds
    nothing for the page's device."""
    gw = gateway_factory("--workers", "2")
    tag = uuid.uuid4().hex[:6]
    dana, sender, device = f"dana{tag}", f"pysender{tag}", "chrome-d"
    page = browsers(f"http://{gw.host}:{gw.ws_port}/")
    login(page, gw.token(dana), device)

    # the module's own id rule: exact strings in, rounded Numbers refused
    checks = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/switchboard.js').then(({ toU64 }) => {"
        "  let refused = '';"
        "  try { toU64(2 ** 53 + 2); } catch (e) { refused = e.name + ': ' + e.message; }"
        "  done([toU64('18446744073709551615').toString(), typeof toU64('7'), refused]);"
        "}).catch((e) => done(['failed', String(e)]));")
    assert checks[:2] == ["18446744073709551615", "bigint"]
    assert checks[2].startswith("TypeError: a u64 id must be a BigInt or a decimal string"), checks

    loop = Loop()
    try:
        c = gw.client(sender, "sdk")
        loop.run(c.connect())

        async def burst():
            return await asyncio.gather(*(c.send(dana, f"exact {i}") for i in range(20)))
        sent = sorted(r.id for r in loop.run(burst()))
        assert any(float(i) != i for i in sent), "no id in the burst needs more than a double"

        async def receipts(kind):
            got = set()
            while len(got) < len(sent):
                r = await c.recv_receipt(timeout=WAIT)
                if r.kind == kind:
                    assert r.by == dana
                    got.add(r.msg_id)
            return got
        # the page acknowledged every message by its exact id (a rounded one matches nothing)
        assert loop.run(receipts("delivered"), timeout=2 * WAIT) == set(sent)

        history = "return JSON.parse(localStorage.getItem(arguments[0]))[arguments[1]].msgs.map(m => m.id);"
        assert page.execute_script(history, f"sb:{dana}:history", sender) == [str(i) for i in sent]

        # a new page load: the history comes back from localStorage, resumes after the exact id
        page.refresh()
        wait(page, "logged in again", lambda: page.execute_script(
            "return document.getElementById('conn-status').textContent === 'online';"))
        wait(page, "the conversation from history", lambda: has_contact(page, sender))
        open_chat(page, sender)
        wait(page, "the burst on screen", lambda: texts(page) == [f"exact {i}" for i in range(20)])
        on_screen = page.execute_script("return [...document.querySelectorAll('.msg')].map(e => e.dataset.id);")
        assert on_screen == [str(i) for i in sent]
        # opening it sent READ with the ids read back from storage
        assert loop.run(receipts("read"), timeout=2 * WAIT) == set(sent)
        page.quit()

        async def nothing_held():
            async with gw.client(dana, device) as same_device:
                await same_device.ping()             # the PONG comes after any backlog
                with pytest.raises(asyncio.TimeoutError):
                    await same_device.recv(timeout=0.05)
        loop.run(nothing_held())
        loop.run(c.close())
    finally:
        loop.stop()


def test_ids_count_bytes_on_the_page(gateway_factory, browsers):
    """PROTOCOL.md section 1: ids are 1..255 bytes, not characters. The page takes a device
    name of 85 three-byte characters (255 bytes) and refuses 86, with a message; likewise a
    contact."""
    gw = gateway_factory("--workers", "1", "--store", "memory")
    user = "\u00fc" * 127 + "u"                                    # 255 bytes
    d = browsers(f"http://{gw.host}:{gw.ws_port}/")
    d.find_element(By.ID, "login-token").send_keys(gw.token(user))
    dev = d.find_element(By.ID, "login-device")
    dev.clear()
    dev.send_keys("\u20ac" * 86)                                   # 258 bytes
    d.find_element(By.ID, "login-button").click()
    wait(d, "device refused", lambda: "1..255 bytes" in d.find_element(By.ID, "login-error").text)
    assert d.find_element(By.ID, "app").get_attribute("hidden") is not None
    dev.clear()
    dev.send_keys("\u20ac" * 85)                                   # 255 bytes
    d.find_element(By.ID, "login-button").click()
    wait(d, "login", lambda: d.execute_script(
        "return !document.getElementById('app').hidden && "
        "document.getElementById('conn-status').textContent === 'online';"))
    assert d.find_element(By.ID, "me").text == f"{user} · {'€' * 85}"
    d.find_element(By.ID, "add-contact").send_keys("x" * 256)
    d.find_element(By.ID, "add-contact-button").click()
    wait(d, "contact refused", lambda: "1..255 bytes" in d.find_element(By.ID, "add-error").text)
    d.find_element(By.ID, "add-contact").clear()                  # the refused id stays for editing
    open_chat(d, "\u00e9" * 127 + "x")                           # 255 bytes: a chat opens
    assert d.find_element(By.ID, "add-error").text == ""
