"""wfdb: a real recording as a Record (leads in order, values in uV, resampled), and back."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from device_agent.core.record import LEAD_ORDER, DeviceInfo, Record
from device_agent.lab.wfdb import INVALID, encode_record, read_record, to_record, write_record
from tests.conftest import REPO

AT = datetime(2026, 11, 27, 9, 30, tzinfo=timezone(timedelta(hours=1)))


@pytest.mark.parametrize("name", ["HR06000", "s0010_re"])  # s0010_re spells leads `ii`, `avr`
def test_leads_are_the_source_leads_in_lead_order(ecg_data_dir, name):
    src = read_record(ecg_data_dir / name)
    record = to_record(src, acquired_at=AT, record_id=f"id-{name}")
    assert isinstance(record, Record)
    assert record.lead_names == LEAD_ORDER
    assert record.samples.dtype == np.int32
    assert record.samples.shape == (12, src.signals_uv.shape[1])
    assert record.sampling_rate == int(src.sampling_rate)
    by_name = {n.lower(): row for n, row in zip(src.lead_names, src.signals_uv, strict=False)}
    for i, lead in enumerate(LEAD_ORDER):
        np.testing.assert_array_equal(record.samples[i], np.rint(by_name[lead.lower()]))
    assert record.missing.shape == record.samples.shape and not record.missing.any()
    assert record.acquired_at == AT and record.record_id == f"id-{name}"
    assert record.device == DeviceInfo()


def test_path_and_parsed_record_give_the_same_record(ecg_data_dir):
    by_path = to_record(ecg_data_dir / "HR06003", acquired_at=AT,
                        device=DeviceInfo("SN-1", "ECG12-PI"))
    parsed = to_record(read_record(ecg_data_dir / "HR06003"), acquired_at=AT)
    np.testing.assert_array_equal(by_path.samples, parsed.samples)
    assert by_path.device.serial == "SN-1" and parsed.device.serial == "unknown"


def test_seconds_keeps_the_first_samples(ecg_data_dir):
    whole = to_record(ecg_data_dir / "s0010_re", acquired_at=AT)
    first = to_record(ecg_data_dir / "s0010_re", seconds=2.5, acquired_at=AT)
    assert whole.sampling_rate == 1000 and whole.n_samples == 38400
    assert first.n_samples == 2500
    np.testing.assert_array_equal(first.samples, whole.samples[:, :2500])


def test_rate_resamples_and_keeps_the_waveform(ecg_data_dir):
    native = to_record(ecg_data_dir / "s0010_re", seconds=10, acquired_at=AT)
    half = to_record(ecg_data_dir / "s0010_re", seconds=10, rate=500, acquired_at=AT)
    same = to_record(ecg_data_dir / "s0010_re", seconds=10, rate=1000, acquired_at=AT)
    assert half.sampling_rate == 500 and half.samples.shape == (12, 5000)
    assert half.samples.dtype == np.int32
    np.testing.assert_array_equal(same.samples, native.samples)
    # every other native sample, against the band-limited resample: close, far from equal
    err = np.abs(half.samples.astype(float) - native.samples[:, ::2]).max(axis=1)
    spread = np.ptp(native.samples, axis=1)
    assert (err < 0.1 * spread).all(), (err, spread)
    assert not np.array_equal(half.samples, native.samples[:, ::2])


def test_acquired_at_defaults_to_now_in_utc(ecg_data_dir):
    before = datetime.now(UTC)
    record = to_record(ecg_data_dir / "HR06000", seconds=1)
    assert before <= record.acquired_at <= datetime.now(UTC)
    assert record.acquired_at.utcoffset() == timedelta(0)


# --- the writer -------------------------------------------------------------------------------


def _lossy(record: Record) -> Record:
    """The record with lost samples: a gap in every lead, one lone sample, a lead's last."""
    missing = record.missing.copy()
    missing[:, 700:730] = True
    missing[LEAD_ORDER.index("V4"), 3] = True
    missing[LEAD_ORDER.index("aVL"), -1] = True
    return dataclasses.replace(record, samples=np.where(missing, 0, record.samples),
                               missing=missing)


