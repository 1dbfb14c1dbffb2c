"""File names dropped into reports/, generated: the legacy forms (`ECG_Report_{stamp}.pdf`,
`ECG_Report_12_1_{stamp}.pdf`, `..._{stamp}_1.pdf`), a patient's name around a stamp or
none, stamps that are not dates (`00010101_000000`, `20260230_...`), stamps inside longer
digit runs, `.PDF`, `.json` twins, controls, backslashes, bidi marks, bytes that are not
UTF-8, modification times before 2000. Two `sync --once` passes, then the outbox is lost and
a third runs: each uploadable report reaches S3 exactly once, byte for byte, under
`ecg-reports/YYYY/MM/DD/{its name}` dated as docs/s3-layout.md says; every other one is one
line; no name but the agent's own forms in a log line (also at --debug), `status`,
`queue list --all [--json]`, `verify --json` or metadata."""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from tests.properties import strategies as s
from tests.properties.conftest import examples
from tests.properties.harness import (
    Unit,
    assert_clean,
    assert_keys_in_layout,
    assert_not_shown,
    operator_views,
    shown_texts,
)

pytestmark = pytest.mark.functional
STAMP_IN_NAME = re.compile(r"(?<!\d)(\d{8}_\d{6})(?!\d)")  # docs/s3-layout.md, section 1
OWN_NAME = re.compile(r"^ECG_Report_\d{8}_\d{6}\.(pdf|json)$")
MTIMES = [datetime(2026, 3, 9, 10, 0, 0), datetime(1999, 12, 31, 12, 0, 0),
          datetime(2099, 1, 2, 3, 4, 5)]

stamps = st.one_of(
    s.real_dates.map(lambda d: d.strftime("%Y%m%d_%H%M%S")),
    st.sampled_from(["00010101_000000", "09991231_235959", "20261345_000000",
                     "20260230_120000", "19991231_235959", "99991231_235959"]))
tails = st.sampled_from(["pdf", "PDF", "Pdf", "pdf.pdf", "json", "txt", "pdf "])


@st.composite
def report_names(draw) -> str:
    stamp = draw(stamps)
    form = draw(st.sampled_from(["own", "12-lead", "taken", "patient", "no-stamp", "digits",
                                 "hostile"]))
    tail = draw(tails) if form in ("patient", "hostile", "no-stamp") else "pdf"
    stem = {
        "own": f"ECG_Report_{stamp}",
        "12-lead": f"ECG_Report_{draw(st.sampled_from(['12_1', '4_3', '6_2']))}_{stamp}",
        "taken": f"ECG_Report_{stamp}_{draw(st.integers(1, 9))}",
        "patient": f"{draw(s.identity())} {stamp}",
        "no-stamp": draw(s.identity()),
        "digits": f"ECG_{draw(st.sampled_from(['1', '٣', '']))}{stamp}"
                  f"{draw(st.sampled_from(['1', '_x', '']))}",
        "hostile": f"{draw(s.hostile_text)}{stamp}{draw(s.identity())}",
    }[form]
    return f"{stem}.{tail}"


@st.composite
def report_folders(draw) -> list[tuple[str | bytes, bool, datetime]]:
    """(name, with a .json twin, mtime) per file; a name may be bytes that are not UTF-8."""
    names = draw(st.lists(report_names(), min_size=1, max_size=5, unique=True))
    files: list[tuple[str | bytes, bool, datetime]] = []
    for name in names:
        raw: str | bytes = name
        if draw(st.integers(0, 9)) == 0:
            raw = b"\xff\xfe" + name.encode("utf-8", "surrogatepass")
        files.append((raw, draw(st.booleans()), draw(st.sampled_from(MTIMES))))
    return files


def _key_problem(name: str) -> bool:
    return (name in ("", ".", "..") or "\\" in name
            or any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name)
            or len(name.encode("utf-8", "surrogateescape")) > 255)


