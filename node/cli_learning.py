"""``lungnode dataset``, ``lungnode train`` and ``lungnode model``: frozen datasets, training runs
and the models they produce (:mod:`node.learn`, :mod:`training`)."""

from __future__ import annotations

import typer

__all__ = ["dataset_app", "model_app", "train_command"]

dataset_app = typer.Typer(help="Frozen datasets, the locked evaluation set, public-dataset importers.",
                          no_args_is_help=True, rich_markup_mode=None)
model_app = typer.Typer(help="Severity models: the shipped ones and the trained candidates.",
                        no_args_is_help=True, rich_markup_mode=None)


def train_command() -> None:
    """Train a candidate severity model on a frozen dataset."""
    raise NotImplementedError
