"""Key naming follows the layout document exactly and nothing can climb out of the prefix."""

from __future__ import annotations

import posixpath
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.core import s3keys

SAFE_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def test_package_key_matches_layout_example():
    assert (
        s3keys.package_key("2026/01/24", "20260124_121815", "ECG_Report_20260124_121815.pdf")
        == "ecg-reports/2026/01/24/20260124_121815/ECG_Report_20260124_121815.pdf"
    )


@pytest.mark.parametrize(
    ("prefix", "stamp", "name"),
    [
        ("2026/1/24", "20260124_121815", "a.pdf"),
        ("2026/01/24", "2026-01-24", "a.pdf"),
        ("2026/01/24", "20260124_121815", "../x.pdf"),
        ("2026/01/24", "20260124_121815", ".."),
        ("2026/01/24", "20260124_121815", ""),
    ],
)
def test_package_key_rejects_malformed_parts(prefix, stamp, name):
    with pytest.raises(ValueError):
        s3keys.package_key(prefix, stamp, name)


def test_report_key_dates_from_name_not_mtime():
    mtime = datetime(2027, 3, 4, 5, 6, 7)
    assert (
        s3keys.report_key("ECG_Report_20260124_121815.pdf", mtime)
        == "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    )
    assert (
        s3keys.report_key("ECG_Report_20260124_121815.json", mtime)
        == "ecg-reports/2026/01/24/ECG_Report_20260124_121815.json"
    )


def test_report_key_falls_back_to_mtime():
    mtime = datetime(2027, 3, 4, 5, 6, 7)
    assert s3keys.report_key("holter.pdf", mtime) == "ecg-reports/2027/03/04/holter.pdf"
    # a stamp that is not a real date is not trusted
    assert (
        s3keys.report_key("ECG_Report_20261399_250000.pdf", mtime)
        == "ecg-reports/2027/03/04/ECG_Report_20261399_250000.pdf"
    )


def test_signup_key_matches_layout_examples():
    when = datetime(2026, 1, 24, 12, 4, 19)
    assert s3keys.signup_key("ptr", when) == (
        "ecg-reports/2026/01/24/user_signup_ptr_20260124_120419.json"
    )
    assert s3keys.signup_key("Divyansh", when) == (
        "ecg-reports/2026/01/24/user_signup_Divyansh_20260124_120419.json"
    )
    assert s3keys.signup_key("12345", when) == (
        "ecg-reports/2026/01/24/user_signup_12345_20260124_120419.json"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Dívyansh O'Neil", "Divyansh_O_Neil"),
        ("../../etc/x", "_._etc_x"),
        ("..", "user-" ),
        ("ptr", "ptr"),
        ("José.Ñúñez", "Jose.Nunez"),
    ],
)
def test_safe_username_examples(name, expected):
    safe = s3keys.safe_username(name)
    assert safe.startswith(expected)
    assert SAFE_RE.match(safe)


def test_traversal_username_stays_in_its_date_folder():
    key = s3keys.signup_key("../../etc/x", datetime(2026, 1, 24, 12, 4, 19))
    assert posixpath.normpath(key) == key
    assert key.startswith("ecg-reports/2026/01/24/user_signup_")
    assert key.count("/") == 4


def test_non_latin_username_gets_stable_distinct_tokens():
    a, b = s3keys.safe_username("דוד"), s3keys.safe_username("дмитрий")
    assert a == s3keys.safe_username("דוד")
    assert a != b and SAFE_RE.match(a) and SAFE_RE.match(b)


@given(st.text(max_size=200))
def test_safe_username_properties(name):
    safe = s3keys.safe_username(name)
    assert SAFE_RE.match(safe)
    assert 0 < len(safe) <= s3keys.USERNAME_MAX
    assert ".." not in safe and not safe.startswith(".")
    assert s3keys.safe_username(name) == safe


def test_disambiguated_key_is_deterministic_and_keeps_extension():
    sha = "ab" * 32
    key = "ecg-reports/2026/01/24/20260124_121815/ECG_Report_20260124_121815.pdf"
    out = s3keys.disambiguated_key(key, sha)
    assert out == (
        "ecg-reports/2026/01/24/20260124_121815/ECG_Report_20260124_121815__abababababab.pdf"
    )
    assert s3keys.disambiguated_key(key, sha) == out
    assert s3keys.disambiguated_key("ecg-reports/x", sha) == "ecg-reports/x__abababababab"
    with pytest.raises(ValueError):
        s3keys.disambiguated_key(key, "not-hex")