def _expected_key(name: str, mtime: datetime) -> tuple[str | None, bool]:
    """docs/s3-layout.md, section 1: the first stamp of the name that is a real date from
    2000 on, else the modification time from 2000 on (one line says so when the name had a
    stamp), else not uploaded. (key or None, whether the line is due)."""
    if _key_problem(name):
        return None, False
    when = None
    m = STAMP_IN_NAME.search(name)
    if m:
        try:
            when = datetime.strptime(m.group(1), "%Y%m%d_%H%M%S")
        except ValueError:
            when = None
        if when is not None and when.year < 2000:
            when = None
        if when is not None:
            return f"ecg-reports/{when:%Y/%m/%d}/{name}", False
    if mtime.year < 2000:
        return None, False
    return f"ecg-reports/{mtime:%Y/%m/%d}/{name}", bool(m)


def _write(folder: str, raw: str | bytes, body: bytes, mtime: datetime) -> str | None:
    """Create one file (bytes names through the bytes API); None when the OS refuses it."""
    path: str | bytes = (os.fsencode(folder) + b"/" + raw if isinstance(raw, bytes)
                         else f"{folder}/{raw}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


def test_every_report_lands_once_under_its_own_date_and_its_name_is_shown_nowhere(
        size, s3_endpoint):
    @examples(size, 6)
    @given(report_folders())
    def check(files: list[tuple[str | bytes, bool, datetime]]) -> None:
        with Unit(s3_endpoint) as unit:
            unit.reports.mkdir()
            listed: dict[str, tuple[bytes, datetime]] = {}  # name as the agent lists it
            for i, (raw, twin, mtime) in enumerate(files):
                body = b"%%PDF-1.4 synthetic report %d" % i
                name = _write(str(unit.reports), raw, body, mtime)
                if name is None:
                    reject()  # the OS refused the name
                listed[name] = (body, mtime)
                if twin and name.lower().endswith(".pdf"):
                    twin_raw = (raw[:-4] + b".json" if isinstance(raw, bytes)
                                else raw[:-4] + ".json")
                    twin_name = _write(str(unit.reports), twin_raw, b'{"twin": %d}' % i,
                                       mtime)
                    if twin_name is not None:
                        listed[twin_name] = (b'{"twin": %d}' % i, mtime)
            (unit.reports / "notes.txt").write_text("not a report")
            # the first pass at --debug: its log names no patient either (issue 22 item 6)
            passes = [unit.run("--debug", "sync", "--once"), unit.run("sync", "--once")]
            first = unit.objects()
            shutil.rmtree(unit.state)  # a reflashed card
            passes.append(unit.run("sync", "--once"))
            operator_views(unit)
            for run in passes:
                assert_clean(run, codes={0, 1})
            objects = unit.objects()
            assert objects == first, "a lost outbox sent nothing twice"
            assert_keys_in_layout(objects)

            expected: dict[str, bytes] = {}
            refused = dated_otherwise = 0
            for name, (body, mtime) in listed.items():
                is_pdf = name.lower().endswith(".pdf")
                is_twin = (name.endswith(".json") and any(
                    other.lower().endswith(".pdf") and other[:-4] == name[:-5]
                    for other in listed))
                if not (is_pdf or is_twin):
                    continue  # not a report: left alone, silently
                key, noted = _expected_key(name, mtime)
                if key is None:
                    refused += 1
                    continue
                expected[key] = body
                dated_otherwise += noted
            assert objects == expected, "each report once, byte for byte, nothing else"

            err = [line for run in passes[:2] for line in run.err_lines()
                   if not line.startswith("DEBUG ")]
            skipped = [line for line in err if re.search(r"report \S+ skipped", line)]
            assert len(skipped) == refused, "one line per refused report, once:\n" + \
                "\n".join(err)
            notes = [line for line in err if "dated by its modification time" in line]
            assert len(notes) == dated_otherwise, "\n".join(err)
            # README: 0 when nothing was refused, 1 when an input was skipped
            assert passes[0].rc == (1 if refused else 0), passes[0]

            shown_names = [n for n in listed if not OWN_NAME.match(n)]
            assert_not_shown(shown_names + [n.rsplit(".", 1)[0] for n in shown_names],
                             shown_texts(unit))

    check()