@pytest.mark.parametrize("name,seconds", [("HR06001", None), ("s0010_re", 10)])
def test_written_record_reads_back_sample_for_sample(ecg_data_dir, tmp_path, name, seconds):
    record = _lossy(to_record(ecg_data_dir / name, seconds=seconds, acquired_at=AT,
                              record_id=f"id-{name}"))
    hea, dat = write_record(record, tmp_path / "out")
    assert (hea.name, dat.name) == ("out.hea", "out.dat")
    assert dat.stat().st_size == 12 * record.n_samples * 2

    src = read_record(hea)
    assert src.lead_names == LEAD_ORDER and src.sampling_rate == record.sampling_rate
    np.testing.assert_array_equal(np.isnan(src.signals_uv), record.missing)
    back = to_record(hea, acquired_at=AT, record_id=f"id-{name}")
    assert back == record  # Record equality: samples, missing, rate, leads
    assert back.missing.sum() == 12 * 30 + 2
    raw = np.fromfile(dat, dtype="<i2").reshape(-1, 12).T
    np.testing.assert_array_equal(raw == INVALID, record.missing)


def test_header_gives_gain_baseline_and_checksum_per_lead(ecg_data_dir, tmp_path):
    record = _lossy(to_record(ecg_data_dir / "HR06002", acquired_at=AT, record_id="rid-2"))
    hea, dat = write_record(record, tmp_path / "rec_2")
    lines = hea.read_text().splitlines()
    assert lines[0] == "rec_2 12 500 5000 09:30:00 27/11/2026"
    raw = np.fromfile(dat, dtype="<i2").reshape(-1, 12).T.astype(np.int64)
    for i, lead in enumerate(LEAD_ORDER):
        fields = lines[1 + i].split()
        assert fields[0] == "rec_2.dat" and fields[1] == "16" and fields[-1] == lead
        assert fields[2] == "1000(0)/mV"  # 1 ADC unit per uV: the record fits int16
        assert int(fields[5]) == raw[i, 0]  # initial value
        assert int(fields[6]) == (raw[i].sum() + 32768) % 65536 - 32768  # 16-bit checksum
    assert "# acquired_at: 2026-11-27T09:30:00+01:00" in lines
    assert "# record_id: rid-2" in lines


def test_a_lead_beyond_int16_is_centred_by_its_baseline_and_stays_exact(ecg_data_dir, tmp_path):
    record = to_record(ecg_data_dir / "HR06000", acquired_at=AT)
    samples = record.samples.copy()
    samples[1] += 50_000  # a large offset: beyond int16, span still small
    samples[2] = samples[2] * 20  # +-25 mV: fits 65534 uV of span, not int16 from 0
    record = _lossy(dataclasses.replace(record, samples=samples))
    hea, _ = write_record(record, tmp_path / "big")
    fields = hea.read_text().splitlines()[2].split()
    gain, baseline = fields[2].split("(")
    assert gain == "1000" and int(baseline.split(")")[0]) != 0
    assert to_record(hea, acquired_at=AT) == record


def test_a_lead_spanning_more_than_int16_is_stored_in_whole_uv_steps(ecg_data_dir, tmp_path):
    record = to_record(ecg_data_dir / "HR06000", acquired_at=AT)
    samples = record.samples.copy()
    samples[6] = np.linspace(-80_000, 100_000, record.n_samples).astype(np.int32)  # off-centre
    record = _lossy(dataclasses.replace(record, samples=samples))
    hea, dat = write_record(record, tmp_path / "wide")
    gain = float(hea.read_text().splitlines()[7].split()[2].split("(")[0])
    step = round(1000.0 / gain)
    assert step > 1 and abs(1000.0 / gain - step) < 1e-9  # whole uV per ADC unit
    back = to_record(hea, acquired_at=AT)
    np.testing.assert_array_equal(back.missing, record.missing)
    err = np.abs(back.samples[6] - record.samples[6])[~record.missing[6]]
    assert err.max() <= step / 2
    others = np.arange(12) != 6
    np.testing.assert_array_equal(back.samples[others], record.samples[others])
    raw = np.fromfile(dat, dtype="<i2").reshape(-1, 12).T
    assert raw[6][~record.missing[6]].min() > INVALID  # no received sample reads as lost


