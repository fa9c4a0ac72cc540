"""The web chat page and its assets (gateway/web/), served by the WebSocket
listener at `/`: loaded once per worker, answered from memory.

Every answer carries its content type, an ETag and `Cache-Control: no-cache`
(browsers revalidate and get 304 while nothing changed, so a new release is
picked up at once without re-downloading an unchanged page), `nosniff`, and
for the page a Content-Security-Policy that allows only our own scripts.
"""
import hashlib
from pathlib import Path

from .handshake import HttpReject, Request, response

WEB_DIR = Path(__file__).resolve().parent / "web"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".ico": "image/x-icon"}
CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; "
       "script-src 'self'; base-uri 'none'; frame-ancestors 'none'")


class WebFiles:
    """path -> (headers, body) for every file of the web directory."""

    def __init__(self, directory: Path = WEB_DIR):
        self.files: dict[str, tuple[list, bytes, str]] = {}
        if not directory.is_dir():
            return
        for f in sorted(directory.iterdir()):
            ctype = TYPES.get(f.suffix)
            if ctype is None or not f.is_file():
                continue
            body = f.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            headers = [("Content-Type", ctype), ("Cache-Control", "no-cache"), ("ETag", etag),
                       ("X-Content-Type-Options", "nosniff"), ("Connection", "close")]
            if f.suffix == ".html":
                headers += [("Content-Security-Policy", CSP), ("Referrer-Policy", "no-referrer")]
            self.files["/" + f.name] = (headers, body, etag)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]

    def answer(self, req: Request) -> bytes:
        """The response to a GET or HEAD of a file, or HttpReject (404, 405)."""
        entry = self.files.get(req.path)
        if entry is None:
            raise HttpReject(404, "not found")
        if req.method not in ("GET", "HEAD"):
            raise HttpReject(405, "only GET and HEAD are served", [("Allow", "GET, HEAD")])
        headers, body, etag = entry
        if etag in req.tokens("if-none-match"):
            return response(304, headers)
        out = response(200, headers, body)
        return out[:len(out) - len(body)] if req.method == "HEAD" else out
