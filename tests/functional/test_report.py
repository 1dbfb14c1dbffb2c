"""The PDF report: true scale measured in rasterised pixels, page sizes, honesty, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.commands import main
from device_agent.core.record import LEAD_ORDER, ElectrodeOff, Quality, Record
from device_agent.documents import pdf as report
from tests.unit.test_qrs import wfdb_record

DPI = 300
PX_PER_MM = DPI / 25.4  # 11.81
PATIENT = {"first_name": "Testa", "last_name": "Synthetica", "age": 59, "gender": "Female",
           "doctor": "Dr Example", "Org.": "Test Clinic"}

needs_poppler = pytest.mark.skipif(shutil.which("pdftoppm") is None,
                                   reason="pdftoppm missing: apt-get install poppler-utils")


def _raster(pdf: bytes, tmp_path, dpi: int = DPI) -> np.ndarray:
    """Page 1 as an (h, w, 3) uint8 array, via pdftoppm's PPM output."""
    src = tmp_path / "page.pdf"
    src.write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", str(dpi), "-singlefile", str(src), str(tmp_path / "p")],
                   check=True, timeout=60)
    data = (tmp_path / "p.ppm").read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P6" and maxval == b"255"
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width), 3)


def _text(pdf: bytes, tmp_path) -> str:
    src = tmp_path / "text.pdf"
    src.write_bytes(pdf)
    out = subprocess.run(["pdftotext", "-layout", str(src), "-"], check=True, timeout=60,
                         capture_output=True)
    return out.stdout.decode()


def _px(mm: float) -> float:
    return mm * PX_PER_MM


def _line_centres(profile: np.ndarray, threshold: float) -> np.ndarray:
    """Centres of runs of profile entries above threshold (one run per drawn line)."""
    above = np.concatenate(([False], profile > threshold, [False]))
    edges = np.flatnonzero(np.diff(above.astype(int)))
    return np.array([(a + b - 1) / 2.0 for a, b in zip(edges[::2], edges[1::2], strict=True)])


def _pitch_px(centres: np.ndarray) -> float:
    """Least-squares line spacing: robust to the pixel rounding of each line."""
    diffs = np.diff(centres)
    median = np.median(diffs)
    step = diffs[(diffs > 0.5 * median) & (diffs < 1.5 * median)].mean()  # not pixel-rounded
    index = np.rint((centres - centres[0]) / step)
    assert np.all(np.diff(index) >= 1), "two line runs map to the same grid line"
    return float(np.polyfit(index, centres, 1)[0])


def _grid_box(page: np.ndarray, paper: str = "a4") -> tuple[slice, slice]:
    geo = report.layout(paper)
    x0, y0, w, h = geo["grid_mm"]
    height_px = page.shape[0]
    rows = slice(int(height_px - _px(y0 + h)) + 3, int(height_px - _px(y0)) - 3)
    cols = slice(int(_px(x0)) + 3, int(_px(x0 + w)) - 3)
    return rows, cols


def _flat_record(fs: int = 500, seconds: float = 10.0) -> Record:
    n = int(fs * seconds)
    return Record(datetime(2026, 11, 27, 8, 0, tzinfo=UTC), fs, np.zeros((12, n), np.int32),
                  np.zeros((12, n), bool), record_id="flat-test")


@pytest.fixture(scope="module")
def hr06000():
    from tests.conftest import ECG_DATA

    return wfdb_record(ECG_DATA / "HR06000")


# --- vector output -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 999.9), st.just(float("nan"))), min_size=1,
                max_size=60))
def test_path_ops_round_trip_and_break_at_nan(values):
    y = np.array(values)
    x = np.arange(y.size) * 16.7
    ops = report.path_ops(x, y)
    rows = [line.split() for line in ops.splitlines()]
    finite = np.isfinite(y)
    assert len(rows) == finite.sum()
    got = np.array([[float(a), float(b)] for a, b, _ in rows]).reshape(-1, 2)
    assert np.allclose(got[:, 0] * report.UNIT, x[finite], atol=report.UNIT / 2 + 1e-9)
    assert np.allclose(got[:, 1] * report.UNIT, y[finite], atol=report.UNIT / 2 + 1e-9)
    # a new sub-path starts at the first point and after every NaN run
    starts = finite & np.concatenate(([True], ~finite[:-1]))
    assert [r[2] for r in rows] == ["m" if s else "l" for s in starts[finite]]


