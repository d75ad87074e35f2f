"""The administrator's web application (:mod:`node.web.app`)."""

from node.web.app import WebServer

__all__ = ["WebServer"]
