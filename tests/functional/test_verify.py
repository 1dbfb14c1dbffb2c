"""verify finds objects deleted or altered behind the agent's back, against moto's HTTP server."""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest

from device_agent.commands.verify import run as cmd_verify
from device_agent.shipping.outbox import DELIVERED, Outbox
from device_agent.shipping.uploader import Uploader, make_client
from device_agent.shipping.verify import MISSING, OK, SHA, SIZE, Expected, verify_objects
from tests.functional.test_uploader import PATIENT, _drain, _settings
from tests.helpers import build, make_record

pytestmark = pytest.mark.functional


@pytest.fixture
def settings(tmp_path, s3_endpoint, s3_bucket):
    return _settings(tmp_path, s3_endpoint, AWS_S3_BUCKET=s3_bucket)


@pytest.fixture
def uploader(settings, s3_bucket):
    return Uploader(make_client(settings), bucket=s3_bucket)


def _put(uploader, key, body):
    sha = hashlib.sha256(body).hexdigest()
    uploader.put_new(key, body, sha256=sha, metadata={"sha256": sha},
                     content_type="application/octet-stream")
    return Expected(key, len(body), sha)


def test_verify_objects_reports_ok_missing_and_altered(uploader, s3_bucket):
    good = _put(uploader, "ecg-reports/a.json", b'{"a": 1}')
    gone = _put(uploader, "ecg-reports/b.json", b'{"b": 2}')
    same_size = _put(uploader, "ecg-reports/c.json", b'{"c": 3}')
    longer = _put(uploader, "ecg-reports/d.json", b'{"d": 4}')
    raw = uploader.client
    raw.delete_object(Bucket=s3_bucket, Key=gone.key)
    # another writer replaces objects, even copying our metadata: it must not fool verify
    raw.put_object(Bucket=s3_bucket, Key=same_size.key, Body=b'{"c": 9}',
                   Metadata={"sha256": same_size.sha256})
    raw.put_object(Bucket=s3_bucket, Key=longer.key, Body=b'{"d": 4, "x": 0}')
    findings = verify_objects(uploader, [good, gone, same_size, longer])
    assert [f.status for f in findings] == [OK, MISSING, SHA, SIZE]
    assert findings[0].method == "checksum"  # our own objects need no download
    assert findings[2].method == "get"  # theirs carry no SHA-256 checksum: hashed by GET
    assert findings[2].actual_sha256 == hashlib.sha256(b'{"c": 9}').hexdigest()
    assert findings[1].actual_size is None and not findings[1].ok


def test_cmd_verify_checks_what_the_outbox_delivered(tmp_path, settings, uploader, s3_bucket,
                                                     capsys):
    info = build(make_record(record_id="rec-v"), PATIENT, tmp_path / "r")
    _drain(tmp_path, uploader, info).close()  # STATE_DIR is tmp_path: the same outbox

    args = argparse.Namespace(json=False, repair=False)
    assert cmd_verify(settings, args) == 0
    assert "verified 4 objects" in capsys.readouterr().out

    pdf, patient = (next(f for f in info.files if f.kind == k)
                    for k in ("ecg_report_pdf", "patient_details"))
    uploader.client.delete_object(Bucket=s3_bucket, Key=info.key(pdf))
    uploader.client.put_object(Bucket=s3_bucket, Key=info.key(patient), Body=b"{}")
    assert cmd_verify(settings, argparse.Namespace(json=True, repair=False)) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 4 and report["problems"] == 2
    bad = {f["key"]: f["status"] for f in report["findings"] if not f["ok"]}
    assert bad == {info.key(pdf): MISSING, info.key(patient): SIZE}

    assert cmd_verify(settings, args) == 1
    out = capsys.readouterr().out
    assert info.key(pdf) in out and "1 missing" not in out and "2 missing or different" in out
    assert "verify --repair" in out

    # --repair queues both again; the next pass sends them and the conditional puts decide:
    # the missing PDF is put back, the object someone replaced is kept and ours goes beside it
    assert cmd_verify(settings, argparse.Namespace(json=False, repair=True)) == 1
    assert "2 queued again" in capsys.readouterr().out
    _drain(tmp_path, uploader).close()
    assert cmd_verify(settings, args) == 0, capsys.readouterr().out
    assert uploader.client.get_object(Bucket=s3_bucket, Key=info.key(pdf))["Body"].read() \
        == pdf.path.read_bytes()
    with Outbox.open(settings) as box:
        resent = [i for i in box.items.all(DELIVERED) if i.id > len(info.all_files)]
        assert sorted(str(i.outcome) for i in resent) == ["collision", "created"]


def test_cmd_verify_with_nothing_delivered_is_ok(settings, capsys):
    assert cmd_verify(settings, argparse.Namespace(json=False, repair=False)) == 0
    assert "verified 0 objects" in capsys.readouterr().out
