"""The patient file from outside, generated: every key of README's table (and its legacy
aliases), misspelt and unknown keys, our own `record_id`/`acquired_at`, values of every JSON
type, hostile text (lone surrogates, controls, scripts, 500+ characters), ages and dates of
birth in every form a front end sends ("45", " 45 ", "²", "١٥٠", 45.0, -1, true).

`report` and `export --format dicom` run in-process (many examples: they are the same gate
and the same writers as a capture); a few examples run the whole way as subprocesses: a
board simulator on a pseudo-terminal, `capture --patient`, `sync --once` to moto. Each
file is either refused in one line before anything is written (exit 2) or every document
is written and the patient block lands in S3 as given; never a traceback, never the
patient's name, id or phone in a log line or in object metadata."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.commands import main
from device_agent.documents.patient import KNOWN_KEYS
from tests.properties import strategies as s
from tests.properties.conftest import examples
from tests.properties.harness import (
    Run,
    Unit,
    assert_clean,
    assert_keys_in_layout,
    assert_not_shown,
    shown_texts,
)

pytestmark = pytest.mark.functional
CPM = 400.0
IDENTITY_KEYS = ("first_name", "last_name", "patient_name", "name", "patient_id", "id",
                 "doctor", "doctor_mobile", "Org.")
ages = st.one_of(st.sampled_from(["45", " 45 ", "", "²", "١٥٠", "٣", "0", "150", "151", "-1",
                                  "45.0", "4 5", "0x2d", "1e2", "045", "\ud800"]),
                 st.integers(-5, 200), st.floats(allow_nan=False), st.booleans(), st.none(),
                 s.json_values)
dobs = st.one_of(st.sampled_from(["1980-01-31", "1980-13-45", "٢٠٢٦-٠١-٢٤", "1980-01-31\n",
                                  "", "31/01/1980", "0000-00-00"]),
                 s.real_dates.map(lambda d: d.strftime("%Y-%m-%d")), s.scalars)
unknown_keys = st.one_of(st.sampled_from(["nmae", "first name", "Phone", "address",
                                          "record_id", "acquired_at", "a" * 65, "",
                                          "name\n", "ключ", "x.y", "__proto__"]),
                         st.text(max_size=8))


AGE_TEXTS = st.sampled_from(["45", " 45 ", "", "²", "١٥٠", "٣", "0", "150", "151", "-1",
                             "45.0", "4 5", "0x2d", "1e2", "045", "\ud800", "⑤", "Ⅻ"])


@st.composite
def patients(draw) -> dict[str, Any]:
    """A plausible patient (synthetic names carrying canaries), then 1-3 hostile keys."""
    valid = s.identity().filter(lambda v: not s.has_surrogate(v) and len(v) <= 100)
    doc: dict[str, Any] = {"first_name": draw(valid), "last_name": draw(s.canary),
                           "patient_id": draw(s.canary), "age": "45", "gender": "F",
                           "dob": "1980-01-31", "doctor": draw(valid),
                           "doctor_mobile": draw(s.canary)}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(KNOWN_KEYS), st.just("age"), unknown_keys))
        if key == "age":
            doc[key] = draw(st.one_of(AGE_TEXTS, AGE_TEXTS, ages))
        elif key in ("dob", "date_of_birth"):
            doc[key] = draw(dobs)
        elif key in ("id", "patient_id"):
            doc[key] = draw(st.one_of(s.identity(), st.integers(-10**20, 10**20), s.scalars))
        else:
            doc[key] = draw(st.one_of(s.identity(), s.identity(), s.scalars, s.json_values))
    return doc


def _identities(patient: dict[str, Any]) -> list[str]:
    return [v for k, v in patient.items() if isinstance(v, str) and (
        k in IDENTITY_KEYS or k not in KNOWN_KEYS)]


def _main(argv: list[str]) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
    return Run(argv, rc, out.getvalue(), err.getvalue())


def _assert_one_refusal(run: Run, written: list[Path]) -> None:
    lines = [line for line in run.err_lines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and "patient details" in lines[0], run
    assert not [p for p in written if p.exists()], f"a refused file wrote something: {run}"


@pytest.fixture(scope="module")
def stored_record(tmp_path_factory, ecg_data_dir_module) -> Path:
    from device_agent.documents import ecgdata
    from device_agent.lab.wfdb import to_record

    path = tmp_path_factory.mktemp("record") / "ecg_data_20261127_093000.json"
    path.write_bytes(ecgdata.dumps(to_record(ecg_data_dir_module / "HR06000",
                                             record_id="props-1")))
    return path


@pytest.fixture(scope="module")
def ecg_data_dir_module() -> Path:
    from tests.conftest import ECG_DATA

    return ECG_DATA


def test_report_and_export_write_every_document_or_refuse_in_one_line(size, stored_record):
    outcomes: Counter[int] = Counter()

    @examples(size, 120)
    @given(patients())
    def check(patient: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="props-") as tmp:
            folder = Path(tmp)
            pfile = folder / "patient.json"
            pfile.write_text(s.to_json(patient), encoding="ascii")
            pdf, dcm = folder / "r.pdf", folder / "r.dcm"
            runs = [_main(["report", "--input", str(stored_record), "--patient", str(pfile),
                           "--out", str(pdf)]),
                    _main(["export", "--format", "dicom", "--input", str(stored_record),
                           "--patient", str(pfile), "--out", str(dcm)])]
            for run in runs:
                assert_clean(run, codes={0, 2})
            assert runs[0].rc == runs[1].rc, f"one gate for both:\n{runs[0]}\n{runs[1]}"
            outcomes[runs[0].rc] += 1
            if runs[0].rc == 2:
                for run in runs:
                    _assert_one_refusal(run, [pdf, dcm])
            else:
                assert pdf.read_bytes().startswith(b"%PDF") and dcm.stat().st_size > 1000
            assert_not_shown(_identities(patient),
                             {f"output of {r.argv[0]}": r.text for r in runs})

    check()
    assert outcomes[0] and outcomes[2], f"the examples wrote and refused: {outcomes}"


def test_a_capture_with_any_patient_file_is_refused_first_or_lands_whole(size, s3_endpoint,
                                                                          ecg_data_dir):
    from device_agent.lab.simulator import BoardSimulator

    outcomes: Counter[int] = Counter()

    @examples(size, 4)
    @given(patients())
    def check(patient: dict[str, Any]) -> None:
        with Unit(s3_endpoint) as unit:
            unit.settings = {"ECG_COUNTS_PER_MV": str(CPM)}
            pfile = unit.root / "patient.json"
            pfile.write_text(s.to_json(patient), encoding="ascii")
            link = unit.root / "board"
            with BoardSimulator(ecg_data_dir / "HR06000", link, counts_per_mv=CPM, speed=25,
                                loop=True):
                capture = unit.run("capture", "--direct", "--port", str(link), "--seconds",
                                   "2", "--patient", str(pfile))
            assert_clean(capture, codes={0, 2})
            outcomes[capture.rc] += 1
            sync = unit.run("sync", "--once")
            assert_clean(sync, codes={0})
            objects = unit.objects()
            assert_keys_in_layout(objects)
            if capture.rc == 2:
                _assert_one_refusal(capture, [])
                assert not list(unit.state.glob("records/*")), "nothing half-written"
                assert objects == {}
            else:
                names = sorted(k.rsplit("/", 1)[-1].split("_2")[0] for k in objects)
                assert names == ["ECG", "ECG_Report", "ecg_data", "manifest",
                                 "patient_details"], sorted(objects)
                stored = json.loads(next(v for k, v in objects.items()
                                         if "/patient_details_" in k))
                for key, value in patient.items():
                    if key in ("record_id", "acquired_at"):
                        continue
                    assert key in stored, f"patient key {key!r} lost"
                    if isinstance(value, str) and key != "age":
                        assert stored[key] == value, f"patient {key!r} changed"
            assert_not_shown(_identities(patient), shown_texts(unit))

    check()
    assert outcomes[0], f"at least one capture landed: {outcomes}"
