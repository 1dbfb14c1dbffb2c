"""Per-unit identity: a local AWS IoT credentials provider over mutual TLS, in front of S3.

The provider runs on 127.0.0.1 with a test CA made here, hands out credentials that expire
seconds after botocore's refresh window opens, and checks the client certificate as AWS
IoT does. moto's S3 server accepts any credentials; a recording proxy shows which ones
each request was signed with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
from botocore.config import Config

from device_agent.core.errors import ConfigError, UploadError
from device_agent.shipping import credentials
from device_agent.shipping.credentials import IotConfig, inspect_certificate, iot_session
from device_agent.shipping.uploader import Uploader
from tests.conftest import wait_until
from tests.faultproxy import PORTAL_HTML, FaultProxy
from tests.pki import Issued, TestCA

pytestmark = pytest.mark.functional

ALIAS = "ecg-unit-uploader"
THING = "SN-0042"
UTC = dt.UTC


@dataclass
class ProviderState:
    """What the test provider does and what it issued."""

    lifetime_s: float = credentials.ADVISORY_REFRESH_S + 2.0
    mode: str = "ok"  # ok | malformed | stale | error | far (expires 9999-12-31, UTC-5)
    issued: list[tuple[str, str, str]] = field(default_factory=list)  # akid, secret, token
    refusals: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, document: object, content_type: str = "application/json"):
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state: ProviderState = self.server.state  # type: ignore[attr-defined]
        peer = self.connection.getpeercert() or {}
        cn = dict(pair[0] for pair in peer.get("subject", ())).get("commonName")
        match = re.fullmatch(r"/role-aliases/([^/]+)/credentials", self.path)
        if state.mode == "malformed":
            self._json(200, PORTAL_HTML, "text/html")
            return
        if state.mode == "error":
            self._json(500, {"message": "Internal error"})
            return
        if not match or match.group(1) != ALIAS:
            state.refusals.append(404)
            self._json(404, {"message": "Role alias does not exist"})
            return
        if self.headers.get(credentials.THING_HEADER) != cn:  # not attached to that thing
            state.refusals.append(403)
            self._json(403, {"message": "Access Denied"})
            return
        now = dt.datetime.now(UTC)
        lifetime = -60 if state.mode == "stale" else state.lifetime_s
        with state.lock:
            n = len(state.issued) + 1
            akid = f"ASIAIOTTEST{n:09d}"
            secret, token = secrets.token_urlsafe(30), f"IoTToken{n}-{secrets.token_urlsafe(60)}"
            state.issued.append((akid, secret, token))
        expiration = (now + dt.timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ")
        if state.mode == "far":
            expiration = "9999-12-31T23:59:59-05:00"  # past year 9999 in UTC
        self._json(200, {"credentials": {"accessKeyId": akid, "secretAccessKey": secret,
                                         "sessionToken": token, "expiration": expiration}})


@dataclass
class Pki:
    ca: TestCA
    other_ca: TestCA
    server: Issued
    device: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCA(tmp_path / "pki", "Fleet CA")
    other = TestCA(tmp_path / "other", "Rogue CA")
    return Pki(ca, other, ca.issue("iot.local", server=True), ca.issue(THING))


@pytest.fixture
def provider(pki: Pki) -> Iterator[tuple[str, ProviderState]]:
    """A mutual-TLS credentials provider on 127.0.0.1; yields (https URL, its state)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    server.state = ProviderState()  # type: ignore[attr-defined]
    context = pki.ca.server_context(pki.server, client_ca=pki.ca)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="iot-provider")
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", server.state  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _config(url: str, pki: Pki, device: Issued | None = None, **changes: str) -> IotConfig:
    device = device or pki.device
    values = {"endpoint": url, "role_alias": ALIAS, "thing_name": THING,
              "cert_file": str(device.cert_file), "key_file": str(device.key_file),
              "ca_file": str(pki.ca.cert_file), **changes}
    return IotConfig(**values)


def _s3(session: boto3.session.Session, endpoint: str):
    return session.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(retries={"mode": "standard", "total_max_attempts": 1}))


def _wire_keys(heads: list[bytes]) -> list[tuple[str, str | None]]:
    """(access key id, session token) of every recorded S3 request."""
    out = []
    for head in heads:
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        found = re.search(r"Credential=([^/]+)/", headers.get("authorization", ""))
        out.append((found.group(1) if found else "", headers.get("x-amz-security-token")))
    return out


