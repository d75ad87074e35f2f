"""Configuration: one TOML file, every key overridable by ``LUNGNODE_SECTION__KEY``.

Loaded once by the CLI (:func:`load_settings`) and passed down; nothing here
reads the environment or the disk at import time.  Relative paths in the file
(storage root, SQLite database, TLS certificate, key and CA files) are relative to the
file's folder.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.errors import ConfigError

__all__ = [
    "AnalysisSettings",
    "CompletionSettings",
    "DatabaseSettings",
    "DeliverySettings",
    "DicomSettings",
    "ModelSettings",
    "Peer",
    "RetentionSettings",
    "SegmentationSettings",
    "SelectionSettings",
    "Settings",
    "StorageSettings",
    "TrainingSettings",
    "WebSettings",
    "WorkerSettings",
    "default_config_path",
    "load_settings",
]

_AE_TITLE_MAX = 16


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > _AE_TITLE_MAX or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 characters without backslash")
    return value


class DicomSettings(_Section):
    """The DICOM listener (SCP) and the node's own AE title as SCU."""

    ae_title: str = "LUNGNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    require_known_peers: bool = True
    """Accept associations only from calling AE titles listed in ``[[peers]]``."""
    check_peer_host: bool = False
    """Also require the connection to come from the peer's configured host."""
    max_associations: int = Field(10, ge=1)
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = Field(131072, ge=0)
    """Maximum PDU size the node receives (0 means unlimited)."""
    request_timeout: float = Field(10.0, gt=0)
    """Seconds a new connection has to complete its A-ASSOCIATE-RQ; a connection that sends nothing
    or too little in that time is closed.  Only associations past their request count against
    ``max_associations``, so stalled connections do not keep known peers out."""

    tls_port: int | None = Field(None, ge=1, le=65535)
    """Port of the DICOM TLS listener (PS3.15 Annex B secure transport, :mod:`node.dicom.tls`);
    ``None``: no TLS listener."""
    plain: bool = True
    """Also listen without TLS on ``port`` (``False``: TLS only, on ``tls_port``)."""
    tls_certificate: Path | None = None
    """PEM certificate (chain) of the node: presented by the TLS listener, and as client
    certificate to peers with ``tls = true``."""
    tls_key: Path | None = None
    """PEM private key of ``tls_certificate``, unencrypted (protect it by file permissions)."""
    tls_ca_file: Path | None = None
    """PEM certificates of the CAs the node trusts: for the client certificates of senders on
    ``tls_port`` and the server certificates of TLS peers (``None``: peers' certificates are
    checked against the system's CAs)."""
    tls_require_client_certificate: bool = True
    """Accept TLS connections only from peers that present a certificate signed by a CA in
    ``tls_ca_file`` (``False``: encryption without client authentication)."""

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @model_validator(mode="after")
    def _tls(self) -> DicomSettings:
        if self.tls_port is None:
            if not self.plain:
                raise ValueError("plain = false (no plain listener) needs a tls_port")
            return self
        if self.plain and self.tls_port == self.port:
            raise ValueError(f"tls_port {self.tls_port} is also the plain port; give it another")
        missing = [k for k in ("tls_certificate", "tls_key") if getattr(self, k) is None]
        if self.tls_require_client_certificate and self.tls_ca_file is None:
            missing.append("tls_ca_file")
        if missing:
            raise ValueError(f"tls_port {self.tls_port} needs {' and '.join(missing)} (the "
                             "node's certificate, its key, and the CA of its senders' client "
                             "certificates)")
        return self


class StorageSettings(_Section):
    """Where instances, results and the de-identified archive live."""

    root: Path = Path("../var/storage")
    min_free_mb: int = Field(500, ge=0)
    """Below this much free space C-STORE is answered 0xA700 (out of resources)."""
    fsync: bool = True
    """Flush every received file, its folder (the new name) and the commit of its row to
    the device before acknowledging it (``False``: written and committed, not flushed: survives a
    crash of the node, not a power loss)."""
    overwrite: Literal["keep-first", "replace"] = "keep-first"
    """A C-STORE of a SOP Instance UID already stored, with other content: ``keep-first`` answers
    success and keeps the first file (Orthanc's default); ``replace`` stores the new file and
    updates its row.  Either way an audit row ``instance-resend-differs`` records it; an identical
    resend is acknowledged and not recorded."""
    max_inflated_mb: int = Field(256, ge=1)
    """A Deflated Explicit VR Little Endian data set larger than this once inflated is refused
    (0xA700), so a small deflated "bomb" cannot take the node's memory."""


