"""wfdb under hostile input: headers and data files written to break the reader.

Every hostile record either reads (a bounded, finite-shaped record) or is refused with one
ValueError line that names the file; never another exception, never an allocation or a read
sized by what the header claims rather than by what the file holds.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.core.record import LEAD_ORDER
from device_agent.lab.wfdb import MAX_SAMPLES, read_record, to_record

PEAK_BYTES = 40 << 20  # far under the unit's MemoryMax=300M, far over a 10 s record


def _files(folder: Path, header: bytes, data: bytes | None = b"\0" * 96, name: str = "r"):
    (folder / f"{name}.hea").write_bytes(header)
    if data is not None:
        (folder / f"{name}.dat").write_bytes(data)
    return folder / f"{name}.hea"


def _refused(hea: Path, *names: str) -> str:
    """read_record's one-line refusal; it must name the header (or the data file)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            read_record(hea)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message
    assert any(str(hea.with_name(n)) in message for n in (hea.name, *names)), message
    assert peak < PEAK_BYTES, f"{peak} bytes allocated before refusing"
    return message


def _spec(fmt: str = "16", gain: str = "200/mV", name: str = "r.dat", lead: str = "I") -> str:
    return f"{name} {fmt} {gain} 16 0 0 0 0 {lead}"


HUGE = str(10**15)


@pytest.mark.parametrize("record_line", [
    f"r 1 500 {HUGE}",          # a sample count no file holds: no np.full of it
    "r 1 500 2000000",         # 2 M frames claimed, 48 frames present (truncated)
    f"r {HUGE} 500 10",         # more signals than lines
    "r 1 500 -5",               # negative sample count
    "r 1 500 ten",              # not a number
    "r x 500 10",
    "r -3 500 10",
    "r 0 500 10",               # no signals at all
])
def test_record_line_claims_are_refused_in_one_line(tmp_path, record_line):
    hea = _files(tmp_path, f"{record_line}\n{_spec()}\n".encode())
    _refused(hea, "r.dat")


@pytest.mark.parametrize("fs", ["0", "-500", "0.0", "1e999", "-0", "1e300", ".", "e"])
def test_sampling_frequency_must_be_a_plausible_positive_number(tmp_path, fs):
    hea = _files(tmp_path, f"r 1 {fs} 10\n{_spec()}\n".encode())
    message = _refused(hea)
    assert "sampling frequency" in message


@pytest.mark.parametrize("fmt", [f"16x{HUGE}", "16x0", f"16:{HUGE}", f"16+{HUGE}", "16+97",
                                 "16+-4", "16:-1", "8", "310", "0", "16x", "16+", "abc",
                                 f"{HUGE}"])
def test_format_field_claims_are_refused_in_one_line(tmp_path, fmt):
    hea = _files(tmp_path, f"r 1 500 10\n{_spec(fmt)}\n".encode())
    _refused(hea, "r.dat")


@pytest.mark.parametrize("gain", ["1e999/mV", "-1e999/mV", "./mV", "e/mV", "200(1e5)/mV",
                                  f"200({HUGE}{HUGE}{HUGE})/mV"])
def test_gain_and_baseline_must_be_finite_numbers(tmp_path, gain):
    hea = _files(tmp_path, f"r 1 500 10\n{_spec(gain=gain)}\n".encode())
    _refused(hea)


def test_gain_zero_is_the_default_200_as_header5_says(tmp_path):
    data = np.full(10, 200, dtype="<i2").tobytes()
    rec = read_record(_files(tmp_path, f"r 1 500 10\n{_spec(gain='0/mV')}\n".encode(), data))
    np.testing.assert_array_equal(rec.signals_uv[0], np.full(10, 1000.0))


@pytest.mark.parametrize("name", ["../r.dat", "/dev/zero", "..", ".", "sub/r.dat"])
def test_a_data_file_outside_the_header_folder_is_refused(tmp_path, name):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.dat").write_bytes(b"\0" * 96)
    (tmp_path.parent / "r.dat").write_bytes(b"\0" * 96)
    hea = _files(tmp_path, f"r 1 500 10\n{_spec(name=name)}\n".encode())
    message = _refused(hea)
    assert "folder" in message


def test_a_record_name_with_a_path_is_refused(tmp_path):
    hea = _files(tmp_path, f"../r 1 500 10\n{_spec()}\n".encode())
    assert "record name" in _refused(hea)


@pytest.mark.parametrize("header", [b"r 1 500 10\n\xff\xfe" + _spec().encode() + b"\n",
                                    b"r 1 500 10\n" + _spec().encode() + b"\0\n",
                                    b"\0" * 64, b"", b"# only a comment\n"])
def test_a_header_that_is_not_text_is_refused(tmp_path, header):
    _refused(_files(tmp_path, header))


def test_a_huge_header_is_refused_without_reading_it_all(tmp_path):
    hea = _files(tmp_path, b"r 1 500 10\n" + _spec().encode() + b"\n" + b"# pad\n" * 400_000)
    assert "bytes" in _refused(hea)


