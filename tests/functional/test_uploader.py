"""Uploads against moto's real HTTP server: layout-exact keys, no duplicates, no overwrites."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from device_agent.core import s3keys
from device_agent.core.clock import Clock
from device_agent.core.config import load_settings
from device_agent.core.errors import UploadError
from device_agent.shipping.drain import Drainer, SynchronousExecutor
from device_agent.shipping.outbox import DELIVERED, FAILED, Outbox
from device_agent.shipping.uploader import (
    ALREADY_DELIVERED,
    COLLISION,
    CREATED,
    REPLACED,
    Uploader,
    classify_error,
    make_client,
)
from tests.faultproxy import FaultProxy
from tests.helpers import FakeEncoders, build, make_record, present

LAYOUT = Path(__file__).resolve().parents[2] / "docs" / "s3-layout.md"
IST = timezone(timedelta(hours=5, minutes=30))
PATIENT = {"first_name": "Zyxwa", "last_name": "Qwertzuiop", "age": "73", "gender": "M",
           "patient_name": "Zyxwa Qwertzuiop", "doctor": "Dr. Synthetic"}
ALLOWED_META = {"type", "uploaded_at", "filename", "sha256", "record-id", "device-serial"}
MOTO_PORT = re.compile(r":(\d+)$")


def _settings(tmp_path, endpoint, **extra):
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_S3_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "STATE_DIR": str(tmp_path), "S3_CONNECT_TIMEOUT_S": "2", "S3_READ_TIMEOUT_S": "5",
           **extra}
    return load_settings(env_file=None, environ={}, overrides=env)


@pytest.fixture
def settings(tmp_path, s3_endpoint, s3_bucket):
    return _settings(tmp_path, s3_endpoint, AWS_S3_BUCKET=s3_bucket)


@pytest.fixture
def client(settings):
    return make_client(settings)


@pytest.fixture
def uploader(client, s3_bucket):
    return Uploader(client, bucket=s3_bucket)


def _listed(client, bucket):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _layout_package_keys(date_prefix: str, stamp: str) -> list[str]:
    """Example 2 of the layout document (plus our manifest), date and stamp substituted."""
    layout = LAYOUT.read_text(encoding="utf-8")
    example = layout.split("### Example 2", 1)[1].split("###", 1)[0]
    names = re.findall(r"[\w.]+_20260124_121815\.\w+", example)
    assert len(names) == 3, names
    manifest = present(re.search(r"`(manifest_\{stamp\}\.json)`", layout)).group(1)
    names.append(manifest.replace("{stamp}", "20260124_121815"))
    return sorted(
        f"ecg-reports/2026/01/24/20260124_121815/{n}"
        .replace("2026/01/24", date_prefix).replace("20260124_121815", stamp)
        for n in names
    )


def _drain(tmp_path, uploader, info=None):
    """Queue a package (if given) and drain the outbox through the real delivery path."""
    import threading

    box = Outbox(tmp_path / "outbox.sqlite3")
    if info is not None:
        box.packages.add(info)
    drainer = Drainer(box, uploader, clock=Clock(check="floor"), stop=threading.Event(),
                      executor=SynchronousExecutor())
    for _ in range(3):
        drainer.drain()
    return box


@pytest.mark.functional
def test_package_lands_with_exact_layout_and_clean_metadata(tmp_path, settings, client,
                                                            uploader, s3_bucket):
    when = datetime(2026, 11, 27, 9, 5, 3, tzinfo=IST)
    info = build(make_record(when=when, record_id="rec-1"), PATIENT, tmp_path / "r")
    box = _drain(tmp_path, uploader, info)
    assert _listed(client, s3_bucket) == _layout_package_keys("2026/11/27", "20261127_090503")
    items = sorted(box.items.all(), key=lambda i: i.delivered_at)
    assert {i.outcome for i in items} == {CREATED} and {i.state for i in items} == {DELIVERED}
    assert items[-1].kind == "manifest", "the manifest goes last"

    for f in info.all_files:
        head = client.head_object(Bucket=s3_bucket, Key=info.key(f), ChecksumMode="ENABLED")
        meta = head["Metadata"]
        assert set(meta) <= ALLOWED_META and meta["type"] == f.kind
        assert meta["sha256"] == f.sha256 and meta["filename"] == f.name
        assert meta["record-id"] == "rec-1" and meta["device-serial"] == "ECG-0042"
        flat = " ".join(meta.values())
        for identity in ("Zyxwa", "Qwertzuiop", "Synthetic"):
            assert identity not in flat
        assert "73" not in meta.values() and not {"age", "name", "patient"} & set(meta)
        assert head["ServerSideEncryption"] == "AES256"
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == f.sha256
    box.close()


@pytest.mark.functional
def test_a_captive_portal_200_is_never_taken_as_delivery(tmp_path, s3_endpoint, s3_bucket,
                                                         s3_env):
    """An endpoint answering 200 OK with an HTML page stores nothing and proves nothing."""
    port = int(present(MOTO_PORT.search(s3_endpoint))[1])
    with FaultProxy(port) as proxy:
        proxy.set_mode("portal")
        settings = _settings(tmp_path, proxy.url, AWS_S3_BUCKET=s3_bucket,
                             S3_MAX_ATTEMPTS="1")
        info = build(make_record(record_id="portal"), PATIENT, tmp_path / "r",
                     encoders=FakeEncoders(dicom=True))
        box = _drain(tmp_path, Uploader.from_settings(settings), info)
        assert proxy.counts["portals"] >= 1
        assert box.stats().delivered == 0 and not box.items.all(DELIVERED)
        assert not box.items.all(FAILED), "nothing is given up: the queue waits"
        _, reason = box.pause.current()
        assert "Unproven" in reason and "captive portal" in reason
        proxy.set_mode("pass")  # the network is fixed: everything goes, once
        box.pause.lift()
        box = _drain(tmp_path, Uploader.from_settings(settings))
        assert box.stats().delivered == 5 and box.stats().pending == 0
        assert len(_listed(make_client(settings), s3_bucket)) == 5


@pytest.mark.functional
def test_a_dripping_answer_ends_at_the_deadline_and_delivers_later(tmp_path, s3_endpoint,
                                                                   s3_bucket, s3_env):
    port = int(present(MOTO_PORT.search(s3_endpoint))[1])
    with FaultProxy(port, drip_interval_s=0.5) as proxy:
        proxy.set_mode("drip")
        settings = _settings(tmp_path, proxy.url, AWS_S3_BUCKET=s3_bucket,
                             S3_MAX_ATTEMPTS="1", S3_READ_TIMEOUT_S="1", S3_CONNECT_TIMEOUT_S="1")
        up = Uploader.from_settings(settings)
        body = b"%PDF drip"
        with pytest.raises(UploadError) as err:
            up.put_new("ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf", body,
                       sha256=_sha(body), metadata={}, content_type="application/pdf")
        assert err.value.retryable and err.value.scope == "queue"
        assert err.value.code == "Timeout"
        assert proxy.counts["drip_answer_bytes"] >= 1, "the answer had started to drip"
        proxy.set_mode("pass")
        done = up.put_new("ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf", body,
                          sha256=_sha(body), metadata={}, content_type="application/pdf")
        assert done.outcome in (CREATED, ALREADY_DELIVERED)


@pytest.mark.functional
def test_report_rewritten_after_a_lost_answer_replaces_its_object(uploader, client, s3_bucket):
    """v1 landed but its answer was lost; the file is rewritten; v2 replaces v1 in place."""
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    v1, v2 = b"%PDF v1", b"%PDF v2 rewritten by the legacy app"
    client.put_object(Bucket=s3_bucket, Key=key, Body=v1, ChecksumAlgorithm="SHA256")
    result = uploader.put_new(key, v2, sha256=_sha(v2), metadata={},
                              content_type="application/pdf", ours=[_sha(v1)])
    assert result.outcome == REPLACED and result.key == key
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == v2
    assert _listed(client, s3_bucket) == [key], "no copy kept aside under __sha12"


@pytest.mark.functional
def test_objects_carry_the_owner_tag_the_bucket_policy_checks(tmp_path, settings, client,
                                                              s3_bucket):
    up = Uploader.from_settings(settings, client)
    body = b"{}"
    up.put_new("ecg-reports/t.json", body, sha256=_sha(body), metadata={},
               content_type="application/json")
    tags = client.get_object_tagging(Bucket=s3_bucket, Key="ecg-reports/t.json")["TagSet"]
    assert tags == [{"Key": "device", "Value": settings.device_serial}]


@pytest.mark.functional
def test_same_put_twice_is_already_delivered(uploader, client, s3_bucket):
    key, body = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf", b"%PDF one"
    meta = {"type": "ecg_report_pdf"}
    first = uploader.put_new(key, body, sha256=_sha(body), metadata=meta,
                             content_type="application/pdf")
    again = uploader.put_new(key, body, sha256=_sha(body), metadata=meta,
                             content_type="application/pdf")
    assert (first.outcome, again.outcome) == (CREATED, ALREADY_DELIVERED)
    assert again.key == key and again.etag == first.etag
    assert _listed(client, s3_bucket) == [key]


@pytest.mark.functional
def test_lost_response_then_botocore_retry_ends_already_delivered(uploader, client, s3_bucket):
    """The first PUT lands but its answer is dropped; botocore's retry gets a 412."""
    lost = []

    def drop_first_success(response, attempts, **kwargs):
        if response is not None and attempts == 1 and response[0].status_code == 200:
            lost.append(attempts)
            return 0  # "retry now", as if the 200 never arrived
        return None

    client.meta.events.register("needs-retry.s3.PutObject", drop_first_success)
    body = b'{"ecg": 1}'
    key = "ecg-reports/2026/01/24/20260124_121815/ecg_data_20260124_121815.json"
    result = uploader.put_new(key, body, sha256=_sha(body), metadata={},
                              content_type="application/json")
    assert lost == [1]
    assert result.outcome == ALREADY_DELIVERED and result.key == key
    assert _listed(client, s3_bucket) == [key]


