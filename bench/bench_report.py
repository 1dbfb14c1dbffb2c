"""12-lead PDF report: `pdf.render_pdf` vs per-point reportlab drawing and vs matplotlib.

Run as `python bench/bench_report.py`; `run()` returns the rows for bench/run_all.py.
All three draw the same page (A4 landscape, 1/5 mm grid, 12 x 2.5 s windows + 10 s rhythm
strip, calibration pulses, labels) from the same record (HR06000, 12 x 5000 samples):
- per-point: reportlab path objects fed one `lineTo` per sample and one `line` per grid
  line, with the same flate-only page streams as ours, so the ratio is the path building;
- matplotlib: one figure in mm coordinates, `vlines`/`hlines` grid, `plot` per trace
  (NaN breaks), `savefig(format="pdf")` (matplotlib compresses its streams too). Its
  default `path.simplify` drops points closer than a fraction of a pixel, so its file is
  smaller (48 KB; 110 KB with every point kept); ours keeps every sample.
Times are medians of repeated runs in one process; ratio = baseline / ours.
"""

from __future__ import annotations

import io
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import median_s, print_rows  # noqa: E402

from device_agent.core.record import Record  # noqa: E402
from device_agent.documents import pdf  # noqa: E402
from device_agent.lab.wfdb import to_record  # noqa: E402

DATA = REPO / "tests" / "data" / "ecg"
PATIENT = {"first_name": "Bench", "last_name": "Synthetic", "age": 59, "gender": "Female"}


def real_record(name: str = "HR06000", seconds: float = 10.0) -> Record:
    """The first `seconds` of a real WFDB recording as a Record (uV, LEAD_ORDER)."""
    return to_record(DATA / name, seconds=seconds, record_id=f"bench-{name}",
                     acquired_at=datetime(2026, 11, 27, 9, 30, tzinfo=timezone(timedelta(hours=1))))