def test_object_metadata_has_only_provenance_fields():
    meta = s3keys.object_metadata(
        "ecg_report_pdf",
        "ECG_Report_20260124_121815.pdf",
        uploaded_at=datetime(2026, 1, 24, 12, 20, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        record_id="0b5c3a2e-1111-2222-3333-444455556666",
        device_serial="ECG-0042",
        sha256="cd" * 32,
    )
    assert meta == {
        "type": "ecg_report_pdf",
        "uploaded_at": "2026-01-24T12:20:00+05:30",
        "filename": "ECG_Report_20260124_121815.pdf",
        "sha256": "cd" * 32,
        "record-id": "0b5c3a2e-1111-2222-3333-444455556666",
        "device-serial": "ECG-0042",
    }


def test_object_metadata_values_are_ascii_and_kind_checked():
    meta = s3keys.object_metadata(
        "report_json", "ECG_Report_Ü.json", uploaded_at=datetime.now(UTC), sha256="0" * 64
    )
    assert all(v.isascii() for v in meta.values())
    # a name the agent did not give (it may carry a patient's name) is hashed, never shown
    assert meta["filename"].startswith("name#") and "Ü" not in meta["filename"]
    own = s3keys.object_metadata("ecg_report_pdf", "ECG_Report_20260124_121815.pdf",
                                 uploaded_at="now", sha256="0" * 64)
    assert own["filename"] == "ECG_Report_20260124_121815.pdf"
    with pytest.raises(ValueError):
        s3keys.object_metadata("patient_name", "x", uploaded_at="now", sha256="0" * 64)


@pytest.mark.parametrize("name", ["Zyxwa Qwertzuiop.pdf", "user_signup_ptr_20260124_120419.json",
                                  "ECG_Report_20260124_121815_J_Doe.pdf"])
def test_display_name_hashes_names_the_agent_did_not_give(name):
    shown = s3keys.display_name(name)
    assert shown.startswith("name#") and shown == s3keys.display_name(name)
    assert all(part not in shown for part in ("Zyxwa", "ptr", "Doe"))


@pytest.mark.parametrize(("name", "why"), [
    ("a\\b.pdf", "backslash"), ("a\nb.pdf", "control"), ("\udcff.pdf", "UTF-8"),
    ("x" * 300 + ".pdf", "255 bytes"), ("..", "dot"),
])
def test_key_problem_names_why_a_file_name_cannot_be_a_key(name, why):
    assert why in (s3keys.key_problem(name) or "")
    with pytest.raises(ValueError) as caught:
        s3keys.report_key(name, datetime(2026, 1, 1))
    assert name not in str(caught.value)  # the name itself never reaches an error


def test_content_types_come_from_one_table():
    assert s3keys.content_type("ECG_20260124_121815.dcm") == "application/dicom"
    assert s3keys.content_type("a/b/ECG_Report_x.PDF") == "application/pdf"
    assert s3keys.content_type("manifest_x.json") == "application/json"
    assert s3keys.content_type("noext") == "application/octet-stream"


def test_a_report_name_with_undecodable_bytes_cannot_form_a_key():
    assert s3keys.key_problem("ECG_Report_\udcff.pdf") == "bytes that are not UTF-8 in the name"
    assert s3keys.key_problem("ECG_Report_é.pdf") is None


def test_report_dates_keep_four_digit_years():
    assert s3keys.date_prefix(datetime(1, 2, 3)) == "0001/02/03"
    assert s3keys.stamp(datetime(999, 2, 3, 4, 5, 6)) == "09990203_040506"
    mtime = datetime(2026, 2, 3, 4, 5, 6)
    for name in ("ECG_Report_00010101_000000.pdf", "ECG_Report_09991231_235959.pdf"):
        when, note = s3keys.report_dating(name, mtime)
        assert when == mtime and note and "dated by its modification time" in note
        assert s3keys.report_key(name, mtime) == f"ecg-reports/2026/02/03/{name}"
    with pytest.raises(ValueError, match="neither its name nor its modification time"):
        s3keys.report_key("ECG_Report_00010101_000000.pdf", datetime(999, 1, 1))
    with pytest.raises(ValueError):
        s3keys.report_key("holter.pdf", None)


@pytest.mark.parametrize(("name", "expected"), [
    ("ECG_Report_12_1_20260127_175300.pdf", "ecg-reports/2026/01/27/"),
    ("ECG_Report_20260124_121815_1.pdf", "ecg-reports/2026/01/24/"),
    ("ECG_Report_4_3_20260128_095719_12.pdf", "ecg-reports/2026/01/28/"),
    ("scan-120260128_095719.pdf", "ecg-reports/2030/05/06/"),  # inside a longer number
])
def test_report_names_of_the_legacy_screens_are_dated_by_their_stamp(name, expected):
    assert s3keys.report_key(name, datetime(2030, 5, 6)) == expected + name


def test_safe_username_is_injective_on_names_that_clean_alike():
    names = ["José", "Jose", "Jose\u0301", "a/b", "a_b", "a b", "x" * 64 + "1", "x" * 64 + "2",
             "Jose-0123456789ab", "user-" + "0" * 12, "", "..", "דוד"]
    safe = [s3keys.safe_username(n) for n in names]
    assert len(set(safe)) == len(names)
    assert s3keys.safe_username("Jose") == "Jose" and s3keys.safe_username("a_b") == "a_b"
    assert all(len(s) <= s3keys.USERNAME_MAX for s in safe)