@pytest.mark.functional
def test_different_file_at_same_key_is_kept_under_disambiguated_key(uploader, client,
                                                                    s3_bucket, caplog):
    key = "ecg-reports/2026/01/24/20260124_121815/ECG_Report_20260124_121815.pdf"
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"other device's report")
    body = b"%PDF ours"
    result = uploader.put_new(key, body, sha256=_sha(body), metadata={},
                              content_type="application/pdf")
    alt = s3keys.disambiguated_key(key, _sha(body))
    assert result.outcome == COLLISION and result.requested_key == key and result.key == alt
    assert "holds a different file" in caplog.text
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"other device's report"
    assert client.get_object(Bucket=s3_bucket, Key=alt)["Body"].read() == body
    # a retry of the collided upload is stable: same alternative key, still two objects
    again = uploader.put_new(key, body, sha256=_sha(body), metadata={},
                             content_type="application/pdf")
    assert (again.outcome, again.key) == (COLLISION, alt)
    assert _listed(client, s3_bucket) == sorted([key, alt])


@pytest.mark.functional
def test_modified_report_replaces_only_with_matching_etag(uploader, client, s3_bucket):
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    v1, v2 = b"%PDF v1", b"%PDF v2 amended"
    first = uploader.put_new(key, v1, sha256=_sha(v1), metadata={},
                             content_type="application/pdf")
    with pytest.raises(UploadError) as refused:
        uploader.replace(key, v2, sha256=_sha(v2), metadata={}, content_type="application/pdf",
                         if_match='"0123456789abcdef0123456789abcdef"')
    assert not refused.value.retryable and refused.value.code == "PreconditionFailed"
    assert key in str(refused.value) and s3_bucket in str(refused.value)
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == v1
    done = uploader.replace(key, v2, sha256=_sha(v2), metadata={},
                            content_type="application/pdf", if_match=first.etag)
    assert done.outcome == REPLACED and done.etag != first.etag
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == v2


