"""``lungnode train`` and ``lungnode model``: training runs and the models they produce
(:mod:`node.learn.runs`, :mod:`training.retrain`)."""

from __future__ import annotations

import typer

__all__ = ["model_app", "train_command"]

model_app = typer.Typer(help="Severity models: the shipped ones and the trained candidates.",
                        no_args_is_help=True, rich_markup_mode=None)


def train_command() -> None:
    """Train a candidate severity model on a frozen dataset."""
    raise NotImplementedError