class DatabaseSettings(_Section):
    url: str = "sqlite:///../var/lungnode.db"
    """SQLAlchemy URL; ``postgresql+psycopg://user@host/db`` for PostgreSQL."""
    echo: bool = False


class CompletionSettings(_Section):
    stable_seconds: float = Field(10.0, ge=0)
    """A study is complete when no instance has arrived for this long."""
    poll_seconds: float = Field(1.0, gt=0)
    """Interval of the stability check; a check that finds a study arriving also sets one for the
    moment it turns stable."""


class WorkerSettings(_Section):
    count: int = Field(1, ge=0)
    """Analysis workers in the ``serve`` process (0: only receive)."""
    lease_seconds: float = Field(900.0, gt=0)
    """A claimed job whose worker stopped renewing it is re-claimed after this long."""
    poll_seconds: float = Field(1.0, gt=0)
    """Queue poll of an idle worker; in ``serve`` a job queued by the same process wakes it at once."""
    warm_up: bool = True
    """At start, analyse a small synthetic study once (in the background, nothing recorded), so the
    first real study pays fewer of the process's one-time costs."""


class SelectionSettings(_Section):
    min_slices: int = Field(20, ge=1)
    max_slice_thickness_mm: float = Field(10.0, gt=0)
    kernel_preference: Literal["smooth", "sharp", "any"] = "smooth"
    """Prefer smooth/standard kernels (QIBA lung density) or sharp lung kernels."""
    sharp_noise_hu: float = Field(30.0, gt=0)
    """Where the kernel is unknown, noise (most common local HU SD in soft tissue of a
    middle slice) above this marks a sharp kernel."""
    max_matrix: int = Field(2048, ge=1)
    """Series with more than this many rows or columns per slice are not analysed (not eligible,
    with the reason), rather than failing on memory."""
    max_voxels: int = Field(1 << 29, ge=1)
    """Series with more voxels (slices x frames x rows x columns) than this are not analysed
    (default 536870912: 2048 slices of 512 x 512, 1 GiB of HU as int16)."""


class AnalysisSettings(_Section):
    opacity_low_hu: float = -700.0
    opacity_high_hu: float = -300.0
    high_opacity_high_hu: float = 100.0
    normal_below_percent: float = Field(1.0, ge=0)
    """Percentage of opacity under which a study counts as CT-0."""
    anonymize: bool = True
    """Write the de-identified archive copy of each analysed series (after its results are committed)."""
    min_lung_volume_ml: float = Field(1000.0, ge=0)
    """Both lungs together must hold at least this much, and each side must be found, or the study
    is rejected ("no lungs in the field of view") and no result is sent: an abdominal CT routed here
    by mistake would otherwise come back as CT-0 (:func:`model.quantify.require_lungs`)."""


class SegmentationSettings(_Section):
    """The lung segmenter (:mod:`model.lungs`, :mod:`model.learned_lungs`)."""

    method: Literal["classical", "lungmask", "auto"] = "classical"
    """``classical``: the threshold and morphology method (about a second per study);
    ``lungmask``: the lungmask U-Net for every study (about a second per slice on a CPU);
    ``auto``: classical first, lungmask only where the classical result cannot be trusted
    (extensive opacity, implausible volume, one side missing) within ``auto_budget_seconds``,
    and lungmask for every study when a GPU is used."""
    model: Literal["R231", "R231CovidWeb", "LTRCLobes"] = "R231"
    """The lungmask model whose weights ``weights`` holds (LTRCLobes: five lobes)."""
    weights: Path | None = None
    """Local lungmask state dict (``.pth``, as published, e.g. ``unet_r231-d5d2fc3d.pth``); a
    sha256 prefix in the name is checked. Nothing is ever downloaded."""
    fusion_weights: Path | None = None
    """LTRCLobes only: an R231 state dict for lungmask's fusion (lobes filled to the R231 outline)."""
    fallback: Literal["classical"] | None = None
    """``classical``: when the weights are missing or do not load, run the classical method
    (every result says so) instead of refusing to start."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available, else the CPU."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads while lungmask runs (``None``: torch's default, one per core)."""
    batch_size: int = Field(8, ge=1)
    """Slices per lungmask forward pass."""
    auto_budget_seconds: float = Field(300.0, gt=0)
    """``auto`` on a CPU: lungmask runs only when its estimated time (slices x measured seconds
    per slice) is within this; otherwise the classical result is kept, with a note."""