@pytest.mark.functional
def test_sse_kms_is_requested_with_the_key_id(client, s3_bucket):
    kms = Uploader(client, bucket=s3_bucket, sse="aws:kms", kms_key_id="alias/ecg-test")
    body = b"{}"
    kms.put_new("ecg-reports/k.json", body, sha256=_sha(body), metadata={},
                content_type="application/json")
    head = client.head_object(Bucket=s3_bucket, Key="ecg-reports/k.json")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"].endswith("alias/ecg-test")


@pytest.mark.functional
def test_manifest_not_sent_when_a_data_file_fails(tmp_path, settings, client, uploader,
                                                  s3_bucket):
    info = build(make_record(record_id="rec-2"), PATIENT, tmp_path / "r")
    pdf = next(f for f in info.files if f.kind == "ecg_report_pdf")
    pdf.path.write_bytes(b"%PDF tampered after packaging")
    box = _drain(tmp_path, uploader, info)
    failed = box.items.all(FAILED)
    assert [i.kind for i in failed] == ["ecg_report_pdf"]
    assert "no longer matches" in failed[0].last_error
    listed = _listed(client, s3_bucket)
    assert not any("manifest_" in k for k in listed)
    assert info.key(pdf) not in listed
    assert len(listed) == 2


# --- classify_error: one place decides retryable vs permanent ---------------------------------