def test_path_ops_clips_to_the_page_range():
    ops = report.path_ops(np.array([-3.0, 2000.0]), np.array([5.0, -1.0]))
    assert ops == "   0   50 m\n9999    0 l\n"


def test_page_is_a4_or_letter_landscape(hr06000):
    for paper, (w, h) in (("a4", (841.89, 595.28)), ("letter", (792.0, 612.0))):
        pdf = report.render_pdf(hr06000, PATIENT, style=report.ReportStyle(paper=paper))
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
        assert box, "no MediaBox"
        assert float(box[1]) == pytest.approx(w, abs=0.01)
        assert float(box[2]) == pytest.approx(h, abs=0.01)


def test_page_is_compressed_and_small(hr06000):
    pdf = report.render_pdf(hr06000, PATIENT)
    assert pdf.startswith(b"%PDF-")
    assert b"/FlateDecode" in pdf and b"ASCII85" not in pdf
    assert len(pdf) < 120_000, len(pdf)


def test_unknown_paper_or_grid_is_refused(hr06000):
    with pytest.raises(ValueError, match="paper"):
        report.render_pdf(hr06000, None, style=report.ReportStyle(paper="a3"))
    with pytest.raises(ValueError, match="grid"):
        report.render_pdf(hr06000, None, style=report.ReportStyle(grid="blue"))


def test_lost_samples_break_the_trace(hr06000):
    missing = hr06000.missing.copy()
    missing[:, 1100:1200] = True  # inside column 0 (and the rhythm strip)
    gappy = Record(hr06000.acquired_at, 500, np.where(missing, 0, hr06000.samples), missing)
    geo = report.layout("a4")
    ops_full, _ = report._trace_ops(hr06000, geo, 210.0)
    ops_gap, _ = report._trace_ops(gappy, geo, 210.0)
    moves = lambda ops: sum(1 for line in ops.splitlines() if line.endswith("m"))  # noqa: E731
    assert moves(ops_full) == 13  # one sub-path per trace
    # lead I, II, III in column 0 and the II rhythm strip each break once
    assert moves(ops_gap) == 13 + 4


# --- true scale in pixels ------------------------------------------------------------------


@pytest.mark.functional
@needs_poppler
def test_rasterised_page_is_true_scale(hr06000, tmp_path):
    pdf = report.render_pdf(hr06000, PATIENT)
    page = _raster(pdf, tmp_path)
    assert page.shape[0] == pytest.approx(210 / 25.4 * DPI, abs=1)  # pdftoppm rounds up
    assert page.shape[1] == pytest.approx(297 / 25.4 * DPI, abs=1)
    rows, cols = _grid_box(page)
    box = page[rows, cols].astype(int)
    r, g = box[..., 0], box[..., 1]
    grid_any = (r > 180) & (r - g > 20)
    grid_major = (r > 180) & (g < 130)
    for axis, span_mm in ((0, 260), (1, 160)):  # vertical lines, then horizontal
        mask_all, mask_major = grid_any, grid_major
        profile_all = mask_all.mean(axis=axis)
        profile_major = mask_major.mean(axis=axis)
        minor = _line_centres(profile_all, 0.6)
        major = _line_centres(profile_major, 0.6)
        assert _pitch_px(minor) == pytest.approx(PX_PER_MM, abs=0.03)
        assert _pitch_px(major) == pytest.approx(5 * PX_PER_MM, abs=0.1)
        assert len(minor) >= span_mm - 2  # every mm line seen (edges may be cropped)
        assert (major[-1] - major[0]) / PX_PER_MM == pytest.approx(
            5 * round((major[-1] - major[0]) / PX_PER_MM / 5), abs=0.2)

    # calibration pulse on the top row: 10 mm tall, 5 mm wide (line centre to line centre)
    geo = report.layout("a4")
    black = page.astype(int).sum(axis=2) < 200
    height_px = page.shape[0]
    base = geo["baselines_mm"][0]
    top_px, base_px = height_px - _px(base + 10), height_px - _px(base)
    band = slice(int(top_px - _px(5)), int(base_px + _px(5)))
    cx = geo["cal_x0_mm"]
    before = _line_centres(black[band, int(_px(cx - 0.5))], 0.5) + band.start
    middle = _line_centres(black[band, int(_px(cx + 3.5))], 0.5) + band.start
    assert len(before) == 1 and len(middle) == 1
    assert (before[0] - middle[0]) / PX_PER_MM == pytest.approx(10.0, abs=0.1)
    half_up = black[int((before[0] + middle[0]) / 2), int(_px(cx - 2)) : int(_px(cx + 7.5))]
    edges = _line_centres(half_up, 0.5)
    assert len(edges) == 2
    assert (edges[1] - edges[0]) / PX_PER_MM == pytest.approx(5.0, abs=0.1)


