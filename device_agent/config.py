"""One frozen, validated settings object, built once at the process edge.

Sources, lowest to highest: defaults, the `.env` file, systemd credentials
(`$CREDENTIALS_DIRECTORY/KEY`, see `LoadCredential=`), the process environment, flags.
No other module reads `os.environ`; they are handed a `Settings`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

log = logging.getLogger(__name__)

_BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("one of true/false, yes/no, 1/0, on/off")


def _range(kind: type, lo: float, hi: float) -> Callable[[str], Any]:
    """A parser for an int or float setting between lo and hi (NaN never passes)."""
    what = f"a whole number from {lo} to {hi}" if kind is int else f"a number from {lo:g} to {hi:g}"

    def parse(raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(what) from None
        if not lo <= value <= hi:  # also false for NaN
            raise ValueError(what)
        return value

    return parse


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    return _range(int, lo, hi)


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    return _range(float, lo, hi)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _baud(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value not in _BAUD_RATES:
        raise ValueError("a standard baud rate: " + ", ".join(map(str, _BAUD_RATES)))
    return value


def _text(raw: str) -> str:
    return raw.strip()


def _optional(raw: str) -> str | None:
    return raw.strip() or None


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("a file or folder path")
    return Path(raw.strip()).expanduser()


_SERIAL_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _device_serial(raw: str) -> str:
    value = raw.strip()
    if not _SERIAL_RE.match(value):
        raise ValueError("1-64 characters of A-Z a-z 0-9 . _ -")
    return value


@dataclass(frozen=True)
class _Key:
    env: str
    attr: str
    parse: Callable[[str], Any]
    default: str
    secret: bool = False
    help: str = ""


# Legacy keys (kept exactly as the desktop app's .env) first, then the agent's own.
KEYS: tuple[_Key, ...] = (
    _Key("CLOUD_UPLOAD_ENABLED", "cloud_upload_enabled", _bool, "true",
         help="upload to the cloud at all"),
    _Key("CLOUD_SERVICE", "cloud_service", _choice("s3"), "s3",
         help="only s3 is supported"),
    _Key("AWS_S3_BUCKET", "s3_bucket", _optional, "", help="bucket name"),
    _Key("AWS_S3_REGION", "s3_region", _optional, "", help="bucket region"),
    _Key("AWS_ACCESS_KEY_ID", "aws_access_key_id", _optional, "", secret=True,
         help="leave empty to use boto3's credential chain"),
    _Key("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", _optional, "", secret=True),
    _Key("AWS_SESSION_TOKEN", "aws_session_token", _optional, "", secret=True),
    _Key("AWS_PROFILE", "aws_profile", _optional, "", help="named profile in ~/.aws"),
    _Key("AWS_ENDPOINT_URL_S3", "s3_endpoint_url", _optional, "",
         help="S3-compatible endpoint, e.g. http://127.0.0.1:9000"),
    _Key("S3_SSE", "s3_sse", _choice("aes256", "aws:kms"), "aes256",
         help="server-side encryption: aes256 (SSE-S3) or aws:kms"),
    _Key("S3_SSE_KMS_KEY_ID", "s3_sse_kms_key_id", _optional, "",
         help="KMS key id when S3_SSE=aws:kms"),
    _Key("S3_CONNECT_TIMEOUT_S", "s3_connect_timeout_s", _float_range(0.1, 120), "5"),
    _Key("S3_READ_TIMEOUT_S", "s3_read_timeout_s", _float_range(0.1, 600), "30"),
    _Key("S3_MAX_ATTEMPTS", "s3_max_attempts", _int_range(1, 20), "3",
         help="botocore standard-mode attempts per request"),
    _Key("ECG_SERIAL_PORT", "serial_port", _text, "/dev/ttyUSB0",
         help="device path or pyserial URL (loop://, socket://host:port)"),
    _Key("ECG_BAUD_RATE", "baud_rate", _baud, "115200"),
    _Key("ECG_SAMPLING_RATE", "sampling_rate", _int_range(100, 2000), "500",
         help="the board's nominal rate in Hz"),
    _Key("ECG_COUNTS_PER_MV", "counts_per_mv", _float_range(1, 100000), "1000",
         help="per-device gain calibration"),
    _Key("ECG_BYTE_ORDER", "byte_order", _choice("high-first", "low-first"), "high-first",
         help="channel byte order in a frame"),
    _Key("ECG_CAPTURE_SECONDS", "capture_seconds", _float_range(1, 60), "10"),
    _Key("ECG_MAX_LOST_FRACTION", "max_lost_fraction", _float_range(0, 1), "0.005",
         help="reject a capture that lost more than this share of samples"),
    _Key("ECG_MAX_GAP_MS", "max_gap_ms", _float_range(0, 10000), "40",
         help="reject a capture with a single gap longer than this"),
    _Key("ECG_MAINS_HZ", "mains_hz", _choice("50", "60"), "50"),
    _Key("DEVICE_SERIAL", "device_serial", _device_serial, "UNSET-0000",
         help="this unit's serial number"),
    _Key("DEVICE_MODEL", "device_model", _text, "ECG12-PI"),
    _Key("REPORTS_DIR", "reports_dir", _path, "./reports"),
    _Key("STATE_DIR", "state_dir", _path, "./state"),
    _Key("USERS_FILE", "users_file", _path, "./users.json"),
    _Key("SYNC_INTERVAL_S", "sync_interval_s", _float_range(0.05, 86400), "15"),
    _Key("RETRY_MAX_BACKOFF_S", "retry_max_backoff_s", _float_range(1, 86400), "900"),
    _Key("DISK_RESERVE_MB", "disk_reserve_mb", _int_range(0, 1_000_000), "200",
         help="refuse captures when free space falls under this"),
    _Key("RETENTION_DAYS", "retention_days", _float_range(0, 36500), "30",
         help="prune delivered records older than this; undelivered are never pruned"),
    _Key("REPORT_PAPER", "report_paper", _choice("a4", "letter"), "a4"),
    _Key("REPORT_GRID", "report_grid", _choice("red", "grey"), "red"),
    _Key("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "info"),
    _Key("CLOCK_CHECK", "clock_check", _choice("ntp", "floor"), "ntp",
         help="ntp: name records only after NTP sync; floor: trust a clock past 2024 (RTC)"),
)
_BY_ENV = {k.env: k for k in KEYS}


@dataclass(frozen=True)
class Settings:
    """The effective configuration; `sources[env_key]` says where each value came from."""

    cloud_upload_enabled: bool
    cloud_service: str
    s3_bucket: str | None
    s3_region: str | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_session_token: str | None
    aws_profile: str | None
    s3_endpoint_url: str | None
    s3_sse: str
    s3_sse_kms_key_id: str | None
    s3_connect_timeout_s: float
    s3_read_timeout_s: float
    s3_max_attempts: int
    serial_port: str
    baud_rate: int
    sampling_rate: int
    counts_per_mv: float
    byte_order: str
    capture_seconds: float
    max_lost_fraction: float
    max_gap_ms: float
    mains_hz: str
    device_serial: str
    device_model: str
    reports_dir: Path
    state_dir: Path
    users_file: Path
    sync_interval_s: float
    retry_max_backoff_s: float
    disk_reserve_mb: int
    retention_days: float
    report_paper: str
    report_grid: str
    log_level: str
    clock_check: str
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def redacted(self) -> list[tuple[str, str, str]]:
        """(key, shown value, source) for every setting, secrets as `***`."""
        rows = []
        for key in KEYS:
            value = getattr(self, key.attr)
            if key.secret and value:
                shown = "***"
            elif value is None:
                shown = ""
            else:
                shown = str(value)
            rows.append((key.env, shown, self.sources.get(key.env, "default")))
        return rows

    def replace(self, **changes: Any) -> Settings:
        """A copy with some attributes changed (tests and the demo use it)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def parse_env_file(text: str, *, origin: str) -> dict[str, str]:
    """Parse `KEY=VALUE` lines (comments, blank lines, `export`, quotes allowed)."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigError(
                f"{origin}:{lineno}: not a KEY=VALUE line; fix or remove it"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read env file {path}: {exc}; check its permissions") from exc
    values = parse_env_file(text, origin=str(path))
    holds_secret = any(values.get(k.env) for k in KEYS if k.secret)
    if holds_secret:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "env file %s holds secrets but is readable by group or others "
                "(mode %o); run: chmod 600 %s",
                path, stat.S_IMODE(mode), path,
            )
    return values


def _read_credentials(directory: str | None) -> dict[str, str]:
    if not directory:
        return {}
    values = {}
    for key in KEYS:
        path = Path(directory) / key.env
        try:
            values[key.env] = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read credential {path}: {exc}") from exc
    return values


def load_settings(
    *,
    env_file: Path | str | None = Path(".env"),
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, `.env`, credentials, environment and flag overrides."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, str]]] = [
        ("default", {k.env: k.default for k in KEYS}),
    ]
    if env_file is not None:
        env_path = Path(env_file)
        layers.append((f"env file {env_path}", _read_env_file(env_path)))
    creds_dir = environ.get("CREDENTIALS_DIRECTORY")
    layers.append((f"credential in {creds_dir}", _read_credentials(creds_dir)))
    layers.append(("environment", {k: v for k, v in environ.items() if k in _BY_ENV}))
    layers.append(("command line", dict(overrides or {})))

    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    for origin, values in layers:
        for env_key, value in values.items():
            if env_key in _BY_ENV:
                raw[env_key] = value
                sources[env_key] = origin
            elif origin == "command line":
                raise ConfigError(f"unknown setting {env_key!r} on the command line")

    values: dict[str, Any] = {}
    for key in KEYS:
        try:
            values[key.attr] = key.parse(raw[key.env])
        except ValueError as exc:
            shown = "***" if key.secret else repr(raw[key.env])
            raise ConfigError(
                f"{key.env}={shown} (from {sources[key.env]}) is invalid: expected {exc}"
            ) from None

    if values["cloud_upload_enabled"]:
        if values["s3_sse"] == "aws:kms" and not values["s3_sse_kms_key_id"]:
            raise ConfigError(
                f"S3_SSE=aws:kms (from {sources['S3_SSE']}) needs S3_SSE_KMS_KEY_ID: "
                "set the KMS key id or use S3_SSE=aes256"
            )
        if bool(values["aws_access_key_id"]) != bool(values["aws_secret_access_key"]):
            raise ConfigError(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together "
                "(or both left empty to use the boto3 credential chain)"
            )
    return Settings(**values, sources=sources)


def setting_key(attr: str) -> str:
    """The environment key of a Settings attribute (for messages)."""
    for key in KEYS:
        if key.attr == attr:
            return key.env
    raise KeyError(attr)
