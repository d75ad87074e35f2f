"""DICOM TLS (PS3.15 Annex B, secure transport connection profiles): the node's TLS contexts.

One place builds every :class:`ssl.SSLContext` the node uses, from ``[dicom]``:

- :func:`server_context` for the listener on ``tls_port`` (pynetdicom's public
  ``AE.start_server(..., ssl_context=...)``): the node's certificate and key, TLS 1.2
  at least, client certificates verified against ``tls_ca_file`` (required unless
  ``tls_require_client_certificate = false``);
- :func:`client_context` for deliveries and C-ECHO to a peer with ``tls = true``
  (``ae.associate(..., tls_args=(context, host))``): the peer's certificate verified
  against ``tls_ca_file`` and its host name or IP address, the node's certificate
  presented as client certificate.

These follow the BCP 195 profiles DCMTK and Orthanc use (TLS 1.2 or 1.3, OpenSSL's
default cipher suites, which exclude the retired non-encrypting and export ones).

The server context defers the handshake from pynetdicom's accept loop to the
connection's own thread (:func:`complete_handshake`, an ``EVT_CONN_OPEN`` step):
pynetdicom wraps each accepted socket with ``do_handshake_on_connect`` left on, so a
client that connects and sends nothing would hold the whole TLS listener, and a failed
handshake would vanish without a word.  Done per connection, with a timeout, a failure
is named (no client certificate, untrusted certificate, not TLS at all) and recorded.

:func:`check_tls_settings` loads every file once when the configuration is loaded, so a
missing or unreadable certificate or key is a :class:`~node.errors.ConfigError` naming
the key and the file, not a failure at the first connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import ConfigError

if TYPE_CHECKING:
    from node.settings import DicomSettings, Peer

__all__ = [
    "MINIMUM_VERSION",
    "check_tls_settings",
    "client_context",
    "complete_handshake",
    "server_context",
]

logger = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
"""The oldest TLS version the node speaks, either side (BCP 195: no TLS 1.0 or 1.1)."""


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets leave the handshake to :func:`complete_handshake`.

    pynetdicom calls ``wrap_socket(client_socket, server_side=True)`` in its accept loop;
    the handshake then happens in the connection's thread instead of blocking the loop.
    """

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(*args, **kwargs)


def _file(path: Path | None, key: str) -> Path:
    if path is None:
        raise ConfigError(f"[dicom] {key} is not set; DICOM TLS needs it")
    if not path.is_file():
        raise ConfigError(f"[dicom] {key}: {path} does not exist or is not a file")
    return path


def _refuse_password() -> str:
    # called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the terminal
    raise ConfigError("encrypted")


def _load_identity(context: ssl.SSLContext, dicom: DicomSettings) -> None:
    """Load ``tls_certificate`` and ``tls_key`` into ``context`` (:class:`ConfigError` naming them)."""
    cert = _file(dicom.tls_certificate, "tls_certificate")
    key = _file(dicom.tls_key, "tls_key")
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except ConfigError as exc:
        raise ConfigError(f"[dicom] tls_key: {key} is encrypted with a passphrase; lungnode needs an "
                          "unencrypted key (openssl pkey -in KEY -out PLAIN_KEY), readable only by "
                          "its user") from exc
    except ssl.SSLError as exc:
        raise ConfigError(f"[dicom] tls_certificate {cert} and tls_key {key} cannot be loaded: "
                          f"{exc.reason or exc}; both must be PEM files and the key must be the "
                          "certificate's") from exc
    except OSError as exc:
        raise ConfigError(f"[dicom] tls_certificate {cert} or tls_key {key} cannot be read: "
                          f"{exc}") from exc


def _load_ca(context: ssl.SSLContext, dicom: DicomSettings) -> None:
    ca = _file(dicom.tls_ca_file, "tls_ca_file")
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[dicom] tls_ca_file: {ca} cannot be loaded as PEM certificates: "
                          f"{getattr(exc, 'reason', None) or exc}") from exc


