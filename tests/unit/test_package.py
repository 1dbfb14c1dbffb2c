"""Package assembly: files named from one stamp, a recorded decision, manifest last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent.core import s3keys
from device_agent.core.errors import PatientDetailsError
from device_agent.core.fsutil import sha256_file
from device_agent.documents.package import (
    QUEUED,
    REJECTED,
    WITHHELD,
    Disposition,
    decide,
    load_package,
    read_disposition,
)
from device_agent.documents.patient import read_patient, validate_patient
from device_agent.shipping.enqueue import reconcile_folders
from device_agent.shipping.outbox import Outbox
from tests.helpers import PATIENT, FakeEncoders, build, make_record, present


def test_package_has_layout_names_and_manifest_vouches_for_files(tmp_path):
    record = make_record(record_id="11111111-2222-3333-4444-555555555555")
    info = build(record, PATIENT, tmp_path / "records")
    stamp = "20260124_121815"
    assert info.folder == tmp_path / "records" / stamp
    assert sorted(p.name for p in info.folder.iterdir()) == sorted([
        f"ECG_Report_{stamp}.pdf", f"patient_details_{stamp}.json",
        f"ecg_data_{stamp}.json", f"manifest_{stamp}.json", "disposition.json",
    ])
    assert info.date_prefix == "2026/01/24" and info.stamp == stamp
    assert info.device_serial == "ECG-0042"
    assert {info.key(f) for f in info.files} == {
        f"ecg-reports/2026/01/24/{stamp}/ECG_Report_{stamp}.pdf",
        f"ecg-reports/2026/01/24/{stamp}/patient_details_{stamp}.json",
        f"ecg-reports/2026/01/24/{stamp}/ecg_data_{stamp}.json",
    }
    doc = json.loads(info.manifest.path.read_bytes())
    assert doc["record_id"] == record.record_id and doc["device_serial"] == "ECG-0042"
    assert doc["acquired_at"] == "2026-01-24T12:18:15+05:30"
    for entry, f in zip(doc["files"], info.files, strict=True):
        assert entry["sha256"] == sha256_file(f.path) == f.sha256
        assert entry["size"] == f.path.stat().st_size == f.size
        assert entry["key"] == info.key(f)
    assert load_package(info.folder) == info
    # the record's own measurements are what was encoded (measured once, at capture)
    data = json.loads((info.folder / f"ecg_data_{stamp}.json").read_bytes())
    assert data["m"] == {"heart_rate_bpm": 60}
    assert read_disposition(info.folder) == Disposition(QUEUED)


def test_dicom_copy_is_listed_in_the_manifest_and_keyed_beside_the_others(tmp_path):
    info = build(make_record(record_id="d1"), PATIENT, tmp_path, encoders=FakeEncoders(dicom=True))
    names = {f.name for f in info.files}
    assert f"ECG_{info.stamp}.dcm" in names and len(info.files) == 4
    doc = json.loads(info.manifest.path.read_bytes())
    assert {e["kind"] for e in doc["files"]} == {"ecg_report_pdf", "patient_details",
                                                 "ecg_12lead_data", "ecg_dicom"}
    assert load_package(info.folder) == info


def test_decision_rejected_and_withheld_never_queue():
    ok = make_record()
    assert decide(ok, withheld=False) == Disposition(QUEUED)
    assert decide(ok, withheld=True).decision == WITHHELD
    from dataclasses import replace

    from device_agent.core.record import Quality

    bad = replace(ok, quality=Quality(verdict="rejected", reasons=("lost 9% of samples",)))
    assert decide(bad, withheld=False) == Disposition(REJECTED, "lost 9% of samples")
    assert decide(bad, withheld=True).decision == REJECTED  # rejection wins


@pytest.mark.parametrize("decision", [WITHHELD, REJECTED])
def test_reconcile_never_queues_a_withheld_or_rejected_folder(tmp_path, decision):
    root = tmp_path / "records"
    info = build(make_record(record_id="w1"), PATIENT, root,
                 disposition=Disposition(decision, "by test"))
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        assert reconcile_folders(root, box) == []
        assert box.items.due() == []
        assert present(box.packages.row(info.folder)).disposition == decision
        assert reconcile_folders(root, box) == []  # and on every later pass


def test_reconcile_queues_a_queued_folder_the_outbox_lost(tmp_path):
    root = tmp_path / "records"
    info = build(make_record(record_id="q1"), PATIENT, root)
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        assert reconcile_folders(root, box) == [info.folder]
        assert len(box.items.due()) == 3  # the data files; the manifest waits for them


def test_reconcile_leaves_an_older_agents_undecided_folder_and_names_it(tmp_path):
    root = tmp_path / "records"
    info = build(make_record(record_id="old"), PATIENT, root)
    (info.folder / "disposition.json").unlink()
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        assert reconcile_folders(root, box) == []
        assert box.items.due() == []
        assert [p.reason for p in box.problems.all()] == ["no upload decision recorded"]


def test_patient_details_carry_record_id_and_time(tmp_path):
    record = make_record(record_id="abc")
    info = build(record, {**PATIENT, "record_id": "stale", "ward": "3B"}, tmp_path)
    pd = json.loads(next(f for f in info.files if f.kind == "patient_details").path.read_text())
    assert pd["record_id"] == "abc" and pd["acquired_at"] == "2026-01-24T12:18:15+05:30"
    assert pd["first_name"] == "Test" and pd["Org."] == "Demo Clinic" and pd["ward"] == "3B"


def test_record_without_id_gets_one_minted(tmp_path):
    info = build(make_record(), None, tmp_path)
    assert info.record_id and len(info.record_id) == 36


def test_same_second_capture_gets_its_own_folder_and_same_names(tmp_path):
    a = build(make_record(record_id="aaaaaaaa-1"), PATIENT, tmp_path)
    b = build(make_record(record_id="bbbbbbbb-2"), PATIENT, tmp_path)
    assert a.folder != b.folder and b.folder.name == "20260124_121815_bbbbbbbb"
    assert [a.key(f) for f in a.files] == [b.key(f) for f in b.files]
    assert load_package(a.folder).record_id == "aaaaaaaa-1"  # first one untouched
    # rebuilding the same record reuses its own folder
    again = build(make_record(record_id="bbbbbbbb-2"), PATIENT, tmp_path)
    assert again.folder == b.folder


def test_folder_without_manifest_is_incomplete(tmp_path):
    info = build(make_record(record_id="x1"), PATIENT, tmp_path)
    info.manifest.path.unlink()
    with pytest.raises(ValueError, match="manifest"):
        load_package(info.folder)


def test_bad_patient_block_writes_nothing_and_never_echoes_the_value(tmp_path):
    with pytest.raises(PatientDetailsError, match="age") as caught:
        build(make_record(), {"age": "Zyxwa-forty"}, tmp_path / "r")
    assert "Zyxwa" not in str(caught.value)
    assert not (tmp_path / "r").exists()


def test_patient_file_is_read_bounded_and_never_through_a_link(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"first_name": "Syn"}))
    assert read_patient(good) == {"first_name": "Syn"}
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:
        fh.truncate(200 * 1024 * 1024)  # sparse: 200 MB that costs no disk
    with pytest.raises(PatientDetailsError, match="larger than 64 KiB"):
        read_patient(huge)
    with pytest.raises(PatientDetailsError, match=r"not a regular|character device"):
        read_patient(Path("/dev/zero"))
    link = tmp_path / "link.json"
    link.symlink_to(good)
    with pytest.raises(PatientDetailsError, match="symbolic link"):
        read_patient(link)


@pytest.mark.parametrize(
    "patient",
    [
        {"first_name": 7},
        {"first_name": "x" * 101},
        {"age": 200},
        {"age": True},
        {"notes": {"nested": 1}},
        {"../evil": "x"},
        {f"k{i}": i for i in range(40)},
        ["not", "a", "dict"],
    ],
)
def test_validate_patient_refuses(patient):
    with pytest.raises(PatientDetailsError):
        validate_patient(patient)


def test_validate_patient_accepts_legacy_forms():
    out = validate_patient({"age": 45, "gender": None, "first_name": "A", "height_cm": 170})
    assert out == {"age": 45, "gender": "", "first_name": "A", "height_cm": 170}
    assert validate_patient({"age": ""}) == {"age": ""}


def test_real_record_with_real_encoders(tmp_path, ecg_data_dir):
    """The real JSON, PDF and DICOM encoders on a real, measured recording."""
    from device_agent.capture import PackageEncoders, measure_once
    from device_agent.core.config import load_settings
    from device_agent.documents import ecgdata

    settings = load_settings(environ={}, overrides={"STATE_DIR": str(tmp_path)})
    record = measure_once(make_record(ecg_data_dir), mains_hz=50)
    info = build(record, PATIENT, tmp_path, encoders=PackageEncoders(settings))
    data_file = next(f for f in info.files if f.kind == "ecg_12lead_data")
    back = ecgdata.loads(data_file.path.read_bytes())
    assert back.record_id == info.record_id
    assert 60 < back.measurements["heart_rate_bpm"] < 75  # README: 68-69 bpm
    assert back.measurements == record.measurements
    pdf = next(f for f in info.files if f.kind == "ecg_report_pdf")
    assert pdf.path.read_bytes().startswith(b"%PDF")
    dcm = next(f for f in info.files if f.kind == "ecg_dicom")
    assert dcm.path.read_bytes()[128:132] == b"DICM"
    assert s3keys.stamp(back.acquired_at) == info.stamp