def test_resampling_a_lossy_recording_keeps_its_gaps(ecg_data_dir, tmp_path):
    record = _lossy(to_record(ecg_data_dir / "s0010_re", seconds=4, acquired_at=AT))
    hea, _ = write_record(record, tmp_path / "r")
    half = to_record(hea, rate=500, acquired_at=AT)
    assert half.samples.shape == (12, 2000)
    np.testing.assert_array_equal(half.missing, record.missing[:, ::2])
    assert not half.samples[half.missing].any()


def test_encode_record_refuses_a_name_wfdb_cannot_hold(ecg_data_dir):
    record = to_record(ecg_data_dir / "HR06000", seconds=1, acquired_at=AT)
    for bad in ("two words", "", "a/b"):
        with pytest.raises(ValueError, match="WFDB record name"):
            encode_record(record, bad)
    header, data = encode_record(record, "ok_name")
    assert header.startswith(b"ok_name 12 500 500 ") and len(data) == 12 * 500 * 2


# --- the header as header(5) defines it: format, samples per frame, skew, byte offset -------

OFFSET = REPO / "tests" / "data" / "wfdb_offset"
LUDB = REPO / "tests" / "data" / "ludb"


def test_a_record_with_a_byte_offset_reads_as_its_source():
    """L00001 is LUDB record 1 in the PhysioNet/CinC 2021 layout (`16x1+24` in a .mat)."""
    assert "16x1+24" in (OFFSET / "L00001.hea").read_text()
    offset, source = read_record(OFFSET / "L00001"), read_record(LUDB / "1")
    assert offset.lead_names == source.lead_names and offset.sampling_rate == 500.0
    np.testing.assert_array_equal(offset.signals_uv, source.signals_uv)
    np.testing.assert_array_equal(to_record(offset, acquired_at=AT).samples,
                                  to_record(source, acquired_at=AT).samples)


def test_measure_reads_a_record_with_a_byte_offset(capsys):
    import json

    from device_agent.commands import main

    assert main(["measure", "--json", str(OFFSET / "L00001.hea"), str(LUDB / "1.hea")]) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert a.pop("input") != b.pop("input")
    assert a == b and a["heart_rate_bpm"] is not None


def _write(tmp_path, header: str, data: bytes, name: str = "r"):
    (tmp_path / f"{name}.hea").write_text(header)
    (tmp_path / f"{name}.dat").write_bytes(data)
    return read_record(tmp_path / name)


def test_format_field_skew_shifts_the_signal_and_pads_invalid(tmp_path):
    frames = np.array([[10, 100], [11, 101], [12, 102], [13, 103]], dtype="<i2")
    rec = _write(tmp_path, "r 2 100 4\nr.dat 16 1(0)/uV 16 0 0 0 0 a\n"
                           "r.dat 16:1 1(0)/uV 16 0 0 0 0 b\n", frames.tobytes())
    np.testing.assert_array_equal(rec.signals_uv[0], [10, 11, 12, 13])
    np.testing.assert_array_equal(rec.signals_uv[1][:3], [101, 102, 103])
    assert np.isnan(rec.signals_uv[1][3])  # past the file's end


def test_samples_per_frame_every_signal_alike_reads_at_that_multiple_of_the_rate(tmp_path):
    # frame = a0 a1 b0 b1
    data = np.array([1, 2, 50, 60, 3, 4, 70, 80], dtype="<i2").tobytes()
    rec = _write(tmp_path, "r 2 100 2\nr.dat 16x2 1/uV 16 0 0 0 0 a\n"
                           "r.dat 16x2 1/uV 16 0 0 0 0 b\n", data)
    assert rec.sampling_rate == 200.0
    np.testing.assert_array_equal(rec.signals_uv, [[1, 2, 3, 4], [50, 60, 70, 80]])


def test_samples_per_frame_mixed_are_averaged_over_each_frame(tmp_path):
    # frame = a0 a1 b0
    data = np.array([1, 3, 50, 5, 7, 70], dtype="<i2").tobytes()
    rec = _write(tmp_path, "r 2 100 2\nr.dat 16x2 1/uV 16 0 0 0 0 a\n"
                           "r.dat 16 1/uV 16 0 0 0 0 b\n", data)
    assert rec.sampling_rate == 100.0
    np.testing.assert_array_equal(rec.signals_uv, [[2, 6], [50, 70]])