def _traces(record: Record) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x_mm, y_mm) of the 13 traces, laid out as render_pdf lays them."""
    geo = pdf.layout("a4")
    fs = record.sampling_rate
    per = round(pdf.WINDOW_S * fs)
    out = []
    jobs = [(name, k * per, per, geo["trace_x0_mm"] + k * 62.5, geo["baselines_mm"][r])
            for k, col in enumerate(pdf.COLUMNS) for r, name in enumerate(col)]
    jobs.append((pdf.RHYTHM_LEAD, 0, 4 * per, geo["trace_x0_mm"], geo["baselines_mm"][3]))
    for name, first, count, x0, base in jobs:
        seg = record.lead(name)[first : first + count]
        seg = seg - np.nanmedian(seg)
        out.append((x0 + np.arange(seg.size) * pdf.SPEED_MM_S / fs, base + seg / 100.0))
    return out


def _grid_lines() -> list[tuple[float, float, float, float, bool]]:
    x0, y0, w, h = pdf.layout("a4")["grid_mm"]
    lines = [(x0 + i, y0, x0 + i, y0 + h, i % 5 == 0) for i in range(int(w) + 1)]
    lines += [(x0, y0 + j, x0 + w, y0 + j, j % 5 == 0) for j in range(int(h) + 1)]
    return lines


def per_point_pdf(record: Record) -> bytes:
    """The same page drawn the usual reportlab way: one Python call per point and line."""
    from reportlab.pdfgen.canvas import Canvas

    mm = pdf.PT_PER_MM
    buf = io.BytesIO()
    c = Canvas(buf, pagesize=(297 * mm, 210 * mm), pageCompression=1, invariant=1)
    (minor_rgb, major_rgb) = pdf.GRID_COLOURS["red"]
    for major in (False, True):
        c.setStrokeColorRGB(*(major_rgb if major else minor_rgb))
        c.setLineWidth((pdf.MAJOR_W_MM if major else pdf.MINOR_W_MM) * mm)
        for x1, y1, x2, y2, is_major in _grid_lines():
            if is_major == major:
                c.line(x1 * mm, y1 * mm, x2 * mm, y2 * mm)
    c.setStrokeColorRGB(0, 0, 0)
    c.setLineWidth(pdf.TRACE_W_MM * mm)
    path = c.beginPath()
    for xs, ys in _traces(record):
        pen_up = True
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            if y != y:  # NaN: lift the pen
                pen_up = True
            elif pen_up:
                path.moveTo(x * mm, y * mm)
                pen_up = False
            else:
                path.lineTo(x * mm, y * mm)
    c.drawPath(path, stroke=1, fill=0)
    c.setFont("Helvetica", 9)
    for name, x, base, _ in pdf._trace_ops(record, pdf.layout("a4"), 210.0)[1]:
        c.drawString((x + 1.5) * mm, (base + 15) * mm, name)
    c.showPage()
    with pdf._binary_streams():
        c.save()
    return buf.getvalue()


def matplotlib_pdf(record: Record) -> bytes:
    """The same page with matplotlib, in mm coordinates on an A4 landscape figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig = plt.figure(figsize=(297 / 25.4, 210 / 25.4))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 297)
    ax.set_ylim(0, 210)
    ax.axis("off")
    x0, y0, w, h = pdf.layout("a4")["grid_mm"]
    minor_rgb, major_rgb = pdf.GRID_COLOURS["red"]
    pt = 72 / 25.4
    for major, rgb, lw in ((False, minor_rgb, pdf.MINOR_W_MM),
                           (True, major_rgb, pdf.MAJOR_W_MM)):
        xs = [x0 + i for i in range(int(w) + 1) if (i % 5 == 0) == major]
        ys = [y0 + j for j in range(int(h) + 1) if (j % 5 == 0) == major]
        ax.vlines(xs, y0, y0 + h, colors=[rgb], linewidths=lw * pt)
        ax.hlines(ys, x0, x0 + w, colors=[rgb], linewidths=lw * pt)
    for xs, ys in _traces(record):
        ax.plot(xs, ys, color="black", linewidth=pdf.TRACE_W_MM * pt)
    for name, x, base, _ in pdf._trace_ops(record, pdf.layout("a4"), 210.0)[1]:
        ax.text(x + 1.5, base + 15, name, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf")
    plt.close(fig)
    return buf.getvalue()


def _row(metric: str, value: float, baseline: float | None, note: str) -> dict:
    ratio = round(baseline / value, 2) if baseline else None
    return {"benchmark": "report", "metric": metric, "value": round(value, 2),
            "baseline": None if baseline is None else round(baseline, 2), "ratio": ratio,
            "note": note}


def run(repeats: int = 15) -> list[dict]:
    """Median render times (ms) and file sizes (KB) of ours and both baselines."""
    record = real_record()
    ours = pdf.render_pdf(record, PATIENT)
    t_ours = median_s(lambda: pdf.render_pdf(record, PATIENT), repeats) * 1000
    t_point = median_s(lambda: per_point_pdf(record), repeats) * 1000
    rows = [_row("render ms (vs reportlab lineTo per point)", t_ours, t_point,
                 f"12 x 5000 samples, {len(per_point_pdf(record)) / 1024:.0f} KB per-point")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        rows.append({"benchmark": "report", "metric": "render vs matplotlib", "value": None,
                     "baseline": None, "ratio": None, "note": "matplotlib not installed"})
        mpl_size = None
    else:
        t_mpl = median_s(lambda: matplotlib_pdf(record), max(3, repeats // 3)) * 1000
        rows.append(_row("render ms (vs matplotlib savefig pdf)", t_ours, t_mpl,
                         "target ratio >= 3"))
        mpl_size = len(matplotlib_pdf(record)) / 1024
    rows.append(_row("PDF KB (vs matplotlib)", len(ours) / 1024, mpl_size,
                     "target < 120 KB at 500 Hz; matplotlib drops points (path.simplify)"))
    fast = real_record("s0010_re")  # 1000 Hz: twice the points
    t_fast = median_s(lambda: pdf.render_pdf(fast, PATIENT), repeats) * 1000
    rows.append(_row("render ms, 10 s at 1000 Hz (s0010_re)", t_fast, None,
                     f"{len(pdf.render_pdf(fast, PATIENT)) / 1024:.0f} KB"))
    return rows


if __name__ == "__main__":
    print_rows(run())