@pytest.mark.functional
@needs_poppler
def test_trace_is_25_mm_per_s_and_10_mm_per_mv(tmp_path):
    record = _flat_record()
    samples = record.samples.copy()
    t = np.arange(5000) / 500
    spikes = np.zeros(5000)
    for second in range(10):  # 1 mV triangles, 40 ms wide, every second from 0.5 s
        spikes += np.clip(1.0 - np.abs(t - second - 0.5) / 0.02, 0, None) * 1000
    samples[LEAD_ORDER.index("II")] = np.rint(spikes).astype(np.int32)
    record = Record(record.acquired_at, 500, samples, record.missing, record_id="spikes")
    page = _raster(report.render_pdf(record, None, style=report.ReportStyle(grid="grey")), tmp_path)
    geo = report.layout("a4")
    black = page.astype(int).sum(axis=2) < 200
    height_px = page.shape[0]
    base = geo["baselines_mm"][3]  # the rhythm strip
    # the row 5 mm above the baseline is crossed only by the spikes
    row = black[int(height_px - _px(base + 5))]
    spike_x = _line_centres(row[int(_px(geo["trace_x0_mm"])) :], 0.5)
    assert len(spike_x) == 2 * 10  # rising and falling edge of each spike
    centres = (spike_x[::2] + spike_x[1::2]) / 2
    assert np.median(np.diff(centres)) / PX_PER_MM == pytest.approx(25.0, abs=0.1)
    assert centres[0] / PX_PER_MM == pytest.approx(0.5 * 25.0, abs=0.2)
    column = black[:, int(_px(geo["trace_x0_mm"]) + centres[3])]
    peak_row = np.flatnonzero(column[: int(height_px - _px(base))])
    peak_row = peak_row[peak_row > height_px - _px(base + 15)].min()
    baseline_row = height_px - _px(base)
    # the apex is rounded by the 0.22 mm stroke: its top edge sits half a stroke above 10 mm
    assert (baseline_row - peak_row) / PX_PER_MM == pytest.approx(10.0, abs=0.3)
    # a grey grid has no coloured pixel at all
    pixels = page.astype(int)
    assert np.max(pixels.max(axis=2) - pixels.min(axis=2)) < 16


# --- what the page says --------------------------------------------------------------------


@pytest.mark.functional
@needs_poppler
def test_header_and_footer_say_what_was_measured(hr06000, tmp_path):
    from device_agent.capture import measure_once

    record = measure_once(hr06000, mains_hz=50)
    text = _text(report.render_pdf(record, PATIENT), tmp_path)
    assert "Testa Synthetica" in text and "Age 59" in text and "Sex Female" in text
    assert "2026-11-27 09:30:00 UTC+01:00" in text
    match = re.search(r"Vent. rate\s+(\d+) bpm", text)
    assert match and 65 <= int(match[1]) <= 72
    assert int(match[1]) == round(record.measurements["heart_rate_bpm"])
    assert "25 mm/s" in text and "10 mm/mV" in text and "500 Hz" in text
    assert "Display filter 0.05-150 Hz" in text
    assert "Record test-HR06000" in text and "Quality: ok" in text
    for lead in LEAD_ORDER:
        assert re.search(rf"(^|\s){lead}(\s|$)", text, re.M), lead


