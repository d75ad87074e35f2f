"""What every ``lungnode`` command shares: consoles, the ``--config`` option, settings and sessions.

The command modules (:mod:`node.cli` and the groups it adds: ``label``,
``dataset``, ``train``, ``model``) import these so that the settings are loaded
once per invocation and errors print alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from node.db import make_engine, make_session_factory
from node.errors import ConfigError
from node.migrate import upgrade
from node.redaction import redact_library_values
from node.settings import Settings, load_settings

__all__ = ["ConfigOpt", "State", "console", "err_console", "error", "sessions", "settings", "state",
           "use_config"]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file "
                                                "(default $LUNGNODE_CONFIG or config/lungnode.toml)")]


def error(message: str) -> None:
    """Print ``message`` in red on stderr exactly as written.

    Rich markup is off: the node's messages name configuration sections such as
    ``[dicom]`` and ``[[peers]]``, which markup would swallow as style tags.
    """
    err_console.print(message, style="red", markup=False, highlight=False)


class State:
    """The invocation's ``--config`` and the settings loaded from it."""

    config: Path | None = None
    settings: Settings | None = None


state = State()


def use_config(config: Path | None) -> None:
    """Take a command's own ``--config`` (it wins over the one given before the command)."""
    if config is not None:
        state.config = config
        state.settings = None


def settings() -> Settings:
    """The settings of this invocation, loaded once; exit code 2 with the reason when invalid."""
    if state.settings is None:
        try:
            state.settings = load_settings(state.config)
        except ConfigError as exc:
            error(f"configuration error: {exc}")
            raise typer.Exit(2) from exc
        logging.basicConfig(level=state.settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # ~20 INFO lines per result object
        redact_library_values()  # pydicom quotes invalid values (a malformed birth date) in its log
    return state.settings


def sessions() -> sessionmaker[Session]:
    """A session factory on the configured database, its schema brought to head first."""
    s = settings()
    upgrade(s.database.url)
    return make_session_factory(make_engine(s.database.url))
