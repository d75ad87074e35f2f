"""Configuration: TOML file, environment overrides, relative paths, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.errors import ConfigError
from node.settings import default_config_path, load_settings
from tests.conftest import write_config


def test_default_config_file_loads_with_documented_defaults() -> None:
    s = load_settings(default_config_path())
    assert s.dicom.ae_title == "LUNGNODE"
    assert s.dicom.port == 11112
    assert s.completion.stable_seconds == 10.0
    assert s.database.url.startswith("sqlite:////")
    root = default_config_path().resolve().parent.parent
    assert s.storage.root == root / "var" / "storage"


def test_environment_overrides_file_and_paths_are_relative_to_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    cfg = write_config(tmp_path / "etc" / "n.toml",
                       {"dicom": {"port": 4000, "ae_title": "FILEAET"},
                        "storage": {"root": "data"},
                        "database": {"url": "sqlite:///db/x.db"},
                        "delivery": {"destinations": ["pacs"]}},
                       [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}])
    monkeypatch.setenv("LUNGNODE_DICOM__PORT", "4001")
    monkeypatch.setenv("LUNGNODE_COMPLETION__STABLE_SECONDS", "2.5")
    s = load_settings(cfg)
    assert s.dicom.port == 4001
    assert s.dicom.ae_title == "FILEAET"
    assert s.completion.stable_seconds == 2.5
    assert s.storage.root == tmp_path / "etc" / "data"
    assert s.database.url == f"sqlite:///{tmp_path / 'etc' / 'db' / 'x.db'}"
    assert s.peer("pacs").port == 4242


@pytest.mark.parametrize(("sections", "peers", "message"), [
    ({"dicom": {"port": 70000}}, None, "port"),
    ({"dicom": {"ae_title": "A" * 17}}, None, "AE title"),
    ({"dicom": {"unknown_key": 1}}, None, "unknown_key"),
    ({"delivery": {"destinations": ["nowhere"]}}, None, "nowhere"),
])
def test_invalid_configuration_is_refused_with_a_message(
        tmp_path: Path, sections: dict, peers: list | None, message: str) -> None:
    cfg = write_config(tmp_path / "bad.toml", sections, peers)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_missing_file_and_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "broken.toml"
    bad.write_text("[dicom\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_unknown_peer_name_is_a_config_error(tmp_path: Path) -> None:
    s = load_settings(write_config(tmp_path / "c.toml", {}))
    with pytest.raises(ConfigError, match="no peer named 'pacs'"):
        s.peer("pacs")


def test_the_readme_peers_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment example in the README's Configuration section works as written."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "LUNGNODE_PEERS=" in ln)
    assigned = dict(re.findall(r"(LUNGNODE_\w+)='([^']*)'", line))
    assert "LUNGNODE_PEERS" in assigned
    for name, value in assigned.items():
        monkeypatch.setenv(name, value)
    s = load_settings(default_config_path())
    assert [p.name for p in s.peers] == ["pacs"]
    assert s.delivery.destinations == ["pacs"]
    assert s.peer("pacs").port == 104
