"""Per-unit AWS identity: temporary credentials from the AWS IoT credentials provider.

Each unit holds an X.509 certificate and key. Over mutual TLS it asks
`https://{endpoint}/role-aliases/{alias}/credentials` (header `x-amzn-iot-thingname`) for
temporary credentials, which botocore refreshes before they expire. Every failure is an
UploadError that the outbox retries: nothing is lost while a certificate is being fixed.
Secrets (the private key, the secret key, the session token) are never logged or shown.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import ssl
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from device_agent.core.config import Settings
from device_agent.core.errors import ConfigError, UploadError

if TYPE_CHECKING:
    import boto3

    from device_agent.shipping import transport

log = logging.getLogger(__name__)

THING_HEADER = "x-amzn-iot-thingname"
# botocore refreshes 15 min (advisory) / 10 min (mandatory) before expiry by default, but a
# role alias may hand out 15-minute credentials: that would fetch before every request
ADVISORY_REFRESH_S = 5 * 60
MANDATORY_REFRESH_S = 2 * 60
# AWS IoT role aliases issue credentials for at most 12 h; later than this is not theirs
MAX_LIFETIME_S = 36 * 3600

# HTTP status from the credentials provider -> (code, what to check)
_REFUSALS: dict[int, tuple[str, str]] = {
    400: ("CredentialsRequestInvalid", "check AWS_IOT_THING_NAME names the unit's IoT thing"),
    401: ("CertificateRejected", ""),
    403: ("CertificateRejected", ""),
    404: ("RoleAliasNotFound", "check AWS_IOT_ROLE_ALIAS exists in this account and region"),
}


_SETTINGS = {"endpoint": "AWS_IOT_CREDENTIAL_ENDPOINT", "role_alias": "AWS_IOT_ROLE_ALIAS",
             "thing_name": "AWS_IOT_THING_NAME", "cert_file": "AWS_IOT_CERT_FILE",
             "key_file": "AWS_IOT_KEY_FILE"}


@dataclass(frozen=True)
class IotConfig:
    """Where and as whom a unit asks for credentials; ca_file None means the system store."""

    endpoint: str
    role_alias: str
    thing_name: str
    cert_file: str
    key_file: str
    ca_file: str | None = None

    def __post_init__(self) -> None:
        for name, setting in _SETTINGS.items():
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{setting} is empty: set it for the AWS IoT credentials "
                                  "provider (docs/fleet-identity.md)")
        if "://" in self.endpoint and not self.endpoint.lower().startswith("https://"):
            raise ConfigError(f"AWS_IOT_CREDENTIAL_ENDPOINT={self.endpoint!r}: must be a host "
                              "name or an https:// URL (the certificate needs TLS)")

    @property
    def url(self) -> str:
        """The credentials URL for this unit's role alias."""
        base = self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}"
        netloc = urlsplit(base).netloc
        return f"https://{netloc}/role-aliases/{quote(self.role_alias, safe='')}/credentials"

    @property
    def host(self) -> str:
        """The endpoint's host[:port], for messages."""
        return urlsplit(self.url).netloc


# --- reading certificates without new dependencies --------------------------------------------

@dataclass(frozen=True)
class CertificateInfo:
    """What `doctor` shows about a unit's certificate and whether its key belongs to it."""

    cert_file: str
    subject_cn: str | None
    issuer_cn: str | None
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: float
    key_matches: bool
    key_problem: str | None
    key_mode_warning: str | None


