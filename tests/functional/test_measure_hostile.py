"""`measure`, `report --input` and `export --format dicom` under hostile input.

WFDB records and ecg_data files written to break the readers, and signals written to break
the measurement: each command either works (values or nulls with a reason, a PDF that
renders) or refuses the input with one line naming the file, exit 1 (README: an input was
skipped); never an "unexpected error", never a traceback. `measure` goes on to its next
input after a refusal.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.clinical.measurements import MEASUREMENT_NAMES
from device_agent.commands import main
from device_agent.core.record import LEAD_ORDER
from device_agent.lab import ludb
from tests.conftest import REPO

pytestmark = pytest.mark.functional
LUDB = REPO / "tests" / "data" / "ludb"
GOOD = LUDB / "1.hea"
FS = 500
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    for text in (out, err):
        assert "unexpected error" not in text and "Traceback" not in text, text
    return rc, out, err


def _measure_refuses(capsys, bad: Path) -> str:
    """measure --json BAD GOOD: exit 1, one error line naming BAD, GOOD still measured."""
    rc, out, _ = _run(capsys, "measure", "--json", str(bad), str(GOOD))
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 1 and len(lines) == 2, out
    assert lines[0]["input"] == str(bad) and "error" in lines[0]
    assert lines[1]["input"] == str(GOOD) and lines[1]["heart_rate_bpm"] is not None
    error: str = lines[0]["error"]
    assert "\n" not in error and bad.stem in error, error
    return error


# --- WFDB records ---------------------------------------------------------------------------

def _wfdb(folder: Path, header: str, data: bytes | None = b"\0" * 240) -> Path:
    (folder / "r.hea").write_text(header)
    if data is not None:
        (folder / "r.dat").write_bytes(data)
    return folder / "r.hea"


_LEADS12 = "\n".join(f"r.dat 16 200/mV 16 0 0 0 0 {lead}" for lead in LEAD_ORDER)


@pytest.mark.parametrize("header", [
    f"r 12 500 {10**15}\n{_LEADS12}\n",      # a sample count no file holds
    f"r 12 500 1000\n{_LEADS12}\n",          # truncated: 10 of 1000 frames
    f"r 12 0 10\n{_LEADS12}\n",              # sampling frequency 0
    f"r 12 -500 10\n{_LEADS12}\n",
    f"r 12 0.5 10\n{_LEADS12}\n",            # under 1 Hz: to_record refuses it
    f"r 12 1e999 10\n{_LEADS12}\n",
    f"r 12 500 10\n{_LEADS12.replace('16 200', '16+4096 200', 1)}\n",  # offset past the end
    f"r 12 500 10\n{_LEADS12.replace('16 200', '16x999999999 200')}\n",
    f"r 12 500 10\n{_LEADS12.replace('16 200', '311 200')}\n",
    f"r 12 500 10\n{_LEADS12.replace('200/mV', '1e999/mV')}\n",
    f"r 12 500 10\n{_LEADS12.replace('r.dat', '../r.dat')}\n",
    "r 1 500 10\nr.dat 16 200/mV 16 0 0 0 0 V1\n",  # not 12 leads
    "r 12 500 10\n\0\0\0\n",
])
def test_measure_refuses_a_hostile_wfdb_header_in_one_line(tmp_path, capsys, header):
    _measure_refuses(capsys, _wfdb(tmp_path, header))


def test_measure_names_a_refused_input_once(tmp_path, capsys):
    """The line names the file once: the reader's message already starts with it."""
    hea = _wfdb(tmp_path, f"r 12 0 10\n{_LEADS12}\n")
    rc, _, err = _run(capsys, "measure", str(hea))
    assert rc == 1 and err.count("\n") == 1 and err.count(str(hea)) == 1, err
    missing = tmp_path / "nope.json"
    rc, _, err = _run(capsys, "measure", str(missing))
    assert rc == 1 and err.count("\n") == 1 and err.count(str(missing)) == 1, err


def test_measure_refuses_a_wfdb_data_file_that_is_a_fifo(tmp_path, capsys):
    hea = _wfdb(tmp_path, f"r 12 500 10\n{_LEADS12}\n", data=None)
    os.mkfifo(tmp_path / "r.dat")
    assert "regular file" in _measure_refuses(capsys, hea)


