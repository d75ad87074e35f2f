"""A small read-only web page for administrators: studies, states, deliveries.

Served by the standard library on ``[web] host:port`` (127.0.0.1 by default;
put a reverse proxy with authentication in front before exposing it).
``/`` is the HTML page, ``/api/studies`` and ``/api/deliveries`` the same as JSON.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from node.work.views import delivery_rows, study_rows

__all__ = ["WebServer"]

logger = logging.getLogger(__name__)


def _page(studies: list[dict[str, Any]], deliveries: list[dict[str, Any]]) -> str:
    def cell(v: object) -> str:
        return f"<td>{html.escape(str(v))}</td>"

    srows = "".join(
        "<tr class='{}'>".format(html.escape(s["state"]))
        + "".join(cell(s[k]) for k in ("id", "study_instance_uid", "state", "instances",
                                       "result_version", "last_received_at"))
        + cell(", ".join(f"{k} {v}" for k, v in s["deliveries"].items() if v))
        + cell(s["reason"]) + "</tr>" for s in studies)
    drows = "".join(
        "<tr class='{}'>".format(html.escape(d["state"]))
        + "".join(cell(d[k]) for k in ("id", "study_instance_uid", "kind", "version",
                                       "destination", "state", "attempts", "next_attempt_at",
                                       "last_error")) + "</tr>" for d in deliveries)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lungnode</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}
.failed,.dead,.rejected,.delivery-failed{{background:#fdd}}
.complete,.sent,.delivered{{background:#dfd}}.delivering,.pending{{background:#ffd}}</style></head>
<body><h1>lungnode</h1><h2>Studies</h2><table><tr><th>id</th><th>Study UID</th><th>state</th>
<th>instances</th><th>version</th><th>last instance</th><th>deliveries</th><th>reason</th></tr>
{srows}</table><h2>Deliveries</h2><table><tr><th>id</th><th>Study UID</th><th>object</th>
<th>version</th><th>destination</th><th>state</th><th>attempts</th><th>next attempt</th>
<th>last error</th></tr>{drows}</table>
<p>Retry a dead delivery with <code>lungnode deliveries retry ID</code>, all of them with
<code>lungnode deliveries retry --dead</code>, a destination's with
<code>lungnode deliveries retry --destination NAME</code>.</p></body></html>"""


class WebServer:
    """The page in a background thread."""

    def __init__(self, host: str, port: int, sessions: sessionmaker[Session]) -> None:
        sessions_ = sessions

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                with sessions_() as session:
                    if self.path.startswith("/api/studies"):
                        body, ctype = json.dumps(study_rows(session)), "application/json"
                    elif self.path.startswith("/api/deliveries"):
                        body, ctype = json.dumps(delivery_rows(session)), "application/json"
                    elif self.path in ("/", "/index.html"):
                        body = _page(study_rows(session), delivery_rows(session, 100))
                        ctype = "text/html; charset=utf-8"
                    else:
                        self.send_error(404)
                        return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                logger.debug("web: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="web")

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        logger.info("web page on http://%s:%d/", *self._httpd.server_address[:2])

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