class ModelSettings(_Section):
    """The severity CNN (:mod:`model.inference`)."""

    enabled: bool = True
    name: str | None = None
    """Model name in the registry; ``None``: the default model shipped in ``model/weights``."""
    registry: Path | None = None
    """Folder of weights files and model cards; ``None``: ``model/weights`` of the package."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda:N``."""
    tta: bool = True
    """Average each prediction with that of the left-right mirrored input."""


class Peer(_Section):
    """A DICOM application entity the node talks to."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    """Associate over DICOM TLS: the peer's certificate is verified against ``[dicom]
    tls_ca_file`` and its host, and the node presents its certificate as client certificate."""

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class DeliverySettings(_Section):
    """The outbox (:mod:`node.work.outbox`): where results go and how long they are retried."""

    destinations: list[str] = Field(default_factory=list)
    """Peer names that receive every result."""
    horizon_hours: float = Field(72.0, gt=0)
    """A delivery is retried until this long after it was queued, then it is ``dead`` (and its
    study ``delivery-failed``) until ``lungnode deliveries retry``; longer than any outage of a
    destination the results should survive."""
    backoff_seconds: float = Field(5.0, gt=0)
    """First retry this long after a failure, doubling up to ``backoff_max_seconds``; a failing
    destination is also probed with C-ECHO this often, and its backlog is sent once it answers."""
    backoff_max_seconds: float = Field(900.0, gt=0)
    poll_seconds: float = Field(1.0, gt=0)
    """Outbox interval (retries, other processes' results); ``serve`` sends its own results at once."""
    send_summary_image: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_max_attempts(cls, data: Any) -> Any:
        # an old configuration's limit (8 attempts: 11 minutes) is what lost results in an outage
        if isinstance(data, dict) and "max_attempts" in data:
            raise ValueError(
                "[delivery] max_attempts was replaced by horizon_hours (default 72): deliveries "
                "are retried until that many hours after they were queued, however many attempts "
                "that takes. Remove max_attempts from the configuration (and set horizon_hours "
                "if 72 hours is not what you want).")
        return data


class WebSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8088, ge=1, le=65535)


class RetentionSettings(_Section):
    """How long patient data stays on the node (:mod:`node.work.retention`)."""

    originals_days: float = Field(7.0, ge=0)
    """Received instances (with patient data) and the node's result files (SR, SEG, summary) are
    deleted this many days after every result of the study's latest analysis was delivered (no
    destinations: after the results were made; rejected studies: after the rejection)."""
    archive_quota_mb: float | None = Field(None, ge=0)
    """Size limit of the de-identified archive (training material); over it, the oldest archived
    studies that no frozen or locked dataset manifest references are deleted, unlabelled ones
    before labelled ones. ``None``: unlimited (nothing is ever deleted from the archive)."""
    emergency_free_percent: float = Field(10.0, ge=0, le=100)
    """When free space on the storage file system falls under this percentage, the originals of
    the oldest delivered studies go before their day count, until it is back above (studies not
    yet delivered are never deleted). 0 turns the emergency purge off."""
    poll_seconds: float = Field(3600.0, gt=0)
    """Interval of the service's retention run (``lungnode serve``)."""


class TrainingSettings(_Section):
    """Labels, frozen datasets and retraining (:mod:`node.learn`, :mod:`training`)."""

    root: Path | None = None
    """Tensors, manifests, runs and candidate models; ``None``: ``<storage root>/learn``."""
    folds: int = Field(5, ge=2, le=20)
    """Folds of the patient-grouped split; fold 0 validates (chooses the best epoch)."""
    architecture: Literal["compact3d", "cov3d"] = "compact3d"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = 0
    class_balanced: bool = True
    """Draw training batches class-balanced (COVID-Net CT-S) instead of uniformly."""
    schedule: str | None = None
    """Cron expression (minute hour day month weekday) of scheduled retraining; ``None``: never."""
    min_new_labels: int = Field(20, ge=0)
    """A scheduled run starts only when this many label events arrived since the last run."""
    threads: int = Field(1, ge=1)
    """torch CPU threads of a scheduled run (the listener and the analysis keep the rest)."""
    nice: int = Field(10, ge=0, le=19)
    """Niceness of a scheduled run's process."""
    lease_seconds: float = Field(300.0, gt=0)
    """A running run renews its lease; one whose lease expired is failed by the next tick."""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a cron expression (minute hour day month weekday, "
                             f"UTC): {exc}") from exc
        return value.strip()