@pytest.mark.functional
@needs_poppler
def test_no_rate_prints_a_dash_and_the_reason_and_warnings(tmp_path):
    record = _flat_record()
    reasons = ("electrode V2 off for 10.00 s", "flat line on V2", "mains noise 62 uV at 50 Hz")
    quality = Quality(frames_expected=5000, frames_received=4990, frames_lost=10,
                      electrodes_off=(ElectrodeOff("V2", 0, 5000),), flat_leads=("V2",),
                      mains_noise_uv=62.0, verdict="warning", reasons=reasons)
    missing = record.missing.copy()
    missing[:, 100:110] = True
    record = Record(record.acquired_at, 500, record.samples, missing, quality=quality,
                    measurements={"heart_rate_bpm": None, "rr_ms": None,
                                  "reasons": {"heart_rate_bpm": "lead II is flat",
                                              "rr_ms": "lead II is flat"}})
    text = _text(report.render_pdf(record, None), tmp_path)
    assert re.search(r"Vent. rate\s+-", text) and re.search(r"RR interval\s+-", text)
    assert "bpm" not in text
    assert "Not measured: rate, RR (lead II is flat)" in text
    # the page says exactly what the record's quality says (decided once, in record.py)
    for reason in reasons:
        assert reason in text
    assert "Quality: warning" in text


def test_patient_lines_tolerate_missing_keys_and_show_id_and_birth_date():
    assert report._patient_lines(None)[0] == "-"
    assert report._patient_lines({"patient_name": "P-17", "age": None}) == (
        "P-17", "ID -    DOB -    Age -    Sex -")
    _, details = report._patient_lines({"patient_id": "MRN-0042", "dob": "1967-03-02"})
    assert "ID MRN-0042" in details and "DOB 1967-03-02" in details


def test_missing_leads_are_labelled_not_invented(hr06000):
    keep = [i for i, n in enumerate(LEAD_ORDER) if n not in ("V3", "II")]
    partial = Record(hr06000.acquired_at, 500, hr06000.samples[keep], hr06000.missing[keep],
                     lead_names=tuple(LEAD_ORDER[i] for i in keep))
    _, labels = report._trace_ops(partial, report.layout("a4"), 210.0)
    absent = {name for name, _, _, gone in labels if gone}
    assert absent == {"V3", "II"}
    assert report.render_pdf(partial, None).startswith(b"%PDF-")


# --- the CLI -------------------------------------------------------------------------------


@pytest.mark.functional
def test_cli_report_rerenders_from_stored_files(hr06000, tmp_path, capsys):
    from device_agent.documents import ecgdata

    data = tmp_path / "ecg_data_20261127_093000.json"
    data.write_bytes(ecgdata.dumps(hr06000))
    details = tmp_path / "patient_details_20261127_093000.json"
    details.write_text(json.dumps(PATIENT))
    out = tmp_path / "out" / "report.pdf"
    out.parent.mkdir()
    argv = ["--debug", "--set", "REPORT_PAPER=letter",
            "report", "--input", str(data), "--patient", str(details), "--out", str(out)]
    assert main(argv) == 0
    pdf = out.read_bytes()
    assert pdf.startswith(b"%PDF-") and b"792 612" in pdf
    assert [p.name for p in out.parent.iterdir()] == ["report.pdf"]  # no temp file left
    captured = capsys.readouterr()  # main() logs to stderr through its own handler
    assert str(out) in captured.out
    assert "Testa" not in captured.err + captured.out
    assert "Synthetica" not in captured.err + captured.out


@pytest.mark.functional
def test_cli_report_names_the_bad_file(tmp_path, capsys):
    bad = tmp_path / "ecg_data_bad.json"
    bad.write_text("{not json")
    out = tmp_path / "x.pdf"
    argv = ["report", "--input", str(bad), "--out", str(out)]
    assert main(argv) == 1
    assert str(bad) in capsys.readouterr().err and not out.exists()
    assert main(["report", "--input", str(tmp_path / "absent.json"), "--out", str(out)]) == 1
    assert "absent.json" in capsys.readouterr().err


# --- a report a clinician trusts: display filter, rejected banner, marked spans ---------------