@pytest.mark.functional
def test_missing_bucket_pauses_the_queue_and_is_named(tmp_path, s3_endpoint, s3_env):
    settings = _settings(tmp_path, s3_endpoint, AWS_S3_BUCKET="no-such-bucket-here")
    up = Uploader.from_settings(settings)
    with pytest.raises(UploadError) as err:
        up.put_new("ecg-reports/x.json", b"{}", sha256=_sha(b"{}"), metadata={},
                   content_type="application/json")
    assert err.value.code == "NoSuchBucket" and err.value.retryable
    assert err.value.scope == "queue"
    assert "s3://no-such-bucket-here/ecg-reports/x.json" in str(err.value)
    assert "AWS_S3_BUCKET" in str(err.value)
    with pytest.raises(UploadError) as err:
        up.check_bucket()
    assert err.value.code == "NoSuchBucket"


@pytest.mark.functional
def test_wrong_credentials_pause_the_queue(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    import moto.settings

    # make moto's server check credentials (it accepts any by default)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    settings = _settings(tmp_path, s3_endpoint, AWS_S3_BUCKET=s3_bucket,
                         AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0",
                         AWS_SECRET_ACCESS_KEY="not-the-secret-value")
    up = Uploader.from_settings(settings)
    with pytest.raises(UploadError) as err:
        up.put_new("ecg-reports/x.json", b"{}", sha256=_sha(b"{}"), metadata={},
                   content_type="application/json")
    assert err.value.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")
    assert err.value.retryable and err.value.scope == "queue"
    assert "not-the-secret-value" not in str(err.value)
    assert s3_bucket in str(err.value)