def server_context(dicom: DicomSettings) -> ssl.SSLContext:
    """The context of the TLS listener on ``[dicom] tls_port``.

    Parameters
    ----------
    dicom
        ``tls_certificate`` and ``tls_key`` (required); ``tls_ca_file``, the CAs whose
        client certificates are accepted (required when ``tls_require_client_certificate``).

    Returns
    -------
    ssl.SSLContext
        TLS 1.2 at least; client certificates required (or, with
        ``tls_require_client_certificate = false``, verified when one is presented and
        ``tls_ca_file`` is set).  Its sockets do not shake hands on their own: run
        :func:`complete_handshake` on each accepted connection.

    Raises
    ------
    ConfigError
        A file is not set, missing or cannot be loaded.
    """
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_identity(context, dicom)
    if dicom.tls_require_client_certificate:
        _load_ca(context, dicom)
        context.verify_mode = ssl.CERT_REQUIRED
    elif dicom.tls_ca_file is not None:
        _load_ca(context, dicom)
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(dicom: DicomSettings) -> ssl.SSLContext:
    """The context of an association to a peer with ``tls = true``.

    The peer's certificate must chain to ``tls_ca_file`` (the system's trusted CAs when
    it is not set) and name the peer's configured ``host`` (DNS name or IP address in
    its subject alternative names); the node presents ``tls_certificate`` as client
    certificate.  Pass it as ``tls_args=(context, peer.host)``.

    Raises
    ------
    ConfigError
        The node's certificate or key is not set, missing or cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = MINIMUM_VERSION
    if dicom.tls_ca_file is not None:
        _load_ca(context, dicom)
    _load_identity(context, dicom)
    return context


def check_tls_settings(dicom: DicomSettings, peers: Iterable[Peer]) -> None:
    """Load the TLS files the configuration uses, once, when it is loaded.

    Raises
    ------
    ConfigError
        Naming the key and the file that is missing or does not load, or the peer
        that needs the node's certificate.
    """
    tls_peers = [p.name for p in peers if p.tls]
    if tls_peers and (dicom.tls_certificate is None or dicom.tls_key is None):
        raise ConfigError(f"[[peers]] {', '.join(tls_peers)} have tls = true: set [dicom] "
                          "tls_certificate and tls_key (the node presents them as its client "
                          "certificate) and tls_ca_file (the CA that signed the peers' certificates)")
    if dicom.tls_port is not None:
        server_context(dicom)
    if tls_peers:
        client_context(dicom)


def _reason(exc: BaseException, timeout: float | None) -> str:
    """What a person can act on, for a failed server-side handshake."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no TLS handshake within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its client certificate was not accepted ({exc.verify_message}); it must be signed "
                "by a CA in [dicom] tls_ca_file")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return ("it presented no client certificate ([dicom] tls_require_client_certificate "
                    "is on); give the peer a certificate signed by a CA in tls_ca_file")
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return ("its client certificate was not accepted; it must be signed by a CA in "
                    "[dicom] tls_ca_file")
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_MESSAGE"):
            return (f"it did not speak TLS ({reason}): a plain DICOM association on the TLS port? "
                    "Use the plain port, or enable TLS on the peer")
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_")):
            return (f"it refused the node's certificate or the TLS parameters ({reason}); the peer "
                    "must trust the CA of [dicom] tls_certificate")
        return f"TLS handshake failed ({reason})"
    return f"the connection ended during the TLS handshake ({type(exc).__name__}: {exc})"


def complete_handshake(raw: socket.socket | None, timeout: float) -> str | None:
    """Run the server side of the TLS handshake on an accepted connection.

    Parameters
    ----------
    raw
        The association's socket (``event.assoc.dul.socket.socket`` in ``EVT_CONN_OPEN``),
        wrapped by :func:`server_context`'s context; anything else is left alone.
    timeout
        Seconds the peer has for the handshake when the socket has no timeout of its own.

    Returns
    -------
    str or None
        ``None`` once the handshake is done, else why it failed, in words a person can
        act on (the caller records it and closes the connection).
    """
    if not isinstance(raw, ssl.SSLSocket):
        return None
    previous = raw.gettimeout()
    try:
        if previous is None:
            raw.settimeout(timeout)
        raw.do_handshake()
        raw.settimeout(previous)
    except OSError as exc:  # ssl.SSLError, TimeoutError and a reset connection are OSErrors
        return _reason(exc, previous or timeout)
    logger.debug("TLS connection: %s, %s", raw.version(), (raw.cipher() or ("?",))[0])
    return None