def test_a_data_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    hea = _files(tmp_path, f"r 1 500 10\n{_spec()}\n".encode(), data=None)
    os.mkfifo(tmp_path / "r.dat")
    assert "regular file" in _refused(hea, "r.dat")


def test_a_data_file_that_links_to_dev_zero_is_refused_without_reading(tmp_path):
    hea = _files(tmp_path, f"r 1 500 0\n{_spec()}\n".encode(), data=None)
    os.symlink("/dev/zero", tmp_path / "r.dat")
    assert "link" in _refused(hea, "r.dat")


def test_a_header_that_links_to_dev_zero_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "r.hea")
    _refused(tmp_path / "r.hea")


def test_a_truncated_data_file_is_refused_and_says_so(tmp_path):
    hea = _files(tmp_path, f"r 2 500 100\n{_spec()}\n{_spec(lead='II')}\n".encode(),
                 data=b"\0" * 120)  # 30 of 100 frames
    assert "truncated" in _refused(hea, "r.dat")


def test_a_data_file_holding_more_than_the_limit_is_refused(tmp_path):
    hea = _files(tmp_path, f"r 1 500 0\n{_spec('80')}\n".encode(), data=None)
    with open(tmp_path / "r.dat", "wb") as out:
        out.truncate(MAX_SAMPLES + 1)  # sparse: costs no disk
    assert "samples" in _refused(hea, "r.dat")


def test_a_declared_count_reads_only_the_bytes_it_needs(tmp_path):
    """A long file with a short declared count is read up to that count, not whole."""
    hea = _files(tmp_path, f"r 1 500 10\n{_spec('80')}\n".encode(), data=None)
    with open(tmp_path / "r.dat", "wb") as out:
        out.write(bytes(range(128, 138)))
        out.truncate(1 << 30)  # sparse 1 GiB
    tracemalloc.start()
    try:
        rec = read_record(hea)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(rec.signals_uv[0], np.arange(10) / 200 * 1000)
    assert peak < PEAK_BYTES


def test_to_record_names_the_missing_leads(tmp_path):
    hea = _files(tmp_path, f"r 1 500 10\n{_spec(lead='V1')}\n".encode(), data=b"\0" * 20)
    with pytest.raises(ValueError, match=r"r.hea.*lacks leads I, II"):
        to_record(hea)


# --- generated headers ---------------------------------------------------------------------

_NUMBERS = st.sampled_from(["0", "1", "-1", "2", "12", "500", "1e999", "nan", "-0", "0.5",
                            HUGE, "x", "", "+", "1e-300", "65536", str(2**63)])
_FMT = st.builds(lambda f, spf, skew, off: f + spf + skew + off,
                 st.sampled_from(["16", "61", "80", "160", "212", "24", "32", "8", "311", "x"]),
                 st.sampled_from(["", "x1", "x2", "x0", f"x{HUGE}", "x"]),
                 st.sampled_from(["", ":0", ":3", f":{HUGE}", ":"]),
                 st.sampled_from(["", "+0", "+24", "+95", "+96", f"+{HUGE}", "+"]))
_GAIN = st.sampled_from(["200/mV", "0/mV", "1(0)/uV", "1e999/mV", "200(x)/mV", "200", "e",
                         "-200/mV", "200(0)/V", "1000(99999999999999999999)/mV"])
_FILE = st.sampled_from(["r.dat", "r.dat", "../r.dat", "missing.dat", "/etc/passwd", "-"])


@st.composite
def _header(draw) -> bytes:
    n_sig = draw(st.integers(1, 3))
    line = f"r {draw(st.sampled_from([str(n_sig), str(n_sig), '0', HUGE, '-1']))}"
    for _ in range(draw(st.integers(0, 2))):
        line += f" {draw(_NUMBERS)}"
    specs = [" ".join([draw(_FILE), draw(_FMT), draw(_GAIN), "16",
                       draw(_NUMBERS), "0", "0", "0", f"L{i}"]) for i in range(n_sig)]
    text = "\n".join([line, *specs]) + "\n"
    if draw(st.booleans()):
        text += "# " + draw(st.text(max_size=20)) + "\n"
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header=_header(), data=st.binary(max_size=200))
def test_generated_headers_read_bounded_or_refuse_in_one_line(tmp_path, header, data):
    folder = tmp_path / "g"
    folder.mkdir(exist_ok=True)
    hea = _files(folder, header, data)
    tracemalloc.start()
    try:
        try:
            rec = read_record(hea)
        except ValueError as exc:
            message = str(exc)
            assert "\n" not in message and str(folder) in message, message
        else:
            assert rec.signals_uv.ndim == 2 and rec.signals_uv.size <= MAX_SAMPLES
            assert np.isfinite(rec.sampling_rate) and rec.sampling_rate > 0
            assert not np.isinf(rec.signals_uv).any()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES


def test_every_standard_lead_missing_but_one_is_a_clear_refusal(tmp_path):
    specs = "\n".join(_spec(lead=lead) for lead in LEAD_ORDER[:11])
    hea = _files(tmp_path, f"r 11 500 4\n{specs}\n".encode(), data=b"\0" * 88)
    with pytest.raises(ValueError, match="V6"):
        to_record(hea)