def test_measure_refuses_a_wfdb_data_file_linked_to_dev_zero(tmp_path, capsys):
    hea = _wfdb(tmp_path, f"r 12 500 0\n{_LEADS12}\n", data=None)
    os.symlink("/dev/zero", tmp_path / "r.dat")
    assert "link" in _measure_refuses(capsys, hea)


def test_measure_refuses_a_non_utf8_wfdb_header(tmp_path, capsys):
    (tmp_path / "r.hea").write_bytes(b"r 12 500 10\n\xff\xfe\n")
    assert "UTF-8" in _measure_refuses(capsys, tmp_path / "r.hea")


# --- ecg_data JSON --------------------------------------------------------------------------

def _legacy(rate: object, leads: object) -> str:
    return json.dumps({"timestamp": "2026-01-17 12:10:50", "sampling_rate": rate,
                       "leads": leads}, allow_nan=True)


def _three_commands(capsys, path: Path, out: Path) -> list[int]:
    """measure, report and export of one file; each exits 0 or refuses in one line."""
    codes = []
    rc, text, _ = _run(capsys, "measure", "--json", str(path))
    line = json.loads(text.splitlines()[-1])
    assert rc in (0, 1) and (rc == 1) == ("error" in line), text
    if rc == 1:
        assert path.name in line["error"] and "\n" not in line["error"]
    codes.append(rc)
    for argv in (["report", "--input", str(path), "--out", str(out / "r.pdf")],
                 ["export", "--format", "dicom", "--input", str(path),
                  "--out", str(out / "r.dcm")]):
        rc, _, err = _run(capsys, *argv)
        assert rc in (0, 1), err
        if rc:
            assert path.name in err, err
        codes.append(rc)
    if codes[1] == 0:
        assert (out / "r.pdf").read_bytes().startswith(b"%PDF-")
    return codes


@pytest.mark.parametrize("rate", [0, -500, 0.5, 10**12, "Infinity", "NaN", None, True, 1e400])
def test_a_sampling_rate_no_ecg_has_is_refused_by_every_command(tmp_path, capsys, rate):
    t = np.arange(2 * FS) / FS
    leads = {name: list(np.round(np.sin(2 * np.pi * t), 3)) for name in LEAD_ORDER}
    text = _legacy(rate, leads)
    if rate in ("Infinity", "NaN"):
        text = text.replace(f'"{rate}"', rate)
    path = tmp_path / "ecg_data_rate.json"
    path.write_text(text)
    assert _three_commands(capsys, path, tmp_path) == [1, 1, 1]


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deeply_nested_json_is_refused_by_every_command(tmp_path, capsys, depth):
    path = tmp_path / "ecg_data_nested.json"
    path.write_text('{"leads":' + "[" * depth + "]" * depth + "}")
    assert _three_commands(capsys, path, tmp_path) == [1, 1, 1]


def test_a_50_mb_file_is_refused_before_it_is_parsed(tmp_path, capsys):
    """Parsed, 46 MB of legacy JSON peaked at 446 MB: over the unit's MemoryMax=300M."""
    n = 50_000_000 // 12 // 6
    lead = "[" + "0.123," * (n - 1) + "0.123]"
    path = tmp_path / "ecg_data_big.json"
    path.write_text('{"timestamp":"2026-01-17 12:10:50","sampling_rate":500,"leads":{'
                    + ",".join(f'"{name}":{lead}' for name in LEAD_ORDER) + "}}")
    assert path.stat().st_size > 49_000_000
    assert _three_commands(capsys, path, tmp_path) == [1, 1, 1]
    _, out, _ = _run(capsys, "measure", "--json", str(path))
    assert "larger than any record" in json.loads(out)["error"]


def test_the_largest_record_the_unit_captures_is_read(tmp_path, capsys):
    """60 s of 12 leads at 2000 Hz, in the unit's own format, fits the input bound."""
    from datetime import UTC, datetime

    from device_agent.core.record import DeviceInfo, Record
    from device_agent.documents.ecgdata import dumps

    rng = np.random.default_rng(24)
    samples = rng.integers(-32000, 32000, (12, 120_000)).astype(np.int32)
    record = Record(acquired_at=datetime(2026, 1, 17, tzinfo=UTC), sampling_rate=2000,
                    samples=samples, missing=np.zeros(samples.shape, bool), record_id=None,
                    device=DeviceInfo())
    path = tmp_path / "ecg_data_long.json"
    path.write_bytes(dumps(record))
    rc, out, _ = _run(capsys, "measure", "--json", str(path))
    assert rc == 0 and "error" not in json.loads(out)