def test_the_display_filter_removes_baseline_wander_from_the_drawing_only(hr06000):
    """A 0.2 Hz, 1 mV wander (breathing): the 0.5 Hz filter takes it out of the drawing; the
    record keeps every sample raw, and the default 0.05 Hz filter leaves it (diagnostic)."""
    from dataclasses import replace

    t = np.arange(hr06000.n_samples) / hr06000.sampling_rate
    wander = np.rint(1000 * np.sin(2 * np.pi * 0.2 * t)).astype(np.int32)
    wavy = replace(hr06000, samples=hr06000.samples + wander)
    raw = np.where(wavy.missing, np.nan, wavy.samples.astype(float))
    clean = np.where(hr06000.missing, np.nan, hr06000.samples.astype(float))
    baseline, diagnostic = report.ReportStyle(highpass_hz=0.5), report.ReportStyle()
    core = slice(500, -500)  # away from the edges

    def centred(x: np.ndarray) -> np.ndarray:  # each trace is drawn centred on its median
        x = x[:, core]
        return x - np.median(x, axis=1, keepdims=True)

    # the filters are linear: what they do to the wander is the difference of the drawings
    removed = (report.display_filter(raw, 500, baseline)
               - report.display_filter(clean, 500, baseline))
    kept = (report.display_filter(raw, 500, diagnostic)
            - report.display_filter(clean, 500, diagnostic))
    assert np.max(np.abs(centred(removed))) < 60  # the 0.5 Hz filter takes the wander out
    assert np.max(np.abs(centred(kept) - centred(wander[None, :].astype(float)))) < 60
    assert np.array_equal(wavy.samples, hr06000.samples + wander), "the record is untouched"


def test_the_40_hz_filter_and_the_notch_are_named_in_the_footer():
    style = report.ReportStyle(highpass_hz=0.5, lowpass_hz=40.0, notch_hz=60.0)
    assert style.filter_text() == "0.5-40 Hz, 60 Hz notch"
    x = np.sin(2 * np.pi * 60 * np.arange(5000) / 500)[None, :] * 200
    assert np.max(np.abs(report.display_filter(x, 500, style)[:, 500:-500])) < 20  # > 90% off


def test_lost_samples_stay_lost_through_the_filter(hr06000):
    raw = np.where(hr06000.missing, np.nan, hr06000.samples.astype(float))
    raw[:, 2000:2100] = np.nan
    drawn = report.display_filter(raw, 500, report.ReportStyle())
    assert np.all(np.isnan(drawn[:, 2000:2100])) and not np.isnan(drawn[:, 1990]).any()


@pytest.mark.functional
@needs_poppler
def test_a_rejected_capture_carries_a_banner_and_marked_spans(hr06000, tmp_path):
    from dataclasses import replace

    missing = hr06000.missing.copy()
    missing[:, 600:800] = True  # 0.4 s lost in column 0
    reasons = ("lost 200 of 5000 samples (4.00%), over the 0.50% allowed",
               "electrode LA off for 2.00 s")
    quality = Quality(frames_expected=5000, frames_received=4800, frames_lost=200,
                      electrodes_off=(ElectrodeOff("LA", 2000, 1000),), verdict="rejected",
                      reasons=reasons)
    bad = replace(hr06000, missing=missing, samples=np.where(missing, 0, hr06000.samples),
                  quality=quality)
    pdf = report.render_pdf(bad, PATIENT)
    text = _text(pdf, tmp_path)
    assert "REJECTED CAPTURE - NOT FOR DIAGNOSIS" in text.replace("\n", " ")
    assert "Quality: rejected" in text and reasons[1] in text
    marks = report.marked_spans(bad, report.layout("a4"))
    lost = [m for m in marks if m[0] == "lost"]
    off = [m for m in marks if m[0] == "off"]
    # 0.4 s lost at 25 mm/s: a 10 mm band on I, II, III (column 0) and the rhythm strip
    assert len(lost) == 4 and {round(m[2] - m[1], 1) for m in lost} == {10.0}
    # LA off 4-6 s: it feeds aVR, aVL, aVF, shown 2.5-5 s (column 1): 1 s = 25 mm each;
    # I and III are shown 0-2.5 s, and lead II does not use LA
    geo = report.layout("a4")
    assert len(off) == 3 and {round(m[2] - m[1], 1) for m in off} == {25.0}
    assert {m[3] for m in off} == set(geo["baselines_mm"][:3])