def _bucket_keys(endpoint: str, bucket: str) -> list[str]:
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


# --- the happy path across refreshes ----------------------------------------------------------

def test_puts_keep_flowing_across_refreshes_signed_with_issued_keys(
        pki, provider, s3_endpoint, s3_bucket):
    url, state = provider
    session, _fetcher = iot_session(_config(url, pki), deadline_s=5, connect_timeout_s=2)
    with FaultProxy(int(urlparse(s3_endpoint).port or 0)) as proxy:
        client = _s3(session, proxy.url)
        assert state.issued == []  # building the client fetched nothing (offline boot works)
        puts = 0

        def put_and_count_refreshes() -> bool:
            nonlocal puts
            client.put_object(Bucket=s3_bucket, Key=f"ecg-reports/{puts:04d}.json", Body=b"{}")
            puts += 1
            return len(state.issued) >= 4

        wait_until(put_and_count_refreshes, timeout=40, interval=0.1,
                   what="four credential sets to be issued")
        heads = list(proxy.request_heads)

    issued = {akid: token for akid, _, token in state.issued}
    wire = _wire_keys(heads)
    assert len(wire) == puts
    for akid, token in wire:
        assert akid in issued and token == issued[akid]  # no env "testing" key, no mix-ups
    used = [akid for akid, _ in wire]
    assert len(set(used)) >= 3  # the keys changed across refreshes...
    assert len(used) > len(set(used))  # ...and were reused until their refresh window
    assert used == sorted(used)  # never an older set after a newer one
    assert len(_bucket_keys(s3_endpoint, s3_bucket)) == puts


# --- failures: one line, retryable, nothing lost ----------------------------------------------

def _put_fails(session: boto3.session.Session, endpoint: str, bucket: str) -> UploadError:
    uploader = Uploader(_s3(session, endpoint), bucket=bucket)
    with pytest.raises(UploadError) as info:
        uploader.put_new("ecg-reports/a.pdf", b"%PDF", sha256=hashlib.sha256(b"%PDF").hexdigest(),
                         metadata={}, content_type="application/pdf")
    error = info.value
    assert error.retryable and "\n" not in str(error)
    return error


def test_certificate_from_another_ca_is_rejected_then_rotated(pki, provider, s3_endpoint,
                                                              s3_bucket):
    url, state = provider
    rogue = pki.other_ca.issue(THING)
    config = _config(url, pki, rogue)
    session, _fetcher = iot_session(config, deadline_s=5, connect_timeout_s=2)
    uploader = Uploader(_s3(session, s3_endpoint), bucket=s3_bucket)
    body = b"%PDF rotated"
    sha = hashlib.sha256(body).hexdigest()
    with pytest.raises(UploadError) as info:
        uploader.put_new("ecg-reports/r.pdf", body, sha256=sha, metadata={},
                         content_type="application/pdf")
    error = info.value
    assert (error.retryable, error.code) == (True, "CertificateRejected")
    assert str(rogue.cert_file) in str(error) and "TLS alert" in str(error)
    assert "\n" not in str(error) and not state.issued
    assert _bucket_keys(s3_endpoint, s3_bucket) == []

    # rotation: the fleet CA's certificate and key replace the files in place, no restart
    rogue.cert_file.write_bytes(pki.device.cert_file.read_bytes())
    rogue.key_file.write_bytes(pki.device.key_file.read_bytes())
    result = uploader.put_new("ecg-reports/r.pdf", body, sha256=sha, metadata={},
                              content_type="application/pdf")
    assert result.outcome == "created" and len(state.issued) == 1


def test_expired_certificate_is_rejected_with_its_date(pki, provider, s3_endpoint, s3_bucket):
    url, _ = provider
    now = dt.datetime.now(UTC)
    expired = pki.ca.issue("expired-unit", not_before=now - dt.timedelta(days=400),
                           not_after=now - dt.timedelta(days=2))
    session, _fetcher = iot_session(_config(url, pki, expired, thing_name="expired-unit"),
                                    deadline_s=5, connect_timeout_s=2)
    error = _put_fails(session, s3_endpoint, s3_bucket)
    assert error.code == "CertificateRejected"
    assert f"expired on {(now - dt.timedelta(days=2)):%Y-%m-%d}" in str(error)
    assert _bucket_keys(s3_endpoint, s3_bucket) == []


