"""A hostile load for tests/test_limits.py, run as its own process:

    python tests/attack.py HOST PORT SECONDS GARBAGE_IP SLOWLORIS_IP SLOWLORIS_CONNS

- garbage flood: connections from GARBAGE_IP, each sending a burst of random
  bytes and closing, as fast as the server lets it (refusals included);
- slowloris: SLOWLORIS_CONNS connections from SLOWLORIS_IP, each sending one
  byte of a HELLO every 2 s, never finishing it; replaced when the server cuts them.

Everything stops after SECONDS. Prints `attack: garbage=N slowloris=M` at the end
(connections made), and `attack: started` once both are under way.
"""
import os
import selectors
import socket
import sys
import time


def main() -> int:
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    garbage_ip, slow_ip, slow_n = sys.argv[4], sys.argv[5], int(sys.argv[6])
    end = time.monotonic() + seconds
    sel = selectors.DefaultSelector()
    slow: dict[socket.socket, float] = {}
    made_garbage = made_slow = 0
    hello_start = b"\x00\x00\x00\x40\x01\x00\x00\x01"      # a HELLO header and the first body bytes, dribbled

    def open_slow():
        nonlocal made_slow
        s = socket.socket()
        s.setblocking(False)
        s.bind((slow_ip, 0))
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        slow[s] = time.monotonic() + 2.0
        sel.register(s, selectors.EVENT_READ)
        made_slow += 1

    for _ in range(slow_n):
        open_slow()
    print("attack: started", flush=True)
    sent_at: dict[socket.socket, int] = {}
    while time.monotonic() < end:
        # garbage: a handful of short connections per round
        for _ in range(20):
            g = socket.socket()
            g.settimeout(0.2)
            try:
                g.bind((garbage_ip, 0))
                g.connect((host, port))
                g.send(os.urandom(512))
                made_garbage += 1
            except OSError:
                pass
            finally:
                g.close()
        # slowloris: one more byte every 2 s; reconnect what the server closed
        for key, _ in sel.select(timeout=0.01):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                del slow[s]
                sent_at.pop(s, None)
                open_slow()
        now = time.monotonic()
        for s, due in list(slow.items()):
            if now >= due:
                i = sent_at.get(s, 0)
                try:
                    s.send(hello_start[i % len(hello_start):i % len(hello_start) + 1])
                except OSError:
                    pass
                sent_at[s] = i + 1
                slow[s] = now + 2.0
    for s in slow:
        s.close()
    print(f"attack: garbage={made_garbage} slowloris={made_slow}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
