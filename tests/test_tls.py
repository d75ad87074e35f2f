"""DICOM TLS (PS3.15 Annex B) against DCMTK built with OpenSSL: the node's TLS listener and its
TLS deliveries, with certificates made here by the ``openssl`` command (the README's commands).

A sender with a client certificate signed by the node's CA is stored and catalogued; one with
none, an untrusted one, or no TLS at all is refused and recorded, nothing stored.  The node
delivers into DCMTK ``storescp +tls`` with its own certificate as client certificate and refuses
a peer whose certificate it does not trust.  TLS does not depend on the database: these run on
SQLite only (the listener's database paths are tested by test_ingest).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.db import Instance, make_engine, make_session_factory
from node.dicom.catalog import Catalog
from node.dicom.scp import StoreSCP as NodeSCP
from node.dicom.scu import send_files
from node.dicom.storage import InstanceStore
from node.dicom.tls import MINIMUM_VERSION, client_context, server_context
from node.errors import ConfigError, DeliveryError
from node.migrate import upgrade
from node.settings import Peer, Settings
from tests.conftest import B40F
from tests.dcmtk import StoreSCP, echoscu, free_port, storescu, wait_for
from tests.peers import Orthanc
from tests.test_ingest import Listener, _files_under, listener  # noqa: F401 - the fixture


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only (overrides conftest's SQLite/PostgreSQL pair): TLS sits before the database."""
    return f"sqlite:///{tmp_path / 'lungnode.db'}"


@pytest.fixture
def node(listener: Callable[..., Listener]) -> Callable[..., Listener]:  # noqa: F811
    """test_ingest's ``listener``: the node's StoreSCP on a fresh database, stopped at the end."""
    return listener


@dataclass(frozen=True)
class Pki:
    """A CA, the node's certificate (127.0.0.1), a modality's (also 127.0.0.1, signed by the CA)
    and a self-signed one nobody trusts; each with its key."""

    folder: Path

    def __getattr__(self, name: str) -> Path:  # ca_crt, node_key, modality_crt, rogue_key, ...
        stem, _, ext = name.rpartition("_")
        if ext not in ("crt", "key"):
            raise AttributeError(name)
        return self.folder / f"{stem}.{ext}"


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


_LEAF_EXT = ("subjectAltName = IP:127.0.0.1, DNS:localhost\n"
             "extendedKeyUsage = serverAuth, clientAuth\n"
             "basicConstraints = CA:FALSE\n"
             "keyUsage = critical, digitalSignature, keyEncipherment\n")


def make_pki(folder: Path) -> Pki:
    """The README's openssl commands: a CA, then certificates it signs, and a self-signed one."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "3650", "-subj", "/CN=lungnode CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (folder / "leaf.ext").write_text(_LEAF_EXT)
    for name in ("node", "modality"):
        _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={name}")
        _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "825", "-extfile", "leaf.ext", "-out", f"{name}.crt")
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key",
             "-out", "rogue.crt", "-days", "30", "-subj", "/CN=rogue",
             "-addext", "subjectAltName=IP:127.0.0.1",
             "-addext", "extendedKeyUsage=serverAuth,clientAuth")
    return Pki(folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_section(pki: Pki, tls_port: int, **more: object) -> dict[str, object]:
    return {"tls_port": tls_port, "tls_certificate": pki.node_crt, "tls_key": pki.node_key,
            "tls_ca_file": pki.ca_crt, **more}


def _dcmtk_tls(pki: Pki, who: str = "modality") -> tuple[str, ...]:
    """DCMTK options: TLS with ``who``'s key and certificate, trusting the CA."""
    return ("+tls", str(getattr(pki, f"{who}_key")), str(getattr(pki, f"{who}_crt")),
            "+cf", str(pki.ca_crt))


def _refusals(lst: Listener) -> list[str]:
    return [a.detail or "" for a in lst.audit("association-refused")]


def test_storescu_and_echoscu_over_tls_with_a_client_certificate_are_stored(
        node: Callable[..., Listener], pki: Pki) -> None:
    tls_port = free_port()
    lst = node(dicom=_tls_section(pki, tls_port))
    assert lst.scp.tls_port == tls_port and lst.scp.port == lst.port
    assert echoscu("127.0.0.1", tls_port, "LUNGNODE", "STORESCU",
                   extra_args=_dcmtk_tls(pki)).returncode == 0
    files = sorted(B40F.iterdir())
    storescu(files[:3], "127.0.0.1", tls_port, "LUNGNODE", extra_args=_dcmtk_tls(pki))
    storescu(files[3:4], "127.0.0.1", lst.port, "LUNGNODE")  # the plain listener beside it
    with lst.sessions() as s:
        rows = list(s.scalars(select(Instance)))
    assert len(rows) == 4 and all((lst.settings.storage.root / r.path).is_file() for r in rows)
    assert _refusals(lst) == []


