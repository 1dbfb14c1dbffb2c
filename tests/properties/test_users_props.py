"""users.json from outside, generated: every shape the legacy app wrote (a dict keyed by
username, a list, either wrapped in {"users": ...}), hostile usernames (names that clean
alike, separators, controls, scripts that fold to nothing, lone surrogates), every date
form (legacy `registration_date`, `signup_date`, ISO, garbage, none), `serial_id` present,
empty or absent, and entries that are not users at all. Two `sync --once` passes, then the
outbox is lost and a third pass runs: each user reaches S3 exactly once, under the layout,
dated by the user; no name in a log line (also at --debug), `status`, `queue list --all
[--json]`, `verify --json` or object metadata; one line per refused entry."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.properties import strategies as s
from tests.properties.conftest import examples
from tests.properties.harness import (
    SIGNUP_FIELDS,
    SIGNUP_RE,
    Unit,
    assert_clean,
    assert_keys_in_layout,
    assert_not_shown,
    operator_views,
    shown_texts,
)

pytestmark = pytest.mark.functional
DATE_KEYS = ("registration_date", "signup_date", "registered_at")
TEXT_FIELDS = ("full_name", "phone", "serial_id", "email", "age", "gender")


@st.composite
def users_files(draw) -> tuple[Any, list[dict[str, Any]], list[Any]]:
    """(the users.json document, the user entries it holds as the legacy app meant them,
    the entries that are not users)."""
    users: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        user: dict[str, Any] = {"username": draw(st.one_of(
            s.identity(), st.sampled_from(["users", " Qzpadded77 ", "Qzplain42"])))}
        for key in draw(st.lists(st.sampled_from(DATE_KEYS), max_size=2, unique=True)):
            user[key] = draw(s.date_texts)
        for key in draw(st.lists(st.sampled_from(TEXT_FIELDS), max_size=4, unique=True)):
            user[key] = draw(st.one_of(s.identity(), s.scalars, s.json_values))
        if draw(st.booleans()):
            user["password"] = "not-a-real-password"
        users.append(user)
    if draw(st.booleans()):  # siblings whose names clean to the first one's, same second
        first = users[0]
        for sep in draw(st.lists(st.sampled_from(["/", "_", " ", "é", "e\u0301", "."]),
                                 min_size=1, max_size=3, unique=True)):
            users.append({**first, "username": f"{first['username']}{sep}x",
                          "full_name": "Qzsibling00"})
    shape = draw(st.sampled_from(["dict", "list", "wrapped-list", "wrapped-dict"]))
    junk = draw(st.lists(st.one_of(s.json_values, st.fixed_dictionaries(
        {"full_name": s.identity()})), max_size=2))  # entries that are not users
    if shape.endswith("list"):
        doc: Any = [*users, *junk]
    else:
        junk = []
        doc = {}
        for user in users:
            entry = {k: v for k, v in user.items() if k != "username"}
            if draw(st.booleans()):
                entry["username"] = user["username"]
            doc.setdefault(user["username"], entry)
        users = [{**entry, "username": name} for name, entry in doc.items()]
        if doc == {"users": {}}:
            users = []  # the wrapper with no users (a user's entry always has fields)
    if shape.startswith("wrapped"):
        doc = {"users": doc}
    return doc, users, junk


def _signup_text(value: Any) -> str:
    # what a signup body holds for a field (users._text's documented rule: text as text,
    # a number as its digits, nothing for null or a nested value; at most 500 characters)
    return "" if value is None or isinstance(value, dict | list) else str(value)[:500]


def _deliverable(user: dict[str, Any]) -> bool:
    fields = [user["username"], *(user.get(k) for k in TEXT_FIELDS)]
    return (isinstance(user["username"], str) and bool(user["username"].strip())
            and not any(s.has_surrogate(_signup_text(v)) for v in fields))


def _legacy_date(user: dict[str, Any]) -> datetime | None:
    """The registration second the entry gives when its first usable date is in the legacy
    form; None otherwise (another form: its key is checked for shape only)."""
    for key in DATE_KEYS:
        value = user.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        try:
            when = datetime.strptime(value.strip(), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            try:
                if datetime.fromisoformat(value.strip()).year >= 2000:
                    return None
            except ValueError:
                pass
            continue
        if when.year >= 2000:
            return when
    return None


def test_every_user_reaches_s3_once_dated_by_the_user_and_named_nowhere(size, s3_endpoint):
    @examples(size, 8)
    @given(users_files())
    def check(generated: tuple[Any, list[dict[str, Any]], list[Any]]) -> None:
        doc, users, junk = generated
        with Unit(s3_endpoint) as unit:
            unit.users_file.write_text(s.to_json(doc), encoding="ascii")
            # the first pass at --debug: its log names nobody either (issue 22 item 6)
            passes = [unit.run("--debug", "sync", "--once"), unit.run("sync", "--once")]
            first = unit.objects()
            shutil.rmtree(unit.state)  # a reflashed card: the outbox is lost
            passes.append(unit.run("sync", "--once"))
            operator_views(unit)
            for run in passes:
                assert_clean(run, codes={0, 1})
            objects = unit.objects()
            assert objects == first, "a lost outbox sent nobody again"
            assert_keys_in_layout(objects)

            expected: dict[str, dict[str, Any]] = {}
            refused: set[str] = set()
            for user in users:  # in file order: the first usable entry of a name counts
                name = user["username"].strip()
                if name in expected:
                    continue
                if _deliverable(user):
                    expected[name] = user
                else:
                    refused.add(name)
            bodies = {}
            for key, body in objects.items():
                m = SIGNUP_RE.match(key.rsplit("/", 1)[-1])
                assert m, f"not a signup key: {key!r}"
                assert key.split("/")[1:4] == [m.group(2)[:4], m.group(2)[4:6], m.group(2)[6:]]
                doc_ = json.loads(body)
                assert list(doc_) == SIGNUP_FIELDS and "password" not in body.decode()
                assert doc_["username"] not in bodies, f"{doc_['username']!r} twice"
                bodies[doc_["username"]] = (key, doc_)
            assert set(bodies) == set(expected), "no user lost, none invented"
            for name, user in expected.items():
                key, body = bodies[name]
                when = _legacy_date(user)
                if when is not None:
                    assert key.endswith(when.strftime("_%Y%m%d_%H%M%S.json")), (key, user)
                serial = user.get("serial_id", name)
                assert body["serial_id"] == _signup_text(serial)
                assert body["full_name"] == _signup_text(user.get("full_name"))

            # one line per refusal over two passes: users whose signup cannot be made, and
            # entries that are not users at all (a third pass on a new outbox says it again)
            lines = [line for run in passes[:2] for line in run.err_lines()
                     if "users file" in line and not line.startswith("DEBUG ")]
            refs = {m.group(1) for line in lines
                    if (m := re.search(r"users\.json: (user#[0-9a-f]{12}|entry \d+) ", line))}
            assert len(lines) == len(refs) == len(refused) + len(junk), passes
            # README: 0 when nothing was refused, 1 when an input was skipped
            assert passes[0].rc == (1 if refused or junk else 0), passes[0]

            identities = [v for u in users for k, v in u.items()
                          if k in ("username", "full_name", "phone", "email")]
            identities += [v for entry in junk if isinstance(entry, dict)
                           for v in entry.values()]
            assert_not_shown(identities, shown_texts(unit))

    check()
