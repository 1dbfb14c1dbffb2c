"""Read WFDB records (format 16) with numpy alone: the simulator's and the tests' source."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from device_agent.record import LEAD_ORDER, DeviceInfo, Record

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
                return self.signals_uv[i]
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
            signals[row_of[index]] = (raw[column].astype(np.float64) - baseline) / gain * scale
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
    """A WFDB recording (or its path) as a 12-lead Record: LEAD_ORDER, int32 uV, none missing.

    `seconds` keeps the first seconds; `rate` FFT-resamples to that rate; `acquired_at`
    defaults to now (UTC).
    """
    src = source if isinstance(source, WfdbRecord) else read_record(source)
    fs = int(src.sampling_rate)
    n = None if seconds is None else int(seconds * fs)
    rows = np.stack([src.lead(name)[:n] for name in LEAD_ORDER])
    if rate is not None and rate != fs:
        n_out = round(rows.shape[1] * rate / fs)
        spectrum = np.fft.rfft(rows, axis=1)[:, : n_out // 2 + 1]
        rows = np.fft.irfft(spectrum, n_out, axis=1) * (n_out / rows.shape[1])
        fs = rate
    samples = np.rint(rows).astype(np.int32)
    return Record(
        acquired_at=acquired_at if acquired_at is not None else datetime.now(UTC),
        sampling_rate=fs,
        samples=samples,
        missing=np.zeros(samples.shape, dtype=bool),
        record_id=record_id,
        device=device if device is not None else DeviceInfo(),
    )