def test_certificate_of_another_thing_gets_403(pki, provider, s3_endpoint, s3_bucket):
    url, state = provider
    session, _fetcher = iot_session(_config(url, pki, thing_name="SN-9999"), deadline_s=5,
                          connect_timeout_s=2)
    error = _put_fails(session, s3_endpoint, s3_bucket)
    assert error.code == "CertificateRejected" and state.refusals == [403]
    assert 'HTTP 403 "Access Denied"' in str(error) and "SN-9999" in str(error)


def test_unknown_role_alias_and_server_errors(pki, provider, s3_endpoint, s3_bucket):
    url, state = provider
    session, _fetcher = iot_session(_config(url, pki, role_alias="nope"), deadline_s=5,
                          connect_timeout_s=2)
    assert _put_fails(session, s3_endpoint, s3_bucket).code == "RoleAliasNotFound"
    state.mode = "error"
    session, _fetcher = iot_session(_config(url, pki), deadline_s=5, connect_timeout_s=2)
    assert _put_fails(session, s3_endpoint, s3_bucket).code == "CredentialsUnavailable"


def test_unreachable_endpoint(pki, s3_endpoint, s3_bucket):
    with FaultProxy(1) as closed:  # a port that refuses
        closed.set_mode("refuse")
        session, _fetcher = iot_session(_config(f"https://127.0.0.1:{closed.port}", pki),
                                        deadline_s=2, connect_timeout_s=1)
        error = _put_fails(session, s3_endpoint, s3_bucket)
    assert error.code == "ConnectionError" and f"127.0.0.1:{closed.port}" in str(error)
    assert _bucket_keys(s3_endpoint, s3_bucket) == []


def test_untrusted_provider_certificate(pki, provider, s3_endpoint, s3_bucket):
    url, _ = provider
    session, _fetcher = iot_session(_config(url, pki, ca_file=str(pki.other_ca.cert_file)),
                          deadline_s=5, connect_timeout_s=2)
    error = _put_fails(session, s3_endpoint, s3_bucket)
    assert error.code == "EndpointNotTrusted" and "AWS_IOT_CA_FILE" in str(error)


def test_malformed_and_stale_answers(pki, provider, s3_endpoint, s3_bucket):
    url, state = provider
    state.mode = "malformed"
    session, _fetcher = iot_session(_config(url, pki), deadline_s=5, connect_timeout_s=2)
    error = _put_fails(session, s3_endpoint, s3_bucket)
    assert error.code == "MalformedCredentials" and "not JSON" in str(error)
    assert "Guest Wi-Fi" not in str(error)  # the body is never echoed
    state.mode = "stale"
    session, _fetcher = iot_session(_config(url, pki), deadline_s=5, connect_timeout_s=2)
    assert _put_fails(session, s3_endpoint, s3_bucket).code == "RequestTimeTooSkewed"


