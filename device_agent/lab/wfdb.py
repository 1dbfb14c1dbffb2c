"""Read and write WFDB records (format 16) with numpy alone: the simulator's and the tests'
source, and an export format for research tools.

A sample stored as -32768 is WFDB's invalid value: it reads as NaN, and a Record built
from it marks the sample lost. The writer stores a Record exactly: 1 ADC unit per uV
(gain 1000/mV) and a per-lead baseline that centres the lead when its received samples
would not otherwise fit -32767..32767; only a lead spanning more than 65534 uV is stored in
coarser whole-uV steps (the gain says which).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from device_agent.fsutil import atomic_write
from device_agent.record import LEAD_ORDER, DeviceInfo, Record

INVALID = -32768  # WFDB's invalid-sample value in format 16
_LIMIT = 32767
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

_GAIN_RE = re.compile(r"^(?P<gain>[-+0-9.eE]+)(?:\((?P<baseline>[-+0-9]+)\))?(?:/(?P<units>\S+))?$")


@dataclass(frozen=True)
class WfdbRecord:
    """Physical signals in microvolts (float64, shape (n_leads, n_samples)) and their names."""

    name: str
    sampling_rate: float
    lead_names: tuple[str, ...]
    signals_uv: np.ndarray
    comments: tuple[str, ...]

    def lead(self, name: str) -> np.ndarray:
        """A lead by its standard name (case-insensitive: PTB spells them `ii`, `avr`)."""
        wanted = name.lower()
        for i, lead in enumerate(self.lead_names):
            if lead.lower() == wanted:
                row: np.ndarray = self.signals_uv[i]
                return row
        raise KeyError(f"lead {name} not in record {self.name} ({', '.join(self.lead_names)})")


def _header_path(path: Path | str) -> Path:
    path = Path(path)
    return path if path.suffix == ".hea" else path.with_name(path.name + ".hea")


def read_record(path: Path | str) -> WfdbRecord:
    """Read a record by its `.hea` path or stem (`.../HR06000`)."""
    hea = _header_path(path)
    lines = hea.read_text(encoding="utf-8").splitlines()
    comments = tuple(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    body = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    name, n_sig, fs, n_samples = body[0][0], int(body[0][1]), float(body[0][2]), int(body[0][3])
    specs = body[1 : 1 + n_sig]

    files: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        if spec[1] != "16":
            raise ValueError(f"{hea}: signal {index} is WFDB format {spec[1]}; only 16 is read")
        files.setdefault(spec[0], []).append(index)

    # Signals whose data file is absent (s0010_re ships without its Frank-lead .xyz) are
    # left out; the 12 standard leads are all the board and the tests use.
    present = {f: idx for f, idx in files.items() if hea.with_name(f).exists()}
    if not present:
        raise FileNotFoundError(f"{hea}: none of its data files {sorted(files)} exist")
    kept = sorted(i for idx in present.values() for i in idx)
    row_of = {index: row for row, index in enumerate(kept)}
    signals = np.empty((len(kept), n_samples), dtype=np.float64)
    names = [specs[index][-1] for index in kept]
    for filename, indices in present.items():
        raw = np.fromfile(hea.with_name(filename), dtype="<i2")
        raw = raw[: n_samples * len(indices)].reshape(-1, len(indices)).T
        for column, index in enumerate(indices):
            spec = specs[index]
            match = _GAIN_RE.match(spec[2])
            if not match:
                raise ValueError(f"{hea}: cannot read gain field {spec[2]!r}")
            gain = float(match["gain"]) or 200.0
            adc_zero = int(spec[4]) if len(spec) > 4 else 0
            baseline = int(match["baseline"]) if match["baseline"] is not None else adc_zero
            units = (match["units"] or "mV").lower()
            scale = {"mv": 1000.0, "uv": 1.0, "v": 1e6}.get(units, 1000.0)
            row = (raw[column].astype(np.float64) - baseline) / gain * scale
            row[raw[column] == INVALID] = np.nan
            signals[row_of[index]] = row
    return WfdbRecord(name, fs, tuple(names), signals, comments)


def to_record(
    source: WfdbRecord | Path | str,
    *,
    seconds: float | None = None,
    rate: int | None = None,
    acquired_at: datetime | None = None,
    record_id: str | None = None,
    device: DeviceInfo | None = None,
) -> Record:
    """A WFDB recording (or its path) as a 12-lead Record: LEAD_ORDER, int32 uV.

    Invalid (NaN) samples become lost ones (value 0, `missing`). `seconds` keeps the first
    seconds; `rate` FFT-resamples to that rate (lost samples count as 0 there, and a
    resampled sample is lost where its nearest source sample was); `acquired_at` defaults
    to now (UTC).
    """
    src = source if isinstance(source, WfdbRecord) else read_record(source)
    fs = int(src.sampling_rate)
    n = None if seconds is None else int(seconds * fs)
    rows = np.stack([src.lead(name)[:n] for name in LEAD_ORDER])
    missing = np.isnan(rows)
    rows = np.where(missing, 0.0, rows)
    if rate is not None and rate != fs:
        n_in = rows.shape[1]
        n_out = round(n_in * rate / fs)
        spectrum = np.fft.rfft(rows, axis=1)[:, : n_out // 2 + 1]
        rows = np.fft.irfft(spectrum, n_out, axis=1) * (n_out / n_in)
        nearest = np.minimum(np.rint(np.arange(n_out) * (n_in / n_out)).astype(np.intp), n_in - 1)
        missing = missing[:, nearest]
        rows[missing] = 0.0
        fs = rate
    samples = np.rint(rows).astype(np.int32)
    return Record(
        acquired_at=acquired_at if acquired_at is not None else datetime.now(UTC),
        sampling_rate=fs,
        samples=samples,
        missing=missing,
        record_id=record_id,
        device=device if device is not None else DeviceInfo(),
    )


def encode_record(record: Record, name: str) -> tuple[bytes, bytes]:
    """(header text, format-16 data) for a Record saved as WFDB record `name` (pure)."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"WFDB record name {name!r} must be letters, digits, _ . - (no spaces or slashes)"
        )
    stored, step, baseline = _store(record.samples, record.missing)
    data = np.ascontiguousarray(stored.T, dtype="<i2").tobytes()
    at = record.acquired_at
    lines = [
        f"{name} {len(record.lead_names)} {record.sampling_rate} {record.n_samples} "
        f"{at.strftime('%H:%M:%S')} {at.strftime('%d/%m/%Y')}"
    ]
    checksums = stored.astype(np.int64).sum(axis=1)
    first = stored[:, 0] if record.n_samples else np.zeros(len(record.lead_names), np.int16)
    for i, lead in enumerate(record.lead_names):
        gain = repr(1000.0 / float(step[i])).removesuffix(".0")  # repr round-trips
        checksum = (int(checksums[i]) + 32768) % 65536 - 32768  # 16-bit signed, as WFDB sums
        lines.append(f"{name}.dat 16 {gain}({int(baseline[i])})/mV 16 0 {int(first[i])} "
                     f"{checksum} 0 {lead}")
    lines.append(f"# acquired_at: {at.isoformat()}")
    if record.record_id:
        lines.append(f"# record_id: {record.record_id}")
    lines.append(f"# device: {record.device.serial} {record.device.model}")
    if bool(record.missing.any()):
        lines.append(f"# lost samples: {int(record.missing.sum())}, stored as {INVALID}")
    return ("\n".join(lines) + "\n").encode("utf-8"), data