@pytest.mark.parametrize("fmt", [16, 61, 80, 160, 212, 24, 32])
def test_each_format_reads_its_samples_and_its_invalid_value(tmp_path, fmt):
    values = np.array([-100, -1, 0, 1, 7, 100, 127, -127], dtype=np.int64)
    invalid = {16: -32768, 61: -32768, 80: -128, 160: -32768, 212: -2048, 24: -(1 << 23),
               32: -(1 << 31)}[fmt]
    stored = np.append(values, invalid)
    stored = np.append(stored, 5)  # an even count for 212
    if fmt == 16:
        data = stored.astype("<i2").tobytes()
    elif fmt == 61:
        data = stored.astype(">i2").tobytes()
    elif fmt == 80:
        data = (stored + 128).astype(np.uint8).tobytes()
    elif fmt == 160:
        data = (stored + 32768).astype("<u2").tobytes()
    elif fmt == 32:
        data = stored.astype("<i4").tobytes()
    elif fmt == 24:
        u = stored % (1 << 24)
        data = np.stack([u & 255, (u >> 8) & 255, u >> 16], axis=1).astype(np.uint8).tobytes()
    else:
        u = stored % 4096
        a, b = u[0::2], u[1::2]
        data = np.stack([a & 255, ((a >> 8) & 15) | ((b >> 8) << 4), b & 255],
                        axis=1).astype(np.uint8).tobytes()
    rec = _write(tmp_path, f"r 1 100 {stored.size}\nr.dat {fmt}+0 1/uV 12 0 0 0 0 x\n", data)
    got = rec.signals_uv[0]
    np.testing.assert_array_equal(got[: values.size], values)
    assert np.isnan(got[values.size]) and got[-1] == 5


def test_byte_offset_belongs_to_the_file_and_sample_count_may_be_left_out(tmp_path):
    data = b"PROLOGUE" + np.array([[1, 2], [3, 4], [5, 6]], dtype="<i2").tobytes()
    rec = _write(tmp_path, "r 2\nr.dat 16+8 1/uV\nr.dat 16+8 1/uV\n", data)
    assert rec.sampling_rate == 250.0  # header(5)'s default frequency
    np.testing.assert_array_equal(rec.signals_uv, [[1, 3, 5], [2, 4, 6]])
    assert rec.lead_names == ("signal 0", "signal 1")


def test_a_sample_count_of_zero_is_read_from_the_file_with_the_skew_taken_off(tmp_path):
    data = np.array([[1, 2], [3, 4], [5, 6]], dtype="<i2").tobytes()
    rec = _write(tmp_path, "r 2 100 0\nr.dat 16 1/uV 16 0 0 0 0 a\nr.dat 16:1 1/uV 16 0 0 0 0 b\n",
                 data)
    np.testing.assert_array_equal(rec.signals_uv, [[1, 3], [4, 6]])


def test_counter_frequency_and_multiword_descriptions(tmp_path):
    rec = _write(tmp_path, "r 2 360/360(0) 1 10:00:00\nr.dat 212+0 200 11 1024 0 0 0 ECG lead II\n"
                           "r.dat 212 200 11 1024 0 0 0 V5\n",
                 bytes([1, 0x20, 2]))
    assert rec.sampling_rate == 360.0 and rec.lead_names == ("ECG lead II", "V5")
    np.testing.assert_array_almost_equal(rec.signals_uv[:, 0], [(1 - 1024) / 200 * 1000,
                                                                (2 + 512 - 1024) / 200 * 1000])


@pytest.mark.parametrize(("header", "message"), [
    ("r 1 100 1\nr.dat 16x 1/uV 12 0 0 0 0 x\n", "is not format"),
    ("r 1 100 1\nr.dat 311 1/uV 12 0 0 0 0 x\n", "format 311"),
    ("r/2 1 100 1\nr.dat 16 1/uV 12 0 0 0 0 x\n", "multi-segment"),
    ("r 2 100 1\nr.dat 16 1/uV 12 0 0 0 0 x\n", "2 signals declared"),
    ("r 2 100 1\nr.dat 16 1/uV 12 0 0 0 0 x\nr.dat 80 1/uV 12 0 0 0 0 y\n", "differ in format"),
])
def test_a_header_the_reader_cannot_follow_is_named(tmp_path, header, message):
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, header, b"\x00" * 8)
