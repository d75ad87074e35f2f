"""Shared fixtures: databases (SQLite and PostgreSQL), configuration, real data."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from node.settings import Settings, load_settings

DATA = Path(__file__).resolve().parent / "data"
CT_STUDY = DATA / "ct" / "lung-pet-ct-dx-A0002"
B70F = CT_STUDY / "series-2-B70f"
B40F = CT_STUDY / "series-3-B40f"

PG_ADMIN_URL = os.environ.get("LUNGNODE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        with sa.create_engine(PG_ADMIN_URL).connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except sa.exc.OperationalError:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lungnode.db'}"
        return
    if not _pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}; the test command starts it")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_ADMIN_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 peers: list[dict[str, Any]] | None = None) -> Path:
    """Write a TOML configuration file the way an administrator would."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    for peer in peers or []:
        lines.append("[[peers]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in peer.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build a configuration file in tmp_path and load it with :func:`load_settings`."""

    def make(db: str, port: int = 0, peers: list[dict[str, Any]] | None = None,
             **sections: dict[str, Any]) -> Settings:
        base: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": "LUNGNODE", "host": "127.0.0.1", "port": port or 11112},
            "storage": {"root": "storage", "min_free_mb": 1, "fsync": False},
            "database": {"url": db},
            "completion": {"stable_seconds": 1.0, "poll_seconds": 0.2},
            "worker": {"count": 1, "lease_seconds": 30.0, "poll_seconds": 0.2, "warm_up": False},
            "delivery": {"poll_seconds": 0.2, "backoff_seconds": 0.5},
            "web": {"enabled": False},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return load_settings(write_config(tmp_path / "lungnode.toml", base, peers))

    return make


@pytest.fixture
def ct_copy(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a series of the real study into tmp_path (tests modify copies only)."""

    def copy(series: Path) -> Path:
        dest = tmp_path / "src" / series.name
        shutil.copytree(series, dest)
        return dest

    return copy
