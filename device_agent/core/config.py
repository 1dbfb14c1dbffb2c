"""One frozen, validated settings object, built once at the process edge.

Sources, lowest to highest: defaults, the env file, systemd credentials
(`$CREDENTIALS_DIRECTORY/KEY`, see `LoadCredential=`), the process environment, flags.
No other module reads `os.environ`; they are handed a `Settings`.

One parser reads the env file for the service and for every field command (the unit and
the wrapper pass `--env-file`; nothing sources it as shell). A key it does not know is
warned about with the closest known key, so `AWS_S3_BUKET` is not silently ignored.
"""

from __future__ import annotations

import logging
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from device_agent.core.errors import ConfigError
from device_agent.core.fsutil import existing_ancestor
from device_agent.core.text import closest, text_problem

log = logging.getLogger(__name__)

_BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Environment variables with these prefixes are meant for the agent: an unknown one is a typo.
_OUR_PREFIXES = ("ECG_", "AWS_S3_", "AWS_IOT_", "S3_", "DEVICE_", "REPORT_", "SYNC_",
                 "PACKAGE_")
REPORT_FILTERS = ("0.05-150", "0.5-150", "0.05-40", "0.5-40")


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("one of true/false, yes/no, 1/0, on/off")


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"a whole number from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"a whole number from {lo} to {hi}")
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"a number from {lo:g} to {hi:g}") from None
        if not lo <= value <= hi:  # also false for NaN
            raise ValueError(f"a number from {lo:g} to {hi:g}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _mains(raw: str) -> int:
    return int(_choice("50", "60")(raw))


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
    if not raw.strip() or "\x00" in raw:  # a NUL fails every open() ("embedded null byte")
        raise ValueError("a file or folder path (without a NUL character)")
    return Path(raw.strip()).expanduser()


def _folder(raw: str) -> Path:
    """A folder the agent creates if need be: refused when it, or the nearest part of it
    that exists, is not a folder (a file named like it would fail the first write)."""
    path = _path(raw)
    probe = existing_ancestor(path)
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == path else f"is inside {probe}, which is"
        raise ValueError(f"a folder, but it {what} a file: point it at a folder, or remove "
                         "the file")
    return path


def _endpoint_url(raw: str) -> str | None:
    """An http(s) URL with a host (and a valid port, if any), or empty."""
    value = raw.strip()
    if not value:
        return None
    try:
        url = urlsplit(value)
        port_ok = url.port is None or url.port > 0
    except ValueError:
        port_ok = False
    if url.scheme not in ("http", "https") or not url.hostname or not port_ok:
        raise ValueError("an http:// or https:// URL with a host, e.g. "
                         "https://s3.eu-west-1.amazonaws.com, or empty for AWS's own")
    return value


def _optional_path(raw: str) -> Path | None:
    return _path(raw) if raw.strip() else None


# botocore's own rules, checked where the value is read: a bucket it refuses used to fail
# every queued item for good, a region it refuses stopped each pass with "unexpected error"
_BUCKET_RE = re.compile(
    r"^[a-zA-Z0-9.\-_]{1,255}$"
    r"|^arn:(aws).*:(s3|s3-object-lambda):[a-z\-0-9]*:[0-9]{12}:accesspoint[/:][a-zA-Z0-9\-.]{1,63}$"
    r"|^arn:(aws).*:s3-outposts:[a-z\-0-9]+:[0-9]{12}:outpost[/:][a-zA-Z0-9\-]{1,63}[/:]"
    r"accesspoint[/:][a-zA-Z0-9\-]{1,63}$")
_REGION_RE = re.compile(r"^(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)$")  # validate_region_name


def _bucket(raw: str) -> str | None:
    value = raw.strip()
    if value and not _BUCKET_RE.match(value):
        raise ValueError("a bucket name: letters, digits, . - _ (or an access point ARN)")
    return value or None


def _region(raw: str) -> str | None:
    value = raw.strip()
    if value and not _REGION_RE.match(value):
        raise ValueError("a region name such as eu-west-1")
    return value or None


_SERIAL_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _device_serial(raw: str) -> str:
    value = raw.strip()
    if not _SERIAL_RE.match(value):
        raise ValueError("1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def _optional_serial(raw: str) -> str | None:
    return _device_serial(raw) if raw.strip() else None


@dataclass(frozen=True)
class _Key:
    env: str
    attr: str
    parse: Callable[[str], object]
    default: str
    secret: bool = False
    file: bool = False  # a credential of this name is a file: its path is the value
    help: str = ""


# Legacy keys (kept exactly as the desktop app's .env) first, then the agent's own.
KEYS: tuple[_Key, ...] = (
    _Key("CLOUD_UPLOAD_ENABLED", "cloud_upload_enabled", _bool, "true",
         help="upload to the cloud at all"),
    _Key("CLOUD_SERVICE", "cloud_service", _choice("s3"), "s3",
         help="only s3 is supported"),
    _Key("AWS_S3_BUCKET", "s3_bucket", _bucket, "", help="bucket name"),
    _Key("AWS_S3_REGION", "s3_region", _region, "", help="bucket region"),
    _Key("AWS_ACCESS_KEY_ID", "aws_access_key_id", _optional, "", secret=True,
         help="leave empty to use boto3's credential chain"),
    _Key("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", _optional, "", secret=True),
    _Key("AWS_SESSION_TOKEN", "aws_session_token", _optional, "", secret=True),
    _Key("AWS_PROFILE", "aws_profile", _optional, "", help="named profile in ~/.aws"),
    _Key("AWS_ENDPOINT_URL_S3", "s3_endpoint_url", _endpoint_url, "",
         help="S3-compatible endpoint, e.g. http://127.0.0.1:9000"),
    _Key("AWS_IOT_CREDENTIAL_ENDPOINT", "iot_endpoint", _optional, "",
         help="AWS IoT credentials provider host (or https://host:port): per-unit identity"),
    _Key("AWS_IOT_ROLE_ALIAS", "iot_role_alias", _optional, ""),
    _Key("AWS_IOT_THING_NAME", "iot_thing_name", _optional_serial, "",
         help="default: DEVICE_SERIAL"),
    _Key("AWS_IOT_CERT_FILE", "iot_cert_file", _optional_path, "", file=True),
    _Key("AWS_IOT_KEY_FILE", "iot_key_file", _optional_path, "", file=True,
         help="the unit's private key; best as a systemd credential (LoadCredential=)"),
    _Key("AWS_IOT_CA_FILE", "iot_ca_file", _optional_path, "", file=True,
         help="the endpoint's CA; default: the system store"),
    _Key("S3_SSE", "s3_sse", _choice("aes256", "aws:kms"), "aes256",
         help="server-side encryption: aes256 (SSE-S3) or aws:kms"),
    _Key("S3_SSE_KMS_KEY_ID", "s3_sse_kms_key_id", _optional, "",
         help="KMS key id when S3_SSE=aws:kms"),
    _Key("S3_CONNECT_TIMEOUT_S", "s3_connect_timeout_s", _float_range(0.1, 120), "5"),
    _Key("S3_READ_TIMEOUT_S", "s3_read_timeout_s", _float_range(0.1, 600), "30",
         help="the whole answer to a small request must arrive within this"),
    _Key("S3_MIN_RATE_KBPS", "s3_min_rate_kbps", _float_range(0.1, 1_000_000), "16",
         help="a request may take 1 s more per this many KiB of body"),
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
    _Key("ECG_MAINS_HZ", "mains_hz", _mains, "50"),
    _Key("DEVICE_SERIAL", "device_serial", _device_serial, "UNSET-0000",
         help="this unit's serial number"),
    _Key("DEVICE_MODEL", "device_model", _text, "ECG12-PI"),
    _Key("DEVICE_MANUFACTURER", "device_manufacturer", _text, "device_agent",
         help="written into the DICOM equipment module"),
    _Key("REPORTS_DIR", "reports_dir", _folder, "./reports"),
    _Key("REPORT_MAX_MB", "report_max_mb", _float_range(0.01, 4096), "64",
         help="a dropped report (or its .json twin) larger than this is refused"),
    _Key("STATE_DIR", "state_dir", _folder, "./state"),
    _Key("USERS_FILE", "users_file", _path, "./users.json"),
    _Key("USERS_MAX_MB", "users_max_mb", _float_range(0.01, 1024), "4",
         help="a users file larger than this is refused (never read whole)"),
    _Key("SERVICE_USER", "service_user", _text, "device-agent",
         help="the account the service runs as; doctor checks permissions as it"),
    _Key("SYNC_INTERVAL_S", "sync_interval_s", _float_range(0.05, 86400), "15"),
    _Key("RETRY_MAX_BACKOFF_S", "retry_max_backoff_s", _float_range(1, 86400), "900"),
    _Key("DISK_RESERVE_MB", "disk_reserve_mb", _int_range(0, 1_000_000), "200",
         help="refuse captures when free space falls under this"),
    _Key("RETENTION_DAYS", "retention_days", _float_range(0, 36500), "30",
         help="prune delivered records older than this; undelivered are never pruned"),
    _Key("INCOMPLETE_GRACE_H", "incomplete_grace_h", _float_range(0, 8760), "24",
         help="remove capture folders a crash left without a manifest after this"),
    _Key("PACKAGE_DICOM", "package_dicom", _bool, "true",
         help="add ECG_{stamp}.dcm (DICOM 12-lead ECG) to every package"),
    _Key("REPORT_PAPER", "report_paper", _choice("a4", "letter"), "a4"),
    _Key("REPORT_GRID", "report_grid", _choice("red", "grey"), "red"),
    _Key("REPORT_FILTER", "report_filter", _choice(*REPORT_FILTERS), "0.05-150",
         help="display filter of the PDF traces in Hz (the JSON stays raw)"),
    _Key("REPORT_NOTCH", "report_notch", _bool, "false",
         help="mains notch on the PDF traces"),
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
    iot_endpoint: str | None
    iot_role_alias: str | None
    iot_thing_name: str | None
    iot_cert_file: Path | None
    iot_key_file: Path | None
    iot_ca_file: Path | None
    s3_sse: str
    s3_sse_kms_key_id: str | None
    s3_connect_timeout_s: float
    s3_read_timeout_s: float
    s3_min_rate_kbps: float
    s3_max_attempts: int
    serial_port: str
    baud_rate: int
    sampling_rate: int
    counts_per_mv: float
    byte_order: str
    capture_seconds: float
    max_lost_fraction: float
    max_gap_ms: float
    mains_hz: int
    device_serial: str
    device_model: str
    device_manufacturer: str
    reports_dir: Path
    report_max_mb: float
    state_dir: Path
    users_file: Path
    users_max_mb: float
    service_user: str
    sync_interval_s: float
    retry_max_backoff_s: float
    disk_reserve_mb: int
    retention_days: float
    incomplete_grace_h: float
    package_dicom: bool
    report_paper: str
    report_grid: str
    report_filter: str
    report_notch: bool
    log_level: str
    clock_check: str
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def thing_name(self) -> str:
        """The unit's AWS IoT thing name (AWS_IOT_THING_NAME, else DEVICE_SERIAL)."""
        return self.iot_thing_name or self.device_serial

    @property
    def report_max_bytes(self) -> int:
        return int(self.report_max_mb * 1024 * 1024)

    @property
    def users_max_bytes(self) -> int:
        return int(self.users_max_mb * 1024 * 1024)

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
        return replace(self, **changes)


def _strip_value(value: str) -> str:
    """A value as written after `=`: quotes removed, or a trailing ` # comment` cut."""
    value = value.strip()
    if value[:1] and value[0] in "\"'":  # ("" is in every string: `KEY=` is empty)
        quote = value[0]
        end = value.find(quote, 1)
        if end > 0:
            rest = value[end + 1:].strip()
            if not rest or rest.startswith("#"):
                return value[1:end]
        raise ValueError("an unterminated or trailing-text quoted value")
    if " #" in value:
        value = value.split(" #", 1)[0].rstrip()
    return value


def parse_env_file(text: str, *, origin: str) -> dict[str, str]:
    """Parse `KEY=VALUE` lines: comments, blank lines, `export`, quotes, ` # comment`.

    `KEY="b" # prod` is `b`; `DEVICE_MODEL=ECG 12 Pro` is the whole text after `=`.
    """
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
            raise ConfigError(f"{origin}:{lineno}: not a KEY=VALUE line; fix or remove it")
        try:
            values[key] = _strip_value(value)
        except ValueError as exc:
            raise ConfigError(f"{origin}:{lineno}: {key} has {exc}; fix the quotes") from None
    return values


def closest_key(name: str) -> str | None:
    """The known setting a misspelt key most likely meant, or None."""
    return closest(name, _BY_ENV)


def _unknown(name: str, origin: str) -> str:
    guess = closest_key(name)
    hint = f"; did you mean {guess}?" if guess else "; see `device-agent config` for the keys"
    return f"unknown setting {name} in {origin}{hint}"


def _read_env_file(path: Path, *, required: bool) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"env file {path} does not exist: check the --env-file path"
                              ) from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read env file {path}: {exc}; check its permissions") from exc
    values = parse_env_file(text, origin=str(path))
    if any(values.get(k.env) for k in KEYS if k.secret):
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("env file %s holds secrets but is readable by group or others "
                        "(mode %o); run: chmod 600 %s, or move the keys to credentials",
                        path, stat.S_IMODE(mode), path)
    for name in values:
        if name not in _BY_ENV:
            log.warning("%s", _unknown(name, f"env file {path}"))
    return values


def _read_credentials(directory: str | None) -> dict[str, str]:
    if not directory:
        return {}
    values = {}
    for key in KEYS:
        path = Path(directory) / key.env
        if key.file:  # an empty placeholder (install.sh makes them) means "not given"
            if path.is_file() and path.stat().st_size > 0:
                values[key.env] = str(path)
            continue
        try:
            values[key.env] = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read credential {path}: {exc}") from exc
    return values


def load_settings(
    *,
    env_file: Path | str | None = None,
    env_file_required: bool = False,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, the env file, credentials, environment and flags."""
    environ = {} if environ is None else environ
    layers: list[tuple[str, Mapping[str, str]]] = [
        ("default", {k.env: k.default for k in KEYS}),
    ]
    if env_file is not None:
        env_path = Path(env_file)
        layers.append((f"env file {env_path}",
                       _read_env_file(env_path, required=env_file_required)))
    creds_dir = environ.get("CREDENTIALS_DIRECTORY")
    layers.append((f"credential in {creds_dir}", _read_credentials(creds_dir)))
    for name in environ:
        if name.startswith(_OUR_PREFIXES) and name not in _BY_ENV:
            log.warning("%s", _unknown(name, "the environment"))
    layers.append(("environment", {k: v for k, v in environ.items() if k in _BY_ENV}))
    for name in overrides or {}:
        if name not in _BY_ENV:
            raise ConfigError(_unknown(name, "the command line (--set)"))
    layers.append(("command line", dict(overrides or {})))

    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    for origin, values in layers:
        for env_key, value in values.items():
            if env_key in _BY_ENV:
                raw[env_key] = value
                sources[env_key] = origin

    parsed: dict[str, Any] = {}
    for key in KEYS:
        problem = text_problem(raw[key.env])
        if problem:  # e.g. DEVICE_MODEL=$'\xff': it would fail the first PDF or DICOM written
            raise ConfigError(f"{key.env} (from {sources[key.env]}) holds {problem}; set it "
                              "again as UTF-8 text")
        try:
            parsed[key.attr] = key.parse(raw[key.env])
        except ValueError as exc:
            shown = "***" if key.secret else repr(raw[key.env])
            raise ConfigError(
                f"{key.env}={shown} (from {sources[key.env]}) is invalid: expected {exc}"
            ) from None
    _check_combinations(parsed, sources)
    return Settings(**parsed, sources=sources)


def _check_combinations(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    if not values["cloud_upload_enabled"]:
        return
    if values["s3_sse"] == "aws:kms" and not values["s3_sse_kms_key_id"]:
        raise ConfigError(f"S3_SSE=aws:kms (from {sources['S3_SSE']}) needs S3_SSE_KMS_KEY_ID: "
                          "set the KMS key id or use S3_SSE=aes256")
    if bool(values["aws_access_key_id"]) != bool(values["aws_secret_access_key"]):
        raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together "
                          "(or both left empty to use the boto3 credential chain)")
    if values["iot_endpoint"]:
        if values["aws_access_key_id"] or values["aws_profile"]:
            static = "AWS_ACCESS_KEY_ID" if values["aws_access_key_id"] else "AWS_PROFILE"
            raise ConfigError(
                f"AWS_IOT_CREDENTIAL_ENDPOINT (from {sources['AWS_IOT_CREDENTIAL_ENDPOINT']}) "
                f"and {static} (from {sources[static]}) are both set: a unit proves who it is "
                "with its certificate or with keys, not both; remove one")
        missing = [k for k, attr in (("AWS_IOT_ROLE_ALIAS", "iot_role_alias"),
                                     ("AWS_IOT_CERT_FILE", "iot_cert_file"),
                                     ("AWS_IOT_KEY_FILE", "iot_key_file"))
                   if not values[attr]]
        if missing:
            raise ConfigError("AWS_IOT_CREDENTIAL_ENDPOINT is set but " + ", ".join(missing)
                              + " is not: set them in the env file (docs/fleet-identity.md)")
