"""``lungnode label``: the append-only label history of archived studies (:mod:`node.learn.labels`)."""

from __future__ import annotations

import typer

__all__ = ["label_app"]

label_app = typer.Typer(help="Severity labels of archived studies (append-only history).",
                        no_args_is_help=True, rich_markup_mode=None)