@pytest.mark.functional
def test_connection_refused_is_retryable(tmp_path, s3_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens
    settings = _settings(tmp_path, f"http://127.0.0.1:{port}", AWS_S3_BUCKET="bkt",
                         S3_MAX_ATTEMPTS="1")
    up = Uploader.from_settings(settings)
    with pytest.raises(UploadError) as err:
        up.put_new("ecg-reports/x.json", b"{}", sha256=_sha(b"{}"), metadata={},
                   content_type="application/json")
    assert err.value.retryable and err.value.code == "ConnectionError"
    assert "s3://bkt/ecg-reports/x.json" in str(err.value)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(
    ("code", "status", "retryable", "scope"),
    [
        ("SlowDown", 503, True, "queue"),
        ("ServiceUnavailable", 503, True, "queue"),
        ("InternalError", 500, True, "queue"),
        ("RequestTimeout", 400, True, "queue"),
        ("SomethingNew", 502, True, "queue"),
        ("TooManyRequests", 429, True, "queue"),
        # credentials, policy, bucket: the queue waits for a person or a refresh
        ("AccessDenied", 403, True, "queue"),
        ("NoSuchBucket", 404, True, "queue"),
        ("InvalidAccessKeyId", 403, True, "queue"),
        ("SignatureDoesNotMatch", 403, True, "queue"),
        ("ExpiredToken", 400, True, "queue"),
        ("KMS.NotFoundException", 400, True, "queue"),
        ("SomethingNew", 400, True, "queue"),  # a proxy's answer without an S3 code
        # about this object alone
        ("OperationAborted", 409, True, "item"),
        ("KeyTooLongError", 400, False, "item"),
        ("EntityTooLarge", 400, False, "item"),
    ],
)
def test_classify_client_errors(code, status, retryable, scope):
    err = classify_error(_client_error(code, status), bucket="b", key="ecg-reports/k")
    assert err.retryable is retryable and err.code == code and err.scope == scope
    assert "s3://b/ecg-reports/k" in str(err) and f"HTTP {status}" in str(err)


def test_a_proxys_bare_403_and_404_pause_the_queue():
    for status in (403, 404):
        err = classify_error(_client_error(str(status), status), bucket="b", key="k")
        assert err.retryable and err.scope == "queue"


def test_classify_transport_errors():
    timeout = classify_error(ReadTimeoutError(endpoint_url="http://x"), bucket="b", key="k")
    refused = classify_error(EndpointConnectionError(endpoint_url="http://x"), bucket="b",
                             key="k")
    assert timeout.retryable and timeout.code == "Timeout" and timeout.scope == "queue"
    assert refused.retryable and refused.code == "ConnectionError"
    bug = classify_error(ValueError("bug"), bucket="b", key="k")
    assert bug.retryable and bug.scope == "item", "a bug in one item's path backs that item off"


def test_make_client_uses_standard_retries_and_timeouts(tmp_path):
    settings = _settings(tmp_path, "http://127.0.0.1:9", S3_MAX_ATTEMPTS="7")
    config = make_client(settings).meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 7}
    assert config.connect_timeout == 2 and config.read_timeout == 5
    from device_agent.shipping.transport import DeadlineSession

    session = make_client(settings)._endpoint.http_session
    assert isinstance(session, DeadlineSession), "every request has a total deadline"


def test_one_deadline_value_for_the_transport_and_the_watchdog(tmp_path):
    import threading
    import types

    settings = _settings(tmp_path, "http://127.0.0.1:9", AWS_S3_BUCKET="b",
                         S3_MIN_RATE_KBPS="4", S3_MAX_ATTEMPTS="2")
    uploader = Uploader.from_settings(settings)
    session = uploader.client._endpoint.http_session
    assert session.deadlines is uploader.deadlines  # computed once, shared
    mib = 1 << 20
    assert uploader.deadlines.request_s(mib) == 2 + 5 + 256  # 1 MiB at 4 KiB/s
    assert uploader.max_duration_s(mib) == 2 * (7 + 256 + 20)
    # a download's deadline follows the same rate (the answer's announced length) and cap
    assert uploader.deadlines.request_s(10**12) == uploader.deadlines.cap_s
    drainer = Drainer(Outbox(tmp_path / "o.sqlite3"), uploader, clock=Clock(check="floor"),
                      stop=threading.Event(), executor=SynchronousExecutor())
    try:
        item = types.SimpleNamespace(size=mib)
        # _limit reads only the item's size
        limit = drainer._limit(item)  # type: ignore[arg-type]
        assert limit == uploader.max_duration_s(mib) + 30  # the watchdog's
    finally:
        drainer.close()


def test_boto3_and_numpy_are_not_imported_by_the_light_modules():
    import subprocess
    import sys

    code = ("import sys, device_agent.core.s3keys, device_agent.documents.patient,"
            " device_agent.shipping.outbox, device_agent.ops.status;"
            "print('boto3' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
    assert boto3  # the tests themselves use it