def test_an_expiration_past_year_9999_pauses_the_queue_with_one_line(
        tmp_path, pki, provider, s3_endpoint, s3_bucket, monkeypatch, capsys):
    from device_agent.commands import main
    from device_agent.shipping.outbox import Outbox
    from tests.helpers import make_package

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    url, state = provider
    state.mode = "far"
    fetcher = credentials.IotCredentialFetcher(_config(url, pki), deadline_s=5,
                                               connect_timeout_s=2)
    with pytest.raises(UploadError) as info:
        fetcher.fetch()
    assert (info.value.code, info.value.scope) == ("MalformedCredentials", "queue")
    assert "before year 10000" in str(info.value)

    make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
    assert main([*_agent_flags(tmp_path, url, pki, s3_endpoint, s3_bucket),
                 "sync", "--once"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OverflowError" not in err
    assert err.count("before year 10000") == 1, err  # one line, not one per item
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as box:
        stats = box.stats()
    assert (stats.pending, stats.failed) == (4, 0)


def test_secrets_never_reach_the_log_and_key_mode_is_warned_once(
        pki, provider, s3_endpoint, s3_bucket, caplog):
    url, state = provider
    loose = pki.ca.issue(THING + "-loose", key_mode=0o640)
    config = _config(url, pki, loose, thing_name=THING + "-loose")
    fetcher = credentials.IotCredentialFetcher(config, deadline_s=5, connect_timeout_s=2)
    with caplog.at_level(logging.DEBUG, logger="device_agent"):
        first, second = fetcher(), fetcher()
        state.mode = "malformed"
        with pytest.raises(UploadError):
            fetcher()
    ours = [r for r in caplog.records if r.name.startswith("device_agent")]
    text = "\n".join(r.getMessage() for r in ours)
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0640" in warnings[0].getMessage()
    assert str(loose.key_file) in warnings[0].getMessage()
    key_pem = loose.key_file.read_text()
    for _, secret, token in state.issued:
        assert secret not in text and token not in text
    assert key_pem.splitlines()[1] not in text
    assert first["access_key"] != second["access_key"]


# --- configuration and the certificate report -------------------------------------------------

def test_config_urls_and_validation(pki):
    host = _config("abc123.credentials.iot.eu-west-1.amazonaws.com", pki)
    assert host.url == ("https://abc123.credentials.iot.eu-west-1.amazonaws.com/role-aliases/"
                        f"{ALIAS}/credentials")
    assert _config("https://127.0.0.1:8443/", pki).url == (
        f"https://127.0.0.1:8443/role-aliases/{ALIAS}/credentials")
    with pytest.raises(ConfigError, match="AWS_IOT_CREDENTIAL_ENDPOINT"):
        _config("http://127.0.0.1:8443", pki)
    with pytest.raises(ConfigError, match="AWS_IOT_THING_NAME is empty"):
        _config("h.example", pki, thing_name=" ")


def test_inspect_certificate_reads_dates_names_and_key_match(pki, tmp_path):
    info = inspect_certificate(str(pki.device.cert_file), str(pki.device.key_file))
    cert = pki.device.cert
    assert (info.not_before, info.not_after) == (cert.not_valid_before_utc,
                                                 cert.not_valid_after_utc)
    assert (info.subject_cn, info.issuer_cn) == (THING, "Fleet CA")
    assert info.key_matches and info.key_problem is None and info.key_mode_warning is None
    assert 6.9 < info.days_left <= 7.0

    # GeneralizedTime (2050 and later) as well as UTCTime; days left from a given "now"
    far = pki.ca.issue("far", not_before=dt.datetime(2049, 12, 31, 23, 0, 0, tzinfo=UTC),
                       not_after=dt.datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC))
    info = inspect_certificate(str(far.cert_file), str(far.key_file),
                               now=dt.datetime(2051, 1, 1, 3, 4, 5, tzinfo=UTC))
    assert info.not_before == dt.datetime(2049, 12, 31, 23, 0, 0, tzinfo=UTC)
    assert info.not_after == dt.datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert info.days_left == 1.0

    mismatch = inspect_certificate(str(pki.device.cert_file), str(far.key_file))
    assert not mismatch.key_matches and "is not the key of" in str(mismatch.key_problem)

    # an encrypted key is reported, never prompted for on a terminal
    from cryptography.hazmat.primitives import serialization as ser

    key = ser.load_pem_private_key(pki.device.key_file.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                            ser.BestAvailableEncryption(b"passphrase")))
    encrypted.chmod(0o600)
    locked = inspect_certificate(str(pki.device.cert_file), str(encrypted))
    assert not locked.key_matches and "is encrypted" in str(locked.key_problem)
    fetcher = credentials.IotCredentialFetcher(
        _config("https://127.0.0.1:9", pki, key_file=str(encrypted)), deadline_s=1,
        connect_timeout_s=1)
    with pytest.raises(UploadError) as fetch_error:
        fetcher()
    assert fetch_error.value.code == "CertificateUnreadable" and fetcher.fetches == 0
    with pytest.raises(UploadError) as info_error:
        inspect_certificate(str(pki.device.key_file), str(pki.device.key_file))
    assert info_error.value.code == "CertificateUnreadable"


# --- the agent itself, configured for per-unit identity ---------------------------------------