@pytest.mark.parametrize("case", ["no-certificate", "untrusted-certificate", "plain-dicom"])
def test_tls_port_refuses_senders_without_a_trusted_certificate(
        node: Callable[..., Listener], pki: Pki, case: str) -> None:
    tls_port = free_port()
    lst = node(dicom=_tls_section(pki, tls_port))
    args = {"no-certificate": ("+tla", "+cf", str(pki.ca_crt)),
            "untrusted-certificate": _dcmtk_tls(pki, "rogue"),
            "plain-dicom": ()}[case]
    res = storescu(sorted(B40F.iterdir())[:2], "127.0.0.1", tls_port, "LUNGNODE",
                   extra_args=("-to", "10", "-ta", "10", *args), check=False, timeout=60)
    assert res.returncode != 0
    assert lst.count() == 0 and not _files_under(lst.settings.storage.root / "instances")
    expected = {"no-certificate": "presented no client certificate",
                "untrusted-certificate": "client certificate was not accepted",
                "plain-dicom": "did not speak TLS"}[case]
    # storescu can exit before the node's connection thread has written the refusal's audit row
    details = wait_for(lambda: _refusals(lst), 60, what="the refusal's audit row")
    assert len(details) == 1 and expected in details[0] and f"port {tls_port}" in details[0]
    # the listener still serves a sender with a good certificate
    storescu(sorted(B40F.iterdir())[:1], "127.0.0.1", tls_port, "LUNGNODE",
             extra_args=_dcmtk_tls(pki))
    assert lst.count() == 1


def test_tls_only_listener_is_not_held_by_a_silent_connection(
        node: Callable[..., Listener], pki: Pki) -> None:
    """``plain = false``: nothing listens on ``port``; a connection to the TLS port that never
    starts its handshake does not keep the next sender out (the handshake runs per connection)."""
    tls_port = free_port()
    lst = node(dicom=_tls_section(pki, tls_port, plain=False))
    with pytest.raises(RuntimeError, match="no plain DICOM listener"):
        _ = lst.scp.port
    assert echoscu("127.0.0.1", lst.port, "LUNGNODE", "STORESCU", check=False).returncode != 0
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10):  # silent
        assert echoscu("127.0.0.1", tls_port, "LUNGNODE", "STORESCU", extra_args=_dcmtk_tls(pki),
                       timeout=30).returncode == 0


def test_a_tls_port_in_use_leaves_no_plain_listener_behind(
        make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s = make_settings(f"sqlite:///{tmp_path / 'n.db'}", port=port,
                          dicom=_tls_section(pki, taken.getsockname()[1]))
        upgrade(s.database.url)
        scp = NodeSCP(s.dicom, s.peers, InstanceStore(s.storage.root, min_free_mb=1, fsync=False),
                      Catalog(make_session_factory(make_engine(s.database.url))))
        with pytest.raises(OSError):
            scp.start()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the plain listener started first was stopped again


def _node_settings(make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki,
                   peer_port: int) -> Settings:
    return make_settings(f"sqlite:///{tmp_path / 'node.db'}", port=free_port(),
                         peers=[{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1",
                                 "port": peer_port, "tls": True}],
                         dicom={"tls_certificate": pki.node_crt, "tls_key": pki.node_key,
                                "tls_ca_file": pki.ca_crt})


def test_node_delivers_into_storescp_over_tls_and_echoes_it(
        make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki) -> None:
    # storescp requires and verifies the node's client certificate (its -rc default)
    with StoreSCP(tmp_path / "received", extra_args=_dcmtk_tls(pki),
                  echo_args=_dcmtk_tls(pki)) as scp:
        s = _node_settings(make_settings, tmp_path, pki, scp.port)
        files = sorted(B40F.iterdir())[:3]
        results = send_files(files, s.peer("pacs"), s.dicom)
        assert [status for _, status, _ in results] == [0, 0, 0]
        assert len(scp.wait_for_files(3)) == 3
        res = CliRunner().invoke(app, ["--config", str(s.config_path), "echo", "pacs"])
        assert res.exit_code == 0 and "C-ECHO OK" in res.output


def test_node_refuses_a_tls_peer_it_does_not_trust(
        make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki) -> None:
    with StoreSCP(tmp_path / "received", extra_args=(*_dcmtk_tls(pki, "rogue"), "-ic"),
                  echo_args=("+tla", "-ic")) as scp:
        s = _node_settings(make_settings, tmp_path, pki, scp.port)
        with pytest.raises(DeliveryError, match="tls_ca_file"):
            send_files(sorted(B40F.iterdir())[:1], s.peer("pacs"), s.dicom)
        assert scp.files() == []
        res = CliRunner().invoke(app, ["--config", str(s.config_path), "echo", "pacs"])
        assert res.exit_code == 1 and "over DICOM TLS" in res.output


def test_orthanc_with_dicom_tls_sends_to_the_node_and_takes_its_deliveries(
        node: Callable[..., Listener], pki: Pki, tmp_path: Path) -> None:
    """The README's Orthanc settings: Orthanc (TLS only on its DICOM port) stores to the node's
    TLS port with ``UseDicomTls``, and the node delivers to Orthanc over TLS."""
    tls_port = free_port()
    lst = node(dicom=_tls_section(pki, tls_port))
    orthanc_tls = {
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.modality_crt),
        "DicomTlsPrivateKey": str(pki.modality_key),
        "DicomTlsTrustedCertificates": str(pki.ca_crt), "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"lungnode": {"AET": "LUNGNODE", "Host": "127.0.0.1", "Port": tls_port,
                                         "UseDicomTls": True}},
    }
    files = sorted(B40F.iterdir())
    with Orthanc(tmp_path / "orthanc", aet="PACS", extra=orthanc_tls) as orthanc:
        orthanc.store_to_modality("lungnode", [orthanc.upload(f)["ID"] for f in files[:2]])
        assert lst.count() == 2
        peer = Peer(name="orthanc", ae_title="PACS", host="127.0.0.1", port=orthanc.dicom_port,
                    tls=True)
        results = send_files(files[2:4], peer, lst.settings.dicom)
        assert [status for _, status, _ in results] == [0, 0]
        assert orthanc.count_instances() == 4
    assert _refusals(lst) == []


