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

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import Delivery, DeliveryState, ResultObject, Study

__all__ = ["WebServer", "delivery_rows", "study_rows"]

logger = logging.getLogger(__name__)


def study_rows(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """Studies, newest first, with delivery counts (what ``lungnode studies`` shows)."""
    counts: dict[tuple[int, str], int] = {}
    for study_id, state, n in session.execute(
        select(ResultObject.study_id, Delivery.state, func.count())
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .group_by(ResultObject.study_id, Delivery.state)
    ):
        counts[(study_id, state.value)] = n
    rows = []
    for st in session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)):
        rows.append({
            "id": st.id, "study_instance_uid": st.study_instance_uid, "state": st.state.value,
            "reason": st.reason or "", "instances": st.instance_count,
            "last_received_at": st.last_received_at.isoformat(timespec="seconds"),
            "result_version": st.result_version,
            "deliveries": {s.value: counts.get((st.id, s.value), 0) for s in DeliveryState},
            "selection_reason": st.selection_reason or "",
        })
    return rows


def delivery_rows(session: Session, limit: int = 500) -> list[dict[str, Any]]:
    rows = []
    for d, obj, uid in session.execute(
        select(Delivery, ResultObject, Study.study_instance_uid)
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .join(Study, Study.id == ResultObject.study_id)
        .order_by(Delivery.id.desc()).limit(limit)
    ):
        rows.append({
            "id": d.id, "study_instance_uid": uid, "kind": obj.kind, "version": obj.version,
            "destination": d.destination, "state": d.state.value, "attempts": d.attempts,
            "next_attempt_at": d.next_attempt_at.isoformat(timespec="seconds"),
            "last_error": d.last_error or "",
        })
    return rows


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
.failed,.dead,.rejected{{background:#fdd}}.complete,.sent{{background:#dfd}}</style></head>
<body><h1>lungnode</h1><h2>Studies</h2><table><tr><th>id</th><th>Study UID</th><th>state</th>
<th>instances</th><th>version</th><th>last instance</th><th>deliveries</th><th>reason</th></tr>
{srows}</table><h2>Deliveries</h2><table><tr><th>id</th><th>Study UID</th><th>object</th>
<th>version</th><th>destination</th><th>state</th><th>attempts</th><th>next attempt</th>
<th>last error</th></tr>{drows}</table>
<p>Retry a dead delivery with <code>lungnode deliveries retry ID</code>.</p></body></html>"""


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