def _agent_flags(tmp_path: Path, url: str, pki: Pki, endpoint: str, bucket: str,
                 device: Issued | None = None) -> list[str]:
    device = device or pki.device
    values = {"STATE_DIR": tmp_path / "state", "REPORTS_DIR": tmp_path / "reports",
              "USERS_FILE": tmp_path / "users.json", "AWS_S3_BUCKET": bucket,
              "AWS_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
              "AWS_IOT_CREDENTIAL_ENDPOINT": url, "AWS_IOT_ROLE_ALIAS": ALIAS,
              "DEVICE_SERIAL": THING, "AWS_IOT_CERT_FILE": device.cert_file,
              "AWS_IOT_KEY_FILE": device.key_file, "AWS_IOT_CA_FILE": pki.ca.cert_file,
              "CLOCK_CHECK": "floor", "DISK_RESERVE_MB": "0", "S3_MAX_ATTEMPTS": "1",
              "RETRY_MAX_BACKOFF_S": "1"}
    flags = []
    for key, value in values.items():
        flags += ["--set", f"{key}={value}"]
    return flags


def test_the_agent_delivers_with_certificate_credentials_and_waits_out_an_outage(
        tmp_path, pki, provider, s3_endpoint, s3_bucket, monkeypatch, capsys):
    from device_agent.commands import main
    from device_agent.shipping.outbox import Outbox
    from tests.helpers import make_package

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)  # no shared key anywhere
    url, state = provider
    make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
    with FaultProxy(int(urlparse(s3_endpoint).port or 0)) as proxy:
        flags = _agent_flags(tmp_path, url, pki, proxy.url, s3_bucket)
        state.mode = "error"  # the provider is down: uploads wait, nothing is lost
        assert main([*flags, "sync", "--once"]) == 3
        assert "CredentialsUnavailable" in capsys.readouterr().err
        with Outbox(tmp_path / "state" / "outbox.sqlite3") as box:
            assert box.stats().pending == 4 and box.stats().failed == 0
            box.pause.lift()
        state.mode = "ok"
        assert main([*flags, "sync", "--once"]) == 0
        assert "delivered 4" in capsys.readouterr().out
        heads = list(proxy.request_heads)
    issued = {akid: token for akid, _, token in state.issued}
    wire = _wire_keys([h for h in heads if b" /" + s3_bucket.encode() in h])
    assert wire and all(akid in issued and token == issued[akid] for akid, token in wire)
    assert main([*flags, "status", "--json"]) == 1  # no service runs here
    doc = json.loads(capsys.readouterr().out)
    assert doc["credentials"]["source"] == f"AWS IoT certificate (thing {THING})"
    assert doc["credentials"]["certificate_expires"].startswith(str(dt.date.today().year))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # the test's own look at the bucket
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert len(_bucket_keys(s3_endpoint, s3_bucket)) == 4


def test_doctor_checks_the_certificate_and_warns_before_it_expires(tmp_path, pki, provider,
                                                                   s3_endpoint, s3_bucket):
    from device_agent.core.config import load_settings
    from device_agent.ops.doctor import check_identity

    url, _state = provider

    def settings(device: Issued):
        flags = _agent_flags(tmp_path, url, pki, s3_endpoint, s3_bucket, device)
        return load_settings(environ={}, overrides=dict(f.split("=", 1) for f in flags[1::2]))

    now = dt.datetime.now(UTC)
    year = pki.ca.issue(THING, not_after=now + dt.timedelta(days=365))
    checks = check_identity(settings(year))
    assert all(c.ok and not c.warn for c in checks), [c.message for c in checks]
    assert any("credentials obtained" in c.message for c in checks)
    soon = pki.ca.issue(THING, not_before=now - dt.timedelta(days=300),
                        not_after=now + dt.timedelta(days=12))
    checks = check_identity(settings(soon))
    assert checks[0].ok and checks[0].warn and "in 12 days" in checks[0].message
    gone = pki.ca.issue(THING, not_before=now - dt.timedelta(days=400),
                        not_after=now - dt.timedelta(days=1))
    checks = check_identity(settings(gone))
    assert not checks[0].ok and "expired on" in checks[0].message
    rogue = pki.other_ca.issue(THING)
    assert not all(c.ok for c in check_identity(settings(rogue)))


def test_certificate_and_static_keys_together_are_refused():
    from device_agent.core.config import load_settings

    with pytest.raises(ConfigError, match=r"AWS_IOT_CREDENTIAL_ENDPOINT.*AWS_ACCESS_KEY_ID"):
        load_settings(environ={}, overrides={
            "AWS_IOT_CREDENTIAL_ENDPOINT": "iot.example", "AWS_IOT_ROLE_ALIAS": ALIAS,
            "AWS_IOT_CERT_FILE": "/c.pem", "AWS_IOT_KEY_FILE": "/k.pem",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "x"})
