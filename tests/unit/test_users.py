"""users.json in its legacy shapes; a broken file is reported, never reset; no passwords out."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from device_agent.core.errors import NotUnicodeText, UsersFileError
from device_agent.shipping.signups import SIGNUP_FIELDS, read_users, signup_document

USER = {"password": "hunter2-secret", "full_name": "Synthetic Person", "phone": "000",
        "serial_id": "SN-1", "email": "s@example.invalid", "age": 40, "gender": "F",
        "registration_date": "2026-01-24 12:04:19", "password_hash": "x", "pin": "9876"}


def test_dict_keyed_by_username(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"ptr": USER, "12345": {"full_name": ""}}))
    users = read_users(path)
    assert [u["username"] for u in users] == ["ptr", "12345"]
    assert users[0]["full_name"] == "Synthetic Person"


def test_list_and_wrapped_list(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps([{**USER, "username": "a"}, "junk", {"full_name": "no name"}]))
    assert [u["username"] for u in read_users(path)] == ["a"]
    path.write_text(json.dumps({"users": [{"username": " b "}]}))
    assert [u["username"] for u in read_users(path)] == ["b"]


def test_missing_file_is_no_users(tmp_path):
    assert read_users(tmp_path / "nope.json") == []


@pytest.mark.parametrize("content", [b"", b"  \n", b'{"ptr": {"full_na', b"\xff\xfe", b"42"])
def test_broken_file_raises_one_line_and_is_left_alone(tmp_path, content):
    path = tmp_path / "users.json"
    path.write_bytes(content)
    with pytest.raises(UsersFileError) as err:
        read_users(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert path.read_bytes() == content


def test_signup_document_has_exactly_legacy_fields_and_no_password():
    ist = timezone(timedelta(hours=5, minutes=30))
    when = datetime(2026, 1, 24, 12, 4, 19, tzinfo=ist)
    doc_bytes = signup_document({**USER, "username": "ptr"}, when)
    doc = json.loads(doc_bytes)
    assert tuple(doc) == SIGNUP_FIELDS
    assert doc["registration_date"] == "2026-01-24 12:04:19"
    assert doc["last_sync"] == "2026-01-24 12:04:19"
    assert doc["uploaded_at"] == "2026-01-24T12:04:19+05:30"
    # the same user always makes the same body: a unit that lost its outbox sends it again
    # byte for byte, and the conditional put says "already delivered"
    assert signup_document({**USER, "username": "ptr", "last_sync": "2026-11-01"},
                           when) == doc_bytes
    assert doc["age"] == "40" and doc["username"] == "ptr"
    assert b"hunter2" not in doc_bytes and b"password" not in doc_bytes and b"9876" not in doc_bytes


def test_signup_document_of_sparse_user_matches_legacy_example():
    when = datetime(2026, 1, 24, 12, 4, 19)
    doc = json.loads(signup_document({"username": "ptr", "serial_id": "ptr"}, when))
    assert doc == {"username": "ptr", "full_name": "", "phone": "", "serial_id": "ptr",
                   "email": "", "age": "", "gender": "",
                   "registration_date": "2026-01-24 12:04:19",
                   "last_sync": "2026-01-24 12:04:19", "uploaded_at": "2026-01-24T12:04:19"}


def test_a_user_field_that_is_not_unicode_is_refused_by_the_signup():
    with pytest.raises(NotUnicodeText, match="users file entry user#"):
        signup_document({"username": "ptr", "full_name": "\ud800x"}, None)