_VALUE: st.SearchStrategy[object] = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(-(10**30), 10**30),
    st.sampled_from(["a", "", None, True, [], {}, [1.0]]),
)


@st.composite
def _hostile_leads(draw) -> dict[str, object]:
    leads: dict[str, object] = {}
    base = draw(st.sampled_from([0, 1, 2, 40, 600]))
    for name in draw(st.sampled_from([LEAD_ORDER, LEAD_ORDER[:1], LEAD_ORDER[:11], ()])):
        n = max(0, base + draw(st.sampled_from([0, 0, 0, -1, 3])))
        kind = draw(st.sampled_from(["sine", "sine", "values", "scalar"]))
        if kind == "sine":
            leads[name] = [round(math.sin(i / 20), 3) for i in range(n)]
        elif kind == "values":
            leads[name] = draw(st.lists(_VALUE, min_size=min(n, 3), max_size=min(n, 3)))
        else:
            leads[name] = draw(_VALUE)
    return leads


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=SUPPRESS)
@given(rate=st.sampled_from([FS, FS, 250, 1, 0, -1, 0.5, 1e9, "500", None]),
       leads=_hostile_leads())
def test_generated_ecg_data_is_measured_or_refused_in_one_line(tmp_path, capsys, rate,
                                                               leads):
    path = tmp_path / "ecg_data_generated.json"
    path.write_text(_legacy(rate, leads))
    _three_commands(capsys, path, tmp_path)


# --- adversarial signals --------------------------------------------------------------------

def _signal_file(tmp_path: Path, mv: np.ndarray) -> Path:
    rows = np.broadcast_to(mv, (12, mv.size))
    leads = {name: [round(float(v), 3) for v in rows[i]] for i, name in enumerate(LEAD_ORDER)}
    path = tmp_path / "ecg_data_signal.json"
    path.write_text(_legacy(FS, leads))
    return path


T = np.arange(10 * FS) / FS
SIGNALS = {
    "all zero": np.zeros(T.size),
    "constant": np.full(T.size, 2.5),
    "hum 49.5 Hz": np.sin(2 * np.pi * 49.5 * T),
    "hum 50.5 Hz": np.sin(2 * np.pi * 50.5 * T),
    "hum 59.5 Hz": np.sin(2 * np.pi * 59.5 * T),
    "hum 60.5 Hz": np.sin(2 * np.pi * 60.5 * T),
    "clipped": np.clip(8 * np.sin(2 * np.pi * 1.2 * T), -1, 1),
    "single spike": np.where(np.arange(T.size) == T.size // 2, 5.0, 0.0),
    "white noise": np.random.default_rng(24).normal(0.0, 0.5, T.size),
}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_an_adversarial_signal_measures_to_values_or_reasons_and_renders(tmp_path, capsys,
                                                                         name):
    path = _signal_file(tmp_path, SIGNALS[name])
    assert _three_commands(capsys, path, tmp_path) == [0, 0, 0]
    rc, text, _ = _run(capsys, "measure", "--json", str(path))
    line = json.loads(text)
    assert rc == 0
    for key in MEASUREMENT_NAMES:
        value = line[key]
        if value is None:
            assert line["reasons"].get(key), (key, line)
        else:
            assert math.isfinite(value)
    rate = line["heart_rate_bpm"]
    if rate is not None:
        assert 20 <= rate <= 300, line
    if name in ("all zero", "constant", "single spike") or name.startswith("hum"):
        assert rate is None, line  # nothing here is a heart


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="pdftotext missing")
def test_the_pdf_of_a_flat_record_says_why_nothing_was_measured(tmp_path, capsys):
    path = _signal_file(tmp_path, SIGNALS["all zero"])
    assert _run(capsys, "report", "--input", str(path), "--out", str(tmp_path / "r.pdf"))[0] == 0
    text = subprocess.run(["pdftotext", str(tmp_path / "r.pdf"), "-"], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    assert "flat" in text.lower()


def test_a_real_record_still_measures_through_the_checks(tmp_path, capsys):
    record = ludb.load_record(LUDB, 1)
    path = tmp_path / "ecg_data_real.json"
    path.write_text(_legacy(record.sampling_rate, {
        name: [round(float(v) / 1000.0, 3) for v in record.samples[i]]
        for i, name in enumerate(record.lead_names)}))
    assert _three_commands(capsys, path, tmp_path) == [0, 0, 0]