_CN_OID = bytes([0x06, 0x03, 0x55, 0x04, 0x03])  # 2.5.4.3 commonName


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at `at`."""
    tag = der[at]
    length = der[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[start:start + count], "big")
        start += count
    end = start + length
    if end > len(der):
        raise ValueError("DER element runs past the end")
    return tag, start, end


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, vstart, vend = _tlv(der, start)
        out.append((tag, vstart, vend))
        start = vend
    return out


def _der_time(der: bytes, tag: int, start: int, end: int) -> dt.datetime:
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; years 50-99 are 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"tag {tag:#x} is not a time")
    if not text.endswith("Z") or len(text) != 15:
        raise ValueError(f"time {text!r} is not YYYYMMDDHHMMSSZ")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def _common_name(der: bytes, start: int, end: int) -> str | None:
    for _, set_start, set_end in _children(der, start, end):  # RDN SETs
        for _, seq_start, seq_end in _children(der, set_start, set_end):
            parts = _children(der, seq_start, seq_end)
            if len(parts) == 2 and der[seq_start:parts[0][2]] == _CN_OID:
                _, vstart, vend = parts[1]
                return der[vstart:vend].decode("utf-8", "replace")
    return None


def parse_certificate(der: bytes) -> tuple[dt.datetime, dt.datetime, str | None, str | None]:
    """(not_before, not_after, subject CN, issuer CN) of a DER X.509 certificate."""
    _, cstart, cend = _tlv(der, 0)
    _, tstart, tend = _children(der, cstart, cend)[0]  # tbsCertificate
    fields = _children(der, tstart, tend)
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, ...
    issuer, validity, subject = fields[2], fields[3], fields[4]
    (tb, sb, eb), (ta, sa, ea) = _children(der, validity[1], validity[2])
    return (_der_time(der, tb, sb, eb), _der_time(der, ta, sa, ea),
            _common_name(der, subject[1], subject[2]), _common_name(der, issuer[1], issuer[2]))


def certificate_der(cert_file: str) -> bytes:
    """The DER bytes of the first certificate in a PEM file (UploadError if unreadable)."""
    try:
        pem = Path(cert_file).read_text("ascii")
        begin = pem.index("-----BEGIN CERTIFICATE-----")
        end = pem.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
        return ssl.PEM_cert_to_DER_cert(pem[begin:end])
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UploadError(f"AWS_IOT_CERT_FILE {cert_file}: cannot read a PEM certificate "
                          f"({_reason(exc)}): check the file exists and is readable by the "
                          "agent's user", retryable=True,
                          scope="queue", code="CertificateUnreadable") from exc


def _reason(exc: BaseException) -> str:
    """A short reason for an OSError/SSLError, never file contents."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(getattr(exc, "reason", None) or type(exc).__name__)


def key_mode_warning(key_file: str) -> str | None:
    """One line if group or others may read the private key file, else None."""
    try:
        mode = os.stat(key_file).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"AWS_IOT_KEY_FILE {key_file} is readable by group/others (mode "
                f"{stat.S_IMODE(mode):04o}): chmod 600 it, or hand it over with systemd "
                "LoadCredential=")
    return None


def inspect_certificate(cert_file: str, key_file: str, *,
                        now: dt.datetime | None = None) -> CertificateInfo:
    """Validity, names and key match of the unit's certificate (for `doctor`)."""
    der = certificate_der(cert_file)
    try:
        not_before, not_after, subject, issuer = parse_certificate(der)
    except (ValueError, IndexError) as exc:
        raise UploadError(f"AWS_IOT_CERT_FILE {cert_file}: not an X.509 certificate ({exc})",
                          retryable=True, scope="queue", code="CertificateUnreadable") from exc
    problem = None
    try:
        _load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_file, key_file)
    except (OSError, _EncryptedKey) as exc:  # ssl.SSLError is an OSError
        problem = _key_problem(cert_file, key_file, exc)
    now = now or dt.datetime.now(dt.UTC)
    return CertificateInfo(cert_file, subject, issuer, not_before, not_after,
                           (not_after - now).total_seconds() / 86400, problem is None, problem,
                           key_mode_warning(key_file))


class _EncryptedKey(Exception):
    """The key asks for a passphrase; a service has no one to ask."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _load_identity(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load the certificate and key, never prompting on a terminal for a passphrase."""
    context.load_cert_chain(cert_file, key_file, password=_no_passphrase)