class Settings(BaseSettings):
    """The whole configuration; see ``config/lungnode.toml`` for every key."""

    model_config = SettingsConfigDict(
        env_prefix="LUNGNODE_", env_nested_delimiter="__", extra="forbid"
    )

    dicom: DicomSettings = Field(default_factory=lambda: DicomSettings())
    storage: StorageSettings = Field(default_factory=lambda: StorageSettings())
    database: DatabaseSettings = Field(default_factory=lambda: DatabaseSettings())
    completion: CompletionSettings = Field(default_factory=lambda: CompletionSettings())
    worker: WorkerSettings = Field(default_factory=lambda: WorkerSettings())
    selection: SelectionSettings = Field(default_factory=lambda: SelectionSettings())
    analysis: AnalysisSettings = Field(default_factory=lambda: AnalysisSettings())
    segmentation: SegmentationSettings = Field(default_factory=lambda: SegmentationSettings())
    model: ModelSettings = Field(default_factory=lambda: ModelSettings())
    peers: list[Peer] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=lambda: DeliverySettings())
    web: WebSettings = Field(default_factory=lambda: WebSettings())
    training: TrainingSettings = Field(default_factory=lambda: TrainingSettings())
    retention: RetentionSettings = Field(default_factory=lambda: RetentionSettings())
    log_level: str = "INFO"
    config_path: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: it overrides what the TOML file (passed as init) says.
        return (env_settings, init_settings)

    def peer(self, name: str) -> Peer:
        """The peer called ``name``; :class:`ConfigError` when there is none."""
        for p in self.peers:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.peers) or "none"
        raise ConfigError(f"no peer named {name!r} in [[peers]] (known: {known})")

    @property
    def archive_root(self) -> Path:
        return self.storage.root / "archive"

    @property
    def learn_root(self) -> Path:
        """``[training] root``, or ``<storage root>/learn``."""
        return self.training.root if self.training.root is not None else self.storage.root / "learn"

    @property
    def results_root(self) -> Path:
        return self.storage.root / "results"

    @property
    def incoming_root(self) -> Path:
        return self.storage.root / "instances"


def default_config_path() -> Path:
    """``$LUNGNODE_CONFIG`` or ``config/lungnode.toml`` of the checkout."""
    env = os.environ.get("LUNGNODE_CONFIG")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "config" / "lungnode.toml"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_sqlite(base: Path, url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////"):
        rest = url[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str(_resolve(base, Path(rest)))
    return url


def _check_segmentation(seg: SegmentationSettings, base: Path) -> None:
    """Resolve the lungmask weights' paths; refuse missing ones unless the fallback is classical.

    Whether a file loads and has the model's classes is checked where it is loaded
    (:class:`model.learned_lungs.LearnedLungs`, when the node or ``analyze`` starts).
    """
    for key in ("weights", "fusion_weights"):
        value = getattr(seg, key)
        if value is not None:
            setattr(seg, key, _resolve(base, value))
    if seg.method == "classical" or seg.fallback == "classical":
        return
    if seg.weights is None:
        raise ConfigError(f"[segmentation] method = {seg.method!r} needs weights = PATH (a local "
                          f"lungmask {seg.model} .pth file), or fallback = \"classical\"")
    for key in ("weights", "fusion_weights"):
        value = getattr(seg, key)
        if value is not None and not value.is_file():
            raise ConfigError(f"[segmentation] {key} {value} does not exist; download the published "
                              f"lungmask file once and point {key} to it, or set fallback = "
                              "\"classical\" to run the classical method until it is there")


def load_settings(path: Path | None = None) -> Settings:
    """Read the TOML file, apply environment overrides, resolve relative paths.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, has an unknown key or an invalid value, or a TLS
        certificate, key or CA file it names is missing or does not load.
    """
    path = (path or default_config_path()).resolve()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    elif path != default_config_path().resolve():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration in {path} or LUNGNODE_* variables:\n{exc}") from exc
    base = path.parent
    settings.storage.root = _resolve(base, settings.storage.root)
    settings.database.url = _resolve_sqlite(base, settings.database.url)
    if settings.model.registry is not None:
        settings.model.registry = _resolve(base, settings.model.registry)
    if settings.training.root is not None:
        settings.training.root = _resolve(base, settings.training.root)
    _check_segmentation(settings.segmentation, base)
    for key in ("tls_certificate", "tls_key", "tls_ca_file"):
        value = getattr(settings.dicom, key)
        if value is not None:
            setattr(settings.dicom, key, _resolve(base, value))
    settings.config_path = path
    names = {p.name for p in settings.peers}
    missing = [d for d in settings.delivery.destinations if d not in names]
    if missing:
        raise ConfigError(f"[delivery] destinations {missing} are not names of [[peers]]")
    from node.dicom.tls import check_tls_settings  # the TLS files load once, here

    check_tls_settings(settings.dicom, settings.peers)
    return settings
