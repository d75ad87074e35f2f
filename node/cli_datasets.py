"""``lungnode dataset``: frozen datasets, the locked evaluation set and the public-dataset importers
(:mod:`node.learn.datasets`, :mod:`node.learn.importers`)."""

from __future__ import annotations

import typer

__all__ = ["dataset_app"]

dataset_app = typer.Typer(help="Frozen datasets, the locked evaluation set, public-dataset importers.",
                          no_args_is_help=True, rich_markup_mode=None)