def _key_problem(cert_file: str, key_file: str, exc: BaseException) -> str:
    if isinstance(exc, _EncryptedKey):
        return (f"AWS_IOT_KEY_FILE {key_file} is encrypted and the agent cannot type its "
                "passphrase: store it unencrypted, mode 600, or hand it over with systemd "
                "LoadCredential=")
    reason = _reason(exc)
    if "KEY_VALUES_MISMATCH" in reason.upper():
        return (f"AWS_IOT_KEY_FILE {key_file} is not the key of AWS_IOT_CERT_FILE {cert_file}: "
                "install the key generated with this certificate")
    return (f"AWS_IOT_KEY_FILE {key_file}: cannot load it with AWS_IOT_CERT_FILE {cert_file} "
            f"({reason}): check it exists, is a PEM private key and is readable by the "
            "agent's user")


# --- fetching --------------------------------------------------------------------------------

class IotCredentialFetcher:
    """Fetches one set of temporary credentials; callable as botocore's refresh function."""

    def __init__(self, config: IotConfig, *, deadline_s: float, connect_timeout_s: float,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.config = config
        self.deadline_s = deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.fetches = 0
        self.last_expiry: str | None = None  # ISO 8601 UTC, of the credentials last fetched
        self._warned: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def _context(self) -> ssl.SSLContext:
        """A fresh mutual-TLS context each time, so a rotated certificate is picked up."""
        cfg = self.config
        try:
            context = ssl.create_default_context(cafile=cfg.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UploadError(f"AWS_IOT_CA_FILE {cfg.ca_file}: cannot load it ({_reason(exc)}): "
                              "check the path (Amazon Root CA 1 in PEM) or leave it empty for "
                              "the system store", retryable=True,
                              scope="queue", code="CAFileUnreadable") from exc
        # TLS 1.2: the provider refuses a certificate inside the handshake, with an alert the
        # unit can name; under TLS 1.3 it refuses after it, and the alert often arrives as a
        # bare connection reset (the request already sent). The provider speaks both.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            _load_identity(context, cfg.cert_file, cfg.key_file)
        except (OSError, _EncryptedKey) as exc:
            raise UploadError(_key_problem(cfg.cert_file, cfg.key_file, exc), retryable=True,
                              scope="queue",
                              code="CertificateUnreadable") from exc
        self._warn_key_mode()
        return context

    def _warn_key_mode(self) -> None:
        warning = key_mode_warning(self.config.key_file)
        if warning is None:
            return
        mark = (self.config.key_file, hash(warning))  # once per file and mode
        with self._lock:
            if mark in self._warned:
                return
            self._warned.add(mark)
        log.warning("%s", warning)

    def _expiry_hint(self) -> str:
        """Why a certificate may be refused, from its own dates (best effort)."""
        try:
            info = inspect_certificate(self.config.cert_file, self.config.key_file,
                                       now=self.clock())
        except UploadError:
            return ""
        if info.days_left < 0:
            return f"; it expired on {info.not_after:%Y-%m-%d}: issue a new one"
        if info.not_before > self.clock():
            return (f"; it is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC: check "
                    "the unit's clock (timedatectl)")
        return ""

    def _rejected(self, why: str) -> UploadError:
        cfg = self.config
        return UploadError(
            f"AWS IoT credentials endpoint {cfg.host} rejected certificate {cfg.cert_file} "
            f"({why}): check it is ACTIVE in AWS IoT, attached to thing {cfg.thing_name} and to "
            f"a policy allowing iot:AssumeRoleWithCertificate on role alias {cfg.role_alias}"
            f"{self._expiry_hint()}", retryable=True, scope="queue", code="CertificateRejected")

    def fetch(self) -> dict[str, str]:
        """Credentials as botocore's refresh metadata (access_key, secret_key, token, expiry)."""
        from device_agent.shipping import transport  # botocore and urllib3: not for `status`

        cfg = self.config
        context = self._context()
        try:
            response = transport.fetch(
                cfg.url, {THING_HEADER: cfg.thing_name, "Accept": "application/json"},
                deadline_s=self.deadline_s, connect_timeout_s=self.connect_timeout_s,
                ssl_context=context, max_bytes=transport.CREDENTIALS_ANSWER_MAX)
        except transport.TLSError as exc:
            if exc.peer_alert:
                raise self._rejected(f"TLS alert {exc.peer_alert}") from exc
            if exc.verify_message:
                raise UploadError(
                    f"AWS IoT credentials endpoint {cfg.host}: its server certificate is not "
                    f"trusted ({exc.verify_message}): check AWS_IOT_CREDENTIAL_ENDPOINT "
                    "(aws iot describe-endpoint --endpoint-type iot:CredentialProvider) and "
                    "AWS_IOT_CA_FILE; uploads wait meanwhile", retryable=True, scope="queue",
                    code="EndpointNotTrusted") from exc
            raise UploadError(
                f"AWS IoT credentials endpoint {cfg.host}: TLS failed ({exc}): check "
                "AWS_IOT_CREDENTIAL_ENDPOINT and whether a proxy or portal intercepts HTTPS; "
                "uploads wait meanwhile", retryable=True, scope="queue", code="TLSError") from exc
        except transport.OversizedAnswer as exc:
            raise UploadError(
                f"AWS IoT credentials endpoint {cfg.host} answered with more than "
                f"{transport.CREDENTIALS_ANSWER_MAX} bytes, far more than credentials take: "
                "check AWS_IOT_CREDENTIAL_ENDPOINT is the credentials provider endpoint, not a "
                "portal or proxy; uploads wait meanwhile", retryable=True, scope="queue",
                code="MalformedCredentials") from exc
        except transport.TransportError as exc:
            code = "Timeout" if isinstance(exc, TimeoutError) else "ConnectionError"
            raise UploadError(
                f"cannot reach the AWS IoT credentials endpoint {cfg.host} "
                f"({type(exc).__name__} during {exc.phase}): check the network and "
                "AWS_IOT_CREDENTIAL_ENDPOINT; uploads wait and resume", retryable=True,
                    scope="queue",
                code=code) from exc
        self.fetches += 1
        if response.status != 200:
            raise self._refused(response)
        metadata = self._parse(response)
        log.info("AWS IoT credentials for thing %s valid until %s", cfg.thing_name,
                 metadata["expiry_time"])
        self.last_expiry = metadata["expiry_time"]
        return metadata

    __call__ = fetch

    def _refused(self, response: transport.Response) -> UploadError:
        message = _server_message(response.body)
        why = f"HTTP {response.status}" + (f" {message}" if message else "")
        code, hint = _REFUSALS.get(response.status, ("", ""))
        if code == "CertificateRejected":
            return self._rejected(why)
        if code:
            return UploadError(f"AWS IoT credentials endpoint {self.config.host} refused "
                               f"({why}): {hint}", retryable=True, scope="queue", code=code)
        return UploadError(f"AWS IoT credentials endpoint {self.config.host} failed ({why}); "
                           "uploads wait and retry", retryable=True, scope="queue",
                           code="CredentialsUnavailable")

    def _parse(self, response: transport.Response) -> dict[str, str]:
        cfg = self.config

        def malformed(what: str) -> UploadError:
            # never echo the body: it may hold a secret
            return UploadError(
                f"AWS IoT credentials endpoint {cfg.host} answered 200 without usable "
                f"credentials ({what}; {response.header('content-type') or 'no content-type'}, "
                f"{len(response.body)} bytes): check AWS_IOT_CREDENTIAL_ENDPOINT is the "
                "credentials provider endpoint, not a portal or proxy", retryable=True,
                    scope="queue",
                code="MalformedCredentials")

        try:
            document = json.loads(response.body)
        except (UnicodeDecodeError, ValueError):
            raise malformed("not JSON") from None
        creds = document.get("credentials") if isinstance(document, Mapping) else None
        if not isinstance(creds, Mapping):
            raise malformed("no 'credentials' object")
        names = ("accessKeyId", "secretAccessKey", "sessionToken", "expiration")
        missing = [n for n in names if not isinstance(creds.get(n), str) or not creds[n]]
        if missing:
            raise malformed(f"missing {', '.join(missing)}")
        try:
            expiry = dt.datetime.fromisoformat(creds["expiration"])
            if expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=dt.UTC)
            expiry = expiry.astimezone(dt.UTC)  # 9999-12-31T23:59:59-05:00 is past year 9999
        except (ValueError, OverflowError):
            raise malformed("expiration is not an ISO 8601 time before year 10000") from None
        now = self.clock()
        if expiry - now > dt.timedelta(seconds=MAX_LIFETIME_S):
            # botocore would never refresh them: the queue would stall on ExpiredToken
            raise malformed(f"expiration {expiry:%Y-%m-%d %H:%M} UTC is more than "
                            f"{MAX_LIFETIME_S // 3600} h away; AWS IoT issues at most 12 h")
        if expiry <= now:
            raise UploadError(
                f"AWS IoT credentials from {cfg.host} expire at {expiry:%Y-%m-%d %H:%M:%S} UTC, "
                f"already past by the unit's clock ({now:%Y-%m-%d %H:%M:%S} UTC): check NTP "
                "(timedatectl)", retryable=True, scope="queue", code="RequestTimeTooSkewed")
        return {"access_key": creds["accessKeyId"], "secret_key": creds["secretAccessKey"],
                "token": creds["sessionToken"],
                "expiry_time": expiry.isoformat()}


def _server_message(body: bytes) -> str:
    """The provider's own {"message": ...} on an error answer, shortened, or ''."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return ""
    message = document.get("message") if isinstance(document, Mapping) else None
    return f'"{str(message)[:120]}"' if message else ""


# --- botocore wiring -------------------------------------------------------------------------

def _credentials_class() -> type:
    from botocore.credentials import DeferredRefreshableCredentials

    class IotCredentials(DeferredRefreshableCredentials):
        """Fetched on first use, refreshed ADVISORY_REFRESH_S before expiry."""

        _advisory_refresh_timeout = ADVISORY_REFRESH_S
        _mandatory_refresh_timeout = MANDATORY_REFRESH_S

    return IotCredentials


def make_provider(fetcher: IotCredentialFetcher) -> Any:
    """A botocore CredentialProvider whose credentials come from `fetcher`, lazily."""
    from botocore.credentials import CredentialProvider

    class IotCredentialProvider(CredentialProvider):
        METHOD = "iot-credentials-provider"
        CANONICAL_NAME = "AwsIotCredentialsProvider"

        def load(self) -> Any:
            # nothing is fetched here: a unit that boots offline still starts, and the
            # first S3 call fetches (or fails retryably)
            return _credentials_class()(refresh_using=fetcher, method=self.METHOD)

    return IotCredentialProvider()


def iot_session(config: IotConfig, *, deadline_s: float, connect_timeout_s: float
                ) -> tuple[boto3.session.Session, IotCredentialFetcher]:
    """A boto3 session whose clients sign with the unit's IoT credentials, refreshed in
    time, and the fetcher (it knows when the credentials it last fetched expire)."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    fetcher = IotCredentialFetcher(config, deadline_s=deadline_s,
                                   connect_timeout_s=connect_timeout_s)
    core.get_component("credential_provider").insert_before("env", make_provider(fetcher))
    return boto3.session.Session(botocore_session=core), fetcher


def config_from_settings(settings: Settings) -> IotConfig:
    """The IoT credentials provider settings as an IotConfig (thing: DEVICE_SERIAL default)."""
    return IotConfig(endpoint=settings.iot_endpoint or "",
                     role_alias=settings.iot_role_alias or "", thing_name=settings.thing_name,
                     cert_file=str(settings.iot_cert_file or ""),
                     key_file=str(settings.iot_key_file or ""),
                     ca_file=str(settings.iot_ca_file) if settings.iot_ca_file else None)