# -- configuration -------------------------------------------------------------------------


def test_tls_paths_are_relative_to_the_config_file_and_tls_12_is_the_minimum(
        make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki) -> None:
    shutil.copytree(pki.folder, tmp_path / "tls")
    s = make_settings(f"sqlite:///{tmp_path / 'n.db'}", dicom={
        "tls_port": 2762, "tls_certificate": "tls/node.crt", "tls_key": "tls/node.key",
        "tls_ca_file": "tls/ca.crt"})
    assert s.dicom.tls_certificate == tmp_path / "tls" / "node.crt"
    assert s.dicom.tls_ca_file == tmp_path / "tls" / "ca.crt"
    server, client = server_context(s.dicom), client_context(s.dicom)
    assert server.minimum_version == client.minimum_version == MINIMUM_VERSION
    assert MINIMUM_VERSION == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


@pytest.mark.parametrize("case", ["missing-key", "no-certificate", "no-ca", "wrong-key",
                                  "encrypted-key", "tls-peer-without-certificate", "no-listener"])
def test_tls_configuration_errors_name_the_key_and_file(
        make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki, case: str) -> None:
    dicom: dict[str, object] = _tls_section(pki, 2762)
    peers = None
    expected: str
    if case == "missing-key":
        dicom["tls_key"] = tmp_path / "nowhere.key"
        expected = rf"\[dicom\] tls_key: {tmp_path / 'nowhere.key'} does not exist"
    elif case == "no-certificate":
        del dicom["tls_certificate"]
        expected = "tls_port 2762 needs tls_certificate"
    elif case == "no-ca":
        del dicom["tls_ca_file"]
        expected = "needs tls_ca_file"
    elif case == "wrong-key":
        dicom["tls_key"] = pki.modality_key
        expected = f"tls_certificate {pki.node_crt} and tls_key {pki.modality_key} cannot be loaded"
    elif case == "encrypted-key":
        _openssl(tmp_path, "pkey", "-in", str(pki.node_key), "-aes256", "-passout", "pass:secret",
                 "-out", "locked.key")
        dicom["tls_key"] = tmp_path / "locked.key"
        expected = "tls_key: .*locked.key is encrypted with a passphrase"
    elif case == "tls-peer-without-certificate":
        dicom = {}
        peers = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242,
                  "tls": True}]
        expected = r"\[\[peers\]\] pacs have tls = true: set \[dicom\] tls_certificate"
    else:
        dicom = {"plain": False}
        expected = "plain = false .* needs a tls_port"
    with pytest.raises(ConfigError, match=expected):
        make_settings(f"sqlite:///{tmp_path / 'n.db'}", peers=peers, dicom=dicom)