def write_record(record: Record, stem: Path | str) -> tuple[Path, Path]:
    """Write `stem.hea` and `stem.dat` (data first, header last); returns both paths."""
    stem = Path(stem)
    header, data = encode_record(record, stem.name)
    hea, dat = stem.with_name(stem.name + ".hea"), stem.with_name(stem.name + ".dat")
    atomic_write(dat, data)
    atomic_write(hea, header)
    return hea, dat


def _store(samples: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 stored (leads, n), uV per ADC unit, baseline in ADC units) per lead.

    stored = (uV - centre) / step, baseline = -centre / step, so (stored - baseline) * step
    is the sample again; centre is 0 whenever the lead fits int16 as it is.
    """
    wide = samples.astype(np.int64)
    present = ~missing
    top, bottom = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    hi = np.where(present, wide, bottom).max(axis=1, initial=bottom)
    lo = np.where(present, wide, top).min(axis=1, initial=top)
    empty = ~present.any(axis=1)
    hi[empty], lo[empty] = 0, 0
    fits = (hi <= _LIMIT) & (lo >= -_LIMIT)
    span = hi - lo
    # centring alone fits a span of 2 * 32767; past that, steps with room for the rounding
    step = np.where(span <= 2 * _LIMIT, 1, -(-span // (2 * _LIMIT - 4)))
    centre = np.where(fits, 0, (hi + lo) // 2)
    centre -= centre % step  # a whole number of steps, so the baseline is an integer
    shifted = wide - centre[:, None]
    s = step[:, None]
    stored = np.sign(shifted) * ((np.abs(shifted) + s // 2) // s)
    stored = np.where(missing, INVALID, stored).astype(np.int16)
    return stored, step, -centre // step
